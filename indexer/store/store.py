"""The store: open a published version, append to it under the writer lock, publish the next version.

How a commit works (each step is a failpoint for the crash tests, see ``_failpoint``):

1. every change is written as *new* files: Delta appends (Parquet parts + a log entry) for new rows, a Delta
   overwrite for a replaced space or relabelled images, new FAISS segment files for new vectors;
2. ``manifest.json`` is replaced in one rename: it names the Delta version of every table and the FAISS files of
   every space.  That rename is the commit.

A reader opens ``manifest.json`` once and reads every table at the version it names, so it never sees a commit in
progress; a commit killed before step 2 leaves Delta versions newer than the manifest's, which the next writer
rolls back (``_roll_back_unpublished``) before it writes.  Nothing a published version names is ever rewritten,
and files no version names any longer are removed only ``KEEP_OLD_FILES_SECONDS`` later, so a reader pinned to an
older version keeps working.  The cost of a commit is proportional to what it adds, not to the store's size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import platform
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from indexer import __version__, defaults
from indexer.store import schema, tables, vectors
from indexer.store.atomic import atomic_write_json, remove_stale_temp_files
from indexer.store.lock import StoreLockedError, WriterLock

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, unreadable, newer schema, other encoder): one clear line."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    return tuple(_library_versions().items())


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers in a store, recorded in the manifest (read once)."""
    return dict(_installed_versions())


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"mammals-space": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "numpy", "pyarrow",
                 "pandas", "pillow", "deltalake"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    return versions


def _failpoint(step: str) -> None:
    """Crash tests set ``MAMMALS_CRASH_AT=<step>`` to SIGKILL the process exactly at one step of a commit."""
    if os.environ.get("MAMMALS_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


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


@dataclass(frozen=True)
class ImageLookup:
    """The images table's rows by faiss id, and the columns a search hit shows as plain arrays: a hit costs one
    hash probe and four array reads, not a pandas row lookup (~0.1 ms each, a tenth of a 1M-row IVF search)."""

    frame: pd.DataFrame  # the images table it was built from (rows in its order)
    faiss_ids: pd.Index
    id: np.ndarray
    path: np.ndarray
    species: np.ndarray  # None where unlabelled
    breed: np.ndarray

    @classmethod
    def of(cls, images: pd.DataFrame) -> ImageLookup:
        def column(name: str) -> np.ndarray:
            values = np.array(images[name].astype(object).to_numpy(), dtype=object)  # a writable copy
            values[pd.isna(values)] = None
            return values

        return cls(images, pd.Index(images["faiss_id"].to_numpy(np.int64)), column("id"), column("path"),
                   column("species"), column("breed"))

    def positions(self, faiss_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Row of each faiss id in :attr:`frame` (-1 where the table has none)."""
        wanted = pd.Index(np.asarray(faiss_ids, dtype=np.int64).reshape(-1))
        return np.asarray(self.faiss_ids.get_indexer(wanted))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): spaces stored raw (a VAE's mu) are searched by cosine."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def space_table(ids: list[str], vecs: np.ndarray) -> pa.Table:
    """A space's rows as Arrow (``vector`` is a list of exactly ``dim`` floats per row)."""
    mat = np.ascontiguousarray(vecs, dtype=np.float32)
    dim = int(mat.shape[1]) if mat.ndim == 2 else 0
    offsets = pa.array(np.arange(0, (len(ids) + 1) * dim, dim, dtype=np.int32) if len(ids) else [0], pa.int32())
    return pa.Table.from_arrays(
        [
            pa.array(ids, type=pa.string()),
            pa.array([schema.faiss_id_of(i) for i in ids], type=pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(mat.ravel(), type=pa.float32())),
        ],
        schema=schema.SPACE_SCHEMA,
    )


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """The (n, dim) float32 matrix of a space table's ``vector`` column (a writable copy)."""
    col = table.column("vector").combine_chunks()
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    if flat.size != table.num_rows * dim:
        raise StoreError(f"space table holds {flat.size} floats for {table.num_rows} rows of dim {dim}")
    return np.array(flat.reshape(-1, dim), dtype=np.float32, copy=True)


def _empty_frame(sch: pa.Schema) -> pd.DataFrame:
    return sch.empty_table().to_pandas()


class Store:
    """A store directory.  ``Store.open`` reads the published version; ``open(write=True)``, ``create`` and
    ``open_or_create`` also take the writer lock (released by ``close`` or at the end of a ``with`` block)."""

    def __init__(self, path: Path, manifest: dict[str, Any], lock: WriterLock | None = None):
        self.path = path
        self.manifest = manifest
        self._lock = lock
        self._images: pd.DataFrame | None = None  # committed rows, read on first use
        self._errors_log: pd.DataFrame | None = None
        self._spaces: dict[str, Space] = {}  # committed spaces loaded in memory (reads only)
        self._search: dict[str, vectors.SearchIndex] = {}
        self._sorted_ids: dict[str, list[str]] = {}  # committed spaces' ids, sorted (id prefix lookups)
        self._sparsity: pd.DataFrame | None = None
        self._sparsity_ids: dict[str, set[str]] = {}
        self._session_fids: np.ndarray | None = None
        self._lookup: ImageLookup | None = None
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._new_images: list[pd.DataFrame] = []
        self._new_vectors: dict[str, list[np.ndarray]] = {}
        self._new_errors: list[pd.DataFrame] = []
        self._relabelled: pd.DataFrame | None = None
        self._replaced: dict[str, Space] = {}
        self._dropped: set[str] = set()
        self._new_sparsity: list[pd.DataFrame] = []
        self._dropped_sparsity: set[str] = set()
        self._dirty = False

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], encoder: Mapping[str, Any], *, wait: bool = False,
               _lock: WriterLock | None = None) -> Store:
        """A new, empty store, locked for writing (nothing is published until ``commit``)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        lock = _lock or cls._take_lock(path, wait)
        if (path / schema.MANIFEST).exists():
            lock.release()
            raise StoreError(f"{path}: a store already exists here")
        if "dim" not in encoder or "name" not in encoder:
            lock.release()
            raise StoreError(f"{path}: encoder description lacks name/dim")
        now = utcnow().isoformat()
        manifest: dict[str, Any] = {
            "schema_version": schema.SCHEMA_VERSION,
            "version": 0,
            "created_at": now,
            "updated_at": now,
            "encoder": dict(encoder),
            "tables": {},
            "spaces": {},
            "models": {},
            "sparsity": {},
            "counts": {},
            "parameters": {},
            "runs": [],
            "versions": library_versions(),
        }
        store = cls(path, manifest, lock)
        store._images = _empty_frame(schema.IMAGE_SCHEMA)
        store._errors_log = _empty_frame(schema.ERROR_SCHEMA)
        store._sparsity = _empty_frame(schema.SPARSITY_SCHEMA)
        store._replaced[schema.ENCODER_SPACE] = Space(
            schema.ENCODER_SPACE, [], np.zeros((0, int(encoder["dim"])), np.float32), {"kind": "encoder"})
        store._dirty = True
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, write: bool = False, wait: bool = False,
             _lock: WriterLock | None = None) -> Store:
        """The store's published version; with ``write`` also the writer lock (``wait`` for it if held)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        if not (path / schema.MANIFEST).is_file():
            raise StoreError(f"{path}: not a Mammals Space store (no {schema.MANIFEST})")
        lock = _lock or (cls._take_lock(path, wait) if write else None)
        try:
            manifest = read_manifest(path)
            store = cls(path, manifest, lock)
            if lock is not None:
                store._prepare_for_writing()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], encoder: Mapping[str, Any], *, wait: bool = False
                       ) -> Store:
        """Open for writing (checking the encoder), or create when there is no store yet.

        The lock is taken first: two runs racing to create one store then both find the one the first made."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        lock = cls._take_lock(path, wait)
        if not (path / schema.MANIFEST).exists():
            return cls.create(path, encoder, _lock=lock)
        store = cls.open(path, _lock=lock)
        try:
            store.check_encoder(encoder)
        except StoreError:
            store.close()
            raise
        return store

    @staticmethod
    def _take_lock(path: Path, wait: bool) -> WriterLock:
        lock = WriterLock(path)
        try:
            lock.acquire(wait=wait)
        except StoreLockedError as e:
            raise StoreError(str(e)) from None
        except OSError as e:
            raise StoreError(f"{path}: cannot take the writer lock ({e.strerror or e})") from None
        return lock

    def close(self) -> None:
        """Release the writer lock (uncommitted changes are dropped)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def dirty(self) -> bool:
        """Whether this writer has changes that ``commit`` would publish."""
        return self._dirty

    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.held

    def _require_writer(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only (Store.open(..., write=True) takes the writer lock)")

    def _prepare_for_writing(self) -> None:
        """Under the lock: undo what a killed commit left, so the next commit starts from the published version."""
        removed = remove_stale_temp_files(self.path)
        if removed:
            log.warning("%s: removed %d temp file(s) left by an interrupted run", self.path, removed)
        self._roll_back_unpublished()

    def _roll_back_unpublished(self) -> None:
        for rel, version in self._table_versions().items():
            path = self.path / rel
            latest = tables.latest_version(path)
            if latest is not None and latest > version:
                log.warning("%s: rolling back an unpublished commit (Delta version %d -> %d)", path, latest, version)
                tables.restore(path, version)

    def _table_versions(self) -> dict[str, int]:
        """Relative table path -> the Delta version the published manifest names."""
        out = {rel: int(t["version"]) for rel, t in self.manifest.get("tables", {}).items()}
        for sp in self.manifest.get("spaces", {}).values():
            out[sp["table"]] = int(sp["table_version"])
        return out

    def check_encoder(self, encoder: Mapping[str, Any]) -> None:
        """Refuse to mix vectors of two encoders (or two checkpoints of one) in one space."""
        mine = self.encoder
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

    # ----------------------------------------------------------------- reading
    @property
    def version(self) -> int:
        """The published store version this object reads (every commit adds one)."""
        return int(self.manifest.get("version", 0))

    @property
    def encoder(self) -> dict[str, Any]:
        return dict(self.manifest["encoder"])

    def _read(self, rel: str, version: int, columns: list[str] | None = None,
              equals: tuple[str, str] | None = None) -> pa.Table:
        try:
            return tables.read(self.path / rel, version, columns, equals)
        except tables.TableError as e:
            raise StoreError(f"{e} — run `mammals verify {self.path} --repair`") from None

    @property
    def images(self) -> pd.DataFrame:
        """One row per image (committed, then this writer's uncommitted rows)."""
        if self._images is None:
            t = self.manifest.get("tables", {}).get(schema.IMAGES)
            self._images = (self._read(schema.IMAGES, int(t["version"])).to_pandas() if t
                            else _empty_frame(schema.IMAGE_SCHEMA)).sort_values("seq", ignore_index=True)
        base = self._relabelled if self._relabelled is not None else self._images
        if not self._new_images:
            return base
        return pd.concat([base, *self._new_images], ignore_index=True) if len(base) else pd.concat(
            self._new_images, ignore_index=True)

    def image_lookup(self) -> ImageLookup:
        """:attr:`images` found by ``faiss_id``, built once per version of the table: every search maps its hits
        through it (a server answers many searches per version; building it costs ~0.5 s a million rows)."""
        df = self.images
        if self._lookup is None or self._lookup.frame is not df:
            self._lookup = ImageLookup.of(df)
        return self._lookup

    def image_ids(self) -> list[str]:
        """Every image id (reads only the id column: cheap even at millions of rows)."""
        if self._images is not None or self._relabelled is not None:
            return self.images["id"].tolist()
        t = self.manifest.get("tables", {}).get(schema.IMAGES)
        ids: list[str] = []
        if t:
            table = self._read(schema.IMAGES, int(t["version"]), ["id", "seq"])
            ids = table.column("id").take(pc.sort_indices(table.column("seq"))).to_pylist()
        for df in self._new_images:
            ids.extend(df["id"].tolist())
        return ids

    def __len__(self) -> int:
        return int(self.manifest.get("counts", {}).get("images", 0)) + sum(len(d) for d in self._new_images)

    def known_ids(self) -> set[str]:
        return set(self.image_ids())

    @property
    def errors(self) -> pd.DataFrame:
        """Files that could not be used: the latest reason per path, leaving out paths indexed since."""
        if self._errors_log is None:
            t = self.manifest.get("tables", {}).get(schema.ERRORS)
            self._errors_log = (self._read(schema.ERRORS, int(t["version"])).to_pandas() if t
                                else _empty_frame(schema.ERROR_SCHEMA))
        log_ = pd.concat([self._errors_log, *self._new_errors], ignore_index=True) if self._new_errors \
            else self._errors_log
        latest = log_.drop_duplicates("path", keep="last")
        return latest[~latest["resolved"].astype(bool)].reset_index(drop=True)

    def space_names(self) -> list[str]:
        names = (set(self.manifest.get("spaces", {})) | set(self._replaced)) - self._dropped
        return sorted(names)

    def space_meta(self, name: str) -> dict[str, Any]:
        if name in self._replaced:
            return dict(self._replaced[name].meta)
        return dict(self.manifest.get("spaces", {}).get(name, {}))

    def space_fingerprint(self, name: str) -> str:
        """Changes whenever the rows of ``name`` change (a cache key that never needs the vectors)."""
        if name in self._replaced or self._new_vectors.get(name):
            return f"uncommitted:{uuid.uuid4().hex}"
        meta = self.manifest.get("spaces", {}).get(name)
        if meta is None:
            raise StoreError(f"{self.path}: no space {name!r} (spaces: {', '.join(self.space_names()) or 'none'})")
        return f"{meta['generation']}:{meta['table_version']}"

    def space(self, name: str) -> Space:
        """A whole space in memory (committed rows, then this writer's new ones)."""
        if name not in self.space_names():
            raise StoreError(f"{self.path}: no space {name!r} (spaces: {', '.join(self.space_names()) or 'none'})")
        if name in self._replaced:
            return self._replaced[name]
        if name not in self._spaces:
            meta = dict(self.manifest["spaces"][name])
            table = self._committed_order(self._read(meta["table"], int(meta["table_version"])))
            self._spaces[name] = Space(name, table.column("id").to_pylist(), vectors_of(table, int(meta["dim"])),
                                       meta)
        sp = self._spaces[name]
        new = self._new_vectors.get(name)
        if not new:
            return sp
        new_ids = [i for df in self._new_images for i in df["id"]]
        return Space(name, sp.ids + new_ids, np.concatenate([sp.vectors, *new]), sp.meta)

    def space_ids(self, name: str) -> list[str]:
        """A space's ids without reading its vectors."""
        if name in self._replaced or name in self._spaces:
            return self.space(name).ids
        meta = self.manifest.get("spaces", {}).get(name)
        if meta is None:
            raise StoreError(f"{self.path}: no space {name!r}")
        ids = self._committed_order(self._read(meta["table"], int(meta["table_version"]), ["id"])
                                    ).column("id").to_pylist()
        for df in self._new_images if self._new_vectors.get(name) else []:
            ids.extend(df["id"].tolist())
        return ids

    def sorted_space_ids(self, name: str) -> list[str]:
        """A space's ids in sorted order, for id prefix lookups: read without the vectors and kept per committed
        space (a server resolves ids on every request; a million-row space's table is 5 GB, its ids 70 MB)."""
        if name in self._replaced or self._new_vectors.get(name):
            return sorted(self.space_ids(name))
        if name not in self._sorted_ids:
            meta = self.manifest.get("spaces", {}).get(name)
            if meta is None:
                raise StoreError(f"{self.path}: no space {name!r}")
            # Sorted anyway: the table's own order is not needed (space_ids pays for it).
            ids = self._read(meta["table"], int(meta["table_version"]), ["id"]).column("id").to_pylist()
            self._sorted_ids[name] = sorted(ids)
        return self._sorted_ids[name]

    def _committed_order(self, table: pa.Table) -> pa.Table:
        """A space's committed rows in the images' order (Delta returns parts in no particular order)."""
        t = self.manifest.get("tables", {}).get(schema.IMAGES)
        if not t or table.num_rows == 0:
            return table
        images = self._read(schema.IMAGES, int(t["version"]), ["id", "seq"])
        rank = pd.Series(images.column("seq").to_numpy(), index=images.column("id").to_pandas())
        seq = rank.reindex(table.column("id").to_pandas()).to_numpy()
        return table.take(pa.array(np.argsort(seq, kind="stable")))

    def index_dir(self, name: str) -> Path:
        return self.path / schema.INDEXES_DIR / name

    def vector_index(self, name: str, *, mmap: bool = True) -> vectors.SearchIndex:
        """The space's published search index (opened once per store object).

        Memory-mapped by default: a reader of a million-row space maps its files instead of copying gigabytes
        into its heap, and processes serving one store share the page cache."""
        if name in self._replaced or self._new_vectors.get(name):
            raise StoreError(f"{self.path}: space {name!r} has uncommitted changes; commit before searching it")
        if name not in self._search:
            meta = self.manifest.get("spaces", {}).get(name)
            if meta is None:
                raise StoreError(f"{self.path}: no space {name!r} (spaces: {', '.join(self.space_names())})")
            try:
                self._search[name] = vectors.SearchIndex.open(self.index_dir(name), meta["index"], mmap=mmap)
            except vectors.IndexFileError as e:
                raise StoreError(f"{e} — run `mammals verify {self.path} --repair`") from None
        return self._search[name]

    def search(self, name: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, faiss ids) of the k nearest rows of ``name`` to each query row (cosine)."""
        return self.vector_index(name).search(unit_rows(queries), k)

    # ----------------------------------------------------------------- sparsity
    def sparsity(self) -> pd.DataFrame:
        """The long per-layer sparsity table (id, model, layer_index, layer_name, metric, value)."""
        if self._sparsity is None:
            t = self.manifest.get("tables", {}).get(schema.SPARSITY)
            self._sparsity = (self._read(schema.SPARSITY, int(t["version"])).to_pandas() if t
                              else _empty_frame(schema.SPARSITY_SCHEMA))
            self._sparsity = self._sparsity[list(schema.SPARSITY_SCHEMA.names)]
        base = self._sparsity
        if self._dropped_sparsity:
            base = base[~base["model"].isin(self._dropped_sparsity)]
        if self._new_sparsity:
            base = pd.concat([base, *self._new_sparsity], ignore_index=True) if len(base) else pd.concat(
                self._new_sparsity, ignore_index=True)
        return base.reset_index(drop=True)

    def sparsity_ids(self, model: str) -> set[str]:
        """Ids with sparsity rows of ``model`` (reads one partition's id column only)."""
        if model not in self._sparsity_ids:
            t = self.manifest.get("tables", {}).get(schema.SPARSITY)
            have: set[str] = set()
            if t and model in self.manifest.get("sparsity", {}) and model not in self._dropped_sparsity:
                col = self._read(schema.SPARSITY, int(t["version"]), ["id"], ("model", model)).column("id")
                have = set(pc.unique(col).to_pylist())
            self._sparsity_ids[model] = have
        pending = {i for df in self._new_sparsity for i in df.loc[df["model"] == model, "id"].unique().tolist()}
        return self._sparsity_ids[model] | pending

    def sparsity_models(self) -> dict[str, dict[str, Any]]:
        """Per model whose sparsity is recorded: the model hash and threshold the rows were computed with."""
        return dict(self.manifest.get("sparsity", {}))

    def add_sparsity(self, rows: pd.DataFrame, model: str, info: Mapping[str, Any]) -> None:
        """Append sparsity rows of one model; rows of an (id, model) already recorded are not added twice."""
        self._require_writer()
        rows = rows.drop_duplicates(["id", "model", "layer_index", "metric"], keep="first")
        have = self.sparsity_ids(model)
        rows = rows[~rows["id"].isin(have)].reset_index(drop=True)
        if len(rows):
            self._new_sparsity.append(rows[list(schema.SPARSITY_SCHEMA.names)].copy())
        self.manifest.setdefault("sparsity", {})[model] = dict(info)
        self._dirty = True

    def drop_sparsity(self, model: str) -> None:
        self._require_writer()
        self._dropped_sparsity.add(model)
        self._new_sparsity = [df[df["model"] != model] for df in self._new_sparsity]
        self._sparsity_ids.pop(model, None)
        self.manifest.setdefault("sparsity", {}).pop(model, None)
        self._dirty = True

    # ----------------------------------------------------------------- writing
    def add_images(self, rows: pd.DataFrame, vecs: Mapping[str, np.ndarray]) -> None:
        """Append image rows and their vectors in every space named in ``vecs`` (same row order)."""
        self._require_writer()
        if rows.empty:
            return
        ids = rows["id"].tolist()
        if len(set(ids)) != len(ids):
            raise ValueError("add_images: duplicate ids in one call")
        if set(vecs) != set(self.space_names()):
            raise ValueError(f"add_images needs vectors for spaces {self.space_names()}, got {sorted(vecs)}")
        dims = {n: int(self.space_meta(n).get("dim") or self.space(n).dim) for n in vecs}
        for name, mat in vecs.items():
            if len(mat) != len(ids):
                raise ValueError(f"space {name}: {len(mat)} vectors for {len(ids)} rows")
            if mat.ndim != 2 or mat.shape[1] != dims[name]:
                raise ValueError(f"space {name}: vectors of dim {mat.shape[1:]} for a space of dim {dims[name]}")
        for name, mat in vecs.items():
            if name in self._replaced:
                sp = self._replaced[name]
                self._replaced[name] = Space(name, sp.ids + ids, np.concatenate([sp.vectors, mat.astype(np.float32)]),
                                             sp.meta)
            else:
                self._new_vectors.setdefault(name, []).append(np.ascontiguousarray(mat, dtype=np.float32))
        rows = rows.reset_index(drop=True).copy()
        rows["seq"] = np.arange(len(self), len(self) + len(rows), dtype=np.int64)
        self._new_images.append(rows)
        self._dirty = True

    def set_labels(self, labels: pd.DataFrame) -> int:
        """Join label columns onto already-indexed images: ``labels`` is indexed by image id, one column per label.

        A value present in ``labels`` replaces the image's earlier value of that column; a missing one keeps it.
        ``species`` and ``breed`` only fill images that have none (as when indexing), and the schema's other
        columns (ids, paths, sizes) are never touched.  Returns how many images changed.  The images table is
        rewritten (one Delta overwrite): relabelling is rare and touches every row's label columns.
        """
        self._require_writer()
        labels = labels[~labels.index.duplicated(keep="first")]
        images = self.images
        hit = images["id"].isin(labels.index).to_numpy()
        if not hit.any():
            return 0
        rows = labels.reindex(images.loc[hit, "id"])
        images = images.copy()
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
            self._relabelled = images
            self._new_images = []
            self._dirty = True
        return n

    def set_errors(self, errors: Iterable[Mapping[str, Any]]) -> None:
        """Record files that could not be used (a later record of the same path replaces the earlier one)."""
        self._require_writer()
        new = pd.DataFrame(list(errors), columns=list(schema.ERROR_SCHEMA.names))
        if new.empty:
            return
        new["seen_at"] = pd.to_datetime(new["seen_at"], utc=True).astype("datetime64[us, UTC]")
        new["resolved"] = [bool(v) if pd.notna(v) else False for v in new["resolved"]]
        self._new_errors.append(new)
        self._dirty = True

    def _resolve_errors(self, paths: pd.Series) -> None:
        """Paths indexed now that were errors before get a ``resolved`` record (the log is never rewritten)."""
        current = self.errors
        fixed = current[current["path"].isin(set(paths))]
        if len(fixed):
            self.set_errors({"path": p, "reason": "indexed", "dataset": d, "seen_at": utcnow(), "resolved": True}
                            for p, d in zip(fixed["path"], fixed["dataset"], strict=True))

    def set_space(self, name: str, ids: list[str], vecs: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Replace a whole space (e.g. after retraining the model that produces it).

        ``ids`` are the images the space covers, every image or a subset: an image whose photo could not be read
        again is left out (and listed under ``missing`` in the space's metadata), never given a made-up vector.
        """
        self._require_writer()
        known = set(self.image_ids())
        if len(set(ids)) != len(ids) or not set(ids) <= known:
            raise ValueError(f"space {name}: ids must be distinct ids of indexed images")
        missing = len(known) - len(ids)
        meta = {**meta, "missing": missing} if missing else {k: v for k, v in meta.items() if k != "missing"}
        self._replaced[name] = Space(name, list(ids), np.ascontiguousarray(vecs, dtype=np.float32), dict(meta))
        self._new_vectors.pop(name, None)
        self._spaces.pop(name, None)
        self._dropped.discard(name)
        self._dirty = True

    def drop_space(self, name: str) -> None:
        self._require_writer()
        self._replaced.pop(name, None)
        self._new_vectors.pop(name, None)
        self._spaces.pop(name, None)
        self._dropped.add(name)
        self._dirty = True

    def commit(self, *, parameters: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None) -> None:
        """Write what changed as new files, then publish the next version by replacing the manifest."""
        self._require_writer()
        m = json.loads(json.dumps(self.manifest, default=str))  # the next version, built beside the current one
        m.setdefault("tables", {})
        self.path.mkdir(parents=True, exist_ok=True)
        _failpoint("commit:start")
        new_rows = pd.concat(self._new_images, ignore_index=True) if self._new_images else None
        if new_rows is not None:
            self._check_new_ids(new_rows["id"])
            self._resolve_errors(new_rows["path"])
        for name in self.space_names():
            if name in self._replaced:
                m["spaces"][name] = self._write_replaced_space(self._replaced[name])
            elif self._new_vectors.get(name):
                assert new_rows is not None
                m["spaces"][name] = self._append_space(name, m["spaces"][name], new_rows["id"].tolist(),
                                                       np.concatenate(self._new_vectors[name]))
        for name in self._dropped:
            m["spaces"].pop(name, None)
        _failpoint("commit:spaces")
        if self._dropped_sparsity or self._new_sparsity:
            m["tables"][schema.SPARSITY] = {"version": self._write_sparsity(m["tables"].get(schema.SPARSITY))}
        _failpoint("commit:sparsity")
        if self._new_errors:
            errors = pa.Table.from_pandas(pd.concat(self._new_errors, ignore_index=True),
                                          schema=schema.ERROR_SCHEMA, preserve_index=False)
            m["tables"][schema.ERRORS] = {"version": self._append_or_create(schema.ERRORS, errors)}
        _failpoint("commit:errors")
        if self._relabelled is not None:
            images = self.images
            version = tables.overwrite(self.path / schema.IMAGES, _images_table(images))
            m["tables"][schema.IMAGES] = {"version": version}
            m["counts"] = counts_of(images, n_errors=0)
        elif new_rows is not None:
            version = self._append_or_create(schema.IMAGES, _images_table(new_rows))
            m["tables"][schema.IMAGES] = {"version": version}
            m["counts"] = add_counts(m.get("counts") or {}, new_rows)
        elif schema.IMAGES not in m["tables"]:
            m["tables"][schema.IMAGES] = {"version": tables.create(self.path / schema.IMAGES, schema.IMAGE_SCHEMA)}
            m["counts"] = counts_of(_empty_frame(schema.IMAGE_SCHEMA), n_errors=0)
        _failpoint("commit:images")
        self._publish(m, parameters, run)
        _failpoint("commit:published")
        self._after_publish()

    def _publish(self, m: dict[str, Any], parameters: Mapping[str, Any] | None,
                 run: Mapping[str, Any] | None) -> None:
        m["version"] = int(m.get("version", 0)) + 1
        m["schema_version"] = schema.SCHEMA_VERSION
        m["updated_at"] = dt.datetime.now(dt.UTC).isoformat()
        m["versions"] = library_versions()
        if self._new_errors:
            m.setdefault("counts", {})["errors"] = len(self.errors)
        if parameters is not None:
            m["parameters"] = dict(parameters)
        if run is not None:
            m["runs"] = [*m.get("runs", []), dict(run)][-50:]  # the last 50 runs: enough history, bounded size
        atomic_write_json(self.path / schema.MANIFEST, m)
        self.manifest = m

    def _after_publish(self) -> None:
        """Forget pending changes (they are published) and drop caches that the new version outdates."""
        if self._new_images or self._relabelled is not None:
            self._images = None  # read again at the new version when needed
        if self._new_errors:
            self._errors_log = None
        if self._new_sparsity or self._dropped_sparsity:
            self._sparsity = None
            # Keep what is known and add what was just written: re-reading a partition's ids after every
            # commit would make a commit's cost grow with the store.
            for model in self._dropped_sparsity:
                self._sparsity_ids.pop(model, None)
            for df in self._new_sparsity:
                for key, ids in df.groupby("model")["id"]:
                    if str(key) in self._sparsity_ids:
                        # unique() first: one row per layer and metric, and iterating an Arrow-backed column
                        # element by element cost 0.2 s for 1,140 photos' rows.
                        self._sparsity_ids[str(key)] |= set(ids.unique().tolist())
        for name in [*self._replaced, *self._dropped, *self._new_vectors]:
            self._spaces.pop(name, None)
            self._search.pop(name, None)
            self._sorted_ids.pop(name, None)
        self._reset_pending()
        self.collect_garbage()

    def _check_new_ids(self, ids: pd.Series) -> None:
        """Ids this writer adds must be new.  Checked against what this writer added in its session; the
        committed ids are not read here (at 1M rows that alone cost more than the rest of a commit): the
        pipeline skips every id the store holds (read once per run, under this same lock), and
        `mammals verify` checks uniqueness over the whole store."""
        new = np.array([schema.faiss_id_of(i) for i in ids], np.int64)
        if self._session_fids is not None:
            clash = np.isin(new, self._session_fids)
            if clash.any():
                raise ValueError(f"add_images: {int(clash.sum())} id(s) already in the store, e.g. "
                                 f"{ids.to_numpy()[clash][0]}")
        self._session_fids = new if self._session_fids is None else np.concatenate([self._session_fids, new])

    def _append_or_create(self, rel: str, table: pa.Table, partition_by: list[str] | None = None) -> int:
        path = self.path / rel
        if rel not in self.manifest.get("tables", {}) and tables.exists(path):
            # A table a killed first commit left behind: nobody has ever read it.
            return tables.overwrite(path, table, partition_by)
        return tables.append(path, table, partition_by)

    def _write_sparsity(self, current: Mapping[str, Any] | None) -> int:
        path = self.path / schema.SPARSITY
        new = (pa.Table.from_pandas(pd.concat(self._new_sparsity, ignore_index=True), schema=schema.SPARSITY_SCHEMA,
                                    preserve_index=False) if self._new_sparsity else None)
        if current is None:
            return tables.overwrite(path, new if new is not None else schema.SPARSITY_SCHEMA.empty_table(),
                                    ["model"]) if tables.exists(path) else self._create_sparsity(path, new)
        version = int(current["version"])
        for model in sorted(self._dropped_sparsity):
            version = tables.delete(path, f"model = '{model}'")
        if new is not None and new.num_rows:
            version = tables.append(path, new, ["model"])
        return version

    @staticmethod
    def _create_sparsity(path: Path, new: pa.Table | None) -> int:
        tables.create(path, schema.SPARSITY_SCHEMA, ["model"])
        return tables.append(path, new, ["model"]) if new is not None and new.num_rows else 0

    def _index_kind(self) -> str:
        return str(self.manifest.get("parameters", {}).get("index") or "auto")

    def _write_replaced_space(self, sp: Space) -> dict[str, Any]:
        rel = f"{schema.SPACES_DIR}/{sp.name}"
        path = self.path / rel
        table = space_table(sp.ids, sp.vectors)
        version = tables.overwrite(path, table) if tables.exists(path) else self._create_space(path, table)
        _failpoint("commit:space-table")
        fids = np.array([schema.faiss_id_of(i) for i in sp.ids], np.int64)
        entry = vectors.build(self.index_dir(sp.name), fids, sp.vectors, kind=self._index_kind())
        _failpoint("commit:space-index")
        return self._space_meta(sp.name, sp.meta, sp.dim, len(sp.ids), version, entry, uuid.uuid4().hex)

    @staticmethod
    def _create_space(path: Path, table: pa.Table) -> int:
        tables.create(path, schema.SPACE_SCHEMA)
        return tables.append(path, table) if table.num_rows else 0

    def _append_space(self, name: str, meta: Mapping[str, Any], ids: list[str], mat: np.ndarray) -> dict[str, Any]:
        version = tables.append(self.path / meta["table"], space_table(ids, mat))
        _failpoint("commit:space-table")
        fids = np.array([schema.faiss_id_of(i) for i in ids], np.int64)
        # No training sample from the table: the index draws one from its own segments (they hold the vectors).
        entry = vectors.append_rows(self.index_dir(name), meta["index"], fids, mat, kind=self._index_kind())
        _failpoint("commit:space-index")
        return self._space_meta(name, meta, int(meta["dim"]), int(meta["count"]) + len(ids), version, entry,
                                str(meta["generation"]))

    @staticmethod
    def _space_meta(name: str, meta: Mapping[str, Any], dim: int, count: int, version: int,
                    entry: Mapping[str, Any], generation: str) -> dict[str, Any]:
        keep = {k: v for k, v in meta.items() if k not in ("index", "index_type")}
        return {
            **keep,
            "dim": dim,
            "count": count,
            "metric": "cosine (inner product of L2-normalised vectors)",
            "table": f"{schema.SPACES_DIR}/{name}",
            "table_version": version,
            "generation": generation,
            "index_dir": f"{schema.INDEXES_DIR}/{name}",
            "index": dict(entry),
            "index_type": str(entry.get("kind", "")),
        }

    # ----------------------------------------------------------------- maintenance
    def optimize(self, *, kind: str | None = None) -> list[str]:
        """Merge index segments / switch big spaces to an approximate index, as its own published version.

        Kept out of ``commit`` so that an append's cost never depends on the store's size; ``mammals index``
        calls it once at the end of a run.  Returns the spaces whose index changed.
        """
        self._require_writer()
        if self._dirty:
            raise StoreError(f"{self.path}: commit before optimize")
        m = json.loads(json.dumps(self.manifest, default=str))
        changed = []
        for name, meta in m.get("spaces", {}).items():
            if not _needs_optimize(meta["index"], kind or self._index_kind()):
                continue
            entry = vectors.optimize(self.index_dir(name), meta["index"], kind=kind or self._index_kind())
            if entry != meta["index"]:
                meta["index"] = dict(entry)
                meta["index_type"] = str(entry.get("kind", ""))
                changed.append(name)
        if changed:
            self._publish(m, None, None)
            for name in changed:
                self._search.pop(name, None)
            self.collect_garbage()
        return changed

    def collect_garbage(self, *, keep_seconds: float | None = None) -> int:
        """Remove files that no published version names any longer, once they are ``keep_seconds`` old."""
        if not self.writable:
            return 0
        keep = defaults.KEEP_OLD_FILES_SECONDS if keep_seconds is None else keep_seconds
        now = time.time()
        removed = 0
        referenced: dict[Path, set[str]] = {}
        for name, meta in self.manifest.get("spaces", {}).items():
            referenced[self.index_dir(name)] = set(vectors.entry_files(meta["index"]))
        root = self.path / schema.INDEXES_DIR
        if root.is_dir():
            for d in root.iterdir():
                if not d.is_dir():
                    continue
                names = referenced.get(d, set())
                for f in d.iterdir():
                    if f.name not in names and now - f.stat().st_mtime > keep:
                        f.unlink(missing_ok=True)
                        removed += 1
        if self.version % defaults.VACUUM_EVERY_VERSIONS == 0:
            for rel in self._table_versions():
                tables.checkpoint(self.path / rel)  # readers then load one checkpoint, not every log entry
                removed += tables.vacuum(self.path / rel, keep)
        return removed


def _needs_optimize(entry: Mapping[str, Any], kind: str) -> bool:
    """Whether index maintenance is worth its cost (at 1M rows, measuring recall alone takes tens of seconds):
    never measured, the wrong kind for its size, many segments, or grown a quarter since it was measured."""
    quality = entry.get("quality")
    if not quality:
        return True
    rows, dim = int(entry.get("rows", 0)), int(entry.get("dim", 0))
    if rows and vectors.choose_kind(rows, dim, kind) != entry.get("kind"):
        return True
    if len(entry.get("segments", [])) > defaults.OPTIMIZE_AFTER_SEGMENTS:
        return True
    return rows > 1.25 * int(quality.get("rows", rows))


def read_manifest(path: Path) -> dict[str, Any]:
    """The published manifest, checked for what every reader needs (one clear line when it lacks it)."""
    manifest_path = path / schema.MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        version = int(manifest["schema_version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{manifest_path}: unreadable manifest ({e.__class__.__name__}: {e})") from None
    if version > schema.SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {version} is newer than this Mammals Space understands "
                         f"({schema.SCHEMA_VERSION}); upgrade mammals-space")
    if version < schema.SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {version} was written by an older Mammals Space; "
                         f"upgrade it in place with `mammals migrate {path}` (nothing is re-embedded)")
    enc = manifest.get("encoder")
    if not isinstance(enc, dict) or not {"name", "dim"} <= set(enc):
        raise StoreError(f"{manifest_path}: manifest has no valid 'encoder' entry (name and dim)")
    for key in ("spaces", "tables", "models", "counts", "parameters", "sparsity"):
        if not isinstance(manifest.setdefault(key, {}), dict):
            raise StoreError(f"{manifest_path}: manifest entry {key!r} is not an object")
    for name, sp in manifest["spaces"].items():
        if not isinstance(sp, dict) or not {"table", "table_version", "dim", "index", "count"} <= set(sp):
            raise StoreError(f"{manifest_path}: space {name!r} lacks table/index entries")
    return manifest


def _images_table(df: pd.DataFrame) -> pa.Table:
    base = pa.Table.from_pandas(df[list(schema.IMAGE_COLUMNS)].astype({"indexed_at": "datetime64[us, UTC]"}),
                                schema=schema.IMAGE_SCHEMA, preserve_index=False)
    for col in df.columns:
        if col not in schema.IMAGE_COLUMNS:
            base = base.append_column(col, pa.Array.from_pandas(df[col]))
    return base


def counts_of(df: pd.DataFrame, *, n_errors: int) -> dict[str, Any]:
    """Images per species and breed (the manifest's ``counts``, shown by `mammals info`)."""
    species = df["species"].fillna("unknown")
    by_breed: dict[str, dict[str, int]] = {}
    for (sp, br), n in sorted(Counter(zip(species, df["breed"].fillna("unknown"), strict=True)).items()):
        by_breed.setdefault(str(sp), {})[str(br)] = n
    return {
        "images": len(df),
        "errors": n_errors,
        "by_species": {str(k): int(v) for k, v in species.value_counts().sort_index().items()},
        "by_breed": by_breed,
        "label_columns": [c for c in df.columns if c not in schema.IMAGE_COLUMNS],
    }


def add_counts(counts: Mapping[str, Any], new: pd.DataFrame) -> dict[str, Any]:
    """``counts`` after appending ``new`` rows (a commit's cost must not depend on the store's size)."""
    add = counts_of(new, n_errors=0)
    by_species = Counter({k: int(v) for k, v in counts.get("by_species", {}).items()})
    by_species.update(add["by_species"])
    by_breed = {sp: dict(b) for sp, b in counts.get("by_breed", {}).items()}
    for sp, breeds in add["by_breed"].items():
        for br, n in breeds.items():
            by_breed.setdefault(sp, {})[br] = by_breed.get(sp, {}).get(br, 0) + n
    labels = list(counts.get("label_columns", []))
    labels += [c for c in add["label_columns"] if c not in labels]
    return {
        "images": int(counts.get("images", 0)) + len(new),
        "errors": int(counts.get("errors", 0)),
        "by_species": dict(sorted(by_species.items())),
        "by_breed": {sp: dict(sorted(b.items())) for sp, b in sorted(by_breed.items())},
        "label_columns": labels,
    }
