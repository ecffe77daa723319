"""The segmented vector index at scale: append in 10k batches, optimize, then recall/latency/memory vs exact.

Data: no real embeddings at this scale are at hand, so the rows are a synthetic stand-in for tiled real
encoder embeddings (as benchmarks/bench_maps.py tiles the 1,140 pets photos with noise): a mixture of 1,140
Gaussians in 1280-d.  Like real CNN embeddings the space is anisotropic (per-axis scale ~ 1/sqrt(axis+1), so
a few hundred axes carry most of the variance) and every centre shares a common mean direction (centres
have cosine ~0.4 with each other, as pooled ReLU features do); each row is a centre plus noise of 0.35 x the
spectrum (cosine ~0.94 with its centre), unit length.  Held-out queries come from the same mixture but are not
in the index.

Steps, in one process:

1. ``append_rows`` in batches of ``--batch`` rows (auto kind: flat segments, even past the threshold),
   timing each append;
2. the exact baseline: brute-force top-10 of the held-out queries over the flat entry, and single-query
   latency of exact (flat, memory-mapped) search;
3. ``optimize``: trains the IVF on a sample of the index's own rows and converts (timed, with train/add split);
4. recall@10 / p50 / p95 / memory of the optimized index (memory-mapped) against the exact baseline;
5. one more append to the IVF (no retraining) and ``check`` against all ids (timed).

Targets at 1M x 1280 on the 2-core CPU: recall@10 >= 0.95, p50 <= 50 ms.

    python -m benchmarks.bench_vectors [--rows 1000000] [--batch 10000] [--queries 500] [--noise 0.35]
        [--dir DIR] [--keep] [--out vectors]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_results
from indexer import defaults
from indexer.store import vectors as vx

DIM = 1280
CENTRES = 1140
NOISE = 0.35
TARGET_RECALL = defaults.VECTOR_RECALL_TARGET
TARGET_P50_MS = 50.0


class Mixture:
    """Deterministic batches of the synthetic space: batch ``b`` is always the same rows."""

    def __init__(self, dim: int = DIM, centres: int = CENTRES, noise: float = NOISE, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
        self.scale /= np.linalg.norm(self.scale)
        mean = rng.normal(size=dim).astype(np.float32) * self.scale
        mean /= np.linalg.norm(mean)
        own = rng.normal(size=(centres, dim)).astype(np.float32) * self.scale
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        c = 0.6 * mean + 0.8 * own
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.noise = noise
        self.seed = seed

    def batch(self, number: int, n: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, number))
        x = self.centres[rng.integers(0, len(self.centres), n)]
        x = x + rng.standard_normal((n, x.shape[1]), dtype=np.float32) * (self.scale * self.noise)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def rss_split_mb() -> dict[str, float]:
    """Resident memory split: anonymous (heap: what the index really costs) and file-backed (mapped index
    files, i.e. page cache that the kernel can drop and other processes share)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                fields[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return {"anon_mb": fields.get("RssAnon", 0.0), "file_mb": fields.get("RssFile", 0.0)}


class AnonPeak:
    """The highest anonymous RSS seen (sampled every 0.2 s): ru_maxrss also counts mapped index files."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mb = max(self.peak_mb, rss_split_mb()["anon_mb"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def probe(directory: Path, entry_path: Path, queries: int, noise: float, mmap: bool) -> dict[str, Any]:
    """In a fresh process: RSS of opening the index and running single-query searches (a long-lived process's
    RSS after optimize also holds the heap the conversion freed but malloc kept, so it says nothing)."""
    entry = json.loads(entry_path.read_text())
    base = rss_split_mb()
    t = time.perf_counter()
    index = vx.SearchIndex.open(directory, entry, mmap=mmap)
    open_s = time.perf_counter() - t
    opened = rss_split_mb()
    lat = []
    for q in Mixture(noise=noise).batch(10**9, queries):
        t = time.perf_counter()
        index.search(q[None, :], 10)
        lat.append((time.perf_counter() - t) * 1000)
    return {"mmap": mmap, "open_s": round(open_s, 2), "rss_python": base,
            "rss_after_open": opened, "rss_after_searches": rss_split_mb(),
            "searches": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
            "memory_bytes": index.memory_bytes(), "mapped_bytes": index.mapped_bytes}


def probe_in_subprocess(directory: Path, entry: dict[str, Any], queries: int, noise: float,
                        mmap: bool) -> dict[str, Any]:
    entry_path = directory / f".probe-entry-{int(mmap)}.json"
    entry_path.write_text(json.dumps(entry))
    cmd = [sys.executable, "-m", "benchmarks.bench_vectors", "--probe", str(directory), str(entry_path),
           "--queries", str(queries), "--noise", str(noise)] + (["--mmap"] if mmap else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    entry_path.unlink()
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(rows: int, batch: int, queries: int, directory: Path, noise: float = NOISE) -> dict[str, Any]:
    anon = AnonPeak()
    mix = Mixture(noise=noise)
    held_out = mix.batch(10**9, queries)
    entry: dict[str, Any] | None = None
    append_s: list[float] = []
    gen_s = 0.0
    start = time.perf_counter()
    for b, first in enumerate(range(0, rows, batch)):
        n = min(batch, rows - first)
        t = time.perf_counter()
        x = mix.batch(b, n)
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        entry = vx.append_rows(directory, entry, np.arange(first, first + n, dtype=np.int64), x)
        append_s.append(time.perf_counter() - t)
        if b % 20 == 0:
            print(f"  appended {first + n:,} rows ({append_s[-1] * 1000:.0f} ms for the last batch)",
                  file=sys.stderr, flush=True)
    assert entry is not None
    flat_entry = entry
    appends = {"batches": len(append_s), "batch_rows": batch, "p50_s": pct(append_s, 50),
               "p95_s": pct(append_s, 95), "max_s": round(max(append_s), 3),
               "first_s": round(append_s[0], 3), "last_s": round(append_s[-1], 3),
               "total_s": round(sum(append_s), 1), "generate_s": round(gen_s, 1),
               "wall_s": round(time.perf_counter() - start, 1), "kind": flat_entry["kind"],
               "segments": len(flat_entry["segments"])}
    print(f"appends: {appends}", file=sys.stderr, flush=True)

    # Exact baseline, from the flat entry (still valid after optimize: readers pinned to it keep working).
    flat = vx.SearchIndex.open(directory, flat_entry, mmap=True)
    t = time.perf_counter()
    _, exact_ids = flat.exact_search(held_out, 10)
    exact_batch_s = time.perf_counter() - t
    lat = []
    for q in held_out[: 30 if rows <= 300_000 else 10]:  # ~1 s a query at 1M
        t = time.perf_counter()
        flat.search(q[None, :], 10)
        lat.append((time.perf_counter() - t) * 1000)
    exact = {"batch_search_s": round(exact_batch_s, 2), "queries": queries,
             "single_query_p50_ms": pct(lat, 50), "single_query_p95_ms": pct(lat, 95), "latency_queries": len(lat),
             "memory_bytes": flat.memory_bytes(), "mapped_bytes": flat.mapped_bytes,
             "flat_search_agrees": bool(np.array_equal(flat.search(held_out[:50], 10)[1], exact_ids[:50]))}
    del flat
    print(f"exact baseline: {exact}", file=sys.stderr, flush=True)

    rss_before = rss_mb()
    t = time.perf_counter()
    optimized = vx.optimize(directory, flat_entry)
    optimize_s = time.perf_counter() - t
    print(f"optimize: {optimize_s:.1f} s, params {optimized['params']}", file=sys.stderr, flush=True)

    ivf = vx.SearchIndex.open(directory, optimized, mmap=True)
    rss_open = rss_mb()
    quality = vx.measure_quality(ivf, held_out, exact_ids, k=10)
    quality["rss_mb_after_open_and_search"] = round(rss_mb(), 1)
    quality["rss_mb_before_optimize"] = round(rss_before, 1)
    quality["rss_mb_after_open"] = round(rss_open, 1)
    del ivf
    print(f"ivf vs exact (held-out): {quality}", file=sys.stderr, flush=True)

    fresh = {"mmap": probe_in_subprocess(directory, optimized, 200, noise, True)}
    if rows <= 300_000:  # reading 5 GB into the heap at 1M would crowd the shared machine
        fresh["in_memory"] = probe_in_subprocess(directory, optimized, 200, noise, False)
    print(f"fresh-process probe: {fresh}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    extra = vx.append_rows(directory, optimized, np.arange(rows, rows + batch, dtype=np.int64),
                           mix.batch(10**6, batch))
    append_ivf_s = time.perf_counter() - t
    t = time.perf_counter()
    vx.check(directory, extra, np.arange(rows + batch, dtype=np.int64))
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    reopened = vx.SearchIndex.open(directory, extra, mmap=True)
    open_s = time.perf_counter() - t
    after_append = vx.measure_quality(reopened, held_out[:100], k=10)
    del reopened

    files = {f: (directory / f).stat().st_size for f in vx.entry_files(optimized)}
    return {
        "rows": rows, "dim": DIM,
        "data": {"kind": "mixture of Gaussians standing in for tiled real embeddings", "centres": CENTRES,
                 "noise": noise, "spectrum": "1/sqrt(axis+1)", "shared_mean_weight": 0.6,
                 "held_out_queries": queries},
        "appends_flat": appends,
        "exact_baseline": exact,
        "optimize": {"seconds": round(optimize_s, 1), "params": optimized["params"],
                     "segments": len(optimized["segments"]), "optimize_quality": optimized["quality"],
                     "files_bytes": files},
        "ivf_vs_exact": quality,
        "fresh_process": fresh,
        "append_to_ivf": {"rows": batch, "seconds": round(append_ivf_s, 3)},
        "check_seconds": round(check_s, 2),
        "open_seconds_with_one_delta_segment": round(open_s, 2),
        "quality_after_one_append": after_append,
        "peak_rss_mb_including_mapped_files": round(peak_rss_mb(), 1),
        "peak_anon_rss_mb": round(anon.stop(), 1),
        "targets": {"recall_at_10": TARGET_RECALL, "p50_ms": TARGET_P50_MS},
        "meets_targets": bool(quality["recall_at_10"] >= TARGET_RECALL and quality["p50_ms"] <= TARGET_P50_MS),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--noise", type=float, default=NOISE, help="noise around each centre (x the spectrum)")
    ap.add_argument("--dir", type=Path, default=None, help="where the index files go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the index files")
    ap.add_argument("--out", default="vectors", help="results name under benchmarks/results/")
    ap.add_argument("--probe", nargs=2, type=Path, metavar=("DIR", "ENTRY_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1], args.queries, args.noise, args.mmap)))
        return 0
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-vectors-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{args.rows:,} x {DIM} rows into {directory}", file=sys.stderr, flush=True)
    try:
        results = run(args.rows, args.batch, args.queries, directory, args.noise)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    out = write_results(args.out, results)
    q = results["ivf_vs_exact"]
    print(f"rows {args.rows:,}: append p50 {results['appends_flat']['p50_s']} s/batch; optimize "
          f"{results['optimize']['seconds']} s (train {results['optimize']['params']['train_seconds']} s); "
          f"recall@10 {q['recall_at_10']} (nprobe {q['nprobe']}), p50 {q['p50_ms']} ms, p95 {q['p95_ms']} ms "
          f"(exact p50 {results['exact_baseline']['single_query_p50_ms']} ms); memory "
          f"{q['memory_bytes'] / 1e9:.2f} GB of which mapped {q['mapped_bytes'] / 1e9:.2f} GB; -> {out}")
    return 0 if results["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
