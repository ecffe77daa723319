"""open_clip encoders: ``open_clip:<model>/<pretrained>`` with the image tower for indexing and the text tower for
prompt search.

``<pretrained>`` is an open_clip tag (downloaded, needs network) or a local checkpoint file. A model open_clip does
not know is described by ``open_clip_config.json`` (HF hub layout) next to the checkpoint and registered through
the public ``open_clip.add_model_config``. open_clip is imported only when such a name is loaded.

(Not named ``open_clip.py``: a module of that name would shadow the library for anyone reading the imports.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from indexer.encoders.attention import pack_self_attention
from indexer.encoders.common import (
    Encoder,
    EncoderError,
    build_encoder,
    freeze,
    is_network_error,
    local_checkpoint,
    offline_error,
    one_line,
    sample,
    suggest,
)
from indexer.store.hashing import file_sha256_cached

# Checkpoint suffixes that make a bad <pretrained> read as a missing file rather than an unknown tag.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")

# Configs this process registered with open_clip (model name -> the open_clip_config.json it came from), so that a
# later load can tell them apart from open_clip's built-in configs and may replace them.
_REGISTERED: dict[str, str] = {}
# Where this process writes the bare configs it registers (see _register_model_config); removed at exit.
_CONFIG_DIR: tempfile.TemporaryDirectory[str] | None = None


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
                hint = "; no network?" if is_network_error(exc) else ""
                raise EncoderError(f"{self.encoder_name}: cannot build the tokenizer ({one_line(exc)}{hint})") from exc
        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            out: torch.Tensor = self.clip.encode_text(tokens)
        return out.float().cpu()


def read_open_clip_config(name: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
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


def _register_model_config(name: str, model_name: str, model_cfg: dict[str, Any], source: Path) -> None:
    """Make ``model_name`` an open_clip architecture, as ``create_model``, ``get_model_config`` and
    ``get_tokenizer`` all read it, through open_clip's public ``add_model_config``.

    ``add_model_config`` takes a path, not a dict: it appends the path (a file or a folder) to open_clip's config
    search list and rescans that list, keeping each ``<model>.json`` whose top level holds embed_dim, vision_cfg and
    text_cfg. A hub-layout ``open_clip_config.json`` nests those under ``model_cfg`` and has the wrong name, so the
    bare config is written as ``<model_name>.json`` into a folder this process owns. Registering a name again
    overwrites its file before the rescan, so the newest config wins.
    """
    import open_clip

    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="mammals-open_clip-configs-")
    target = Path(_CONFIG_DIR.name) / f"{model_name}.json"
    if target.stem != model_name:  # e.g. a name ending in ".json"; open_clip would file it under another name
        raise EncoderError(f"{name}: '{model_name}' cannot be registered as an open_clip model name")
    try:
        target.write_text(json.dumps(model_cfg), encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{name}: cannot register the open_clip config of {source} ({one_line(exc)})") from exc
    open_clip.add_model_config(target)
    _REGISTERED[model_name] = str(source)


def _download_tag(name: str, model_name: str, pretrained: str, tag_cfg: dict[str, Any]) -> str:
    """Download (or find in open_clip's cache) the weights of a pretrained tag; the sha256 of that file, so that
    the hash covers the very file open_clip then loads (``tag:<tag>`` where there is no single file)."""
    import open_clip

    try:
        ckpt_file = open_clip.download_pretrained(tag_cfg)
    except Exception as exc:  # every download failure becomes one line
        offline = offline_error(name, f"open_clip weights '{pretrained}'", exc, f"open_clip:{model_name}/<path>")
        if offline is not None:
            raise offline from exc
        raise EncoderError(f"{name}: cannot fetch open_clip weights '{pretrained}' ({one_line(exc)})") from exc
    return file_sha256_cached(ckpt_file) if ckpt_file and os.path.isfile(ckpt_file) else f"tag:{pretrained}"


def _resolve_local(name: str, model_name: str, pretrained: str, builtin: list[str]) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint, create_model_and_transforms overrides)`` for a ``<pretrained>`` that is not a known tag.

    A model open_clip does not know is registered from ``open_clip_config.json`` next to the checkpoint.
    """
    import open_clip

    path = Path(pretrained).expanduser()
    looks_like_file = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES) or path.exists()
    if not looks_like_file:
        # A tag-like word: either the tag or the model name is wrong; say which.
        if model_name not in builtin:
            raise EncoderError(f"{name}: unknown open_clip model '{model_name}' ({suggest(model_name, builtin)})")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise EncoderError(
            f"{name}: '{pretrained}' is neither a pretrained tag of {model_name} "
            f"(tags: {sample(tags) or 'none'}) nor an existing checkpoint file"
        )
    ckpt = local_checkpoint(name, pretrained)
    config_file = ckpt.parent / "open_clip_config.json"
    if model_name in builtin:
        # A built-in architecture keeps its own model_cfg, but the checkpoint's preprocessing still applies
        # (a local copy of an HF hub repo records the mean/std it was trained with).
        overrides = _preprocess_overrides(read_open_clip_config(name, config_file)[1]) if config_file.is_file() else {}
        return ckpt, overrides
    if not config_file.is_file():
        raise EncoderError(
            f"{name}: unknown open_clip model '{model_name}' ({suggest(model_name, builtin)}); "
            f"for a custom model put open_clip_config.json next to the checkpoint"
        )
    model_cfg, preprocess_cfg = read_open_clip_config(name, config_file)
    _register_model_config(name, model_name, model_cfg, config_file)
    return ckpt, _preprocess_overrides(preprocess_cfg)


def load_open_clip(name: str, model_name: str, pretrained: str, device: torch.device) -> Encoder:
    """The encoder ``open_clip:<model_name>/<pretrained>`` (``name``) on ``device``, with its text tower."""
    import open_clip

    builtin = [m for m in open_clip.list_models() if m not in _REGISTERED]
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if model_name in builtin else {}
    overrides: dict[str, Any] = {}
    if tag_cfg:
        sha = _download_tag(name, model_name, pretrained, tag_cfg)
    else:
        ckpt, overrides = _resolve_local(name, model_name, pretrained, builtin)
        pretrained = str(ckpt)
        sha = file_sha256_cached(ckpt)

    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **overrides
        )
    except Exception as exc:  # strict state_dict errors, bad configs, failed downloads
        offline = offline_error(name, "open_clip weights", exc) if tag_cfg else None
        if offline is not None:
            raise offline from exc
        raise EncoderError(f"{name}: cannot build open_clip model '{model_name}' ({one_line(exc)})") from exc

    freeze(clip, device)
    # Fast self-attention under CPU autocast (precision auto on a bfloat16 CPU): indexer/encoders/attention.py.
    pack_self_attention(clip.visual)
    resize_mode = (getattr(clip.visual, "preprocess_cfg", None) or {}).get("resize_mode", "shortest")
    return build_encoder(
        name,
        OpenClipImageTower(clip),
        preprocess,
        device,
        sha,
        {"resize_mode": resize_mode},
        encode_text=OpenClipTextEncoder(clip, model_name, device, name),
    )
