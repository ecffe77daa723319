"""What every image encoder resolves to: a frozen model, its preprocessing, and the facts the store records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


class EncoderError(ValueError):
    """A user-fixable problem with an encoder name, checkpoint or config (shown as one line, exit code 2)."""


@dataclass
class Encoder:
    """A resolved encoder.

    ``model`` maps a preprocessed batch ``(B, 3, H, W)`` to pooled features ``(B, dim)`` (not yet L2-normalised;
    the extractor normalises).  ``preprocess`` maps one RGB PIL image to a ``(3, H, W)`` float tensor and must be
    picklable, because DataLoader workers run it.
    """

    name: str  # the registry name the user typed, e.g. "efficientnet-lite0" or "open_clip:ViT-B-32/laion2b_s34b_b79k"
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    dim: int
    weights_sha256: str  # sha256 of the weight file(s) actually loaded; "" only where none exist
    preprocessing: dict[str, Any] = field(default_factory=dict)  # JSON-able description recorded in the manifest
    # Text tower for open_clip stores (prompt search); None for image-only encoders.
    encode_text: Callable[[list[str]], torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this encoder."""
        return {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
        }
