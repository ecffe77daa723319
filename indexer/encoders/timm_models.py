"""timm encoders: ``timm:<model>[/<checkpoint>]``, any timm model's pooled features (classifier removed).

A local checkpoint is loaded with timm's public API, ``create_model(pretrained=False)`` then
``timm.models.load_checkpoint(strict=True)``, so a checkpoint of another architecture fails loudly instead of
leaving a half-random model. Without a checkpoint timm fetches its pretrained weights (Hugging Face hub or URL,
needs network). timm is imported only when such a name is loaded.

(Not named ``timm.py``: a module of that name would shadow the library for anyone reading the imports.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from indexer.encoders.common import (
    Encoder,
    EncoderError,
    EnsureRGB,
    build_encoder,
    freeze,
    local_checkpoint,
    offline_error,
    one_line,
    suggest,
)
from indexer.store.hashing import file_sha256_cached


def _classifier_names(model: torch.nn.Module) -> list[str]:
    """The classifier module(s) a timm model's pretrained_cfg names (``head``, ``fc``, ``("head", "head_dist")``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return [names] if isinstance(names, str) else list(names)


def _drop_classifier(state_dict: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``load_checkpoint`` filter: drop the checkpoint's classifier weight and bias, which a ``num_classes=0`` model
    has no place for (as timm's own pretrained loader does); every other tensor must still match exactly."""
    dropped = {f"{c}.{p}" for c in _classifier_names(model) for p in ("weight", "bias")}
    return {k: v for k, v in state_dict.items() if k not in dropped}


def _load_checkpoint(name: str, model_name: str, ckpt: Path) -> torch.nn.Module:
    """``model_name`` with the weights of the local file ``ckpt``, strictly: a missing, renamed or extra tensor is an
    :class:`EncoderError` naming the file."""
    import timm
    import timm.models

    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception as exc:  # bad kwargs for this architecture and the like
        raise EncoderError(f"{name}: cannot build timm model '{model_name}' ({one_line(exc)})") from exc
    try:
        # weights_only: a checkpoint is data, never code to run (safetensors files are read as such).
        timm.models.load_checkpoint(model, str(ckpt), strict=True, filter_fn=_drop_classifier, weights_only=True)
    except Exception as exc:  # missing/unexpected keys, shape mismatches, unreadable or unsafe files
        raise EncoderError(
            f"{name}: checkpoint {ckpt} does not fit timm model '{model_name}' ({one_line(exc)})"
        ) from exc
    return model


def _load_pretrained(name: str, model_name: str) -> torch.nn.Module:
    """``model_name`` with timm's own pretrained weights (hub or URL download, or timm's cache)."""
    import timm

    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as exc:  # failed downloads, unpickling errors
        offline = offline_error(name, "timm weights", exc, f"timm:{model_name}/<path>")
        if offline is not None:
            raise offline from exc
        raise EncoderError(f"{name}: cannot build timm model '{model_name}' ({one_line(exc)})") from exc


def _pretrained_file(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """Best-effort path of the cached file timm loaded its pretrained weights from (for the weights hash).

    Read from the model's public ``pretrained_cfg`` the way timm picks the source: a Hugging Face hub id when set
    (and huggingface_hub is installed), else a URL, whose file timm caches under ``torch.hub``'s checkpoints folder.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        hub_id = None
    if hub_id:
        repo_id, _, revision = str(hub_id).partition("@")
        filename = pretrained_cfg.get("hf_hub_filename")
        for fname in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
            try:
                hit = try_to_load_from_cache(repo_id, fname, revision=revision or None)
            except Exception:  # e.g. a repo id the hub client rejects: the tag fallback is fine
                return None
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    url = pretrained_cfg.get("url")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url)) if url else None
    return str(cached) if cached is not None and cached.is_file() else None


def load_timm(name: str, model_name: str, weights: str, device: torch.device) -> Encoder:
    """The encoder ``timm:<model_name>[/<weights>]`` (``name``) on ``device``: pooled features, timm's eval
    preprocessing for the model."""
    import timm
    import timm.data
    from torchvision.transforms import Compose

    if not timm.is_model(model_name):
        raise EncoderError(f"{name}: unknown timm model '{model_name}' ({suggest(model_name, timm.list_models())})")
    if weights:
        ckpt = local_checkpoint(name, weights)
        model = _load_checkpoint(name, model_name, ckpt)
        sha = file_sha256_cached(ckpt)
    else:
        model = _load_pretrained(name, model_name)
        hub_file = _pretrained_file(dict(getattr(model, "pretrained_cfg", None) or {}))
        sha = file_sha256_cached(hub_file) if hub_file else f"tag:timm:{model_name}"

    freeze(model, device)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    preprocess = Compose([EnsureRGB(), *timm.data.create_transform(**data_cfg).transforms])
    return build_encoder(name, model, preprocess, device, sha, {"crop_pct": float(data_cfg.get("crop_pct", 1.0))})
