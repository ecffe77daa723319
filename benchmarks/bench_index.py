"""Index the shared photos and, in the same run, time the bare encoder forward pass over the same images.

The whole `index` (read, hash, decode, preprocess, forward, write the store) is compared with the forward pass
alone on pre-decoded tensors: the ratio says how well decoding is hidden behind inference.  Sparsity recording
is off here (it is a research feature with its own cost, measured by bench_latents.py).
Target: ratio <= 1.25.

    python -m benchmarks.bench_index [--data ../shared/data/pets] [--workers 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SHARED_DATA, shown, timed, write_results
from indexer import defaults
from indexer.encoders import load_encoder
from indexer.extract import embed, iter_batches
from indexer.pipeline import catalog, run_index


def bare_forward_seconds(paths: list[str], batch_size: int) -> tuple[float, int]:
    """Decode + preprocess everything first (untimed), then time only the model on the same batches."""
    enc = load_encoder(defaults.ENCODER)
    batches = [b.tensors["encoder"] for b in iter_batches(paths, {"encoder": enc.preprocess},
                                                           batch_size=batch_size, workers=0) if b.tensors]
    dev = torch.device("cpu")
    embed(enc.model, batches[0][:4], dev)  # warm-up: the first calls allocate and pick kernels
    t = time.perf_counter()
    n = 0
    for b in batches:
        embed(enc.model, b, dev)
        n += len(b)
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "pets")
    ap.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    ap.add_argument("--workers", type=int, default=defaults.WORKERS)
    a = ap.parse_args()

    rows, _ = catalog([a.data])
    paths = [str(r.path) for r in rows]
    print(f"{len(paths)} photos from {a.data}", file=sys.stderr)

    # Warm the encoder and the page cache once so neither measurement pays for the other's cold start.
    with tempfile.TemporaryDirectory() as tmp:
        run_index([a.data], Path(tmp) / "warm", progress=False, batch_size=a.batch_size, workers=a.workers,
                  sparsity=False)

    forward_s, n = bare_forward_seconds(paths, a.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        rep, index_s = timed(run_index, [a.data], Path(tmp) / "store", progress=False, batch_size=a.batch_size,
                             workers=a.workers, sparsity=False)
    ratio = index_s / forward_s
    print(f"bare encoder forward : {forward_s:7.2f} s  ({n / forward_s:6.1f} img/s)")
    print(f"whole `index`        : {index_s:7.2f} s  ({rep.added / index_s:6.1f} img/s)")
    print(f"ratio index/forward  : {ratio:7.3f}  (target <= 1.25)")
    print(f"stages               : {rep.stages}")
    out = write_results("index", {
        "data": shown(a.data), "images": rep.added, "batch_size": a.batch_size, "workers": a.workers,
        "encoder": defaults.ENCODER, "bare_forward_seconds": round(forward_s, 3),
        "index_seconds": round(index_s, 3), "ratio_index_over_forward": round(ratio, 3), "target_ratio": 1.25,
        "stages": rep.stages,
    })
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
