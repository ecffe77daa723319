"""One fused step for the common preprocessing ``[RGB], Resize(short side), CenterCrop, [RGB], ToTensor,
Normalize``: the numbers of the torchvision ``Compose`` up to 8-bit rounding, for a quarter of its time (per pets
photo on one core, 2026-12-04: Compose 1.9 ms, this step 0.44 ms with PyTorch's resize and 1.04 ms with Pillow's;
decoding the JPEG takes 0.38 ms).

Decoding threads share the machine's cores with the forward pass, so every millisecond they spend per photo is
taken from the model (issue 11: on 2 cores the whole indexing run reached 0.63-0.75x the bare forward rate). Three
things made the torchvision steps slow:

- Pillow's resampling is plain C, one pixel at a time. On a CPU with AVX2 the resize runs in PyTorch's uint8
  antialiased kernel instead (a vectorised port of Pillow's algorithm, same filters, same fixed-point
  arithmetic): 0.3 instead of 0.9 ms for a pets photo. Its rounding differs from Pillow's on a few values: at
  most 2 of 255 grey levels, on 0.37% of the values of the pets photos (embeddings agree to cosine >= 0.9999).
  It computes the whole resized image; the crop is a view of it.
- Elsewhere (no AVX2: ARM, old x86), where that kernel falls back to slow generic code, Pillow resizes, and
  ``resize(box=...)`` computes only the crop (torchvision's ``Resize`` computed every pixel and ``CenterCrop``
  threw a quarter away: 500x375 -> 341x256 -> 224x224), from the same source pixels, outside the box included,
  at the same scale. Pillow reads the box as 32-bit floats, so an 8-bit rounding flips now and then: at most 2
  of 255 grey levels apart, on 0.03% of the values of the pets photos on average
  (:meth:`FusedResizeCrop._pillow_resize_crop`).
- ``ToTensor`` + ``Normalize`` made three float passes over a channel-first copy. Here one pass converts the
  uint8 pixels where they lie (height, width, channel) and scales them (one NumPy multiply from uint8 straight
  to float32 against a whole row's per-channel factors, so no size-3 broadcast), a second pass shifts them in
  place; the result is returned as a ``(3, H, W)`` view of that channel-last memory, which is the layout
  convolutional encoders run in, so the batch needs no NCHW -> NHWC copy on the model's thread either
  (:func:`indexer.extract.collate`).

Anything that does not match the pattern exactly (a ``Resize`` to a fixed (h, w); ``max_size``; other steps)
keeps the ``Compose`` as it is; a photo whose resize is smaller than the crop (torchvision pads it) goes to the
``Compose``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize, ToTensor

__all__ = ["FusedResizeCrop", "fuse_preprocess"]

# Half-width of Pillow's filters, in source pixels at scale 1.
_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0}
_RESAMPLE = {InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}
_TORCH_MODE = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def torch_resizes_fast() -> bool:
    """Whether PyTorch's uint8 antialiased resize runs its vectorised kernel here (x86 with AVX2 or AVX-512)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


def _is_rgb_step(step: Any) -> bool:
    """EnsureRGB, open_clip's ``_convert_to_rgb`` and the like: a mode conversion to RGB, nothing else."""
    name = getattr(step, "__name__", type(step).__name__)
    if name == "MaybeConvertMode":  # open_clip's, after the crop; the indexer's photos are RGB by then anyway
        return getattr(step, "mode", None) == "RGB"
    return name in ("EnsureRGB", "_convert_to_rgb", "convert_to_rgb")


def _is_to_tensor(step: Any) -> bool:
    # timm's MaybeToTensor is ToTensor for PIL images.
    return isinstance(step, ToTensor) or type(step).__name__ == "MaybeToTensor"


def _single(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, Sequence) and len(size) == 1 and isinstance(size[0], int):
        return int(size[0])
    return None


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, Sequence) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


class FusedResizeCrop:
    """``Resize(short)`` + ``CenterCrop(crop)`` + ``ToTensor`` + ``Normalize(mean, std)`` of an RGB image in one
    step, as a ``(3, H, W)`` float32 view of channel-last memory (the module docstring says how close it is).
    ``fallback`` (the original ``Compose``) handles what this step does not: a crop larger than the resize."""

    def __init__(self, short: int, crop: tuple[int, int], resample: Image.Resampling, mean: Sequence[float],
                 std: Sequence[float], fallback: Callable[[Image.Image], torch.Tensor], *,
                 channels_last: bool = True, torch_resize: bool | None = None) -> None:
        self.short, self.crop, self.resample, self.fallback = short, crop, resample, fallback
        self.channels_last = channels_last
        # Decided once, where the step is built (a decode process or Ray worker rebuilds it from a pickle with
        # the choice made: the same pixels on every worker of a run).
        self.torch_resize = torch_resizes_fast() if torch_resize is None else torch_resize
        m = np.asarray(mean, dtype=np.float64)
        s = np.asarray(std, dtype=np.float64)
        # (u / 255 - m) / s = u * scale - shift, per channel (the last axis of the HWC pixels).
        self.scale = torch.from_numpy((1.0 / (255.0 * s)).astype(np.float32))
        self.shift = torch.from_numpy((m / s).astype(np.float32))
        # The same factors laid out along one channel-last row of the crop (R, G, B, R, G, B, ...): NumPy then
        # broadcasts over rows, which runs 8x faster than over a last axis of 3 and does the same float32 ops.
        self._row_scale = np.tile(self.scale.numpy(), crop[1])
        self._row_shift = np.tile(self.shift.numpy(), crop[1])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":  # before the fallback too, which may have no RGB step of its own
            img = img.convert("RGB")
        out = self.cropped(img)
        if out is None:
            return self.fallback(img)  # torchvision pads here
        h, w = self.crop
        # A (h, w, 3) view whose rows may be strided: each row's w * 3 values are contiguous, so this is a view.
        rows = np.multiply(out.reshape(h, w * 3), self._row_scale, dtype=np.float32)
        rows -= self._row_shift
        chw = torch.from_numpy(rows.reshape(h, w, 3)).permute(2, 0, 1)
        # A model that runs in NCHW gets NCHW here, in the decode thread, rather than a copy on its own thread.
        return chw if self.channels_last else chw.contiguous()

    def cropped(self, img: Image.Image) -> np.ndarray | None:
        """The resized and centre-cropped RGB photo as ``(H, W, 3)`` uint8 pixels (possibly a view with strided
        rows), or None where the crop is larger than the resized photo."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        # torchvision's Resize(int) on a PIL image: the shorter side becomes `short`, the longer one is truncated.
        if w <= h:
            rw, rh = self.short, int(self.short * h / w)
        else:
            rw, rh = int(self.short * w / h), self.short
        ch, cw = self.crop
        if ch > rh or cw > rw:
            return None
        # torchvision's center_crop offsets, in the resized image, mapped back to source pixels.
        top, left = round((rh - ch) / 2.0), round((rw - cw) / 2.0)
        if (rw, rh) == (w, h):
            return np.asarray(img)[top:top + ch, left:left + cw]
        if self.torch_resize:
            return self._torch_resize_crop(img, left, top, rw, rh)
        return np.asarray(self._pillow_resize_crop(img, left, top, rw, rh))

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """:meth:`cropped` as a uint8 ``(3, H, W)`` tensor (a view of a channel-last copy), for a consumer that
        keeps or ships pixels (the Ray engine's decode stage, the VAE's training set); only for photos whose crop
        fits the resize (``ValueError`` otherwise: :meth:`__call__` pads those through the fallback)."""
        out = self.cropped(img)
        if out is None:
            raise ValueError(f"the {self.crop} crop is larger than the {self.short} px resize of a {img.size} photo")
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` pixels of :meth:`cropped` photos -> the float32 batch ``__call__`` gives, bit for
        bit (the same two operations, per channel), for a consumer that receives pixels (the Ray engine)."""
        x = pixels.to(torch.float32)
        x.mul_(self.scale[:, None, None]).sub_(self.shift[:, None, None])
        return x

    def _torch_resize_crop(self, img: Image.Image, left: int, top: int, rw: int, rh: int) -> np.ndarray:
        """``img`` resized to ``(rw, rh)`` by PyTorch's uint8 antialiased kernel, and the crop at ``(left, top)``
        as a view of it."""
        ch, cw = self.crop
        w, h = img.size
        hwc = torch.from_numpy(np.array(img))  # a writable copy: torch refuses read-only NumPy memory
        # (1, 3, h, w) in channels-last strides, with a batch stride the kernel recognises as channels-last (a
        # plain [None] gives stride 3 there, and the kernel then returns NCHW at the price of a transpose).
        x = hwc.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))
        y = torch.nn.functional.interpolate(x, size=(rh, rw), mode=_TORCH_MODE[self.resample], antialias=True)
        return y[0, :, top:top + ch, left:left + cw].permute(1, 2, 0).numpy()

    def _pillow_resize_crop(self, img: Image.Image, left: int, top: int, rw: int, rh: int) -> Image.Image:
        """The ``crop``-sized window at ``(left, top)`` of ``img`` resized to ``(rw, rh)``, computing only that
        window, in the full resize's two passes: horizontal (over the source rows the vertical pass reads), then
        vertical. Pillow's ``box`` takes the filter taps from the same source pixels as the full resize, outside
        the box included.

        Not bit for bit: Pillow reads ``box`` as 32-bit floats, which moves the taps by a little, and an 8-bit
        rounding then flips now and then. Two calls keep the offsets small (one call with the whole box: up to
        10 levels apart on 3% of the values); on the 1,140 pets photos at most 2 of 255 levels differ, on 0.03%
        of the values on average (tests/test_fused_preprocess.py). The bit-exact alternative (whole-image passes,
        cropped between them) saved a tenth of the time instead of a third."""
        ch, cw = self.crop
        w, h = img.size
        sx, sy = w / rw, h / rh
        x0, y0 = left * sx, top * sy
        # The source rows the vertical pass reads: the filter's reach, widened by the scale when shrinking.
        reach = _SUPPORT[self.resample] * max(sy, 1.0) + 2.0
        r0 = max(0, math.floor(y0 - reach))
        r1 = min(h, math.ceil(y0 + ch * sy + reach))
        across = img.crop((0, r0, w, r1)).resize((cw, r1 - r0), self.resample, box=(x0, 0.0, x0 + cw * sx, r1 - r0))
        return across.resize((cw, ch), self.resample, box=(0.0, y0 - r0, cw, y0 - r0 + ch * sy))

    def __repr__(self) -> str:
        mean = (self.shift / self.scale / 255.0).tolist()
        std = (1.0 / (self.scale * 255.0)).tolist()
        return (f"{type(self).__name__}(short={self.short}, crop={self.crop}, resample={self.resample.name}, "
                f"mean={[round(m, 4) for m in mean]}, std={[round(s, 4) for s in std]}, "
                f"resize={'torch' if self.torch_resize else 'pillow'})")


def fuse_preprocess(transform: Any, memory_format: torch.memory_format = torch.channels_last
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """A :class:`FusedResizeCrop` equivalent to ``transform`` when it is ``[RGB], Resize(int), CenterCrop, [RGB],
    ToTensor, Normalize`` (bicubic or bilinear, antialiased, no ``max_size``); otherwise ``transform`` itself.
    ``memory_format``: the model's layout; channels-last gets channel-last views (module docstring)."""
    steps = [s for s in getattr(transform, "transforms", [transform]) if not _is_rgb_step(s)]
    if len(steps) != 4:
        return transform
    resize, crop, to_tensor, norm = steps
    if not (isinstance(resize, Resize) and isinstance(crop, CenterCrop) and _is_to_tensor(to_tensor)
            and isinstance(norm, Normalize)):
        return transform
    short, size = _single(resize.size), _pair(crop.size)
    resample = _RESAMPLE.get(resize.interpolation)
    if short is None or size is None or resample is None or resize.max_size is not None:
        return transform
    if resize.antialias is False or norm.inplace or len(norm.mean) != 3 or len(norm.std) != 3:
        return transform
    return FusedResizeCrop(short, size, resample, norm.mean, norm.std, transform,
                           channels_last=memory_format == torch.channels_last)
