"""The batched runner: read + hash + decode + preprocess in decode threads, forward passes in the calling thread.

Kept ignorant of stores and layouts (it takes paths and returns per-file results) so that the indexer, the
query command and the benchmarks all run the very same code.  It times each stage per run, as clip-retrieval's
runner does, because that is how one finds out whether indexing is decode-bound or model-bound.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

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
        """Page-locked copies of the tensors: a GPU run then copies
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
    """One batch from its items, in input order: results for every file, stacked tensors for the decoded ones."""
    results = [it["result"] for it in items]
    oks = [it["tensors"] for it in items if "tensors" in it]
    tensors = {name: _stack([t[name] for t in oks]) for name in (oks[0] if oks else {})}
    return Batch(results, tensors)


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, except that ``(C, H, W)`` views of channel-last memory (the fused preprocessing's output
    for a channels-last encoder) stack into a channels-last batch: one copy here instead of a second one into
    that layout on the model's thread."""
    if all(t.dim() == 3 and t.stride(0) == 1 and t.shape[0] > 1 for t in parts):
        return torch.stack([t.permute(1, 2, 0) for t in parts]).permute(0, 3, 1, 2)
    return torch.stack(parts)


# Batches decoded ahead of the one the model is running on.
PREFETCH_BATCHES = 2

# Nice value of the decode threads (Linux): see lower_thread_priority.
DECODE_NICE = 19


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux; elsewhere nothing changes).

    Decode threads run ahead of the forward pass on the same cores. At equal priority the scheduler splits a core
    between a decode thread and one of torch's threads, and the forward pass, whose threads meet at every layer,
    waits for its slowest thread: on 2 cores one decode thread beside the forward pass cost it 20-30% (pets,
    ``benchmarks/bench_index.py``). At nice 19 a decode thread runs where a core would idle (between layers, in
    the single-threaded parts of the forward pass and of the sparsity hooks), and when the forward pass outruns
    it and waits for a batch, it has the cores to itself. Linux alone sets the nice value per thread (POSIX has
    it per process), so only there is the thread's id passed to ``setpriority``."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except OSError as e:  # a sandbox that forbids it: run at normal priority
        log.debug("could not lower the decode thread's priority: %s", e)


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
    """Decoded, preprocessed batches in input order; ``workers`` decode threads run ahead of the consumer
    (:data:`PREFETCH_BATCHES` batches), 0 decodes in the calling thread.  ``pin_memory`` for a CUDA consumer
    (page-locked batches copy to the GPU asynchronously); ``side``: the largest shorter side the transforms
    resize to, so that big JPEGs decode at a reduced scale (:func:`indexer.images.decode_image_for`; 0: full size).

    Threads, not worker processes: reading, hashing, JPEG decoding, resizing and the tensor conversions all
    release the GIL, and in one process nothing crosses shared memory.  On this project's 2-core machine one
    decode thread beside the forward pass ran the pets photos at 129-131 img/s end to end where one DataLoader
    worker process ran them at 67-74 (the forward pass itself slowed from 8.5 to 15-16 s under the worker
    process).  Threads also die with the process, so a killed indexer leaves no decoder behind."""
    dataset = PhotoDataset(paths, transforms, known_ids, side)
    starts = range(0, len(dataset), batch_size)

    def make(items: list[dict[str, Any]]) -> Batch:
        batch = collate(items)
        return batch.pin_memory() if pin_memory and batch.tensors else batch

    if workers <= 0:
        for s in starts:
            yield make([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mammals-decode", initializer=lower_thread_priority)
    try:
        pending: deque[list[Future[dict[str, Any]]]] = deque()
        for s in starts:
            pending.append([pool.submit(dataset.__getitem__, i) for i in range(s, min(s + batch_size, len(dataset)))])
            if len(pending) > PREFETCH_BATCHES:
                yield make([f.result() for f in pending.popleft()])
        while pending:
            yield make([f.result() for f in pending.popleft()])
    finally:  # a consumer that stops early (an error, a closed generator) does not wait for decodes it won't use
        pool.shutdown(wait=True, cancel_futures=True)


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
