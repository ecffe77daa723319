"""A writer process and a consistency check for the store's concurrency and crash tests.

The writer appends rows made from the store's own (real) encoder vectors under new ids, with sparsity rows and an
error record per commit, so every step of a commit has something to write.  Run as
``python -m tests.helpers_store STORE TAG BATCHES PER_BATCH``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from deltalake import DeltaTable

from indexer.store import Store, schema


def new_rows(store: Store, tag: str, start: int, n: int) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """``n`` image rows with ids derived from ``tag``, vectors for every space (perturbed real vectors) and
    sparsity rows (copies of a real image's rows under the new ids)."""
    rng = np.random.default_rng(start)
    ids = [hashlib.sha256(f"{tag}-{start + i}".encode()).hexdigest() for i in range(n)]
    base = store.images.iloc[:1]
    rows = pd.DataFrame({
        "id": ids,
        "faiss_id": [schema.faiss_id_of(i) for i in ids],
        "path": [f"/synthetic/{tag}/{start + i}.jpg" for i in range(n)],
        "relpath": [f"{tag}/{start + i}.jpg" for i in range(n)],
        "species": base["species"].iloc[0],
        "breed": base["breed"].iloc[0],
        "dataset": "synthetic",
        "layout": "flat",
        "width": np.full(n, 224, np.int32),
        "height": np.full(n, 224, np.int32),
        "indexed_at": pd.Timestamp.now(tz="UTC").floor("s"),
    })
    vecs = {}
    for name in store.space_names():
        sp = store.space(name)
        pick = sp.vectors[rng.integers(0, len(sp.ids), n)]
        vecs[name] = (pick + rng.normal(scale=0.01, size=pick.shape)).astype(np.float32)
    sparsity = store.sparsity()
    first = sparsity[sparsity["id"] == sparsity["id"].iloc[0]] if len(sparsity) else sparsity
    spars = pd.concat([first.assign(id=i) for i in ids], ignore_index=True) if len(first) else first
    return rows, vecs, spars


def append_batches(path: Path, tag: str, batches: int, per_batch: int) -> None:
    """Open for writing (waiting for the lock) and publish ``batches`` commits of ``per_batch`` rows each."""
    with Store.open(path, write=True, wait=True) as store:
        done = sum(1 for p in store.images["path"] if p.startswith(f"/synthetic/{tag}/"))
        for b in range(batches):
            rows, vecs, spars = new_rows(store, tag, done + b * per_batch, per_batch)
            store.add_images(rows, vecs)
            for model, part in spars.groupby("model"):
                store.add_sparsity(part.reset_index(drop=True), str(model), store.sparsity_models()[str(model)])
            store.set_errors([{"path": f"/synthetic/{tag}/broken-{done + b}.jpg", "reason": "truncated or corrupt",
                               "dataset": "synthetic", "seen_at": pd.Timestamp.now(tz="UTC")}])
            store.commit()


def check_consistent(path: Path, *, deep: bool = True) -> set[str]:
    """Assert every invariant a reader relies on, through our code and (``deep``) through deltalake + duckdb alone
    at the versions the manifest names, and the sparsity table; returns the image ids."""
    store = Store.open(path)
    ids = store.image_ids()
    assert len(ids) == len(set(ids)), "duplicate image ids"
    assert store.manifest["counts"]["images"] == len(ids)
    for name in store.space_names():
        sp_ids = store.space_ids(name)
        assert len(sp_ids) == len(set(sp_ids)) and set(sp_ids) == set(ids), name
        index = store.vector_index(name)
        assert index.ntotal == len(ids), (name, index.ntotal, len(ids))
        if ids:
            sims, fids = store.search(name, store.space(name).vectors[:1], 1)
            assert fids[0, 0] == schema.faiss_id_of(sp_ids[0]) or sims[0, 0] > 0.999, name
    if not deep:
        return set(ids)
    sparsity = store.sparsity()
    assert not sparsity.duplicated(["id", "model", "layer_index", "metric"]).any(), "duplicate sparsity rows"
    assert set(sparsity["id"]) <= set(ids)
    # Without our code: deltalake at the manifest's versions, queried with duckdb.
    m = store.manifest
    con = duckdb.connect()
    con.register("images", DeltaTable(str(path / "images"), version=m["tables"]["images"]["version"])
                 .to_pyarrow_dataset())
    enc = m["spaces"]["encoder"]
    con.register("encoder", DeltaTable(str(path / enc["table"]), version=enc["table_version"]).to_pyarrow_dataset())
    n_images, n_distinct = con.sql("select count(*), count(distinct id) from images").fetchall()[0]
    n_space = con.sql("select count(*) from encoder").fetchall()[0][0]
    n_joined = con.sql("select count(*) from images join encoder using (id)").fetchall()[0][0]
    assert n_images == n_distinct == n_space == n_joined == len(ids)
    return set(ids)


if __name__ == "__main__":
    append_batches(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
