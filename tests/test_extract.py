"""indexer.extract: decode threads keep input order, report bad files, run ahead of the consumer and stop with it."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from indexer.extract import DECODE_NICE, PREFETCH_BATCHES, iter_batches
from tests.conftest import PETS, sample_photos
from tests.helpers_badfiles import make_bad_corpus


def _zeros(img: object) -> torch.Tensor:
    return torch.zeros(3, 4, 4)


def test_iter_batches_with_workers_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    bad = make_bad_corpus(tmp_path / "bad")
    photos = [str(p) for p in sample_photos(3)] if PETS.is_dir() else []
    chosen = ["pipe.jpg", "truncated.jpg", "loop_a.jpg", "empty.jpg"]
    paths = [*photos, *(str(tmp_path / "bad" / n) for n in chosen)]
    for workers in (0, 2):
        results = [r for b in iter_batches(paths, {"t": _zeros}, batch_size=3, workers=workers) for r in b.results]
        assert [r.index for r in results] == list(range(len(paths)))
        assert [r.status for r in results] == ["ok"] * len(photos) + ["error"] * len(chosen)
        for r, name in zip(results[len(photos) :], chosen, strict=True):
            assert bad[name].lower() in r.reason.lower(), (name, r.reason)


def test_decode_threads_run_ahead_and_stop_with_the_consumer() -> None:
    paths = [str(p) for p in sample_photos(40)]
    decoded: list[int] = []
    lock = threading.Lock()

    def counting(img: object) -> torch.Tensor:
        with lock:
            decoded.append(1)
        return torch.zeros(3, 4, 4)

    batches = iter_batches(paths, {"t": counting}, batch_size=4, workers=2)
    first = next(batches)
    assert [r.index for r in first.results] == [0, 1, 2, 3] and first.tensors["t"].shape == (4, 3, 4, 4)
    deadline = time.monotonic() + 30
    while len(decoded) < 4 * (1 + PREFETCH_BATCHES) and time.monotonic() < deadline:
        time.sleep(0.01)
    # While the consumer holds batch 0, the next PREFETCH_BATCHES batches are decoded, and no more.
    assert len(decoded) == 4 * (1 + PREFETCH_BATCHES)
    batches.close()  # the consumer stops: queued decodes are cancelled and the threads exit
    assert len(decoded) <= 4 * (2 + PREFETCH_BATCHES)
    assert not [t for t in threading.enumerate() if t.name.startswith("mammals-decode")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_decode_threads_run_at_the_lowest_priority_and_the_caller_is_untouched() -> None:
    # Decode threads must not take a core from the forward pass (indexer/extract.py, lower_thread_priority).
    seen: list[int] = []

    def nice(img: object) -> torch.Tensor:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return torch.zeros(3, 4, 4)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    list(iter_batches([str(p) for p in sample_photos(4)], {"t": nice}, batch_size=2, workers=2))
    assert seen and set(seen) == {DECODE_NICE}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before < DECODE_NICE
