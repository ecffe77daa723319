"""Content-addressed cache of analysis tables inside a store (the latent-scope pattern).

Every computation (a map, a clustering, ...) writes its result table next to a JSON sidecar that records the
exact parameters, the fingerprint of its input, when it was made, how long it took and the library versions::

    STORE/analysis/<kind>/<key>.parquet     the result table
    STORE/analysis/<kind>/<key>.json        {"kind", "key", "params", "fingerprint", "created_at", "seconds",
                                              "rows", "columns", "details", "versions"}

``key = sha256(kind, canonical JSON of params, fingerprint)[:16]``, so the same request finds the same file and
never recomputes, while a changed input (a new fingerprint) or a changed parameter is a different key and is
always computed afresh.  Old keys are never overwritten, so two dashboards looking at two versions of a store do
not fight over one file.  An in-process memo keeps the tables of this process so that a dashboard repaint does not
even read Parquet again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.store import Store
from indexer.store.atomic import atomic_write, atomic_write_json
from indexer.store.lock import StoreLockedError, WriterLock

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
# Bump when the sidecar format or the meaning of a key changes: old entries then simply stop matching.
CACHE_FORMAT = 1

# parquet path -> (stat of table and sidecar, table, sidecar): a hit in this process costs two os.stat calls, and
# a rewritten or damaged file (new size, mtime or inode) is read again instead of trusted.
# Least recently used first; bounded so a long-running dashboard does not keep every table it ever showed.
_MEMO: OrderedDict[str, tuple[tuple[int, ...], pd.DataFrame, dict[str, Any]]] = OrderedDict()
MEMO_MAX_ENTRIES = 64
_LOCK = threading.Lock()  # the dashboard serves several sessions from threads of one process


@dataclass(frozen=True)
class CacheInfo:
    """How a cached table was obtained.

    ``hit`` is True when nothing was computed (``source`` says whether it came from this process's memory or from
    disk); ``seconds`` is the wall time of this call (load or compute); ``path`` is the Parquet table.
    """

    hit: bool
    key: str
    path: Path
    seconds: float
    source: str = "computed"  # "memory" | "disk" | "computed"

    def as_dict(self) -> dict[str, Any]:
        return {"hit": self.hit, "key": self.key, "path": str(self.path), "seconds": round(self.seconds, 4),
                "source": self.source}


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes an analysis result (recorded in each sidecar)."""
    import importlib.metadata as md

    from indexer.store import library_versions as store_versions

    versions = store_versions()
    for dist in ("umap-learn", "pynndescent", "hdbscan", "scikit-learn", "numba", "scipy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    return versions


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, NaN refused (it is not valid JSON and never equal)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def cache_key(kind: str, params: Mapping[str, Any], fingerprint: str) -> str:
    payload = canonical_json({"format": CACHE_FORMAT, "kind": kind, "params": dict(params),
                              "fingerprint": fingerprint})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    # An atomic rewrite is a new inode and a new mtime, so a changed file never matches an old entry.
    return st.st_size, st.st_mtime_ns, st.st_ino


def input_fingerprint(store: Store, space: str) -> str:
    """A fingerprint that changes whenever the rows or vectors of ``space`` change.

    A committed space is named by its generation (new whenever the space is replaced, e.g. after retraining) and
    the Delta version of its table (new with every append), both from the manifest: free to compute, never the
    vectors.  A space with uncommitted changes gets a one-off fingerprint, so such results never masquerade as
    results of a committed version.
    """
    if space not in store.space_names():
        store.space(space)  # raises the store's own one-line error naming the spaces that exist
    return "space:" + hashlib.sha256(store.space_fingerprint(space).encode("utf-8")).hexdigest()


def cache_dir(store: Store, kind: str) -> Path:
    return Path(store.path) / ANALYSIS_DIR / kind


def _read_entry(table_path: Path, sidecar_path: Path, expect: Mapping[str, Any]) -> tuple[pd.DataFrame,
                                                                                           dict[str, Any]] | None:
    """The cached table when both files are present, readable and describe this very request; else None."""
    if not (table_path.is_file() and sidecar_path.is_file()):
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text("utf-8"))
        if not isinstance(sidecar, dict):
            raise ValueError("sidecar is not a JSON object")
        for field, value in expect.items():
            if canonical_json(sidecar.get(field)) != canonical_json(value):
                raise ValueError(f"sidecar {field!r} does not match the request")
        table = pq.read_table(table_path).to_pandas()
        if len(table) != sidecar.get("rows") or list(table.columns) != sidecar.get("columns"):
            raise ValueError("table does not match its sidecar (rows or columns)")
    except (OSError, ValueError, TypeError, pa.ArrowException) as e:
        log.warning("%s: unusable cache entry (%s); recomputing", table_path, e)
        return None
    return table, sidecar


def cached(
    store: Store,
    kind: str,
    params: Mapping[str, Any],
    fingerprint: str,
    compute: Callable[[], pd.DataFrame],
) -> tuple[pd.DataFrame, CacheInfo]:
    """The table ``compute()`` returns for (kind, params, fingerprint): from memory, from disk, or computed now.

    ``params`` must be JSON-serialisable and should hold every resolved choice that shapes the result (resolve
    "auto" settings before calling, so the sidecar says what was actually done).  ``compute`` may put extra facts
    about the run (timings, effective settings) into ``frame.attrs``; they are written to the sidecar's
    ``details``.  A corrupt or mismatched entry on disk counts as a miss and is rewritten.  The returned frame is a
    copy: changing it does not change the cache.
    """
    t0 = time.perf_counter()
    key = cache_key(kind, params, fingerprint)
    folder = cache_dir(store, kind)
    table_path = folder / f"{key}.parquet"
    sidecar_path = folder / f"{key}.json"
    expect = {"kind": kind, "key": key, "params": dict(params), "fingerprint": fingerprint}

    memo_name = str(table_path.resolve())
    with contextlib.suppress(OSError):
        stat = _stat_key(table_path) + _stat_key(sidecar_path)
        with _LOCK:
            memo = _MEMO.get(memo_name)
            if memo is not None:
                _MEMO.move_to_end(memo_name)
        if memo is not None and memo[0] == stat:
            return memo[1].copy(), CacheInfo(True, key, table_path, time.perf_counter() - t0, "memory")

    entry = _read_entry(table_path, sidecar_path, expect)
    if entry is not None:
        table, sidecar = entry
        table.attrs = dict(sidecar.get("details") or {})
        _remember(memo_name, table_path, table, sidecar)
        return table.copy(), CacheInfo(True, key, table_path, time.perf_counter() - t0, "disk")

    t_compute = time.perf_counter()
    frame = compute()
    seconds = time.perf_counter() - t_compute
    frame = frame.reset_index(drop=True)
    details = dict(frame.attrs)
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    sidecar = {
        **expect,
        "format": CACHE_FORMAT,
        "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seconds": round(seconds, 4),
        "rows": len(frame),
        "columns": [str(c) for c in frame.columns],
        "details": details,
        "versions": library_versions(),
    }
    try:
        # Cache writes follow the store's one-writer rule; a reader never waits, so while another process
        # writes the store the result is kept in memory only.
        with WriterLock(Path(store.path)):
            atomic_write(table_path, lambda tmp: pq.write_table(arrow, tmp))
            # The sidecar goes last: a table without its sidecar is never read, so a crash between them is a miss.
            atomic_write_json(sidecar_path, sidecar)
    except (OSError, StoreLockedError) as e:
        # A read-only store (a shared copy) or one being written still gets its answer, just not kept on disk.
        log.warning("%s: could not write the cache entry (%s); the result is kept in memory only", table_path, e)
        table = arrow.to_pandas()
        table.attrs = details
        return table, CacheInfo(False, key, table_path, time.perf_counter() - t0, "computed")
    table = arrow.to_pandas()
    table.attrs = details
    _remember(memo_name, table_path, table, sidecar)
    return table.copy(), CacheInfo(False, key, table_path, time.perf_counter() - t0, "computed")


def _remember(memo_name: str, table_path: Path, table: pd.DataFrame, sidecar: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        stat = _stat_key(table_path) + _stat_key(table_path.with_suffix(".json"))
        with _LOCK:
            _MEMO[memo_name] = (stat, table, sidecar)
            _MEMO.move_to_end(memo_name)
            while len(_MEMO) > MEMO_MAX_ENTRIES:
                _MEMO.popitem(last=False)


def sidecar(info: CacheInfo) -> dict[str, Any]:
    """The JSON sidecar of a cached table (parameters, fingerprint, timings, versions)."""
    data = json.loads(info.path.with_suffix(".json").read_text("utf-8"))
    return dict(data)


def clear_memo() -> None:
    """Forget the in-process tables and fingerprints (tests and benchmarks use it to measure a cold read)."""
    with _LOCK:
        _MEMO.clear()
