"""`mammals index --engine local` against `--engine ray` on one machine, and a projection to more workers.

Both engines index the same photos into fresh stores, in this process, after one untimed read of every photo
(page cache) and one untimed warm-up run of each engine on a few photos (imports, Ray's worker processes).
The Ray instance is started once, before the timed runs, as a cluster would already be running
(its start-up time is printed on its own). The default sparsity of each run is the same (``--sparsity``).

Figures: img/s of each engine, Ray's overhead ratio (local img/s over Ray img/s; target <= 1.2 on one machine),
and a **projection** (not a measurement) for 4 and 16 model workers: the measured one-worker Ray rate times the
workers, capped by the rate at which this driver appended and committed the photos (measured: the run's seconds
minus the time it waited for Ray's outputs). The projection assumes each worker brings its own cores and the
shared storage keeps up.

    python -m benchmarks.bench_ray [--data ../shared/data/imagewoof-scale] [--sparsity off] [--limit N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED_DATA, shown, write_results
from indexer import defaults
from indexer.encoders import load_encoder
from indexer.pipeline import IndexReport, catalog, run_index

TARGET_OVERHEAD = 1.2
PROJECTED_WORKERS = (4, 16)


def _link_subset(paths: list[Path], root: Path, dest: Path) -> Path:
    for p in paths:
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(p)
    return dest


def _figures(rep: IndexReport) -> dict[str, Any]:
    driver_busy = max(rep.seconds - rep.stages.get("wait_for_decode", 0.0), 1e-9)
    return {"added": rep.added, "seconds": round(rep.seconds, 2), "images_per_second": round(rep.images_per_second, 2),
            "stages": rep.stages, "driver_busy_seconds": round(driver_busy, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "imagewoof-scale")
    ap.add_argument("--sparsity", default="off", choices=("off", *defaults.SPARSITY_METHODS))
    ap.add_argument("--limit", type=int, default=0, help="index only the first N photos (0: all)")
    ap.add_argument("--cpus", type=int, default=0, help="CPUs of the Ray instance (0: all of this machine)")
    a = ap.parse_args()

    import ray

    rows, _ = catalog([a.data])
    paths = [r.path for r in rows][: a.limit or None]
    for p in paths:
        p.read_bytes()
    enc = load_encoder(defaults.ENCODER, device="cpu")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = _link_subset(paths, a.data, tmp / "photos") if a.limit else a.data
        warm = _link_subset(paths[:32], a.data, tmp / "warm")
        t = time.perf_counter()
        ray.init(num_cpus=a.cpus or None, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        try:
            runs: dict[str, dict[str, Any]] = {}
            for engine in ("local", "ray"):
                run_index([warm], tmp / f"warm-{engine}", encoder=enc, engine=engine, progress=False,
                          sparsity=a.sparsity)
                rep = run_index([data], tmp / engine, encoder=enc, engine=engine, progress=False, sparsity=a.sparsity)
                runs[engine] = _figures(rep)
                print(f"{engine:<5}: {rep.added} photos in {rep.seconds:.1f} s, {rep.images_per_second:.1f} img/s",
                      file=sys.stderr)
                shutil.rmtree(tmp / engine)
        finally:
            ray.shutdown()
    local, dist = runs["local"], runs["ray"]
    overhead = local["images_per_second"] / dist["images_per_second"]
    per_worker = dist["images_per_second"]
    driver_ceiling = dist["added"] / dist["driver_busy_seconds"]
    projection = {str(w): {"images_per_second": round(min(per_worker * w, driver_ceiling), 1),
                           "limited_by": "workers" if per_worker * w < driver_ceiling else "driver"}
                  for w in PROJECTED_WORKERS}
    print(f"ray start-up       : {ray_start:.1f} s (not in the runs)")
    print(f"local              : {local['images_per_second']:7.1f} img/s")
    print(f"ray, 1 model actor : {dist['images_per_second']:7.1f} img/s")
    print(f"overhead (local/ray): {overhead:.2f}x  (target <= {TARGET_OVERHEAD})")
    print(f"driver ceiling     : {driver_ceiling:7.1f} img/s (appending and committing only)")
    for w, proj in projection.items():
        print(f"PROJECTION {w:>2} workers: {proj['images_per_second']:7.1f} img/s (limited by {proj['limited_by']})")
    out = write_results("ray", {
        "data": shown(a.data), "images": len(paths), "encoder": defaults.ENCODER, "sparsity": a.sparsity,
        "ray_start_seconds": round(ray_start, 2), "runs": runs, "overhead_ratio": round(overhead, 3),
        "target_overhead_ratio": TARGET_OVERHEAD,
        "projection": {"note": "PROJECTION, not measured: one-worker Ray rate x workers, capped by the driver's "
                               "measured append rate", "driver_ceiling_images_per_second": round(driver_ceiling, 1),
                       "workers": projection},
    })
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
