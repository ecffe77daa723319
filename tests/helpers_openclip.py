"""A tiny real open_clip model (custom config + checkpoint) for tests that need a text tower without a download."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

TINY_MODEL_NAME = "mammals-tiny-vit"
TINY_SEED = 1234

# HF-hub layout, as open_clip writes it for hub models. Not a built-in open_clip architecture, so loading it
# exercises the registry's config registration. Mean/std deliberately differ from open_clip's OpenAI default
# so that a test can tell whether preprocess_cfg was honoured.
TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def tiny_open_clip_model(seed: int = TINY_SEED, config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The tiny CLIP built by open_clip's own class with a fixed seed (the same weights on every call), eval mode.

    ``config`` is an HF-hub-layout config like ``TINY_OPEN_CLIP_CONFIG`` (the default).
    """
    import open_clip

    cfg = copy.deepcopy((config or TINY_OPEN_CLIP_CONFIG)["model_cfg"])
    torch.manual_seed(seed)
    model: torch.nn.Module = open_clip.CLIP(**cfg)
    return model.eval()


def make_tiny_open_clip_checkpoint(dir: Path, config: dict[str, Any] | None = None) -> str:
    """Write ``open_clip_config.json`` and ``tiny.pt`` into ``dir``; return the encoder name that loads them
    (always ``TINY_MODEL_NAME``). ``config`` (default ``TINY_OPEN_CLIP_CONFIG``) describes the model."""
    config = config or TINY_OPEN_CLIP_CONFIG
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    ckpt = dir / "tiny.pt"
    torch.save(tiny_open_clip_model(config=config).state_dict(), ckpt)
    return f"open_clip:{TINY_MODEL_NAME}/{ckpt}"
