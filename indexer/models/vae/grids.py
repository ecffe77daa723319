"""PNG grids of a trained VAE: reconstructions under their originals, and samples from the prior."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid

from indexer.models.vae.config import VAEError
from indexer.models.vae.model import ConvVAE, as_float_images, decode_latents, encode_images, to_pil
from indexer.store.atomic import atomic_write

_GRID_PADDING = 2


def _save_png(grid: torch.Tensor, path: Path) -> None:
    img = to_pil(grid)[0]
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_reconstruction_grid(model: ConvVAE, images: torch.Tensor, path: Path, n: int = 16) -> None:
    """PNG of the first n images (top row) over their reconstructions (bottom row), with 2 px padding."""
    x = as_float_images(images, model.image_size)[:n]
    if len(x) == 0:
        raise VAEError("no images to reconstruct")
    recon = decode_latents(model, encode_images(model, x))
    _save_png(make_grid(torch.cat([x, recon]), nrow=len(x), padding=_GRID_PADDING), path)


def save_sample_grid(model: ConvVAE, path: Path, n: int = 64, seed: int = 0) -> None:
    """PNG of n decodes of z ~ N(0, I) (seeded), in a near-square grid (8 x 8 for 64), 2 px padding."""
    if n < 1:
        raise VAEError(f"n must be at least 1, got {n}")
    z = torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(seed))
    nrow = math.ceil(math.sqrt(n))
    _save_png(make_grid(decode_latents(model, z), nrow=nrow, padding=_GRID_PADDING), path)
