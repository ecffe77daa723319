"""`mammals` subcommands of the analysis package: `train`, `query`, `serve`, `map`, `export` and `quality` (entry
points in ``pyproject.toml``).  Heavy imports happen inside the run functions, so that `mammals --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any

from indexer import defaults
from indexer.cli import EXIT_OK, EXIT_PARTIAL, Command
from indexer.errors import UsageError
from indexer.store import schema

log = logging.getLogger("mammals")


# ---------------------------------------------------------------------------------------------------- export
def _conf_export(p: argparse.ArgumentParser) -> None:
    # The choices are spelled out here (not imported from analysis.export) to keep `mammals --help` light.
    whats = ("images", "map", "clusters", "cluster-summary", "sparsity-matrix", "sparsity-curves",
             "sparsity-differences", "sparsity-context", "sparsity-tests", "sparsity-correlations",
             "sparsity-heatmap")
    p.add_argument("store", type=Path, metavar="STORE")
    p.add_argument("--what", required=True, choices=whats, help="what to export")
    p.add_argument("--format", dest="fmt", choices=("csv", "parquet", "latex", "png", "svg"),
                   help="output format (default: from the --out suffix: .csv .parquet .tex .png .svg)")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="file to write (atomically)")
    p.add_argument("--model", default="encoder", help="sparsity model: encoder, mapper or vae (default encoder)")
    p.add_argument("--metric", default="hoyer",
                   help="sparsity metric: near_zero_fraction, hoyer, gini, l1_l2_ratio (default hoyer)")
    p.add_argument("--label", default="breed",
                   help="label column: categorical for curves/tests/heatmap, numeric for correlations "
                        "(default breed)")
    p.add_argument("--space", action="append", default=[], metavar="SPACE",
                   help="images: add this space's vectors (repeatable); map/clusters: the space to use")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of curve intervals")
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate for tests (BH)")
    p.add_argument("--digits", type=int, default=3, help="decimals in LaTeX tables")
    p.add_argument("--columns", help="comma-separated columns to keep, in order")
    p.add_argument("--caption", help="LaTeX caption (default: describes the table)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--relative", action="store_true",
                   help="heat-map figure: each group minus its layer's mean (diverging colours)")
    p.add_argument("--wide", action="store_true",
                   help="CSV: vectors as one column per dimension (e0..eN) instead of a JSON array per cell")


def _run_export(a: argparse.Namespace) -> int:
    from analysis.export import export_store

    try:
        out = export_store(
            a.store, a.what, a.out, fmt=a.fmt, model=a.model, metric=a.metric, label=a.label, spaces=a.space,
            confidence=a.confidence, alpha=a.alpha, digits=a.digits, caption=a.caption, title=a.title,
            relative=a.relative, wide=a.wide,
            columns=[c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None,
        )
    except ValueError as e:  # a request the store cannot answer: one line, exit 2 (see indexer.cli.main)
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return EXIT_OK


EXPORT = Command("export", "export tables and figures (CSV, Parquet, LaTeX, PNG, SVG) for papers", _conf_export,
                 _run_export)


# ---------------------------------------------------------------------------------------------------- map
def _conf_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE")
    p.add_argument("--space", default="encoder",
                   help="feature space to map: encoder (default), mapper_id, mapper_attr, vae_mu, vae_logvar")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="map dimensions (default 2)")
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP n_neighbors (default 15)")
    p.add_argument("--min-dist", type=float, default=0.1, help="UMAP min_dist (default 0.1)")
    p.add_argument("--metric", default="cosine", help="UMAP metric (default cosine)")
    p.add_argument("--seed", type=int, default=42,
                   help="UMAP random_state (default 42; maps of >= 20,000 points ignore it and run in parallel)")
    p.add_argument("--clusters", action="store_true",
                   help="also cluster the map with HDBSCAN and print the agreement with every label column")
    p.add_argument("--cluster-on", choices=("map", "pca"), default="map",
                   help="cluster the map's coordinates (default) or the space reduced by PCA (--pca-components)")
    p.add_argument("--pca-components", type=int, default=50, help="with --cluster-on pca: dimensions (default 50)")
    p.add_argument("--min-cluster-size", type=int, default=15, help="HDBSCAN min_cluster_size (default 15)")
    p.add_argument("--min-samples", type=int, help="HDBSCAN min_samples (default: min_cluster_size)")
    p.add_argument("--cluster-selection", choices=("eom", "leaf"), default="eom",
                   help="HDBSCAN cluster_selection_method (default eom)")
    p.add_argument("--hard", action="store_true",
                   help="keep noise points as noise (default: give them their likeliest cluster)")
    p.add_argument("--coarse", action="store_true",
                   help="species-level groups: 100 UMAP neighbours and clusters of >= 1/10 of the images "
                        "(overrides --n-neighbors and --min-cluster-size)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def map_report(store_path: Path, *, space: str = "encoder", dims: int = 2, n_neighbors: int = 15,
               min_dist: float = 0.1, metric: str = "cosine", seed: int | None = 42, clusters: bool = False,
               min_cluster_size: int = 15, cluster_on: str = "map", pca_components: int = 50,
               min_samples: int | None = None, cluster_selection: str = "eom", soft: bool = True,
               coarse: bool = False, progress: bool = False) -> dict[str, Any]:
    """Everything `mammals map` shows, as data: the map (and clusters) computed or loaded from the store's cache."""
    from analysis.clusters import ClusterParams, coarse_cluster_params, compute_clusters, label_agreement
    from analysis.maps import MapParams, compute_map, require_map_points
    from indexer.store import Store

    store = Store.open(store_path)
    try:
        if coarse:
            base = coarse_cluster_params(len(store), space)
            n_neighbors, min_cluster_size = base.map.n_neighbors, base.min_cluster_size
        params = MapParams(space=space, n_components=dims, n_neighbors=n_neighbors, min_dist=min_dist,
                           metric=metric, random_state=seed)
        cparams = ClusterParams(space=space, on=cluster_on, pca_components=pca_components,
                                min_cluster_size=min_cluster_size, min_samples=min_samples, soft=soft,
                                cluster_selection_method=cluster_selection, map=params) if clusters else None
        require_map_points(store, space)
    except ValueError as e:
        raise UsageError(str(e)) from None
    m = compute_map(store, params, progress=progress)
    out: dict[str, Any] = {
        "store": str(store_path),
        "space": space,
        "points": len(m.frame),
        "dims": dims,
        "params": params.as_dict(),
        "settings": m.settings,
        "map": m.info.as_dict(),
    }
    if cparams is not None:
        c = compute_clusters(store, cparams, progress=progress)
        hard = c.frame["cluster"]
        out["clusters"] = {
            **c.info.as_dict(),
            "params": {k: v for k, v in cparams.as_dict().items() if k != "map"},
            "n_clusters": int(hard[hard >= 0].nunique()),
            "noise_fraction": float((hard < 0).mean()) if len(hard) else 0.0,
            "agreement": label_agreement(store, c.frame).to_dict(orient="records"),
        }
    return out


def _run_map(a: argparse.Namespace) -> int:
    import json
    import math

    r = map_report(a.store, space=a.space, dims=a.dims, n_neighbors=a.n_neighbors, min_dist=a.min_dist,
                   metric=a.metric, seed=a.seed, clusters=a.clusters, min_cluster_size=a.min_cluster_size,
                   cluster_on=a.cluster_on, pca_components=a.pca_components, min_samples=a.min_samples,
                   cluster_selection=a.cluster_selection, soft=not a.hard, coarse=a.coarse, progress=not a.quiet)
    if a.json:
        def clean(v: Any) -> Any:  # NaN (no labelled rows) is not JSON: null instead
            return None if isinstance(v, float) and math.isnan(v) else v

        if "clusters" in r:
            r["clusters"]["agreement"] = [{k: clean(v) for k, v in row.items()} for row in r["clusters"]["agreement"]]
        print(json.dumps(r, indent=2, default=str))
        return EXIT_OK
    m = r["map"]
    how = f"cache hit ({m['source']})" if m["hit"] else "computed"
    s = r["settings"]
    extra = f", PCA to {s['pca_components']} dims" if s["pca_components"] else ""
    seed = "parallel, unseeded" if s["parallel"] else f"seed {s['random_state']}"
    print(f"map        {r['space']}: {r['points']} points -> {r['dims']}-D in {m['seconds']:.2f} s, {how}")
    print(f"           UMAP n_neighbors {s['n_neighbors']}, metric {s['umap_metric']}{extra}, {seed}")
    print(f"table      {m['path']}")
    if "clusters" in r:
        c = r["clusters"]
        how = f"cache hit ({c['source']})" if c["hit"] else "computed"
        on = "the map" if c["params"]["on"] == "map" else f"PCA to {c['params']['pca_components']} dims"
        print(f"clusters   {c['n_clusters']} clusters on {on}, {c['noise_fraction']:.1%} noise (before soft "
              f"assignment) in {c['seconds']:.2f} s, {how}")
        print(f"table      {c['path']}")
        if c["agreement"]:
            print(f"{'label':<24} {'NMI':>6} {'ARI':>6} {'labelled':>9} {'values':>7}")
            for row in c["agreement"]:
                print(f"{row['label']:<24} {row['nmi']:6.3f} {row['ari']:6.3f} {row['n_labelled']:>9} "
                      f"{row['n_label_values']:>7}")
    return EXIT_OK


MAP = Command("map", "UMAP map (and HDBSCAN clusters) of a feature space, cached in the store", _conf_map, _run_map)


# ---------------------------------------------------------------------------------------------------- query
def _conf_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="photos to embed and search with")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                   help="an indexed image's id (or a unique prefix of 6+ characters); repeatable. Its own row is "
                        "left out of the neighbours unless --include-self")
    p.add_argument("--include-self", action="store_true", help="with --id: keep the image itself (rank 1)")
    p.add_argument("--text", dest="texts", action="append", default=[], metavar="PROMPT",
                   help="a text prompt (open_clip stores only, encoder space); repeatable")
    p.add_argument("-k", type=int, default=defaults.K, help=f"neighbours per query (default {defaults.K})")
    p.add_argument("--space", default=schema.ENCODER_SPACE,
                   help="feature space to search: encoder (default), mapper_id, mapper_attr, vae_mu, vae_logvar")
    p.add_argument("--device", default=defaults.DEVICE)
    p.add_argument("--json", action="store_true", help=f"machine-readable output ({'mammals.query/1'})")


def _run_query(a: argparse.Namespace) -> int:
    from analysis.neighbours import QUERY_JSON_SCHEMA, query_ids, query_images, query_texts
    from indexer.store import Store

    if a.k < 1:
        raise UsageError("-k must be >= 1")
    if not (a.images or a.ids or a.texts):
        raise UsageError("nothing to query: give IMAGE paths, --id ID or --text PROMPT")
    store = Store.open(a.store)
    results = []
    if a.images:
        results += query_images(store, a.images, k=a.k, space=a.space, device=a.device)
    if a.ids:
        results += query_ids(store, a.ids, k=a.k, space=a.space, exclude_self=not a.include_self)
    if a.texts:
        results += query_texts(store, a.texts, k=a.k, space=a.space, device=a.device)
    if a.json:
        print(json.dumps({"schema": QUERY_JSON_SCHEMA, "store": str(a.store), "space": a.space,
                          "encoder": store.encoder["name"], "k": a.k,
                          "results": [r.as_dict() for r in results]}, indent=2))
    else:
        for r in results:
            print(f"== {r.kind} {r.query}")
            if r.error:
                print(f"   error: {r.error}")
                continue
            for n in r.neighbours:
                print(f"  {n.rank:>3}  {n.similarity:6.3f}  {n.species or '-':<4} {n.breed or '-':<28} {n.path}")
            votes = ", ".join(f"{v.breed} {v.share:.0%}" for v in r.breed_votes[:5]) or "no labelled neighbours"
            print(f"   breed vote: {votes}")
    failed = [r for r in results if r.error]
    for r in failed:
        log.error("%s: %s", r.query, r.error)
    return EXIT_PARTIAL if failed else EXIT_OK


QUERY = Command("query", "nearest indexed images and breed votes for photos", _conf_query, _run_query)


# ---------------------------------------------------------------------------------------------------- train
def _config_classes() -> dict[str, type]:
    from indexer.models.mapper import MapperConfig
    from indexer.models.vae import VAEConfig

    return {"mapper": MapperConfig, "vae": VAEConfig}


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per config field; its help is the field's docstring in the dataclass (one place per fact)."""
    from indexer.models.config_docs import field_docs

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help strings: a literal % in a docstring must be doubled.
        doc = f"{docs.get(f.name, '').replace('%', '%%')} (default {default})".lstrip()
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif isinstance(default, tuple) or typing.get_origin(hint) is tuple:
            p.add_argument(flag, type=int, nargs="+", default=None, metavar="N", help=doc)
        elif hint in (int, float, str):
            p.add_argument(flag, type=hint, default=None, help=doc)
        else:  # Optional[...] and other unions: accept the text and let the dataclass validate it
            p.add_argument(flag, type=float if isinstance(default, float) else str, default=None, help=doc)


def _conf_train(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, cls in _config_classes().items():
        what = {"mapper": "identity/attribute mapper on the encoder embeddings (breed labels needed)",
                "vae": "convolutional VAE on the photos"}[name]
        sp = sub.add_parser(name, help=what, description=f"Train the {what}.")
        # -q/-v also after MODEL; SUPPRESS keeps a flag given before MODEL from being reset by this parser.
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        sp.add_argument("--store", type=Path, required=True)
        sp.add_argument("--json", action="store_true", help="print the training report as JSON")
        if name == "vae":
            sp.add_argument("--workers", type=int, default=1, help="photo decode workers")
            sp.add_argument("--device", default=defaults.DEVICE,
                            help="auto (cuda if present), cpu, cuda, cuda:1, ... (default %(default)s)")
        _add_config_options(sp, cls)


def _config_from_args(cls: type, a: argparse.Namespace) -> Any:
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name, None) is not None}
    for k, v in given.items():
        if isinstance(v, list):
            given[k] = tuple(v)
    return cls(**given)


def _run_train(a: argparse.Namespace) -> int:
    from analysis.training import train_store_mapper, train_store_vae

    cfg = _config_from_args(_config_classes()[a.model], a)
    if a.model == "mapper":
        out = train_store_mapper(a.store, cfg, progress=not a.quiet)
    else:
        out = train_store_vae(a.store, cfg, progress=not a.quiet, workers=a.workers, device=a.device)
    if a.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"trained {a.model}: {out['dir']} (sha256 {out['sha256'][:16]}…)")
        for k, v in out["report"].items():
            print(f"  {k:<32} {v:.4f}" if isinstance(v, float) else f"  {k:<32} {v}")
        for k in ("reconstructions_png", "samples_png"):
            if k in out:
                print(f"  {k:<32} {out[k]}")
        print(f"run `mammals index --store {a.store}` to compute its spaces for every image")
    return EXIT_OK


TRAIN = Command("train", "train the mapper or the VAE on a store", _conf_train, _run_train)


# ---------------------------------------------------------------------------------------------------- serve
def _conf_serve(p: argparse.ArgumentParser) -> None:
    # Constants from defaults, not analysis.server: building the parser must not import fastapi, torch or faiss.
    token_env = defaults.SERVE_TOKEN_ENV
    p.add_argument("store", type=Path, help="the store to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; another address needs a token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with the store loaded")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${token_env} when set)")
    p.add_argument("--max-upload-mb", type=float, default=defaults.SERVE_MAX_UPLOAD_MB,
                   help="largest accepted upload in MiB (default %(default)s)")
    p.add_argument("--device", default="cpu", help="where query photos are embedded (default cpu)")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _run_serve(a: argparse.Namespace) -> int:
    import os

    import uvicorn

    from analysis.server import TOKEN_ENV, create_app
    from indexer.store import Store

    token = a.token or os.environ.get(TOKEN_ENV) or None
    if a.host not in _LOOPBACK and not token:
        raise UsageError(f"--host {a.host} exposes the store beyond this machine: give --token (or ${TOKEN_ENV})")
    if a.workers < 1 or not 0 < a.port < 65536 or a.max_upload_mb <= 0:
        raise UsageError("--workers must be >= 1, --port in 1-65535 and --max-upload-mb > 0")
    Store.open(a.store)  # a missing or broken store fails here, before the server starts
    max_upload = int(a.max_upload_mb * 2**20)
    log.info("serving %s on http://%s:%d (docs at /docs)", a.store, a.host, a.port)
    if a.workers == 1:
        uvicorn.run(create_app(a.store, token=token, max_upload_bytes=max_upload, device=a.device), host=a.host,
                    port=a.port, log_level="warning")
    else:  # worker processes build the app themselves, from the environment
        os.environ.update({"MAMMALS_SERVE_STORE": str(a.store.resolve()), "MAMMALS_SERVE_MAX_UPLOAD": str(max_upload),
                           "MAMMALS_SERVE_DEVICE": a.device, TOKEN_ENV: token or ""})
        uvicorn.run("analysis.server:app_from_env", factory=True, host=a.host, port=a.port, workers=a.workers,
                    log_level="warning")
    return EXIT_OK


SERVE = Command("serve", "HTTP query service over a store (FastAPI; docs at /docs)", _conf_serve, _run_serve)


# ---------------------------------------------------------------------------------------------------- quality
QUALITY_CHECKS = ("duplicates", "labels", "outliers")


def _conf_quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="the store to check")
    p.add_argument("--out", type=Path, default=None,
                   help="write duplicates.csv, label_issues.csv, outliers.csv and summary.json here")
    p.add_argument("--checks", default=",".join(QUALITY_CHECKS),
                   help=f"comma-separated subset of {', '.join(QUALITY_CHECKS)} (default: all)")
    p.add_argument("--space", default=schema.ENCODER_SPACE, help="feature space for neighbours (default encoder)")
    p.add_argument("--label", default="breed", help="label column checked for errors (default breed)")
    p.add_argument("-k", type=int, default=defaults.QUALITY_NEIGHBOURS,
                   help=f"neighbours per photo (default {defaults.QUALITY_NEIGHBOURS})")
    p.add_argument("--max-hash-bits", type=int, default=defaults.DUPLICATE_MAX_HASH_BITS,
                   help="perceptual hashes differing in at most this many of 64 bits are duplicates "
                        f"(default {defaults.DUPLICATE_MAX_HASH_BITS})")
    p.add_argument("--outlier-fraction", type=float, default=defaults.OUTLIER_FLAG_FRACTION,
                   help=f"share of photos flagged as outliers (default {defaults.OUTLIER_FLAG_FRACTION})")
    p.add_argument("--top", type=int, default=10, help="rows of each finding printed (default 10)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (mammals.quality/1)")


def _run_quality(a: argparse.Namespace) -> int:
    from analysis.quality import QualityParams, quality_report, write_report
    from indexer.store import Store

    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(QUALITY_CHECKS))
    if unknown or not checks:
        raise UsageError(f"--checks: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(QUALITY_CHECKS)}")
    if a.k < 1 or a.max_hash_bits < 0 or not 0 <= a.outlier_fraction <= 1:
        raise UsageError("-k must be >= 1, --max-hash-bits >= 0 and --outlier-fraction in [0, 1]")
    store = Store.open(a.store)
    params = QualityParams(space=a.space, k=a.k, label=a.label, duplicate_max_hash_bits=a.max_hash_bits,
                           outlier_flag_fraction=a.outlier_fraction)
    try:
        report = quality_report(store, params, checks=checks, progress=not a.quiet)
    except ValueError as e:  # a label column the store lacks
        raise UsageError(str(e)) from None
    if a.out is not None:
        for path in write_report(report, a.out):
            log.info("wrote %s", path)
    if a.json:
        print(json.dumps(report.summary, indent=2, default=str))
        return EXIT_OK
    s = report.summary
    print(f"{s['store']} (version {s['version']}, {s['images']} photos)")
    if "duplicates" in s:
        d = s["duplicates"]
        print(f"\nduplicates: {d['pairs']} pairs in {d['groups']} groups ({d['exact_pairs']} exact), "
              f"from {d['candidates']} candidate pairs")
        for r in report.duplicates.head(a.top).itertuples():
            print(f"  {r.kind:<5} {r.hash_bits:>2} bits  cos {r.cosine:.3f}  {r.path_a}  {r.path_b}")
    if "label_issues" in s:
        li = s["label_issues"]
        if "skipped" in li:
            print(f"\nlabel errors ({li['label']}): skipped, {li['skipped']}")
        else:
            print(f"\nlabel errors ({li['label']}): {li['likely']} likely, {li['flagged']} flagged by cleanlab of "
                  f"{li['labelled']} labelled photos (out-of-fold accuracy {li['out_of_fold_accuracy']:.1%})")
            for r in report.label_issues[report.label_issues["likely"]].head(a.top).itertuples():
                print(f"  {r.given!s:<24} -> {r.suggested!s:<24} p={r.given_probability:.3f}  {r.path}")
    if "outliers" in s:
        o = s["outliers"]
        print(f"\noutliers: {o['flagged']} flagged of {o['scored']} (score = mean cosine distance to the "
              f"{params.k} nearest photos; median {o['median_score']})")
        for r in report.outliers.head(a.top).itertuples():
            print(f"  #{r.rank:<4} {r.score:.3f}  {r.path}")
    return EXIT_OK


QUALITY = Command("quality", "data quality: near-duplicates, likely label errors, outliers (CSV with --out)",
                  _conf_quality, _run_quality)
