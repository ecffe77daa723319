"""Photos in: the VAE's view of an RGB photo (shorter side to S, centre S x S) and the decoding of a list of
photo files into one uint8 tensor, through the indexing pipeline's own reader (:mod:`indexer.extract`, which
reads, validates and converts to RGB with :mod:`indexer.images`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms

from indexer.encoders.fused import FusedResizeCrop
from indexer.extract import iter_batches
from indexer.images import ImageError
from indexer.models.vae.config import VAEError, check_image_size

_LOAD_BATCH = 32
_TENSORS = "vae"  # the name of the one transform load_images gives the reader


def _rgb_only(img: Image.Image) -> Image.Image:
    """The photo readers (``indexer.images.load_image`` / ``decode_image``) give RGB; converting is theirs alone."""
    if img.mode != "RGB":
        raise VAEError(f"the VAE takes RGB images (indexer.images.load_image gives them), got mode {img.mode}")
    return img


def _geometry(image_size: int) -> list[Callable[[Any], Any]]:
    # Shorter side to S, then the central S x S: keeps the aspect ratio and the (usually centred) animal.
    return [
        _rgb_only,
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
    ]


class VAEResizeCrop(FusedResizeCrop):
    """The VAE's view of an RGB photo in one step (indexer/encoders/fused.py): the numbers of ``Resize(S)``,
    ``CenterCrop(S)``, ``ToTensor`` up to one 8-bit level on a few values, in under half the time (a pets photo:
    0.30 instead of 0.68 ms), as a ``(3, S, S)`` view of channel-last memory, the layout the VAE runs in. The
    decode threads share the cores with the models, so this is time the forward passes get back."""

    def __init__(self, image_size: int) -> None:
        check_image_size(image_size)
        super().__init__(image_size, (image_size, image_size), Image.Resampling.BICUBIC, (0.0, 0.0, 0.0),
                         (1.0, 1.0, 1.0), transforms.Compose([*_geometry(image_size), transforms.ToTensor()]))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return super().__call__(_rgb_only(img))

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """The same view as uint8 ``(3, S, S)`` (what training keeps in memory); the crop, the resized shorter
        side, always fits."""
        return super().pixels(_rgb_only(img))


def vae_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> float tensor ``(3, S, S)`` in [0, 1] (shorter side resized to S, centre crop). Picklable.

    Raises ``VAEError`` for an image of another mode: read photos with ``indexer.images``, which converts.
    """
    return VAEResizeCrop(image_size)


def load_images(paths: Sequence[str], image_size: int, *, workers: int = 1) -> torch.Tensor:
    """Decode every photo once into one uint8 tensor ``(N, 3, S, S)`` (1,140 photos at 64 px are 14 MB).

    Training then never touches the disk or the JPEG decoder again. The photos are read as the indexer reads them
    (:func:`indexer.extract.iter_batches`), in ``workers`` decode processes (0: decode in this process). Raises
    ``ImageError`` naming the first file that cannot be read.
    """
    check_image_size(image_size)
    paths = [str(p) for p in paths]
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    if not paths:
        return out
    uint8 = VAEResizeCrop(image_size).pixels  # the pixels vae_transform scales: training sees what indexing sees
    for batch in iter_batches(paths, {_TENSORS: uint8}, batch_size=_LOAD_BATCH, workers=max(0, workers)):
        for r in batch.results:
            if r.status != "ok":  # no known ids are given, so anything else is an error
                raise ImageError(r.path, r.reason)
        out[[r.index for r in batch.ok]] = batch.tensors[_TENSORS]
    return out
