"""What every encoder family shares: the :class:`Encoder` record, its error type, device resolution, RGB conversion,
the preprocessing description the manifest records, and the probe that measures the output width.

Family modules (``efficientnet``, ``openclip``, ``timm_models``) import only this module; the registry imports them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.encoders.fused import fuse_preprocess

_SAMPLE_SIZE = 8  # how many known names an error message lists


class EncoderError(ValueError):
    """A user-fixable problem with an encoder name, checkpoint or config (shown as one line, exit code 2)."""


@dataclass
class Encoder:
    """A resolved encoder.

    ``model`` maps a preprocessed batch ``(B, 3, H, W)`` to pooled features ``(B, dim)`` (not yet L2-normalised;
    the extractor normalises).  ``preprocess`` maps one RGB PIL image to a ``(3, H, W)`` float tensor and must be
    picklable, because other processes (Ray workers) run it.
    """

    name: str  # the registry name the user typed, e.g. "efficientnet-lite0" or "open_clip:ViT-B-32/laion2b_s34b_b79k"
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    dim: int
    weights_sha256: str  # sha256 of the weight file(s) actually loaded; "" only where none exist
    preprocessing: dict[str, Any] = field(default_factory=dict)  # JSON-able description recorded in the manifest
    # Text tower for open_clip stores (prompt search); None for image-only encoders.
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    # Layout the model runs in (and its batches are converted to): channels-last for CNNs (pick_memory_format).
    memory_format: torch.memory_format = torch.contiguous_format
    # Half-precision dtype the model runs in under autocast (None: float32), set by load_encoder (autocast_dtype).
    autocast: torch.dtype | None = None
    # What load_encoder folded into the convolutions (indexer/encoders/fold.py): {"batchnorm": n, "same_padding": m}.
    folded: dict[str, int] = field(default_factory=dict)

    @property
    def input_side(self) -> int:
        """The shorter side the preprocessing resizes a photo to (0: unknown), for reduced-scale JPEG decoding."""
        size = self.preprocessing.get("size")
        sides = size if isinstance(size, list) else [size]
        return max((int(v) for v in sides if isinstance(v, int | float)), default=0)

    @property
    def run_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`indexer.extract.embed` for this encoder (layout, autocast)."""
        return {"memory_format": self.memory_format, "autocast": self.autocast}

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this encoder."""
        return {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
        }


def build_encoder(
    name: str,
    model: torch.nn.Module,
    preprocess: Any,
    device: torch.device,
    weights_sha256: str,
    extra_preprocessing: dict[str, Any],
    encode_text: Callable[[list[str]], torch.Tensor] | None = None,
) -> Encoder:
    """The :class:`Encoder` of a frozen ``model`` on ``device``: its width measured by :func:`probe_dim`, its
    preprocessing described by :func:`describe_transform` followed by the family's ``extra_preprocessing`` keys."""
    memory_format = pick_memory_format(model)
    model = model.to(memory_format=memory_format)
    dim = probe_dim(model, preprocess, device, name)
    preprocessing = describe_transform(preprocess)
    preprocessing.update(extra_preprocessing)
    return Encoder(
        name=name,
        model=model,
        # Same numbers, about half the decode thread's time (indexer/encoders/fused.py); the manifest describes
        # the transform as given.
        preprocess=fuse_preprocess(preprocess, memory_format),
        dim=dim,
        weights_sha256=weights_sha256,
        preprocessing=preprocessing,
        encode_text=encode_text,
        memory_format=memory_format,
    )


def pick_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """Channels-last for convolutional networks, the default layout for the rest.

    oneDNN's (and cuDNN's) convolutions run in NHWC natively: EfficientNet-Lite0's bare forward pass on this
    project's 2-core CPU runs at 154 img/s channels-last against 103 in NCHW, and at 64 against 29 with glibc's
    default allocator (benchmarks/results/index.json measures all four for every run). A
    ViT has one convolution (its patch embedding) and then works on (B, tokens, width) tensors that have no
    channels-last form, so it is left as it is. "Convolutional" = more than one 2-D convolution.
    """
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if convs > 1 else torch.contiguous_format


def resolve_device(device: str | torch.device, name: str = "") -> torch.device:
    """``"auto"`` picks CUDA when present; an unusable device is an :class:`EncoderError`, not a crash mid-run."""
    prefix = f"{name}: " if name else ""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise EncoderError(f"{prefix}bad device {device!r} ({one_line(exc)})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"{prefix}device {str(dev)!r} requested but CUDA is not available")
    return dev


class EnsureRGB:
    """Convert any PIL mode (L, P, RGBA, CMYK...) to RGB; a class, not a lambda, so other processes can unpickle it."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def describe_transform(transform: Any) -> dict[str, Any]:
    """JSON-able summary of a torchvision ``Compose`` (size, crop, interpolation, mean, std, pipeline)."""
    steps = list(getattr(transform, "transforms", [transform]))
    out: dict[str, Any] = {"pipeline": [type(t).__name__ for t in steps]}
    for t in steps:
        kind = type(t).__name__
        if kind in ("Resize", "ResizeKeepRatio") and "size" not in out:
            out["size"] = _jsonable(t.size)
            out["interpolation"] = _jsonable(getattr(t, "interpolation", None))
        elif kind in ("CenterCrop", "CenterCropOrPad"):
            out["crop"] = _jsonable(t.size)
        elif kind == "Normalize":
            out["mean"] = _jsonable(t.mean)
            out["std"] = _jsonable(t.std)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.flatten().tolist()]
    if hasattr(value, "value") and isinstance(value.value, str):  # InterpolationMode and other str enums
        return value.value
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        # torchvision stores a square crop as (224, 224); one number reads better in a manifest.
        return items[0] if len(items) == 2 and items[0] == items[1] else items
    if isinstance(value, float):
        return float(value)
    return value


def probe_dim(model: torch.nn.Module, preprocess: Any, device: torch.device, name: str) -> int:
    """Output width, measured by one forward pass of a blank image through the real preprocessing.

    Measuring beats trusting configs: timm heads, open_clip projections and custom configs all change the width.
    """
    x = preprocess(Image.new("RGB", (64, 64), (128, 128, 128))).unsqueeze(0).to(device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=pick_memory_format(model))
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:  # any failure here means the weights/config pair is unusable
        raise EncoderError(f"{name}: test forward pass failed ({one_line(exc)})") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{name}: model returns {shape}, expected pooled features (1, dim)")
    return int(out.shape[1])


def probe_batch(preprocess: Any, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """Two fixed noise photos through the real preprocessing: a batch on which a changed network shows."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(2)]
    x = torch.stack([preprocess(img) for img in images]).to(device)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device``: every encoder is a fixed feature extractor."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception (or message) as one short line (state_dict errors span dozens of lines)."""
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, known: Sequence[str]) -> str:
    """``did you mean: ...?`` for close matches of ``word``, else a sample of ``known``."""
    close = difflib.get_close_matches(word, known, n=5, cutoff=0.6)
    if close:
        return "did you mean: " + ", ".join(close) + "?"
    return "known: " + sample(known)


def sample(items: Sequence[str]) -> str:
    """The first few ``items`` and how many more there are."""
    head = ", ".join(items[:_SAMPLE_SIZE])
    return head + (f", ... {len(items) - _SAMPLE_SIZE} more" if len(items) > _SAMPLE_SIZE else "")


def is_network_error(exc: BaseException) -> bool:
    """Downloads fail offline with OSError subclasses (URLError, requests/httpx errors, hub 'not in cache')."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (OSError, ConnectionError, TimeoutError)):
            return True
        if type(cur).__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx", "urllib3"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def offline_error(name: str, what: str, exc: BaseException, local_form: str = "") -> EncoderError | None:
    """The one-line error for a download of ``what`` that failed for want of network (None for other failures),
    pointing at the local-file form of the name (``local_form``, e.g. ``timm:resnet50/<path>``) where there is one."""
    if not is_network_error(exc):
        return None
    how = f": {local_form}" if local_form else ""
    detail = one_line(exc, 160)
    return EncoderError(f"{name}: cannot download {what} (no network?); pass a local checkpoint{how} ({detail})")


def local_checkpoint(name: str, weights: str) -> Path:
    """``weights`` as an existing file, made absolute: a relative path is resolved against a working directory the
    user may not expect, so messages name the absolute one."""
    path = Path(weights).expanduser().absolute()
    if not path.exists():
        raise EncoderError(f"{name}: checkpoint file not found: {path}")
    if not path.is_file():
        raise EncoderError(f"{name}: checkpoint path is not a file: {path}")
    return path
