"""The batched runner: read + hash + decode + preprocess in DataLoader workers, forward passes in the main process.

Kept ignorant of stores and layouts (it takes paths and returns per-file results) so that the indexer, the
query command and the benchmarks all run the very same code.  It times each stage per run, as clip-retrieval's
runner does, because that is how one finds out whether indexing is decode-bound or model-bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from indexer.images import ImageError, content_id, decode_image, read_bytes

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class FileResult:
    """What happened to one input file."""

    index: int  # position in the input sequence
    path: str
    status: str  # "ok" | "known" (already in the store) | "error"
    id: str | None = None
    width: int = 0
    height: int = 0
    reason: str = ""


@dataclass
class Batch:
    """One batch of results and, for its "ok" files in order, the preprocessed tensors per transform name."""

    results: list[FileResult]
    tensors: dict[str, torch.Tensor]

    @property
    def ok(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "ok"]


class PhotoDataset(Dataset[dict[str, Any]]):
    """Reads one file per item; never raises for a bad file (the reason travels back instead)."""

    def __init__(self, paths: Sequence[str], transforms: Mapping[str, Transform], known_ids: frozenset[str]):
        self.paths = list(paths)
        self.transforms = dict(transforms)
        self.known_ids = known_ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            data = read_bytes(Path(path))
            cid = content_id(data)
            if cid in self.known_ids:
                # Skip decoding entirely: re-runs over big, mostly-indexed folders cost one read + hash per file.
                return {"result": FileResult(i, path, "known", cid)}
            img = decode_image(data, path)
            tensors = {name: t(img) for name, t in self.transforms.items()}
            return {"result": FileResult(i, path, "ok", cid, img.width, img.height), "tensors": tensors}
        except ImageError as e:
            return {"result": FileResult(i, path, "error", reason=e.reason)}
        except Exception as e:
            return {"result": FileResult(i, path, "error", reason=f"{type(e).__name__}: {e}")}


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack in the worker, so the main process only runs the model."""
    results = [it["result"] for it in items]
    oks = [it["tensors"] for it in items if "tensors" in it]
    tensors = {name: torch.stack([t[name] for t in oks]) for name in (oks[0] if oks else {})}
    return Batch(results, tensors)


def iter_batches(
    paths: Sequence[str],
    transforms: Mapping[str, Transform],
    *,
    known_ids: frozenset[str] = frozenset(),
    batch_size: int,
    workers: int,
) -> Iterator[Batch]:
    """Decoded, preprocessed batches in input order; decoding overlaps the consumer when workers > 0."""
    loader = DataLoader(
        PhotoDataset(paths, transforms, known_ids),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        # Two batches in flight per worker is enough to hide decode time behind a CPU forward pass.
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader


@dataclass
class StageTimes:
    """Wall seconds per stage: waiting for decoded batches, and model forward passes (per model)."""

    wait: float = 0.0
    forward: dict[str, float] = field(default_factory=dict)

    def add_forward(self, name: str, seconds: float) -> None:
        self.forward[name] = self.forward.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        forward = {f"forward_{k}": round(v, 3) for k, v in self.forward.items()}
        return {"wait_for_decode": round(self.wait, 3), **forward}


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


@torch.inference_mode()
def embed(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> np.ndarray:
    """L2-normalised features of one preprocessed batch, as float32 numpy."""
    out = model(batch.to(device, non_blocking=True))
    return l2_normalise(out).cpu().numpy().astype(np.float32, copy=False)
