"""Upgrade a schema-1 store (one Parquet file per table, rewritten by every commit) to the versioned store, in place.

Nothing is re-embedded: the old tables are read, written as the new store's first version in a sibling folder,
and only then swapped in by two renames; the old files are kept beside it as ``STORE.v1-backup`` until the user
removes them (``mammals`` never deletes a user's data it cannot recompute).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from indexer.store import schema
from indexer.store.lock import WriterLock
from indexer.store.store import Store, StoreError

log = logging.getLogger(__name__)

# Schema 1's file names (indexer/schema.py before schema 2).
V1_IMAGES, V1_ERRORS, V1_SPARSITY = "images.parquet", "errors.parquet", "sparsity.parquet"


def is_v1(path: Path) -> bool:
    try:
        return int(json.loads((path / schema.MANIFEST).read_text("utf-8"))["schema_version"]) == 1
    except (OSError, ValueError, KeyError, TypeError):
        return False


def migrate_v1(path: Path) -> Path:
    """Rewrite the schema-1 store at ``path`` as a schema-2 store; returns where the old files were kept."""
    path = Path(path)
    if not is_v1(path):
        raise StoreError(f"{path}: not a schema-1 store")
    old = json.loads((path / schema.MANIFEST).read_text("utf-8"))
    staging = path.with_name(f".{path.name}.migrating")
    backup = path.with_name(f"{path.name}.v1-backup")
    if backup.exists():
        raise StoreError(f"{backup}: exists; remove it (or move it away) before migrating again")
    shutil.rmtree(staging, ignore_errors=True)
    with WriterLock(path):  # the old store must not change while it is copied
        images = pq.read_table(path / V1_IMAGES).to_pandas()
        vecs: dict[str, np.ndarray] = {}
        for name in old.get("spaces", {}):
            t = pq.read_table(path / schema.SPACES_DIR / f"{name}.parquet")
            col = t.column("vector").combine_chunks()
            order = pd.Index(t.column("id").to_pylist()).get_indexer(images["id"])
            if (order < 0).any():
                raise StoreError(f"{path}: space {name!r} lacks some images; run the old version once to repair it")
            vecs[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)[order]
        store = Store.create(staging, old["encoder"])
        with store:
            for name, mat in vecs.items():
                if name != schema.ENCODER_SPACE:
                    store.set_space(name, [], np.zeros((0, mat.shape[1]), np.float32), old["spaces"][name])
            rows = images.drop(columns=["seq"], errors="ignore")
            rows["indexed_at"] = pd.to_datetime(rows["indexed_at"], utc=True)
            store.add_images(rows, vecs)
            if (path / V1_ERRORS).exists():
                errors = pq.read_table(path / V1_ERRORS).to_pandas()
                store.set_errors(errors.to_dict("records"))
            if (path / V1_SPARSITY).exists():
                sparsity = pq.read_table(path / V1_SPARSITY).to_pandas()
                sparsity = sparsity[sparsity["id"].isin(set(images["id"]))]
                for model, info in old.get("sparsity", {}).items():
                    part = sparsity[sparsity["model"] == model].reset_index(drop=True)
                    store.add_sparsity(part, model, info)
            for key in ("models", "parameters", "runs", "created_at"):
                if key in old:
                    store.manifest[key] = old[key]
            store.commit()
        if (path / "models").is_dir():
            shutil.copytree(path / "models", staging / "models")
        os.replace(path, backup)
    os.replace(staging, path)
    log.warning("%s: migrated to store schema %d; the old files are in %s", path, schema.SCHEMA_VERSION, backup)
    return backup
