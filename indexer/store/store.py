"""The store directory: open, validate, append, replace spaces, commit atomically.

Invariant: every feature space listed in the manifest holds exactly the ids of ``images.parquet`` in the same
order, and its FAISS index holds the same rows in that order.  Writes are append-only for images, so a commit
that was killed between two renames is repaired on open by keeping the ids that every table shares (= the last
complete commit); the rows lost that way were never reported as indexed and the next run re-embeds them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer import __version__, schema
from indexer.atomic import atomic_write, atomic_write_json, remove_stale_temp_files

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, unreadable, newer schema, other encoder): one clear line."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers in a store, recorded in the manifest."""
    import importlib.metadata as md

    versions = {"mammals-space": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "numpy", "pyarrow",
                 "pandas", "pillow"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    return versions


@dataclass
class Space:
    """One feature space held in memory: ids in table order and an (n, dim) float32 matrix."""

    name: str
    ids: list[str]
    vectors: np.ndarray
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _vectors_from_table(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    # A writable copy: Arrow's buffers are read-only, and torch.from_numpy warns about (and cannot own) those.
    return np.array(flat.reshape(-1, dim), dtype=np.float32, copy=True)


def space_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    dim = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array(ids, type=pa.string()),
            pa.array([schema.faiss_id_of(i) for i in ids], type=pa.int64()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
        ],
        schema=schema.space_schema(dim),
    )


def build_faiss_index(ids: list[str], vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product search over unit-length rows (= cosine), keyed by each image's faiss_id.

    Exact search is the honest default up to a few hundred thousand rows on a CPU (a 100k x 1280 query is
    tens of milliseconds); approximate indexes trade recall we would then have to report.
    """
    dim = int(vectors.shape[1])
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(unit_rows(vectors), np.array([schema.faiss_id_of(i) for i in ids], dtype=np.int64))
    return index


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): spaces stored raw (a VAE's mu) are searched by cosine."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def write_table(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_index(path: Path, index: faiss.Index) -> None:
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))


class Store:
    """A store directory.  ``Store.open`` for an existing one, ``Store.create`` for a new one."""

    def __init__(self, path: Path, manifest: dict[str, Any], images: pd.DataFrame, errors: pd.DataFrame):
        self.path = path
        self.manifest = manifest
        self.images = images
        self.errors = errors
        self._spaces: dict[str, Space] = {}
        self._dirty_spaces: set[str] = set()
        self._dropped_spaces: set[str] = set()
        self._dirty = False
        self._indexes: dict[str, faiss.Index] = {}
        self._sparsity: pd.DataFrame | None = None  # loaded on first use: it is the largest table
        self._sparsity_dirty = False

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], encoder: Mapping[str, Any]) -> Store:
        """A new, empty store (nothing is written until ``commit``)."""
        path = Path(path)
        if (path / schema.MANIFEST).exists():
            raise StoreError(f"{path}: a store already exists here")
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        now = utcnow().isoformat()
        manifest: dict[str, Any] = {
            "schema_version": schema.SCHEMA_VERSION,
            "created_at": now,
            "updated_at": now,
            "encoder": dict(encoder),
            "spaces": {},
            "models": {},
            "counts": {},
            "parameters": {},
            "runs": [],
            "versions": library_versions(),
        }
        images = pa.Table.from_pylist([], schema=schema.IMAGE_SCHEMA).to_pandas()
        errors = pa.Table.from_pylist([], schema=schema.ERROR_SCHEMA).to_pandas()
        store = cls(path, manifest, images, errors)
        store._spaces[schema.ENCODER_SPACE] = Space(
            schema.ENCODER_SPACE, [], np.zeros((0, int(encoder["dim"])), np.float32), {"kind": "encoder"}
        )
        store._dirty_spaces.add(schema.ENCODER_SPACE)
        store._dirty = True
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing store, repairing a commit that a killed run left half done."""
        path = Path(path)
        manifest_path = path / schema.MANIFEST
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not a Mammals Space store (no {schema.MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
            version = int(manifest["schema_version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{manifest_path}: unreadable manifest ({e.__class__.__name__}: {e})") from None
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"{path}: store schema version {version} is newer than this Mammals Space understands "
                f"({schema.SCHEMA_VERSION}); upgrade mammals-space"
            )
        try:
            images = pq.read_table(path / schema.IMAGES).to_pandas() if (path / schema.IMAGES).exists() else None
            errors = pq.read_table(path / schema.ERRORS).to_pandas() if (path / schema.ERRORS).exists() else None
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: unreadable table ({e})") from None
        if images is None:
            images = pa.Table.from_pylist([], schema=schema.IMAGE_SCHEMA).to_pandas()
        if errors is None:
            errors = pa.Table.from_pylist([], schema=schema.ERROR_SCHEMA).to_pandas()
        store = cls(path, manifest, images, errors)
        store._repair()
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], encoder: Mapping[str, Any]) -> Store:
        path = Path(path)
        if (path / schema.MANIFEST).exists():
            store = cls.open(path)
            store.check_encoder(encoder)
            return store
        return cls.create(path, encoder)

    def check_encoder(self, encoder: Mapping[str, Any]) -> None:
        """Refuse to mix vectors of two encoders (or two checkpoints of one) in one space."""
        mine = self.manifest["encoder"]
        if encoder["name"] != mine["name"]:
            raise StoreError(
                f"{self.path}: the store was built with encoder {mine['name']!r}, not {encoder['name']!r} "
                f"(use --encoder {mine['name']} or another --store)"
            )
        if encoder.get("weights_sha256") != mine.get("weights_sha256"):
            raise StoreError(
                f"{self.path}: encoder {mine['name']!r} weights differ from the store's "
                f"(sha256 {str(encoder.get('weights_sha256'))[:12]}… vs {str(mine.get('weights_sha256'))[:12]}…)"
            )

    def _repair(self) -> None:
        removed = remove_stale_temp_files(self.path)
        if removed:
            log.warning("%s: removed %d temp file(s) left by an interrupted run", self.path, removed)
        image_ids = self.images["id"].tolist()
        common = set(image_ids)
        # Only the id columns are read here: opening a 100k-image store must not load every space's vectors.
        space_ids: dict[str, list[str]] = {}
        for name in self.space_names():
            try:
                space_ids[name] = self._space_ids(name)
            except StoreError:
                log.warning("%s: space %r is unreadable; it will be recomputed", self.path, name)
                self.drop_space(name)
                continue
            common &= set(space_ids[name])
        if len(common) == len(image_ids) and all(len(ids) == len(image_ids) for ids in space_ids.values()):
            return
        log.warning(
            "%s: the last commit was interrupted; rolling back to the %d rows every table holds (the rest will be "
            "indexed again)", self.path, len(common),
        )
        keep = self.images["id"].isin(common).to_numpy()
        self.images = self.images[keep].reset_index(drop=True)
        order = self.images["id"].tolist()
        for name in self.space_names():
            sp = self.space(name)
            pos = {i: k for k, i in enumerate(sp.ids)}
            rows = [pos[i] for i in order]
            self._spaces[name] = Space(name, order, sp.vectors[rows], sp.meta)
            self._dirty_spaces.add(name)
        self._dirty = True

    # ----------------------------------------------------------------- reading
    @property
    def encoder(self) -> dict[str, Any]:
        return dict(self.manifest["encoder"])

    def __len__(self) -> int:
        return len(self.images)

    def known_ids(self) -> set[str]:
        return set(self.images["id"])

    def space_names(self) -> list[str]:
        names = set(self.manifest.get("spaces", {})) | set(self._spaces)
        return sorted(n for n in names if n not in self._dropped_spaces)

    def space_meta(self, name: str) -> dict[str, Any]:
        if name in self._spaces:
            return dict(self._spaces[name].meta)
        return dict(self.manifest.get("spaces", {}).get(name, {}))

    def table_path(self, name: str) -> Path:
        return self.path / schema.SPACES_DIR / f"{name}.parquet"

    def index_path(self, name: str) -> Path:
        return self.path / schema.SPACES_DIR / f"{name}.faiss"

    def _space_ids(self, name: str) -> list[str]:
        """A space's ids in row order, without reading its vectors when they are not loaded yet."""
        if name in self._spaces:
            return self._spaces[name].ids
        try:
            return pq.read_table(self.table_path(name), columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException, KeyError) as e:
            raise StoreError(f"{self.table_path(name)}: unreadable ({e})") from None

    def space(self, name: str) -> Space:
        if name in self._dropped_spaces or name not in self.space_names():
            raise StoreError(f"{self.path}: no space {name!r} (spaces: {', '.join(self.space_names()) or 'none'})")
        if name not in self._spaces:
            try:
                table = pq.read_table(self.table_path(name))
            except (OSError, pa.ArrowException) as e:
                raise StoreError(f"{self.table_path(name)}: unreadable ({e})") from None
            meta = dict(self.manifest["spaces"].get(name, {}))
            self._spaces[name] = Space(name, table.column("id").to_pylist(), _vectors_from_table(table), meta)
        return self._spaces[name]

    def faiss_index(self, name: str) -> faiss.Index:
        """The space's FAISS index: read from disk when it is current, else rebuilt from the table."""
        if name in self._dirty_spaces or not self.index_path(name).exists():
            sp = self.space(name)
            return build_faiss_index(sp.ids, sp.vectors)
        # Read once per open store: a query loop (or a dashboard) must not re-read a large index per call.
        if name not in self._indexes:
            self._indexes[name] = faiss.read_index(str(self.index_path(name)))
        return self._indexes[name]

    @property
    def sparsity_path(self) -> Path:
        return self.path / schema.SPARSITY

    def sparsity(self) -> pd.DataFrame:
        """The long per-layer sparsity table (id, model, layer_index, layer_name, metric, value)."""
        if self._sparsity is None:
            if self.sparsity_path.exists():
                try:
                    df = pq.read_table(self.sparsity_path).to_pandas()
                except (OSError, pa.ArrowException) as e:
                    raise StoreError(f"{self.sparsity_path}: unreadable ({e})") from None
                # Rows of images that a rolled-back commit removed are not part of the store.
                self._sparsity = df[df["id"].isin(set(self.images["id"]))].reset_index(drop=True)
            else:
                self._sparsity = pd.DataFrame(columns=list(schema.SPARSITY_SCHEMA.names))
        return self._sparsity

    def sparsity_models(self) -> dict[str, dict[str, Any]]:
        """Per model whose sparsity is recorded: the model hash and threshold the rows were computed with."""
        return dict(self.manifest.get("sparsity", {}))

    def add_sparsity(self, rows: pd.DataFrame, model: str, info: Mapping[str, Any]) -> None:
        """Append sparsity rows of one model (computed under ``info``: model hash, threshold, layers)."""
        current = self.sparsity()
        self._sparsity = pd.concat([current, rows], ignore_index=True) if len(current) else rows.copy()
        self.manifest.setdefault("sparsity", {})[model] = dict(info)
        self._sparsity_dirty = True
        self._dirty = True

    def drop_sparsity(self, model: str) -> None:
        current = self.sparsity()
        self._sparsity = current[current["model"] != model].reset_index(drop=True)
        self.manifest.setdefault("sparsity", {}).pop(model, None)
        self._sparsity_dirty = True
        self._dirty = True

    # ----------------------------------------------------------------- writing
    def add_images(self, rows: pd.DataFrame, vectors: Mapping[str, np.ndarray]) -> None:
        """Append image rows and their vectors in every space named in ``vectors`` (same row order)."""
        if rows.empty:
            return
        ids = rows["id"].tolist()
        if set(vectors) != set(self.space_names()):
            raise ValueError(f"add_images needs vectors for spaces {self.space_names()}, got {sorted(vectors)}")
        for name, mat in vectors.items():
            if len(mat) != len(ids):
                raise ValueError(f"space {name}: {len(mat)} vectors for {len(ids)} rows")
            sp = self.space(name)
            self._spaces[name] = Space(name, sp.ids + ids, np.concatenate([sp.vectors, mat.astype(np.float32)]),
                                       sp.meta)
            self._dirty_spaces.add(name)
        self.images = pd.concat([self.images, rows], ignore_index=True) if len(self.images) else rows.copy()
        self.errors = self.errors[~self.errors["path"].isin(rows["path"])].reset_index(drop=True)
        self._dirty = True

    def set_labels(self, labels: pd.DataFrame) -> int:
        """Join label columns onto already-indexed images: ``labels`` is indexed by image id, one column per label.

        A value present in ``labels`` replaces the image's earlier value of that column; a missing one keeps it.
        ``species`` and ``breed`` only fill images that have none (as when indexing), and the schema's other
        columns (ids, paths, sizes) are never touched.  Returns how many images changed.
        """
        labels = labels[~labels.index.duplicated(keep="first")]
        hit = self.images["id"].isin(labels.index).to_numpy()
        if not hit.any():
            return 0
        rows = labels.reindex(self.images.loc[hit, "id"])
        images = self.images.copy()
        changed = np.zeros(len(images), dtype=bool)
        for col in labels.columns:
            if col in schema.IMAGE_COLUMNS and col not in ("species", "breed"):
                continue
            current = (images[col] if col in images.columns else pd.Series(None, index=images.index)).astype(object)
            current = current.where(current.notna(), None)
            new = rows[col].astype(object).to_numpy()
            given = pd.notna(new)
            old = current[hit].to_numpy()
            if col in ("species", "breed"):
                take = given & pd.isna(old)
            else:
                take = given & np.array([o is None or o != v for o, v in zip(old, new, strict=True)], dtype=bool)
            if not take.any():
                continue
            where = np.flatnonzero(hit)[take]
            values = current.to_numpy(copy=True)
            values[where] = new[take]
            # Back from object to a real dtype (float64, str, bool), as indexing with the CSV would have made it.
            images[col] = pd.Series(values, index=images.index, dtype=object).infer_objects()
            changed[where] = True
        n = int(changed.sum())
        if n:
            self.images = images
            self._dirty = True
        return n

    def set_errors(self, errors: Iterable[Mapping[str, Any]]) -> None:
        """Record (or replace, by path) files that could not be used."""
        new = pd.DataFrame(list(errors), columns=list(schema.ERROR_SCHEMA.names))
        if new.empty:
            return
        new["seen_at"] = pd.to_datetime(new["seen_at"], utc=True)
        kept = self.errors[~self.errors["path"].isin(new["path"])]
        self.errors = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        self._dirty = True

    def set_space(self, name: str, ids: list[str], vectors: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Replace a whole space (e.g. after retraining the model that produces it)."""
        if ids != self.images["id"].tolist():
            raise ValueError(f"space {name}: ids must match images.parquet row for row")
        self._spaces[name] = Space(name, list(ids), np.ascontiguousarray(vectors, dtype=np.float32), dict(meta))
        self._dirty_spaces.add(name)
        self._dropped_spaces.discard(name)
        self._dirty = True

    def drop_space(self, name: str) -> None:
        self._spaces.pop(name, None)
        self._dropped_spaces.add(name)
        self._dirty_spaces.discard(name)
        self._dirty = True

    def commit(self, *, parameters: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None) -> None:
        """Write every changed table, then the indexes, then swap the manifest in last."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / schema.SPACES_DIR).mkdir(exist_ok=True)
        spaces_meta = dict(self.manifest.get("spaces", {}))
        # Spaces before images: on a crash the longer tables are the spaces, and _repair trims them.
        for name in sorted(self._dirty_spaces):
            sp = self._spaces[name]
            write_table(self.table_path(name), space_table(sp.ids, sp.vectors))
            write_index(self.index_path(name), build_faiss_index(sp.ids, sp.vectors))
            spaces_meta[name] = {
                **sp.meta,
                "dim": sp.dim,
                "count": len(sp.ids),
                "metric": "cosine (inner product of L2-normalised vectors)",
                "table": f"{schema.SPACES_DIR}/{name}.parquet",
                "index": f"{schema.SPACES_DIR}/{name}.faiss",
                "index_type": "IndexIDMap2(IndexFlatIP)",
            }
        for name in self._dropped_spaces:
            spaces_meta.pop(name, None)
        if self._sparsity_dirty and self._sparsity is not None:
            write_table(self.sparsity_path, pa.Table.from_pandas(self._sparsity, schema=schema.SPARSITY_SCHEMA,
                                                                 preserve_index=False))
        write_table(self.path / schema.IMAGES, self._images_table())
        write_table(self.path / schema.ERRORS,
                    pa.Table.from_pandas(self.errors, schema=schema.ERROR_SCHEMA, preserve_index=False))

        m = self.manifest
        m["spaces"] = spaces_meta
        m["updated_at"] = utcnow().isoformat()
        m["versions"] = library_versions()
        m["counts"] = self.counts()
        if parameters is not None:
            m["parameters"] = dict(parameters)
        if run is not None:
            m["runs"] = [*m.get("runs", []), dict(run)][-50:]  # the last 50 runs: enough history, bounded size
        atomic_write_json(self.path / schema.MANIFEST, m)
        # Dropped spaces' files go only after the manifest no longer names them.
        for name in self._dropped_spaces:
            self.table_path(name).unlink(missing_ok=True)
            self.index_path(name).unlink(missing_ok=True)
        self._dropped_spaces.clear()
        self._dirty_spaces.clear()
        self._indexes.clear()
        self._sparsity_dirty = False
        self._dirty = False

    def _images_table(self) -> pa.Table:
        df = self.images
        base = pa.Table.from_pandas(df[list(schema.IMAGE_COLUMNS)], schema=schema.IMAGE_SCHEMA,
                                    preserve_index=False)
        for col in df.columns:
            if col not in schema.IMAGE_COLUMNS:
                base = base.append_column(col, pa.Array.from_pandas(df[col]))
        return base

    def counts(self) -> dict[str, Any]:
        df = self.images
        species = df["species"].fillna("unknown")
        by_breed: dict[str, dict[str, int]] = {}
        pairs = zip(species, df["breed"].fillna("unknown"), strict=True)
        for (sp, br), n in sorted(Counter(pairs).items()):
            by_breed.setdefault(str(sp), {})[str(br)] = n
        return {
            "images": len(df),
            "errors": len(self.errors),
            "by_species": {str(k): int(v) for k, v in species.value_counts().sort_index().items()},
            "by_breed": by_breed,
            "label_columns": [c for c in df.columns if c not in schema.IMAGE_COLUMNS],
        }
