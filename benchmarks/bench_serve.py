"""`mammals serve` under load: 16 concurrent clients for 60 s per query kind, against a real server process.

The server is started as a user starts it (`mammals serve STORE`, one process, 127.0.0.1, a free port) on the
given store (default: the pets photos indexed into a temporary store), warmed with a few queries of each kind,
then for each kind, ``--clients`` threads send requests back to back for ``--seconds``:

* ``id``: ``GET /neighbours/{id}?k=10`` for random indexed ids (no model runs: stored vector + index search);
* ``image``: ``POST /query/image?k=10`` uploading random shared pets photos (decode + encoder + search).

Figures per kind: requests/s, latency p50/p95/p99 (ms, client side), errors (any non-200). Target (the issue's):
0 errors, and p50 of an id query <= 50 ms on a 1M-row store (``--store`` a store kept by
``benchmarks.bench_store --keep``). The clients run on the same machine as the server, and share its cores.

    python -m benchmarks.bench_serve [--store STORE] [--clients 16] [--seconds 60] [--kinds id,image]
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
from benchmarks.common import SHARED_DATA, shown, write_results
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="store to serve (default: index the shared pets photos)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--kinds", default="id,image")
    ap.add_argument("--name", default="serve", help="results file name (benchmarks/results/NAME.json)")
    a = ap.parse_args()

    pets = SHARED_DATA / "pets"
    photos = [p.read_bytes() for p in sorted(pets.rglob("*.jpg"))[::10]]
    with tempfile.TemporaryDirectory() as tmp:
        store_path = a.store
        if store_path is None:
            from indexer.pipeline import run_index

            store_path = Path(tmp) / "pets"
            run_index([pets], store_path, progress=False, sparsity="off")
        store = Store.open(store_path)
        ids = store.image_ids()
        port = _free_port()
        t = time.perf_counter()
        log_file = Path(tmp) / "server.log"
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
            runs = {}
            for kind in a.kinds.split(","):
                runs[kind] = _load(client, kind, ids, photos, a.clients, a.seconds)
                r = runs[kind]
                print(f"{kind:<5}: {r['requests_per_second']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f}  errors {r['errors']}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    out = write_results(a.name, {
        "store": shown(store_path) if a.store else "pets photos indexed into a temporary store",
        "rows": len(ids), "clients": a.clients, "seconds_per_kind": a.seconds,
        "server_start_seconds": round(start_s, 2), "runs": runs,
        "target": {"id_p50_ms_at_1m_rows": TARGET_ID_P50_MS_AT_1M, "errors": 0},
    })
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
