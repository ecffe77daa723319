"""The batched runner: read + hash + decode + preprocess in DataLoader workers, forward passes in the main process.

Kept ignorant of stores and layouts (it takes paths and returns per-file results) so that the indexer, the
query command and the benchmarks all run the very same code.  It times each stage per run, as clip-retrieval's
runner does, because that is how one finds out whether indexing is decode-bound or model-bound.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from indexer.images import ImageError, content_id, decode_image_for, read_bytes

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

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (DataLoader's ``pin_memory`` calls this): a GPU run then copies
        batches to the device without blocking (``non_blocking=True`` in :func:`embed`)."""
        return Batch(self.results, {k: t.pin_memory() for k, t in self.tensors.items()})


class PhotoDataset(Dataset[dict[str, Any]]):
    """Reads one file per item; never raises for a bad file (the reason travels back instead)."""

    def __init__(self, paths: Sequence[str], transforms: Mapping[str, Transform], known_ids: frozenset[str],
                 side: int = 0):
        self.paths = list(paths)
        self.transforms = dict(transforms)
        self.known_ids = known_ids
        self.side = side  # the largest shorter side any transform resizes to (0: decode at full size)

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
            img, (width, height) = decode_image_for(data, path, side=self.side)
            tensors = {name: t(img) for name, t in self.transforms.items()}
            return {"result": FileResult(i, path, "ok", cid, width, height), "tensors": tensors}
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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int | None, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker is SIGKILLed as soon as the process that started it dies.

    Without it a SIGKILLed indexer leaves its decode workers running (torch's own watchdog only
    notices between items, and not at all while a worker is blocked). Linux's parent-death
    signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) covers every later death; a parent that died
    before the call is caught by comparing ``getppid()`` with ``parent_pid`` (an orphan has
    been re-parented). ``parent_pid`` None skips that check (a forkserver is the parent).
    A no-op off Linux. Note the signal follows the *thread* that started the worker: start the
    loader's iteration from a thread that lives as long as the loader.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("decode worker %d: prctl(PR_SET_PDEATHSIG) failed: %s", worker_id,
                        os.strerror(ctypes.get_errno()))  # fmt: skip
    except (OSError, AttributeError) as e:  # no usable libc (static or exotic builds)
        log.warning("decode worker %d: cannot set the parent-death signal: %s", worker_id, e)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)  # the parent died before prctl: nothing would ever stop us


def _worker_init_fn(loader_context: Any) -> Callable[[int], None]:
    """``die_with_parent`` bound to this process: the parent of the workers the loader is about to start."""
    if loader_context is not None:
        method = loader_context.get_start_method()
    else:  # without fixing the global start method as a side effect; the first listed is the default
        method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    # fork and spawn start workers as children of this process; forkserver's server is their parent.
    parent = os.getpid() if method in ("fork", "spawn") else None
    return functools.partial(die_with_parent, parent)


def iter_batches(
    paths: Sequence[str],
    transforms: Mapping[str, Transform],
    *,
    known_ids: frozenset[str] = frozenset(),
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    side: int = 0,
) -> Iterator[Batch]:
    """Decoded, preprocessed batches in input order; decoding overlaps the consumer when workers > 0.
    ``pin_memory`` for a CUDA consumer (page-locked batches copy to the GPU asynchronously); ``side``: the
    largest shorter side the transforms resize to, so that big JPEGs decode at a reduced scale
    (:func:`indexer.images.decode_image_for`; 0: full size)."""
    loader = DataLoader(
        PhotoDataset(paths, transforms, known_ids, side),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        # Two batches in flight per worker is enough to hide decode time behind a CPU forward pass.
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
        # Workers die with this process, even when it is SIGKILLed (which runs no cleanup).
        worker_init_fn=_worker_init_fn(None) if workers > 0 else None,
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
def embed(model: torch.nn.Module, batch: torch.Tensor, device: torch.device, *,
          memory_format: torch.memory_format = torch.contiguous_format,
          autocast: torch.dtype | None = None) -> np.ndarray:
    """L2-normalised features of one preprocessed batch, as float32 numpy.

    ``memory_format``: the encoder's layout (``Encoder.memory_format``; the batch is converted to it on the
    device). ``autocast``: a half-precision dtype to run the model in (``Encoder.autocast``)."""
    x = batch.to(device, non_blocking=True)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    if autocast is not None and x.device.type in ("cuda", "cpu"):
        with torch.autocast(x.device.type, dtype=autocast):
            out = model(x)
    else:
        out = model(x)
    return l2_normalise(out).cpu().numpy().astype(np.float32, copy=False)
