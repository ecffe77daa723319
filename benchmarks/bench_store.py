"""The store at scale: 1,000,000 rows appended 10k at a time, against today's rewrite-everything store.

Rows are real encoder embeddings of the shared pets photos, tiled with noise as ``benchmarks.bench_maps`` does
(``tiled_vectors``: the real vectors' covariance, scale ``--noise``).  Batch ``b`` is generated from seed
``seed * 1_000_003 + b`` wherever it is needed (an append process, the exact-search pass), so 5 GB of vectors
never travel through pipes and at most one batch is held at a time.  Row ids are sha256 of a row counter, labels
are copied from each row's original photo.

Measured in one run:

* every append is its own process (open for writing, add 10k rows, commit, close), printing the seconds of each
  step (the commit call alone is ``commit_s``) and its peak RSS.  Peak RSS is the process's ``VmHWM``, reset
  (``/proc/self/clear_refs``) after imports and row generation, so it is the high-water mark of the store work
  itself on top of what the process already held.  ``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too, but
  on Linux a child inherits the high-water mark of the process that spawned it (exec keeps ``signal->maxrss``
  of the old mm), so it reads at least the parent's RSS and cannot show a trend;
* after the last append: ``Store.open`` timed in a fresh process (page cache warm), ``optimize()`` (index
  maintenance: merge segments, train IVF above the size threshold, measure quality; timed apart, not an
  append), then fresh held-out queries (noisy tiles not in the store): single-query ``store.search`` latency
  p50/p95 and recall@10 against exact brute-force search over every row (recomputed here from the regenerated
  batches with ``faiss.knn``, independent of the store), the index's memory, and what ``mammals info --json``
  reports (the quality ``optimize`` measured into the manifest);
* the same queries at ``--baseline-rows`` on the new store (before any optimize) and on the store of git commit
  73f8ba6 (one Parquet file per table and one IndexFlatIP, all rewritten by every commit), built from the same
  batches row for row; its code is taken from git into a temporary package.

Targets (the issue's): mean commit time of the last 10% of appends <= 1.5 x that of the first 10%; peak RSS
of an append likewise flat (<= 1.5 x); ``Store.open`` <= 1 s; query p50 <= 50 ms and recall@10 >= 0.95 at
1M.  The first append creates the store (it builds and measures a first index), so the ratios are taken over
appends 2..N.

    python -m benchmarks.bench_store [--source STORE] [--rows 1000000] [--batch 10000] [--baseline-rows 100000]
                                     [--workdir DIR] [--keep] [--out benchmarks/results/store.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.bench_maps import source_store, tiled_vectors
from benchmarks.common import RESULTS_DIR, machine, write_results

REPO = Path(__file__).resolve().parent.parent
# Workers run from a copy of the code taken at the start of the run (``snapshot_code``): the store is being
# edited while a 1M run takes half an hour, and every append must run the same code.
PACKAGES = ("indexer", "analysis", "dashboard", "data", "benchmarks")
CODE = {"dir": REPO}
BASELINE_COMMIT = "73f8ba6"
OLD_PACKAGE = "mammals_old_store"  # the baseline's modules, taken from git into <workdir>/baseline-code/
SPACE = "encoder"
K = 10

TARGET_COMMIT_GROWTH = 1.5
TARGET_RSS_GROWTH = 1.5
TARGET_OPEN_S = 1.0
TARGET_P50_MS = 50.0
TARGET_RECALL = 0.95

NOISE_SHAPE = "data"
QUERY_BATCH = 1_000_000  # seed offset of the held-out queries (no append batch number reaches it)


# ---------------------------------------------------------------------------------------------- data


def batch_seed(seed: int, batch_no: int) -> int:
    return seed * 1_000_003 + batch_no


def batch_vectors(source: np.ndarray, batch_no: int, n: int, noise: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim unit rows, index of each row's source photo) of append batch ``batch_no``: deterministic."""
    return tiled_vectors(source, n, noise, NOISE_SHAPE, seed=batch_seed(seed, batch_no))


def row_ids(start: int, n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"bench-store-{seed}-{i}".encode()).hexdigest() for i in range(start, start + n)]


def faiss_ids(ids: Sequence[str]) -> np.ndarray:
    from indexer.store import schema

    return np.array([schema.faiss_id_of(i) for i in ids], np.int64)


def batch_rows(species: np.ndarray, breed: np.ndarray, origin: np.ndarray, start: int, seed: int) -> pd.DataFrame:
    """Image rows for one batch (the columns both stores' schemas have; the new store adds ``seq`` itself)."""
    n = len(origin)
    ids = row_ids(start, n, seed)
    return pd.DataFrame({
        "id": ids,
        "faiss_id": faiss_ids(ids),
        "path": [f"/synthetic/{i}.jpg" for i in range(start, start + n)],
        "relpath": [f"{i}.jpg" for i in range(start, start + n)],
        "species": [s or None for s in species[origin]],
        "breed": [b or None for b in breed[origin]],
        "dataset": "tiled",
        "layout": "synthetic",
        "width": np.full(n, 224, np.int32),
        "height": np.full(n, 224, np.int32),
        "indexed_at": pd.Timestamp.now(tz="UTC").floor("s"),
    })


def batches(rows: int, batch: int) -> list[tuple[int, int, int]]:
    """(batch number, first row, rows) of every append."""
    return [(b, start, min(batch, rows - start)) for b, start in enumerate(range(0, rows, batch))]


def prepare_source(src_path: Path, workdir: Path) -> Path:
    """The source store's encoder vectors, labels and encoder description in one .npz for the workers."""
    from indexer.store import Store, schema

    src = Store.open(src_path)
    sp = src.space(schema.ENCODER_SPACE)
    labels = src.images.set_index("id").loc[sp.ids]
    out = workdir / "source.npz"
    np.savez(out, vectors=sp.vectors,
             species=labels["species"].fillna("").astype(str).to_numpy(str),
             breed=labels["breed"].fillna("").astype(str).to_numpy(str),
             encoder=np.array(json.dumps(src.encoder)))
    return out


# ---------------------------------------------------------------------------------------------- the baseline code


def extract_baseline(dest: Path) -> Path | None:
    """The 73f8ba6 store (indexer/store.py + the schema.py and atomic.py it imported) as package
    ``OLD_PACKAGE`` under ``dest``; None (with the reason printed) when git cannot give it."""
    pkg = dest / OLD_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    for name, src in (("__init__.py", "indexer/__init__.py"), ("schema.py", "indexer/schema.py"),
                      ("atomic.py", "indexer/atomic.py"), ("store.py", "indexer/store.py")):
        try:
            text = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:{src}"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            why = getattr(e, "stderr", "") or str(e)
            print(f"baseline skipped: git show {BASELINE_COMMIT}:{src} failed ({why.strip()})", flush=True)
            return None
        text = text.replace("from indexer import ", f"from {OLD_PACKAGE} import ")
        text = text.replace("from indexer.store.atomic import ", f"from {OLD_PACKAGE}.atomic import ")
        left = re.findall(r"^\s*(?:from|import)\s+indexer\b.*$", text, flags=re.M)
        if left:
            print(f"baseline skipped: {src} at {BASELINE_COMMIT} imports {left[0].strip()!r}", flush=True)
            return None
        (pkg / name).write_text(text, "utf-8")
    return dest


def import_baseline(code_dir: Path) -> Any:
    import importlib

    sys.path.insert(0, str(code_dir))
    return importlib.import_module(f"{OLD_PACKAGE}.store")


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else float("nan")


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    return round(kb / 1024, 1) if kb is not None else ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------- workers


def worker_append(a: argparse.Namespace) -> dict[str, Any]:
    """One append run: generate batch ``a.batch_no``, then open, add, commit, close (each timed)."""
    t_start = time.perf_counter()
    rss_imports = rss_mb()
    src = np.load(a.source)
    x, origin = batch_vectors(src["vectors"], a.batch_no, a.n, a.noise, a.seed)
    rows = batch_rows(src["species"], src["breed"], origin, a.start, a.seed)
    encoder = json.loads(str(src["encoder"]))
    vecs = {SPACE: x}
    t_gen = time.perf_counter()
    rss_before = rss_mb()
    hwm_reset = reset_peak_rss()
    exists = (a.store / "manifest.json").exists()
    if a.impl == "new":
        from indexer.store import Store

        store = Store.open(a.store, write=True) if exists else Store.create(a.store, encoder)
        t_open = time.perf_counter()
        store.add_images(rows, vecs)
        t_add = time.perf_counter()
        store.commit()
        t_commit = time.perf_counter()
        version = store.version
        store.close()
    else:
        old = import_baseline(a.baseline_code)
        store = old.Store.open(a.store) if exists else old.Store.create(a.store, encoder)
        t_open = time.perf_counter()
        store.add_images(rows, vecs)
        t_add = time.perf_counter()
        store.commit()
        t_commit = time.perf_counter()
        version = None
        del store
    t_end = time.perf_counter()
    return {
        "impl": a.impl, "batch_no": a.batch_no, "rows_after": a.start + a.n, "created": not exists,
        "store_version": version,
        "generate_s": round(t_gen - t_start, 3),
        "open_s": round(t_open - t_gen, 3),
        "add_s": round(t_add - t_open, 3),
        "commit_s": round(t_commit - t_add, 3),
        "close_s": round(t_end - t_commit, 3),
        "store_s": round(t_end - t_gen, 3),  # open + add + commit + close
        "total_s": round(t_end - t_start, 3),  # + row generation (not process start-up and imports)
        "rss_after_imports_mb": rss_imports,
        "rss_before_store_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_is_store_phase": hwm_reset,
        "ru_maxrss_mb": ru_maxrss_mb(),
    }


def worker_optimize(a: argparse.Namespace) -> dict[str, Any]:
    from indexer.store import Store

    reset_peak_rss()
    t0 = time.perf_counter()
    store = Store.open(a.store, write=True)
    t_open = time.perf_counter()
    changed = store.optimize()
    t_opt = time.perf_counter()
    entry = store.manifest["spaces"][SPACE]["index"]
    store.close()
    return {
        "open_s": round(t_open - t0, 3), "optimize_s": round(t_opt - t_open, 2), "changed": changed,
        "kind": entry.get("kind"), "segments": len(entry.get("segments", [])), "params": entry.get("params"),
        "quality": entry.get("quality"), "peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(),
    }


def worker_measure(a: argparse.Namespace) -> dict[str, Any]:
    """A fresh reader: time ``Store.open``, load the index, then single-query searches (latency, found ids)."""
    queries = np.load(a.queries_file)["queries"][: a.n_queries]
    rss0 = rss_mb()
    t0 = time.perf_counter()
    search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    memory: dict[str, Any] = {}
    if a.impl == "new":
        from indexer.store import Store

        store = Store.open(a.store)
        t_open = time.perf_counter()
        # What store.search then uses: the store's own choice, or forced mapped / read into the heap.
        index = (store.vector_index(SPACE) if a.index_mode == "default"
                 else store.vector_index(SPACE, mmap=a.index_mode == "mmap"))
        t_index = time.perf_counter()
        memory = {"kind": index.kind, "rows": index.ntotal, "heap_mb": round(index.heap_bytes / 2**20, 1),
                  "mapped_mb": round(index.mapped_bytes / 2**20, 1),
                  "memory_bytes_mb": round(index.memory_bytes() / 2**20, 1),
                  "segments": len(store.manifest["spaces"][SPACE]["index"].get("segments", [])),
                  "nprobe": index.nprobe if index.kind == "ivf" else None}

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return store.search(SPACE, q, K)
    else:
        old = import_baseline(a.baseline_code)
        store = old.Store.open(a.store)
        t_open = time.perf_counter()
        flat = store.faiss_index(SPACE)
        t_index = time.perf_counter()
        memory = {"kind": type(flat).__name__, "rows": int(flat.ntotal),
                  "heap_mb": round(flat.ntotal * (flat.d * 4 + 8) / 2**20, 1), "mapped_mb": 0.0}

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return flat.search(old.unit_rows(q), K)  # what 73f8ba6's query path did
    rss_index = rss_mb()
    t1 = time.perf_counter()
    search(queries[:1])
    first_s = time.perf_counter() - t1
    latencies, found = [], []
    for q in queries:
        t1 = time.perf_counter()
        _, ids = search(q[None, :])
        latencies.append((time.perf_counter() - t1) * 1000.0)
        found.append(ids[0])
    np.save(a.found, np.array(found, np.int64))
    # The same searches with one OpenMP thread: a single query runs on one thread anyway, and on a loaded
    # machine waking the idle OpenMP thread of every faiss call (one per segment) dominates the latency.
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    single = []
    for q in queries:
        t1 = time.perf_counter()
        search(q[None, :])
        single.append((time.perf_counter() - t1) * 1000.0)
    faiss.omp_set_num_threads(threads)
    return {
        "omp_threads": threads, "load_average": round(os.getloadavg()[0], 2),
        "p50_ms_1_thread": round(float(np.percentile(single, 50)), 3),
        "p95_ms_1_thread": round(float(np.percentile(single, 95)), 3),
        "open_s": round(t_open - t0, 4), "index_load_s": round(t_index - t_open, 3),
        "first_query_s": round(first_s, 4), "queries": len(latencies),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p95_ms": round(float(np.percentile(latencies, 95)), 3),
        "mean_ms": round(float(np.mean(latencies)), 3),
        "rss_before_open_mb": rss0, "rss_after_index_mb": rss_index, "rss_end_mb": rss_mb(),
        "index": memory, "index_mode": a.index_mode,
    }


def run_worker(a: argparse.Namespace) -> int:
    fn = {"append": worker_append, "optimize": worker_optimize, "measure": worker_measure}[a.worker]
    print("RESULT " + json.dumps(fn(a), default=str), flush=True)
    return 0


def call_worker(kind: str, args: Sequence[str]) -> dict[str, Any]:
    """Run a worker in a fresh interpreter; its result plus the process's wall seconds (start-up included)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_store", "--worker", kind, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=CODE["dir"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"worker {kind} {' '.join(args)} failed (exit {proc.returncode})")
    out: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    out["process_s"] = round(wall, 3)
    return out


# ---------------------------------------------------------------------------------------------- runs


def append_run(impl: str, store: Path, source: Path, rows: int, batch: int, a: argparse.Namespace,
               baseline_code: Path | None, at: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    print(f"\n== {impl} store: {rows:,} rows in appends of {batch:,} ({store})", flush=True)
    print(f"{'append':>6} {'rows':>9} {'commit s':>9} {'open+add+commit+close s':>24} {'process s':>10} "
          f"{'peak RSS MB':>12} {'(+store MB)':>11} {'load':>5}", flush=True)
    out = []
    for b, start, n in batches(rows, batch):
        args = ["--impl", impl, "--store", str(store), "--source", str(source), "--batch-no", str(b),
                "--start", str(start), "--n", str(n), "--noise", str(a.noise), "--seed", str(a.seed)]
        if baseline_code is not None:
            args += ["--baseline-code", str(baseline_code)]
        r = call_worker("append", args)
        r["load_average"] = round(os.getloadavg()[0], 2)
        out.append(r)
        print(f"{b + 1:>6} {r['rows_after']:>9,} {r['commit_s']:>9.3f} {r['store_s']:>24.3f} {r['process_s']:>10.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['rss_before_store_mb']:>11.0f} "
              f"{r['load_average']:>5.1f}", flush=True)
        if at is not None:
            at(r["rows_after"])
    return out


def measure(impl: str, store: Path, queries: Path, n_queries: int, tag: str, workdir: Path,
            baseline_code: Path | None = None, index_mode: str = "default") -> dict[str, Any]:
    found = workdir / f"found-{tag}.npy"
    args = ["--impl", impl, "--store", str(store), "--queries-file", str(queries), "--n-queries", str(n_queries),
            "--found", str(found)]
    if baseline_code is not None:
        args += ["--baseline-code", str(baseline_code)]
    args += ["--index-mode", index_mode]
    r = call_worker("measure", args)
    r["found_file"] = str(found)
    print(f"[{tag}] open {r['open_s']:.3f} s, index load {r['index_load_s']:.2f} s, p50 {r['p50_ms']:.2f} ms, "
          f"p95 {r['p95_ms']:.2f} ms over {r['queries']} queries (1 OpenMP thread: p50 {r['p50_ms_1_thread']:.2f}, "
          f"p95 {r['p95_ms_1_thread']:.2f} ms; load {r['load_average']}), index {r['index']}, "
          f"RSS {r['rss_after_index_mb']:.0f} MB", flush=True)
    return r


def exact_top(source: np.ndarray, queries: np.ndarray, rows: int, batch: int, noise: float, seed: int,
              snapshots: Sequence[int]) -> dict[int, np.ndarray]:
    """Exact top-K faiss ids of ``queries`` among the first ``s`` rows, for each s in ``snapshots``: every batch
    regenerated and scanned once (``faiss.knn``), one batch in memory at a time."""
    import faiss

    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.full((nq, 0), -1, np.int64)
    out: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for b, start, n in batches(rows, batch):
        x, _ = batch_vectors(source, b, n, noise, seed)
        fids = faiss_ids(row_ids(start, n, seed))
        sims, pos = faiss.knn(queries, x, min(K, n), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, sims], axis=1)
        all_i = np.concatenate([best_i, fids[pos]], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
        if start + n in snapshots:
            out[start + n] = best_i.copy()
        if (b + 1) % 20 == 0:
            print(f"  exact search: {start + n:,} rows scanned ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def recall_at_k(found_file: str, truth: np.ndarray) -> float:
    found = np.load(found_file)
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, len(t[t >= 0])) for f, t in zip(found, truth,
                                                                                                  strict=True)]
    return round(float(np.mean(hits)), 4)


def growth(values: Sequence[float]) -> dict[str, Any]:
    """Mean of the last 10% over the mean of the first 10% (at least one value each)."""
    if not values:  # a run of one commit (the creating one) has no appends
        return {"first_10pct_mean": None, "last_10pct_mean": None, "ratio": None, "n": 0}
    m = max(1, round(len(values) * 0.1))
    first, last = float(np.mean(values[:m])), float(np.mean(values[-m:]))
    return {"first_10pct_mean": round(first, 3), "last_10pct_mean": round(last, 3),
            "ratio": round(last / first, 3) if first > 0 else None, "n": len(values), "window": m}


def summarize_appends(runs: list[dict[str, Any]]) -> dict[str, Any]:
    appends = [r for r in runs if not r["created"]]  # the creating commit builds a first index: not an append
    return {
        "commit_s": growth([r["commit_s"] for r in appends]),
        "store_s": growth([r["store_s"] for r in appends]),
        "peak_rss_mb": growth([r["peak_rss_mb"] for r in appends]),
        "store_rss_increase_mb": growth([r["peak_rss_mb"] - r["rss_before_store_mb"] for r in appends]),
        "first_append_peak_rss_mb": appends[0]["peak_rss_mb"] if appends else None,
        "last_append_peak_rss_mb": appends[-1]["peak_rss_mb"] if appends else None,
        "max_commit_s": max((r["commit_s"] for r in appends), default=None),
        "create_commit_s": next((r["commit_s"] for r in runs if r["created"]), None),
    }


def disk_usage(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in sorted(path.iterdir()):
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        out[child.name] = {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 1e6, 1)}
    return out


def mammals_info(store: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "indexer.cli", "info", "--json", str(store)], cwd=CODE["dir"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-2000:], "seconds": round(seconds, 2)}
    info = json.loads(proc.stdout)
    return {"seconds": round(seconds, 2), "encoder_index": info["spaces"][SPACE]["index"],
            "version": info["version"], "images": info["counts"].get("images")}


def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copy the packages the workers import to ``dest`` and run them from there; the store code's digest."""
    for name in PACKAGES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    CODE["dir"] = dest
    h = hashlib.sha256()
    files = [*sorted((dest / "indexer" / "store").glob("*.py")), dest / "indexer" / "defaults.py"]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"dir": str(dest), "store_code_sha256": h.hexdigest()[:16], "files": [f.name for f in files]}


def store_code_changed(snapshot: dict[str, Any]) -> bool:
    h = hashlib.sha256()
    for name in snapshot["files"]:
        f = REPO / "indexer" / ("defaults.py" if name == "defaults.py" else f"store/{name}")
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.exists() else b""))
    return h.hexdigest()[:16] != snapshot["store_code_sha256"]


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"head": git("rev-parse", "--short", "HEAD"),
            "dirty_paths": len(git("status", "--porcelain").splitlines())}


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="store whose encoder space is tiled (default: index the pets)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000, help="rows per append")
    ap.add_argument("--baseline-rows", type=int, default=100_000,
                    help=f"rows of the {BASELINE_COMMIT} baseline (0: skip it)")
    ap.add_argument("--queries", type=int, default=200, help="held-out queries (latency and recall)")
    ap.add_argument("--unoptimized-queries", type=int, default=20,
                    help="queries at --rows before optimize (every row in flat segments; 0: skip)")
    ap.add_argument("--noise", type=float, default=0.35, help="tile noise scale (as bench_maps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where the stores are built (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: removed at the end)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "store.json")
    # A worker process (one append, optimize, or a measuring reader): internal.
    ap.add_argument("--worker", choices=("append", "optimize", "measure"), help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("new", "old"), default="new", help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-code", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch-no", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n-queries", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--found", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--index-mode", choices=("default", "mmap", "heap"), default="default", help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        return run_worker(a)
    if a.baseline_rows > a.rows:
        raise SystemExit("--baseline-rows must not exceed --rows (the new store's first appends are compared)")
    parent = a.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need_gb = a.rows * 1280 * 4 * 3.5 / 1e9 + a.baseline_rows * 1280 * 4 * 2 / 1e9 + 1
    free_gb = shutil.disk_usage(parent).free / 1e9
    if free_gb < need_gb:
        print(f"warning: {parent} has {free_gb:.0f} GB free, the run needs about {need_gb:.0f} GB", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-", dir=parent))
    print(f"workdir {workdir}", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    try:
        results = run(a, workdir)
    finally:
        if a.keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    from indexer.store import library_versions

    results = {"started_at": started, "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                         / 2**30, 1),
               "versions": library_versions(), "git": git_state(),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()], **results}
    # Paths on this machine (temp work folders, the source store) say nothing to a reader of the results file.
    text = json.dumps(results, default=str).replace(str(workdir), "<workdir>").replace(str(workdir.parent), "<parent>")
    results = json.loads(text)
    if a.out.resolve() == (RESULTS_DIR / "store.json").resolve():
        out = write_results("store", results)
    else:
        from indexer.store.atomic import atomic_write_json

        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out, {"benchmark": "store", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "machine": machine(), **results})
        out = a.out
    print(f"written to {out}", file=sys.stderr)
    return 0 if results["all_targets_met"] else 1


def run(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    code = snapshot_code(workdir / "code")
    print(f"workers run the code copied to {code['dir']} (store code {code['store_code_sha256']})", flush=True)
    src_path = source_store(a.source, workdir)
    source = prepare_source(src_path, workdir)
    src = np.load(source)
    vectors = src["vectors"]
    q, _ = tiled_vectors(vectors, a.queries, a.noise, NOISE_SHAPE, seed=batch_seed(a.seed, QUERY_BATCH))
    queries = workdir / "queries.npz"
    np.savez(queries, queries=q)
    baseline_code = extract_baseline(workdir / "baseline-code") if a.baseline_rows > 0 else None

    old_runs: list[dict[str, Any]] = []
    old_query: dict[str, Any] | None = None
    if baseline_code is not None:
        old_store = workdir / "baseline-store"
        old_runs = append_run("old", old_store, source, a.baseline_rows, a.batch, a, baseline_code)
        old_query = measure("old", old_store, queries, a.queries, "old-at-baseline", workdir, baseline_code)
        shutil.rmtree(old_store, ignore_errors=True)

    new_store = workdir / "store"
    at_baseline: dict[str, Any] = {}

    def measure_at(rows_after: int) -> None:
        if rows_after == a.baseline_rows:
            at_baseline.update(measure("new", new_store, queries, a.queries, "new-at-baseline", workdir))

    new_runs = append_run("new", new_store, source, a.rows, a.batch, a, None, measure_at)
    before_optimize_disk = disk_usage(new_store)
    unoptimized = (measure("new", new_store, queries, a.unoptimized_queries, "new-before-optimize", workdir)
                   if a.unoptimized_queries > 0 else None)
    print("\n== optimize (index maintenance, not an append)", flush=True)
    opt = call_worker("optimize", ["--store", str(new_store)])
    print(f"optimize: {opt['optimize_s']:.1f} s, peak RSS {opt['peak_rss_mb']:.0f} MB -> {opt['kind']}, "
          f"{opt['segments']} segment(s), params {opt['params']}", flush=True)
    after = measure("new", new_store, queries, a.queries, "new-optimized", workdir)
    # The other way of opening the index than the store's default (mapped vs read into the heap).
    other = "heap" if after["index"]["mapped_mb"] > after["index"]["heap_mb"] else "mmap"
    after_other = measure("new", new_store, queries, a.queries, f"new-optimized-{other}", workdir, index_mode=other)
    info = mammals_info(new_store)
    disk = disk_usage(new_store)

    print("\n== exact search (ground truth)", flush=True)
    snapshots = sorted({a.rows, *([a.baseline_rows] if a.baseline_rows else [])})
    truth = exact_top(vectors, q, a.rows, a.batch, a.noise, a.seed, snapshots)
    after["recall_at_10"] = recall_at_k(after["found_file"], truth[a.rows])
    after_other["recall_at_10"] = recall_at_k(after_other["found_file"], truth[a.rows])
    if unoptimized is not None:
        unoptimized["recall_at_10"] = recall_at_k(unoptimized["found_file"], truth[a.rows][: a.unoptimized_queries])
    if at_baseline:
        at_baseline["recall_at_10"] = recall_at_k(at_baseline["found_file"], truth[a.baseline_rows])
    if old_query is not None:
        old_query["recall_at_10"] = recall_at_k(old_query["found_file"], truth[a.baseline_rows])

    code["repo_store_code_changed_during_run"] = store_code_changed(code)
    if code["repo_store_code_changed_during_run"]:
        print("note: indexer/store changed in the repo during the run; every worker ran the copy taken at its start",
              flush=True)
    out = report(a, new_runs, old_runs, at_baseline, old_query, unoptimized, opt, after, after_other, info, disk,
                 before_optimize_disk, baseline_code is not None)
    return {"code": code, **out}


def report(a: argparse.Namespace, new_runs: list[dict[str, Any]], old_runs: list[dict[str, Any]],
           at_baseline: dict[str, Any], old_query: dict[str, Any] | None, unoptimized: dict[str, Any] | None,
           opt: dict[str, Any], after: dict[str, Any], after_other: dict[str, Any], info: dict[str, Any],
           disk: dict[str, Any], before_optimize_disk: dict[str, Any], have_baseline: bool) -> dict[str, Any]:
    new_sum = summarize_appends(new_runs)
    new_first = summarize_appends(new_runs[: len(old_runs)]) if old_runs else None
    old_sum = summarize_appends(old_runs) if old_runs else None

    if old_runs:
        print(f"\n== row for row, first {a.baseline_rows:,} rows: new store vs {BASELINE_COMMIT} (rewrite-everything)")
        print(f"{'append':>6} {'rows':>9} | {'new commit s':>12} {'new store s':>11} {'new RSS MB':>10} | "
              f"{'old commit s':>12} {'old store s':>11} {'old RSS MB':>10}")
        for n, o in zip(new_runs, old_runs, strict=False):
            print(f"{n['batch_no'] + 1:>6} {n['rows_after']:>9,} | {n['commit_s']:>12.3f} {n['store_s']:>11.3f} "
                  f"{n['peak_rss_mb']:>10.0f} | {o['commit_s']:>12.3f} {o['store_s']:>11.3f} {o['peak_rss_mb']:>10.0f}")
        if old_query is not None and at_baseline:
            print(f"at {a.baseline_rows:,}: open {at_baseline['open_s']:.3f} s (new) vs {old_query['open_s']:.3f} s "
                  f"(old); query p50 {at_baseline['p50_ms']:.2f} ms (new, {at_baseline['index']['segments']} flat "
                  f"segments) vs {old_query['p50_ms']:.2f} ms (old); recall@10 {at_baseline['recall_at_10']:.3f} "
                  f"vs {old_query['recall_at_10']:.3f}")
    else:
        print(f"\nbaseline ({BASELINE_COMMIT}) skipped")

    cg, rg = new_sum["commit_s"], new_sum["peak_rss_mb"]
    targets = {
        "commit_time_flat": {"value": cg["ratio"], "target": f"<= {TARGET_COMMIT_GROWTH}",
                             "pass": cg["ratio"] is not None and cg["ratio"] <= TARGET_COMMIT_GROWTH},
        "peak_rss_flat": {"value": rg["ratio"], "target": f"<= {TARGET_RSS_GROWTH}",
                          "pass": rg["ratio"] is not None and rg["ratio"] <= TARGET_RSS_GROWTH},
        "open_s": {"value": after["open_s"], "target": f"<= {TARGET_OPEN_S}", "pass": after["open_s"] <= TARGET_OPEN_S},
        "query_p50_ms": {"value": after["p50_ms"], "target": f"<= {TARGET_P50_MS}",
                         "pass": after["p50_ms"] <= TARGET_P50_MS},
        "recall_at_10": {"value": after["recall_at_10"], "target": f">= {TARGET_RECALL}",
                         "pass": after["recall_at_10"] >= TARGET_RECALL},
    }
    print(f"\n== summary at {a.rows:,} rows ({len(new_runs)} appends of {a.batch:,}; ratios over appends 2..N, "
          "first/last 10%)")

    def line(label: str, value: str, ok: bool | None, old: str = "") -> None:
        print(f"{verdict(ok)}  {label:<44} {value:<34} {old}")

    og = old_sum["commit_s"]["ratio"] if old_sum else None
    line("commit time last10%/first10% (<= 1.5)",
         f"{cg['ratio']} ({cg['first_10pct_mean']} -> {cg['last_10pct_mean']} s)", targets["commit_time_flat"]["pass"],
         f"baseline at {a.baseline_rows:,}: {og} ({old_sum['commit_s']['first_10pct_mean']} -> "
         f"{old_sum['commit_s']['last_10pct_mean']} s)" if old_sum else "")
    line("peak RSS of an append last10%/first10% (<= 1.5)",
         f"{rg['ratio']} ({rg['first_10pct_mean']} -> {rg['last_10pct_mean']} MB)",
         targets["peak_rss_flat"]["pass"],
         f"baseline: {old_sum['peak_rss_mb']['ratio']} ({old_sum['peak_rss_mb']['first_10pct_mean']} -> "
         f"{old_sum['peak_rss_mb']['last_10pct_mean']} MB)" if old_sum else "")
    sg = new_sum["store_s"]
    line("open+add+commit+close last10%/first10%", f"{sg['ratio']} ({sg['first_10pct_mean']} -> "
         f"{sg['last_10pct_mean']} s)", None,
         f"baseline: {old_sum['store_s']['ratio']}" if old_sum else "")
    line("Store.open, fresh process (<= 1 s)", f"{after['open_s']:.4f} s (index load {after['index_load_s']:.1f} s)",
         targets["open_s"]["pass"],
         f"baseline at {a.baseline_rows:,}: {old_query['open_s']:.3f} s" if old_query else "")
    line("query p50 / p95, store.search (<= 50 ms)", f"{after['p50_ms']:.2f} / {after['p95_ms']:.2f} ms",
         targets["query_p50_ms"]["pass"],
         f"baseline at {a.baseline_rows:,}: {old_query['p50_ms']:.2f} / {old_query['p95_ms']:.2f} ms" if old_query
         else "")
    line("  same, faiss with 1 OpenMP thread", f"{after['p50_ms_1_thread']:.2f} / {after['p95_ms_1_thread']:.2f} ms",
         None, f"baseline: {old_query['p50_ms_1_thread']:.2f} / {old_query['p95_ms_1_thread']:.2f} ms" if old_query
         else "")
    line("recall@10 vs exact (>= 0.95)", f"{after['recall_at_10']:.4f}", targets["recall_at_10"]["pass"])
    line(f"  same index opened {after_other['index_mode']}",
         f"p50 {after_other['p50_ms']:.2f} ms, recall {after_other['recall_at_10']}", None,
         f"RSS {after_other['rss_after_index_mb']:.0f} MB vs {after['rss_after_index_mb']:.0f} MB (default: "
         f"heap {after['index']['heap_mb']:.0f} MB, mapped {after['index']['mapped_mb']:.0f} MB)")
    if unoptimized is not None:
        line("  before optimize (flat segments)", f"p50 {unoptimized['p50_ms']:.1f} ms, recall "
             f"{unoptimized['recall_at_10']}", None, f"{unoptimized['index']['segments']} segments")
    line("optimize (maintenance)", f"{opt['optimize_s']:.1f} s, peak RSS {opt['peak_rss_mb']:.0f} MB", None,
         f"{opt['kind']}, params {opt['params']}")
    q = (info.get("encoder_index") or {}).get("quality") or {}
    line("manifest's own quality (mammals info)", f"recall@10 {q.get('recall_at_10')}, p50 {q.get('p50_ms')} ms",
         None, f"memory {(q.get('memory_bytes') or 0) / 2**20:.0f} MiB, nprobe {q.get('nprobe')}")
    ok = all(t["pass"] for t in targets.values())
    missed = [k for k, t in targets.items() if not t["pass"]]
    print("\nALL TARGETS MET" if ok else f"\nTARGETS MISSED: {', '.join(missed)}")
    return {
        "source_store": str(a.source) if a.source else "indexed from shared/data/pets",
        "rows": a.rows, "batch": a.batch, "baseline_rows": a.baseline_rows, "queries": a.queries,
        "tile_noise": a.noise, "tile_noise_shape": NOISE_SHAPE, "seed": a.seed,
        "peak_rss_note": "VmHWM of the append process, reset after imports and row generation (the store work on "
                         "top of what the process held); ru_maxrss of a child inherits its spawner's high-water "
                         "mark on Linux, kept as ru_maxrss_mb for reference",
        "ratio_note": "growth = mean of the last 10% of appends / mean of the first 10%, over appends 2..N (the "
                      "first commit creates the store)",
        "targets": targets, "all_targets_met": ok,
        "new": {"appends_summary": new_sum, "first_appends_summary": new_first, "at_baseline_rows": at_baseline,
                "before_optimize": unoptimized, "optimize": opt, "after_optimize": after,
                "after_optimize_other_index_mode": after_other, "mammals_info": info,
                "disk_before_optimize": before_optimize_disk, "disk": disk, "appends": new_runs},
        "baseline": ({"commit": BASELINE_COMMIT, "appends_summary": old_sum, "at_baseline_rows": old_query,
                      "appends": old_runs} if have_baseline else {"commit": BASELINE_COMMIT, "skipped": True}),
    }


if __name__ == "__main__":
    sys.exit(main())
