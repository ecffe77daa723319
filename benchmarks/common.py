"""Helpers shared by the benchmark scripts: machine facts and writing results into the repo."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


T = TypeVar("T")


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the wall-clock seconds it took."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def shown(path: Path) -> str:
    """``path`` as a results file records it: relative to the checkout (``../shared/data/pets``), so that no
    machine's absolute paths land in the repo."""
    return os.path.relpath(Path(path).resolve(), REPO)


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        **_cpu(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# CPU features that change which path is fastest (bfloat16 matmuls run natively with AVX512-BF16 and far faster
# with AMX): a shared VM's host can change between runs, and results are only comparable on the same one.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu() -> dict[str, Any]:
    """The CPU's model name and the flags of :data:`_CPU_FLAGS` it has (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's: all alike
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", platform.processor()),
            "cpu_flags": [f for f in _CPU_FLAGS if f in flags]}


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` (plus when and where) to benchmarks/results/<name>.json, atomically."""
    from indexer.store.atomic import atomic_write_json

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    atomic_write_json(out, {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "machine": machine(), **results})
    return out
