"""The indexer's subcommands: `mammals index`, `info`, `verify` and `migrate` (registered as entry points).

Heavy imports (torch, the store) happen inside the run functions, so that building the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from indexer import defaults
from indexer.cli import EXIT_OK, EXIT_PARTIAL, Command
from indexer.engines import ENGINES, EngineOptions
from indexer.errors import UsageError
from indexer.store import schema


def default_data_dirs() -> list[Path]:
    """The README's main job indexes ../shared/data/pets when no folder is given and it exists."""
    for cand in (Path.cwd().parent / "shared" / "data" / "pets", defaults.SHARED_PETS):
        if cand.is_dir():
            return [cand]
    raise UsageError("no DATA_DIR given and ../shared/data/pets does not exist; name a photo folder")


def stored_sources(store: Path) -> list[Path]:
    """The folders an existing store was last indexed from (`mammals index --store S` refreshes it)."""
    from indexer.store import Store

    if not (store / schema.MANIFEST).exists():
        return []
    return [Path(p) for p in Store.open(store).manifest.get("parameters", {}).get("sources", [])]


# ---------------------------------------------------------------------------------------------------- index
def _conf_index(p: argparse.ArgumentParser) -> None:
    from indexer.sources import LAYOUTS

    p.add_argument("data_dirs", nargs="*", type=_path_arg, metavar="DATA_DIR",
                   help="photo folders or CSV manifests (default: the store's own sources when it exists, "
                        "else ../shared/data/pets where it exists)")
    p.add_argument("--store", type=_path_arg, required=True,
                   help="store directory (created if missing); a path or a file:// URL")
    p.add_argument("--encoder", default=defaults.ENCODER,
                   help=f"encoder name (default {defaults.ENCODER}; also open_clip:MODEL/TAG_OR_PATH, "
                        "timm:MODEL/CHECKPOINT)")
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="dataset layout (default: detect)")
    p.add_argument("--species", choices=("cat", "dog"), help="species for folders whose layout does not say")
    p.add_argument("--labels", type=Path, metavar="CSV", help="CSV with a 'path' column; other columns are joined")
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    p.add_argument("--workers", type=int, default=defaults.WORKERS,
                   help="local engine: decode threads running ahead of the model (0: decode between batches)")
    p.add_argument("--device", default=defaults.DEVICE, help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default=defaults.PRECISION,
                   help="encoder arithmetic: auto = fp16 autocast on CUDA, bf16 for transformers and the VAE's "
                        "encoder on CPUs with native bf16 (cosine >= 0.999 to fp32), else fp32 (default %(default)s)")
    p.add_argument("--sparsity", choices=("auto", *defaults.SPARSITY_METHODS), default=None,
                   help="per-layer activation sparsity: sampled (estimated from a stratified random sample of "
                        f"{defaults.SPARSITY_SAMPLE_UNITS} units per image and layer; error bounds in "
                        "indexer/sparsity/metrics.py), exact (every unit; several times slower), off; auto (the "
                        f"default): the store's method, else {defaults.SPARSITY}")
    p.add_argument("--no-sparsity", action="store_true", help="same as --sparsity off")
    p.add_argument("--sparsity-threshold", type=float, default=defaults.SPARSITY_THRESHOLD,
                   help=f"near-zero threshold relative to each layer's peak (default {defaults.SPARSITY_THRESHOLD})")
    p.add_argument("--wait", action="store_true",
                   help="when another process is writing the store, wait for it (default: exit 2 at once)")
    p.add_argument("--index", dest="index_kind", metavar="KIND", default=None,
                   help="vector index type: auto (exact below a size threshold, approximate above; the default), "
                        "or force one of flat, ivf, ivfpq, hnsw (remembered by the store)")
    p.add_argument("--engine", choices=ENGINES, default=defaults.ENGINE,
                   help="where new photos are decoded and embedded: local (this process; the default) or ray (Ray "
                        "Data: CPU decode tasks and model actors; pip install 'mammals-space[ray]'); this process "
                        "writes the store either way")
    p.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="--engine ray: a running cluster (auto, or HOST:PORT of `ray start --head`); default: start "
                        "a Ray on this machine for the run")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="--engine ray: model actors, each holding the encoder and trained models (default 1)")
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs per model actor (default 0: CPU actors)")
    p.add_argument("--json", action="store_true", help="print the run report as JSON on stdout")


def _path_arg(value: str) -> Path:
    """argparse type: a path or a file:// URL (indexer.sources.local_path); anything else exits 2 with why."""
    from indexer.sources import local_path

    try:
        return local_path(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_index(a: argparse.Namespace) -> int:
    from indexer.pipeline import run_index
    from indexer.store.vectors import INDEX_KINDS

    if a.batch_size < 1 or a.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    if a.index_kind is not None and a.index_kind not in INDEX_KINDS:
        raise UsageError(f"--index must be one of {', '.join(INDEX_KINDS)}, not {a.index_kind!r}")
    if a.no_sparsity and a.sparsity not in (None, "off"):
        raise UsageError(f"--no-sparsity contradicts --sparsity {a.sparsity}")
    sparsity = "off" if a.no_sparsity else a.sparsity or "auto"
    if a.engine != "ray" and (a.ray_address or a.concurrency != 1 or a.num_gpus_per_worker):
        raise UsageError("--ray-address, --concurrency and --num-gpus-per-worker need --engine ray")
    try:
        engine = EngineOptions(a.engine, a.ray_address, a.concurrency, a.num_gpus_per_worker)
    except ValueError as e:
        raise UsageError(str(e)) from None
    dirs = a.data_dirs or stored_sources(a.store) or default_data_dirs()
    report = run_index(dirs, a.store, encoder=a.encoder, layout=a.layout, species=a.species, labels_csv=a.labels,
                       batch_size=a.batch_size, workers=a.workers, device=a.device, precision=a.precision,
                       progress=not a.quiet,
                       sparsity=sparsity, sparsity_threshold=a.sparsity_threshold, wait=a.wait,
                       index_kind=a.index_kind, engine=engine)
    if a.json:
        print(json.dumps({**report.as_dict(), "error_files": [{"path": p, "reason": r} for p, r in report.errors]},
                         indent=2))
    else:
        rate = f", {report.images_per_second:.1f} img/s" if report.added else ""  # no rate for a run that added none
        print(f"{a.store}: added {report.added}, already indexed {report.already_indexed}, "
              f"duplicates {report.duplicates}, errors {len(report.errors)} "
              f"({report.scanned} files scanned in {report.seconds:.1f} s{rate})")
        if report.labels_updated:
            print(f"{a.store}: labels from {a.labels} updated for {report.labels_updated} already-indexed images")
        if report.recomputed:
            print(f"{a.store}: recomputed for every image: {', '.join(report.recomputed)}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- info
def _index_line(ix: dict[str, Any]) -> str:
    """One line per index: its type and what it measured about itself (recall against exact search, latency)."""
    q = ix.get("quality") or {}
    parts = [f"{ix.get('kind', '?')}", f"{ix.get('segments', 0)} segment(s)"]
    if q:
        parts.append(f"recall@10 {q.get('recall_at_10', float('nan')):.3f}")
        parts.append(f"p50 {q.get('p50_ms', float('nan')):.1f} ms, p95 {q.get('p95_ms', float('nan')):.1f} ms")
        if q.get("memory_bytes") is not None:
            parts.append(f"{q['memory_bytes'] / 2**20:.1f} MiB")
    else:
        parts.append("quality not measured yet")
    return ", ".join(parts)


def _conf_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE")
    p.add_argument("--json", action="store_true")


def store_info(path: Path) -> dict[str, Any]:
    """Everything `mammals info` shows, as data."""
    from indexer.store import Store

    store = Store.open(path)
    m = store.manifest
    errors = store.errors
    return {
        "store": str(path),
        "schema_version": m["schema_version"],
        "version": store.version,
        "encoder": m["encoder"],
        "spaces": {n: {**{k: v for k, v in s.items() if k in ("dim", "count", "kind", "model_sha256", "missing")},
                       "index": {k: v for k, v in s["index"].items() if k in ("kind", "rows", "params", "quality")}
                                | {"segments": len(s["index"].get("segments", []))}}
                   for n, s in m.get("spaces", {}).items()},
        "models": m.get("models", {}),
        "counts": m.get("counts", {}),
        "errors": [{"path": p, "reason": r} for p, r in zip(errors["path"], errors["reason"], strict=True)],
        "versions": m.get("versions", {}),
        "created_at": m.get("created_at"),
        "updated_at": m.get("updated_at"),
        "last_run": (m.get("runs") or [None])[-1],
    }


def _run_info(a: argparse.Namespace) -> int:
    info = store_info(a.store)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    c = info["counts"]
    enc = info["encoder"]
    print(f"store      {info['store']} (schema {info['schema_version']}, version {info['version']}, "
          f"updated {info['updated_at']})")
    print(f"encoder    {enc['name']}  dim {enc['dim']}  weights sha256 {enc['weights_sha256'][:16]}…")
    print(f"images     {c.get('images', 0)}   errors {c.get('errors', 0)}")
    for name, s in info["spaces"].items():
        missing = f"  ({s['missing']} image(s) left out: photo unreadable)" if s.get("missing") else ""
        print(f"space      {name:<12} dim {s.get('dim')}  rows {s.get('count')}{missing}")
        print(f"  index    {_index_line(s['index'])}")
    for sp, n in c.get("by_species", {}).items():
        breeds = c.get("by_breed", {}).get(sp, {})
        print(f"species    {sp:<8} {n:>6} images, {len(breeds)} breed(s)")
        for br, nb in sorted(breeds.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"             {br:<32} {nb:>6}")
    if c.get("label_columns"):
        print(f"labels     {', '.join(c['label_columns'])}")
    for e in info["errors"][:20]:
        print(f"error      {e['path']}: {e['reason']}")
    if len(info["errors"]) > 20:
        print(f"error      … {len(info['errors']) - 20} more (see errors.parquet)")
    print("versions   " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return EXIT_OK


INDEX = Command("index", "index photo folders into a store", _conf_index, _run_index)
INFO = Command("info", "what is in a store", _conf_info, _run_info)


# ---------------------------------------------------------------------------------------------------- verify
def _conf_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE")
    p.add_argument("--repair", action="store_true",
                   help="fix what can be fixed: rebuild indexes from their tables, drop duplicate sparsity rows, "
                        "recompute unreadable spaces (takes the writer lock)")
    p.add_argument("--device", default=defaults.DEVICE, help="for recomputing spaces (auto, cpu, cuda, ...)")
    p.add_argument("--json", action="store_true")


def _run_verify(a: argparse.Namespace) -> int:
    from indexer.store.verify import verify

    def recompute(store: Any, spaces: list[str]) -> list[str]:
        from indexer.pipeline import recompute_spaces

        store.close()  # the pipeline takes the lock itself
        return recompute_spaces(a.store, spaces, device=a.device, progress=not a.quiet)

    findings = verify(a.store, repair=a.repair, recompute=recompute)
    bad = [f for f in findings if not f.ok and not f.repaired]
    if a.json:
        print(json.dumps({"store": str(a.store), "ok": not bad, "findings": [f.as_dict() for f in findings]},
                         indent=2))
    else:
        for f in findings:
            mark = "ok      " if f.ok else "repaired" if f.repaired else "FAILED  "
            print(f"{mark} {f.check}" + (f": {f.detail}" if f.detail else ""))
        print(f"{a.store}: " + ("all invariants hold" if not bad else
                                f"{len(bad)} problem(s)" + ("" if a.repair else "; `--repair` fixes what it can")))
    return EXIT_OK if not bad else EXIT_PARTIAL


VERIFY = Command("verify", "check a store's invariants (and repair them)", _conf_verify, _run_verify)


def _conf_migrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE")


def _run_migrate(a: argparse.Namespace) -> int:
    from indexer.store.migrate import is_v1, migrate_v1

    if not is_v1(a.store):
        raise UsageError(f"{a.store}: not a store of schema version 1 (nothing to migrate)")
    backup = migrate_v1(a.store)
    print(f"{a.store}: migrated to store schema {schema.SCHEMA_VERSION}; the old files are kept in {backup}")
    return EXIT_OK


MIGRATE = Command("migrate", "upgrade a store written by an older Mammals Space (schema 1)", _conf_migrate,
                  _run_migrate)
