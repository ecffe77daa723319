"""`mammals verify STORE [--repair]`: check every invariant of the published version, and repair what can be.

Invariants: image ids unique and their faiss ids derived from them; every space's ids are distinct image ids and
cover every image except those its metadata counts as ``missing``; every index holds exactly its space's rows;
counts in the manifest match the tables; sparsity rows unique per (id, model, layer, metric) and of indexed
images; no Delta table is ahead of the published version.

Repairs never delete what cannot be recomputed in the same run: an index is rebuilt from its table; duplicate
sparsity rows are dropped (their copies stay); an unreadable space is recomputed (the encoder's from the photos,
the mapper's from the encoder space, the VAE's from the photos) by the indexing pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexer.store import schema, tables, vectors
from indexer.store.store import Store, StoreError, vectors_of

log = logging.getLogger(__name__)


@dataclass
class Finding:
    """One checked invariant: ``ok``, or what is wrong (and whether ``--repair`` fixed it)."""

    check: str
    ok: bool
    detail: str = ""
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Ctx:
    store: Store
    findings: list[Finding]
    broken_spaces: list[str]
    bad_indexes: list[str]
    duplicate_sparsity: int = 0

    def add(self, check: str, ok: bool, detail: str = "") -> None:
        self.findings.append(Finding(check, ok, detail))


def verify(path: Path, *, repair: bool = False, recompute: Callable[[Store, list[str]], list[str]] | None = None
           ) -> list[Finding]:
    """Check the store at ``path``; with ``repair`` take the writer lock and fix what can be fixed.

    ``recompute(store, spaces)`` recomputes unreadable spaces for every image (the pipeline provides it; the
    store layer does not run models).  Returns every finding, repaired ones marked.
    """
    store = Store.open(path, write=repair)
    try:
        ctx = _Ctx(store, [], [], [])
        _check_unpublished(ctx, before_repair=not repair)
        image_ids = _check_images(ctx)
        if image_ids is not None:
            for name in store.space_names():
                _check_space(ctx, name, image_ids)
            _check_sparsity(ctx, set(image_ids))
        if repair:
            _repair(ctx, recompute)
        return ctx.findings
    finally:
        store.close()


def _check_unpublished(ctx: _Ctx, *, before_repair: bool) -> None:
    # A writer rolls unpublished Delta versions back when it opens the store (repair mode did just that).
    ahead = []
    for rel, version in ctx.store._table_versions().items():
        latest = tables.latest_version(ctx.store.path / rel)
        if latest is None:
            ctx.add(f"table {rel}", False, "missing or unreadable Delta log")
        elif latest > version:
            ahead.append(f"{rel} (Delta {latest} > published {version})")
    note = "; the next writer rolls them back" if before_repair and ahead else ""
    ctx.add("no unpublished commits", not ahead, ", ".join(ahead) + note)


def _check_images(ctx: _Ctx) -> list[str] | None:
    store = ctx.store
    try:
        images = store.images
    except StoreError as e:
        ctx.add("images table readable", False, str(e))
        return None
    ids = images["id"].tolist()
    dup = len(ids) - len(set(ids))
    ctx.add("image ids unique", dup == 0, f"{dup} duplicate id(s)" if dup else "")
    bad_fid = int((images["faiss_id"].to_numpy() != np.array([schema.faiss_id_of(i) for i in ids], np.int64)).sum())
    ctx.add("faiss ids derived from image ids", bad_fid == 0, f"{bad_fid} row(s) differ" if bad_fid else "")
    n = int(store.manifest.get("counts", {}).get("images", -1))
    ctx.add("image count matches the manifest", n == len(ids), f"manifest {n}, table {len(ids)}")
    try:
        errors = store.errors
        ctx.add("errors table readable", True, f"{len(errors)} file(s) could not be used")
    except StoreError as e:
        ctx.add("errors table readable", False, str(e))
    return ids


def _check_space(ctx: _Ctx, name: str, image_ids: list[str]) -> None:
    store = ctx.store
    meta = store.manifest["spaces"][name]
    try:
        table = tables.read(store.path / meta["table"], int(meta["table_version"]))
        mat = vectors_of(table, int(meta["dim"]))
    except (tables.TableError, StoreError, pa.ArrowException) as e:
        ctx.add(f"space {name}: table readable", False, str(e))
        ctx.broken_spaces.append(name)
        return
    ids = table.column("id").to_pylist()
    known = set(image_ids)
    problems = []
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate id(s)")
    stray = len(set(ids) - known)
    if stray:
        problems.append(f"{stray} id(s) of no image")
    uncovered = len(known - set(ids))
    if uncovered != int(meta.get("missing", 0)):
        problems.append(f"{uncovered} image(s) without a vector, manifest says {int(meta.get('missing', 0))}")
    if len(ids) != int(meta["count"]):
        problems.append(f"manifest count {meta['count']}, table {len(ids)}")
    if not np.isfinite(mat).all():
        problems.append("non-finite vector values")
    ctx.add(f"space {name}: rows match the images", not problems, "; ".join(problems) or f"{len(ids)} rows")
    if problems:
        ctx.broken_spaces.append(name)
        return
    try:
        vectors.check(store.index_dir(name), meta["index"], np.array([schema.faiss_id_of(i) for i in ids], np.int64))
        ctx.add(f"space {name}: index holds exactly its rows", True, str(meta["index"].get("kind", "")))
    except vectors.IndexFileError as e:
        ctx.add(f"space {name}: index holds exactly its rows", False, str(e))
        ctx.bad_indexes.append(name)


def _check_sparsity(ctx: _Ctx, image_ids: set[str]) -> None:
    try:
        sp = ctx.store.sparsity()
    except StoreError as e:
        ctx.add("sparsity table readable", False, str(e))
        return
    dup = int(sp.duplicated(["id", "model", "layer_index", "metric"]).sum())
    ctx.duplicate_sparsity = dup
    ctx.add("sparsity rows unique", dup == 0, f"{dup} duplicate row(s)" if dup else f"{len(sp)} rows")
    stray = int((~sp["id"].isin(image_ids)).sum())
    ctx.add("sparsity rows belong to images", stray == 0, f"{stray} row(s) of no image" if stray else "")


def _repair(ctx: _Ctx, recompute: Callable[[Store, list[str]], list[str]] | None) -> None:
    store = ctx.store
    m = store.manifest
    for name in ctx.bad_indexes:
        sp = store.space(name)
        fids = np.array([schema.faiss_id_of(i) for i in sp.ids], np.int64)
        m["spaces"][name]["index"] = vectors.build(store.index_dir(name), fids, sp.vectors,
                                                   kind=store._index_kind())
        _mark(ctx, f"space {name}: index holds exactly its rows", "rebuilt from the space's table")
    if ctx.duplicate_sparsity:
        rows = store.sparsity().drop_duplicates(["id", "model", "layer_index", "metric"], keep="first")
        version = tables.overwrite(store.path / schema.SPARSITY,
                                   pa.Table.from_pandas(rows, schema=schema.SPARSITY_SCHEMA, preserve_index=False),
                                   ["model"])
        m["tables"][schema.SPARSITY] = {"version": version}
        _mark(ctx, "sparsity rows unique", f"{ctx.duplicate_sparsity} duplicate row(s) dropped")
    if ctx.bad_indexes or ctx.duplicate_sparsity:
        store._dirty = True
        store.commit()
    if ctx.broken_spaces:
        if recompute is None:
            raise StoreError(f"{store.path}: spaces {', '.join(ctx.broken_spaces)} are unreadable and nothing here "
                             "can recompute them")
        done = recompute(store, ctx.broken_spaces)
        for name in done:
            _mark(ctx, f"space {name}:", "recomputed for every image")


def _mark(ctx: _Ctx, prefix: str, how: str) -> None:
    for f in ctx.findings:
        if not f.ok and f.check.startswith(prefix):
            f.repaired = True
            f.detail = f"{f.detail} — repaired: {how}"
