"""`mammals serve` under load: 16 concurrent clients for 60 s per query kind, against a real server process.

For each store (the pets photos indexed into a temporary store, then every ``--store``, e.g. the 1M-row store
kept by ``benchmarks.bench_store --keep``) the server is started as a user starts it (`mammals serve STORE`,
one process, 127.0.0.1, a free port), warmed with a few queries of each kind, then for each kind ``--clients``
threads send requests back to back for ``--seconds``:

* ``id``: ``GET /neighbours/{id}?k=10`` for random indexed ids (no model runs: stored vector + index search);
* ``image``: ``POST /query/image?k=10`` uploading random shared pets photos (decode + encoder + search).

Figures per kind: requests/s, latency p50/p95/p99 (ms, client side), errors (any non-200), and the server's
peak RSS.  Baseline, measured in the same run: the same query done in this process by the library
(``query_ids`` / ``query_photo_bytes``), one at a time for ``--baseline-seconds``: the floor without HTTP,
JSON or queueing; the ratios are server latency p50 over the library's p50, and server requests/s over the
library's sequential rate.  Target (the issue's): 0 errors, and p50 of an id query <= 50 ms on a store of at
least 1M rows.  The clients run on the same machine as the server and share its cores.

    python -m benchmarks.bench_serve [--store STORE ...] [--no-pets] [--clients 16] [--seconds 60]
                                     [--kinds id,image]
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from analysis.client import Client, ServiceError
from benchmarks.common import SHARED_DATA, write_results
from indexer.store import Store

TARGET_ID_P50_MS_AT_1M = 50.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(client: Client, kind: str, ids: list[str], photos: list[bytes], clients: int,
          seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[float] = []
        bad: list[str] = []
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                if kind == "id":
                    client.neighbours(rng.choice(ids), k=10)
                else:
                    client.query_image(rng.choice(photos), k=10, filename="q.jpg")
                mine.append(time.perf_counter() - t)
            except (ServiceError, OSError) as e:
                bad.append(str(e)[:120])
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "requests_per_second": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


BIG_ROWS = 1_000_000


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _in_process(store_path: Path, kind: str, ids: list[str], photos: list[bytes], seconds: float) -> dict[str, Any]:
    """The library answering the same queries one at a time in this process: the floor a server adds to."""
    from analysis.neighbours import encoder_for_store, query_ids, query_photo_bytes

    store = Store.open(store_path)
    encoder = encoder_for_store(store) if kind == "image" else None
    rng = random.Random(7)

    def once() -> None:
        if kind == "id":
            (r,) = query_ids(store, [rng.choice(ids)], k=10, exclude_self=True)
        else:
            r = query_photo_bytes(store, rng.choice(photos), "q.jpg", k=10, encoder=encoder, device="cpu")
        if r.error:
            raise RuntimeError(r.error)

    for _ in range(3):
        once()
    latencies = []
    stop = time.monotonic() + seconds
    t0 = time.perf_counter()
    while time.monotonic() < stop:
        t = time.perf_counter()
        once()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "requests_per_second": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def bench_one(store_path: Path, photos: list[bytes], a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every kind against one store: the library in this process first, then the server under load."""
    ids = Store.open(store_path).image_ids()
    kinds = a.kinds.split(",")
    baseline = {kind: _in_process(store_path, kind, ids, photos, a.baseline_seconds) for kind in kinds}
    port = _free_port()
    t = time.perf_counter()
    log_file = tmp / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "indexer.cli", "serve", str(store_path), "--port", str(port),
                               "-q"], stderr=log_file.open("w"))
    client = Client(f"http://127.0.0.1:{port}", timeout=120)
    try:
        while True:
            try:
                client.healthz()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited: {log_file.read_text()[-2000:]}") from None
                time.sleep(0.2)
        start_s = time.perf_counter() - t
        for _ in range(3):
            client.neighbours(ids[0], k=10)
            client.query_image(photos[0], k=10, filename="q.jpg")
        runs: dict[str, Any] = {}
        for kind in kinds:
            r = runs[kind] = _load(client, kind, ids, photos, a.clients, a.seconds)
            b = baseline[kind]
            r["p50_over_library_p50"] = round(r["p50_ms"] / b["p50_ms"], 2)
            r["rate_over_library_sequential"] = round(r["requests_per_second"] / b["requests_per_second"], 2)
            print(f"  {kind:<5}: {r['requests_per_second']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f}  errors {r['errors']}   library alone: "
                  f"{b['requests_per_second']:.1f} req/s, p50 {b['p50_ms']:.1f} ms", flush=True)
        rss = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"rows": len(ids), "server_start_seconds": round(start_s, 2), "server_peak_rss_mb": rss,
            "runs": runs, "library_in_process": baseline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, action="append", default=[],
                    help="a store to serve besides the pets (repeatable; e.g. one kept by bench_store --keep)")
    ap.add_argument("--no-pets", action="store_true", help="skip the pets store")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline-seconds", type=float, default=15.0, help="seconds of the in-process baseline")
    ap.add_argument("--kinds", default="id,image")
    ap.add_argument("--name", default="serve", help="results file name (benchmarks/results/NAME.json)")
    a = ap.parse_args()

    pets = SHARED_DATA / "pets"
    photos = [p.read_bytes() for p in sorted(pets.rglob("*.jpg"))[::10]]
    stores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets: list[tuple[str, Path]] = []
        if not a.no_pets:
            from indexer.pipeline import run_index

            run_index([pets], Path(tmp) / "pets", progress=False, sparsity="off")
            targets.append(("pets photos indexed into a temporary store", Path(tmp) / "pets"))
        targets += [(f"store {p.name!r} given with --store", p) for p in a.store]
        for label, path in targets:
            print(f"{label}:", flush=True)
            result = bench_one(path, photos, a, Path(tmp))
            stores[f"{result['rows']:,} rows: {label}"] = result  # no machine's paths in the results file
    big = [s for s in stores.values() if s["rows"] >= BIG_ROWS]
    errors = sum(r["errors"] for s in stores.values() for r in s["runs"].values())
    id_p50 = max((s["runs"]["id"]["p50_ms"] for s in big if "id" in s["runs"]), default=None)
    met = {"errors": errors == 0,
           "id_p50_ms_at_1m_rows": None if id_p50 is None else id_p50 <= TARGET_ID_P50_MS_AT_1M}
    out = write_results(a.name, {
        "clients": a.clients, "seconds_per_kind": a.seconds, "baseline_seconds": a.baseline_seconds,
        "stores": stores,
        "target": {"id_p50_ms_at_1m_rows": TARGET_ID_P50_MS_AT_1M, "errors": 0},
        "target_met": met,
    })
    print(f"errors {errors}; id p50 at >= {BIG_ROWS:,} rows: {id_p50} ms (target <= {TARGET_ID_P50_MS_AT_1M}): "
          f"{met}", file=sys.stderr)
    print(f"written to {out}", file=sys.stderr)
    return 0 if errors == 0 and met["id_p50_ms_at_1m_rows"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
