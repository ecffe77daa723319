"""The vector index of one space: immutable segment files plus a small JSON "entry" that names them.

Why this shape: the store is append-only and versioned (a manifest publishes each version), so an index must
never be rewritten in place.  An index is a list of segment files in one directory, described by an entry
(a JSON-able dict the store keeps in its manifest).  A commit writes only the new rows as a new segment and
returns a new entry; a reader pinned to an older entry opens exactly the files that entry names, so it keeps
working while writers add files.  Nothing here deletes a file that an entry may reference: the store
garbage-collects files that no live entry lists (``entry_files``).

Kinds (``INDEX_KINDS``):

* ``flat``: exact inner product over unit rows (= cosine).  Each segment is an ``IndexIDMap(IndexFlatIP)``;
  a search runs on every segment and merges the per-segment top-k (sims descending, ties in segment order, so
  the result equals one ``IndexFlatIP`` over all rows).  ``mmap=True`` opens segments with
  ``IO_FLAG_MMAP_IFC`` (zero-copy: measured +1.5 MB RSS for a 410 MB segment, against +410 MB without).
* ``ivf``: ``IndexIVFFlat`` (inner product, spherical k-means) with one trained *template* file (quantizer,
  empty lists).  An append adds the rows to an empty copy of the template and writes its inverted lists as a
  segment (no retraining; the segment is written without the quantizer so it costs only its rows).
  ``optimize`` merges segments into faiss on-disk inverted lists (an ``.ivfdata`` file beside a small
  ``.faiss`` file, as ``faiss.contrib.ondisk.merge_ondisk`` does) that ``mmap=True`` searches memory-mapped.
  Several IVF segments are searched with one coarse assignment (``search_preassigned`` per segment).
  nprobe is the smallest power of two whose measured recall@10 reaches ``VECTOR_NPROBE_TUNING_TARGET``.

``auto`` is flat while rows x dim <= ``VECTOR_EXACT_MAX_CELLS`` (50k rows at 1280-d) and IVF above it.
``append_rows`` never changes the kind of an existing index (a flat index that crossed the threshold keeps
taking cheap flat segments); ``optimize`` trains and converts, merges small segments (tiered), retrains an IVF
that outgrew its lists, and records measured quality (recall@10 against exact search, latency, memory) in
the entry, as autofaiss does.

faiss 1.15.1 facts this module relies on (tried, not assumed):

* ``read_index(..., IO_FLAG_MMAP)`` of an index with ``OnDiskInvertedLists`` reads but *segfaults on
  search*; with ``IO_FLAG_READ_ONLY | IO_FLAG_ONDISK_SAME_DIR`` the lists are mmapped read-only and search
  works, so that is what is used (on-disk lists are always mmapped).
* ``IndexIVF.merge_from`` refuses segments whose quantizer is empty, so lists are copied with
  ``InvertedLists.add_entries`` instead (which also leaves the source untouched).
* A truncated ``.ivfdata`` is not detected by faiss (a search would read past the mapping), so every file's
  size is recorded in the entry and checked before faiss opens it.
* faiss read errors are ``RuntimeError``s with a C++ backtrace-like text; they become ``IndexFileError``.

* faiss prints "resizing ..." (merging on-disk lists) and "IO_FLAG_ONDISK_SAME_DIR: updating ondisk
  filename ..." (opening them) from C++; harmless.

Measured at 1,000,000 x 1280 on the shared 2-core CPU (``python -m benchmarks.bench_vectors``; synthetic
1,140-centre Gaussian mixture standing in for tiled embeddings; benchmarks/results/vectors.json; timings
vary ~1.5x with the machine's other load): flat appends of 10k rows 0.09-0.14 s each (p50); ``optimize``
flat -> ivf 170-290 s (nlist 2048, k-means on 81,920 rows 45-63 s, adding 1M rows 90-150 s); recall@10
0.988 on 500 held-out queries against exact search at the tuned nprobe 2 (0.983 at nprobe 32 on a harder
200k mixture, noise 1.0); single-query p50 0.7-0.9 ms, p95 ~4 ms (exact flat: 1.4-2.7 s a query);
memory-mapped: +27 MB heap after open, 5.12 GB of index file mapped (page cache); peak heap during the
conversion 2.4 GB; an append to the IVF 0.7-1.9 s per 10k rows; ``check`` 0.2-0.3 s.

Threading: faiss searches are read-only and may run concurrently on one ``SearchIndex``; setting ``nprobe``
is not thread-safe (do it before sharing).  Writers (``append_rows``, ``build``, ``optimize``) assume one
writer per space, which the store's commit lock already guarantees.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer import defaults

log = logging.getLogger(__name__)

_faiss: Any = faiss  # for SWIG names faiss's stubs do not declare

INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf")
ENTRY_FORMAT = 1

# Sims of the -1 padding, as faiss pads inner-product results.
_PAD_SIM = np.float32(np.finfo(np.float32).min)
# An exact neighbour at least this similar to a query that is itself a row of the index is that row.
_SELF_SIM = 1.0 - 1e-5
_EXACT_CHUNK_ROWS = 65_536


class IndexFileError(Exception):
    """An index file that cannot be used as the entry says (missing, garbage, truncated, foreign, wrong rows or
    dim): one clear line naming the file and the reason.  The store answers it by rebuilding from the table."""


# ---------------------------------------------------------------------------------------------- small helpers


def gpu_search_enabled() -> bool:
    """Whether searches run on GPUs: a GPU build of faiss that sees at least one, unless MAMMALS_FAISS_GPU=0.
    faiss-cpu (the default install) has no GPUs to see."""
    if os.environ.get("MAMMALS_FAISS_GPU", "1") == "0":
        return False
    get = getattr(_faiss, "get_num_gpus", None)
    return bool(get is not None and get() > 0)


def _unit(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous: inner product = cosine."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, not shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"vectors have {x.shape[1]} dims, the index {dim}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _ids(faiss_ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.ascontiguousarray(faiss_ids, dtype=np.int64).reshape(-1)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} faiss_ids for {n} vectors")
    return ids


def ids_digest(ids: np.ndarray) -> str:
    """An order-independent 64-bit digest of a set of ids (sum of splitmix64 hashes, wrapping).

    IVF lists store a segment's ids in list order, flat segments in insertion order; a sum of hashes compares
    both with the ids the entry recorded without sorting, so ``open`` catches a foreign file cheaply."""
    z = np.asarray(ids, dtype=np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return f"{int(z.sum(dtype=np.uint64)):016x}"


def _new_name(prefix: str) -> str:
    """A file stem no other writer (this store or a copy of it) will ever produce."""
    return f"{prefix}-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:16]}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(directory: Path, name: str) -> Path:
    """A fresh temp file beside ``name``, created with mode 0o666 & ~umask (mkstemp would make it 0600)."""
    tmp = directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def _publish(directory: Path, tmp: Path, name: str) -> int:
    """fsync ``tmp``, rename it to ``name`` (atomic within the directory), fsync the directory; return bytes."""
    _fsync_path(tmp)
    final = directory / name
    if final.exists():  # unique names make this a bug, never a user error
        raise FileExistsError(final)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        _fsync_path(directory)
    return final.stat().st_size


def _write_index_file(directory: Path, name: str, index: Any) -> int:
    tmp = _temp_path(directory, name)
    try:
        faiss.write_index(index, str(tmp))
        return _publish(directory, tmp, name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _downcast(index: Any) -> Any:
    """The concrete faiss class of ``index`` (typed Any: faiss's stubs lack most SWIG attributes used here)."""
    return faiss.downcast_index(index)


def _faiss_reason(err: Exception) -> str:
    """The useful last part of a faiss error ("Error: 'ret == (1)' failed: ...") on one line."""
    text = " ".join(str(err).split())
    return text[text.find("Error:"):] if "Error:" in text else text[:200]


def _checked_path(directory: Path, name: str, expected_bytes: int | None) -> Path:
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing (the entry names it)") from None
    except OSError as err:
        raise IndexFileError(f"{path}: unreadable ({err.strerror})") from None
    if expected_bytes is not None and size != expected_bytes:
        raise IndexFileError(f"{path}: {size} bytes, the entry says {expected_bytes} (truncated or overwritten)")
    return path


def _read(path: Path, flags: int = 0) -> Any:
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise IndexFileError(f"{path}: not a readable FAISS index ({_faiss_reason(err)})") from None


def nlist_for(rows: int) -> int:
    """IVF lists for ``rows``: ~4 sqrt(rows), capped, and never fewer than 39 training points per list."""
    n = round(defaults.VECTOR_NLIST_PER_SQRT_ROWS * math.sqrt(max(rows, 1)))
    return max(1, min(n, defaults.VECTOR_NLIST_MAX, rows // 39 if rows >= 39 else 1))


def choose_kind(n_rows: int, dim: int, requested: str = "auto") -> str:
    """``requested`` unless it is "auto": exact (flat) while rows x dim is small enough to scan per query,
    approximate (ivf) above ``VECTOR_EXACT_MAX_CELLS``."""
    if requested not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not {requested!r}")
    if requested != "auto":
        return requested
    return "flat" if n_rows * dim <= defaults.VECTOR_EXACT_MAX_CELLS else "ivf"


def entry_files(entry: Mapping[str, Any]) -> list[str]:
    """Every file (relative to the index directory) that ``entry`` references: what the store must keep."""
    files: list[str] = []
    if entry.get("template"):
        files.append(entry["template"]["file"])
    for seg in entry.get("segments", []):
        files.append(seg["file"])
        if seg.get("data_file"):
            files.append(seg["data_file"])
    return files


def _empty_entry(kind: str, dim: int) -> dict[str, Any]:
    return {"format": ENTRY_FORMAT, "kind": kind, "dim": int(dim), "rows": 0, "segments": [], "template": None,
            "params": {}, "quality": None}


def _copy_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(entry))
    json.dumps(out)  # an entry must stay JSON-able; fail here, not in the store's manifest write
    return out


# ---------------------------------------------------------------------------------------------- writing segments


def _write_flat_segment(directory: Path, ids: np.ndarray, unit: np.ndarray) -> dict[str, Any]:
    index = faiss.IndexIDMap(faiss.IndexFlatIP(unit.shape[1]))
    index.add_with_ids(unit, ids)
    name = _new_name("flat") + ".faiss"
    size = _write_index_file(directory, name, index)
    return {"file": name, "rows": len(ids), "bytes": size, "ids_digest": ids_digest(ids)}


def _train_template(train: np.ndarray, dim: int, nlist: int) -> Any:
    """An IndexIVFFlat (inner product) whose lists are spherical k-means centroids of ``train`` (unit rows)."""
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.niter = defaults.VECTOR_TRAIN_ITERATIONS
    index.cp.seed = 1234
    index.cp.max_points_per_centroid = defaults.VECTOR_TRAIN_POINTS_PER_LIST
    index.train(train)
    # A standalone copy that owns its quantizer (the Python-side quantizer object is then free to go).
    return faiss.clone_index(index)


def _write_template(directory: Path, template: Any) -> dict[str, Any]:
    name = _new_name("ivf-template") + ".faiss"
    return {"file": name, "bytes": _write_index_file(directory, name, template)}


def _write_ivf_segment(directory: Path, template: Any, ids: np.ndarray,
                       unit: np.ndarray) -> dict[str, Any]:
    """The rows added to an empty copy of the trained template, written without the quantizer (the template
    holds it once), so a segment costs what its rows cost."""
    seg: Any = faiss.clone_index(template)
    seg.add_with_ids(unit, ids)
    name = _new_name("ivf") + ".faiss"
    own_quantizer = seg.quantizer
    empty = faiss.IndexFlatIP(template.d)
    seg.quantizer = empty
    try:
        size = _write_index_file(directory, name, seg)
    finally:
        seg.quantizer = own_quantizer  # seg owns and frees it; ``empty`` is freed by Python
    return {"file": name, "rows": len(ids), "bytes": size, "ids_digest": ids_digest(ids)}


def _write_ondisk_segment(directory: Path, template_path: Path, sources: Sequence[Any],
                          digest: str) -> dict[str, Any]:
    """Concatenate the inverted lists ``sources`` into one on-disk segment (``.ivfdata`` + small ``.faiss``)."""
    index = _read(template_path)
    stem = _new_name("ivf")
    data_name, index_name = stem + ".ivfdata", stem + ".faiss"
    tmp_data = _temp_path(directory, data_name)
    try:
        lists: Any = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(tmp_data))
        vec = _faiss.InvertedListsPtrVector()
        for src in sources:
            vec.push_back(src)
        rows = int(lists.merge_from_multiple(vec.data(), vec.size(), False))
        data_bytes = _publish(directory, tmp_data, data_name)
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        raise
    # The index file records the data file's bare name; readers resolve it beside the index (ONDISK_SAME_DIR),
    # so a store directory can be moved or copied.
    lists.filename = data_name
    index.replace_invlists(lists, True)
    lists.this.disown()  # the index owns the lists now
    index.ntotal = rows
    size = _write_index_file(directory, index_name, index)
    return {"file": index_name, "rows": rows, "bytes": size, "ids_digest": digest,
            "data_file": data_name, "data_bytes": data_bytes}


def _list_arrays(invlists: Any, list_no: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) views of one IVFFlat list (codes are the raw float32 rows); valid while the index lives."""
    n = int(invlists.list_size(list_no))
    ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), n)
    codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), n * dim * 4)
    return ids, codes.view(np.float32).reshape(n, dim)


# ---------------------------------------------------------------------------------------------- reading


class SearchIndex:
    """One space's index opened from an entry: search, exact search, memory.  Built by ``SearchIndex.open``."""

    def __init__(self, directory: Path, entry: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.entry = _copy_entry(entry)
        self.kind: str = str(entry["kind"])
        self.dim: int = int(entry["dim"])
        self.ntotal: int = 0
        self._flat: list[tuple[Any, np.ndarray, np.ndarray]] = []  # (index, ids, vectors view)
        self._ivf: list[Any] = []  # IndexIVFFlat parts
        self._quantizer: Any = None
        self._nprobe = 1
        self.heap_bytes = 0
        self.mapped_bytes = 0
        self._gpu: list[Any] | None = None  # GPU copies of the flat segments (built at the first search)
        self._where: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # see _locations
        self._where_lock = threading.Lock()

    # -- opening

    @classmethod
    def open(cls, directory: Path, entry: Mapping[str, Any], *, mmap: bool = False) -> SearchIndex:
        """Open exactly the files ``entry`` names; ``mmap=True`` maps vectors instead of reading them into memory.

        Every file is checked before use (exists, size as recorded, readable by faiss, right type, dim, rows,
        ids digest): any disagreement is an ``IndexFileError`` naming the file."""
        directory = Path(directory)
        try:
            kind, segments = str(entry["kind"]), list(entry["segments"])
            int(entry["dim"])
        except (KeyError, TypeError, ValueError) as err:
            raise IndexFileError(f"{directory}: malformed index entry ({err!r})") from None
        if kind not in INDEX_KINDS or kind == "auto":
            raise IndexFileError(f"{directory}: unknown index kind {kind!r} in the entry")
        self = cls(directory, entry)
        if kind == "flat":
            for seg in segments:
                self._open_flat_segment(seg, mmap)
        else:
            self._open_ivf(entry, segments, mmap)
        if self.ntotal != int(entry.get("rows", self.ntotal)):
            raise IndexFileError(f"{directory}: segments hold {self.ntotal} rows, the entry says {entry['rows']}")
        return self

    def _open_flat_segment(self, seg: Mapping[str, Any], mmap: bool) -> None:
        path = _checked_path(self.directory, seg["file"], seg.get("bytes"))
        index = _read(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        inner = _downcast(index.index) if isinstance(index, faiss.IndexIDMap) else None
        if not isinstance(inner, faiss.IndexFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"{path}: a {type(index).__name__}, not a flat inner-product segment")
        self._check_shape(path, index.d, index.ntotal, seg)
        ids = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        self._check_ids(path, ids, seg)
        vectors = faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        self._flat.append((index, ids, vectors))
        self.ntotal += index.ntotal
        self.heap_bytes += ids.nbytes
        if mmap:
            self.mapped_bytes += vectors.nbytes
        else:
            self.heap_bytes += vectors.nbytes

    def _check_shape(self, path: Path, d: int, rows: int, seg: Mapping[str, Any]) -> None:
        if d != self.dim:
            raise IndexFileError(f"{path}: vectors of {d} dims, the space has {self.dim}")
        if rows != int(seg["rows"]):
            raise IndexFileError(f"{path}: {rows} rows, the entry says {seg['rows']}")

    @staticmethod
    def _check_ids(path: Path, ids: np.ndarray, seg: Mapping[str, Any]) -> None:
        if "ids_digest" in seg and ids_digest(ids) != seg["ids_digest"]:
            raise IndexFileError(f"{path}: holds other ids than the entry recorded (a file of another space or "
                                 "store, or a damaged one)")

    def _open_ivf(self, entry: Mapping[str, Any], segments: list[Mapping[str, Any]], mmap: bool) -> None:
        tinfo = entry.get("template") or {}
        if "file" not in tinfo:
            raise IndexFileError(f"{self.directory}: an ivf entry without a template file")
        tpath = _checked_path(self.directory, tinfo["file"], tinfo.get("bytes"))
        template = _read(tpath)
        if not isinstance(template, faiss.IndexIVFFlat) or template.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"{tpath}: a {type(template).__name__}, not an inner-product IVF template")
        if template.d != self.dim:
            raise IndexFileError(f"{tpath}: vectors of {template.d} dims, the space has {self.dim}")
        nlist = int(entry.get("params", {}).get("nlist", template.nlist))
        if template.nlist != nlist or template.quantizer.ntotal != nlist or template.ntotal != 0:
            raise IndexFileError(f"{tpath}: not the trained template the entry describes (nlist {template.nlist})")
        self._quantizer = template.quantizer
        memory: Any = faiss.clone_index(template)  # rows read into memory go here
        for seg in segments:
            path = _checked_path(self.directory, seg["file"], seg.get("bytes"))
            ondisk = bool(seg.get("data_file"))
            if ondisk:
                _checked_path(self.directory, seg["data_file"], seg.get("data_bytes"))
            part = _read(path, faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0)
            if not isinstance(part, _faiss.IndexIVFFlat) or part.nlist != nlist:
                raise IndexFileError(f"{path}: not a segment of this IVF index (a {type(part).__name__})")
            self._check_shape(path, part.d, part.ntotal, seg)
            ids = self._ivf_ids(part)
            if len(ids) != part.ntotal:
                raise IndexFileError(f"{path}: its lists hold {len(ids)} rows, its header {part.ntotal}")
            self._check_ids(path, ids, seg)
            self.ntotal += part.ntotal
            self.heap_bytes += nlist * self.dim * 4  # each segment file carries its own copy of the quantizer
            if ondisk and mmap:
                self._ivf.append(part)
                self.heap_bytes += ids.nbytes
                self.mapped_bytes += int(seg["data_bytes"]) - ids.nbytes
            else:
                for list_no in range(nlist):
                    n = int(part.invlists.list_size(list_no))
                    if n:
                        memory.invlists.add_entries(list_no, n, part.invlists.get_ids(list_no),
                                                    part.invlists.get_codes(list_no))
                memory.ntotal += part.ntotal
                self.heap_bytes += part.ntotal * (memory.code_size + 8)
        if memory.ntotal or not self._ivf:
            self._ivf.insert(0, memory)
        self._template = template
        self.nprobe = int(entry.get("params", {}).get("nprobe", min(nlist, 16)))

    @staticmethod
    def _ivf_ids(part: Any) -> np.ndarray:
        chunks = [faiss.rev_swig_ptr(part.invlists.get_ids(i), part.invlists.list_size(i)).copy()
                  for i in range(part.nlist) if part.invlists.list_size(i)]
        return np.concatenate(chunks).astype(np.int64, copy=False) if chunks else np.empty(0, np.int64)

    # -- searching

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        """Lists scanned per query (ivf only); not thread-safe against concurrent searches."""
        self._nprobe = max(1, int(value))
        for part in self._ivf:
            part.nprobe = min(self._nprobe, part.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims float32 (n, k), faiss_ids int64 (n, k)) by cosine, best first, padded with -1 ids."""
        q = _unit(queries, self.dim)
        results: list[tuple[np.ndarray, np.ndarray]] = []
        if self.kind == "flat":
            for index in self._flat_searchers():
                if index.ntotal:
                    results.append(index.search(q, min(k, index.ntotal)))
        elif self.ntotal:
            if len(self._ivf) == 1:
                results.append(self._ivf[0].search(q, k))
            else:
                assert self._quantizer is not None
                coarse_sims, coarse = self._quantizer.search(q, min(self._nprobe, self._quantizer.ntotal))
                for part in self._ivf:
                    if part.ntotal:
                        results.append(part.search_preassigned(q, k, coarse, coarse_sims))
        return _merge_top(results, len(q), k)

    def _flat_searchers(self) -> list[Any]:
        """The flat segments as searched: copies on the GPUs where a GPU build of faiss sees any
        (``pip install '.[gpu]'``; ``MAMMALS_FAISS_GPU=0`` keeps them on the CPU), else the segments themselves."""
        if self._gpu is None:
            self._gpu = []
            if gpu_search_enabled():
                try:
                    self._gpu = [_faiss.index_cpu_to_all_gpus(index) for index, _, _ in self._flat]
                except (RuntimeError, AttributeError) as err:  # out of GPU memory, an index type it cannot copy
                    log.warning("%s: searching on the CPU (could not copy the index to the GPU: %s)",
                                self.directory, _faiss_reason(err))
                    self._gpu = []
        return self._gpu or [index for index, _, _ in self._flat]

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k over every stored row (any kind): the ground truth for recall."""
        q = _unit(queries, self.dim)
        best = (np.full((len(q), 0), _PAD_SIM, np.float32), np.full((len(q), 0), -1, np.int64))
        for ids, vecs in self.iter_rows(_EXACT_CHUNK_ROWS):
            sims, pos = faiss.knn(q, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            best = _merge_top([best, (sims, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))], len(q), k)
        return _merge_top([best], len(q), k)

    def iter_rows(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, unit vectors) of every stored row, in blocks of up to ``chunk_rows`` (views where possible)."""
        for _, ids, vecs in self._flat:
            for start in range(0, len(ids), chunk_rows):
                yield ids[start:start + chunk_rows], vecs[start:start + chunk_rows]
        for part in self._ivf:
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            size = 0
            for list_no in range(part.nlist):
                if part.invlists.list_size(list_no):
                    pending.append(_list_arrays(part.invlists, list_no, self.dim))
                    size += len(pending[-1][0])
                if size >= chunk_rows or (list_no == part.nlist - 1 and pending):
                    yield (np.concatenate([p[0] for p in pending]).astype(np.int64, copy=False),
                           np.concatenate([p[1] for p in pending]))
                    pending, size = [], 0

    def sample_rows(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of up to ``n`` stored rows drawn uniformly without replacement."""
        # (rows, part number, list number or -1 for a flat segment): vectors are fetched only for drawn blocks.
        refs: list[tuple[int, int, int]] = [(len(ids), i, -1) for i, (_, ids, _) in enumerate(self._flat)]
        for p, part in enumerate(self._ivf):
            for list_no in range(part.nlist):
                size = int(part.invlists.list_size(list_no))
                if size:
                    refs.append((size, p, list_no))
        total = sum(r[0] for r in refs)
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        starts = np.cumsum([0] + [r[0] for r in refs])
        which = np.searchsorted(starts, picks, side="right") - 1
        out_ids, out_vecs = [], []
        for block in np.unique(which):
            _, p, list_no = refs[block]
            if list_no < 0:
                ids, vecs = self._flat[p][1], self._flat[p][2]
            else:
                ids, vecs = _list_arrays(self._ivf[p].invlists, list_no, self.dim)
            rows = picks[which == block] - starts[block]
            out_ids.append(np.asarray(ids[rows], np.int64))
            out_vecs.append(np.asarray(vecs[rows], np.float32))
        if not out_ids:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate(out_ids), np.concatenate(out_vecs)

    def _locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sorted faiss ids, part, list number or -1 for a flat segment, row in that list or segment) of every
        stored row; built on first use (~30 MB and well under a second for a million rows) and kept."""
        with self._where_lock:  # a server asks from many threads at once: build it once
            if self._where is None:
                ids, part, lists, rows = [], [], [], []
                for p, (_, seg_ids, _) in enumerate(self._flat):
                    n = len(seg_ids)
                    ids.append(seg_ids)
                    part.append(np.full(n, p, np.int32))
                    lists.append(np.full(n, -1, np.int32))
                    rows.append(np.arange(n, dtype=np.int32))
                for p, ivf in enumerate(self._ivf):
                    for list_no in range(ivf.nlist):
                        n = int(ivf.invlists.list_size(list_no))
                        if n:
                            ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), n).astype(np.int64))
                            part.append(np.full(n, p, np.int32))
                            lists.append(np.full(n, list_no, np.int32))
                            rows.append(np.arange(n, dtype=np.int32))
                if not ids:
                    empty = np.empty(0, np.int32)
                    self._where = (np.empty(0, np.int64), empty, empty, empty)
                else:
                    all_ids = np.concatenate(ids)
                    order = np.argsort(all_ids, kind="stable")
                    self._where = (all_ids[order], np.concatenate(part)[order], np.concatenate(lists)[order],
                                   np.concatenate(rows)[order])
            return self._where

    def vectors_of(self, faiss_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored (unit) vectors of rows by faiss id, read from the index files: a reader of a million-row
        space fetches one row without loading the space's 5 GB table.  A ``KeyError`` names an id not stored."""
        wanted = np.asarray(faiss_ids, dtype=np.int64).reshape(-1)
        sorted_ids, part, lists, rows = self._locations()
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), max(len(sorted_ids) - 1, 0))
        out = np.empty((len(wanted), self.dim), np.float32)
        for i, (fid, p) in enumerate(zip(wanted, pos, strict=True)):
            if not len(sorted_ids) or sorted_ids[p] != fid:
                raise KeyError(f"{self.directory}: no row with faiss id {int(fid)}")
            if lists[p] < 0:
                out[i] = self._flat[part[p]][2][rows[p]]
            else:
                out[i] = _list_arrays(self._ivf[part[p]].invlists, int(lists[p]), self.dim)[1][rows[p]]
        return out

    def all_ids(self) -> list[np.ndarray]:
        """The ids of each opened part (flat segments, or IVF parts), for ``check``."""
        return [ids for _, ids, _ in self._flat] + [self._ivf_ids(part) for part in self._ivf]

    def memory_bytes(self) -> int:
        """Bytes a warm search touches: heap (ids, quantizer, lists read into memory) plus mapped file bytes
        (``mapped_bytes``: page cache, shared between processes and evictable)."""
        return int(self.heap_bytes + self.mapped_bytes)


def _merge_top(results: Sequence[tuple[np.ndarray, np.ndarray]], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part (sims, ids) into one top-k: sims descending, ties in part order then rank (stable), so
    flat segments give exactly what one IndexFlatIP over all rows gives."""
    sims = np.full((n, k), _PAD_SIM, np.float32)
    ids = np.full((n, k), -1, np.int64)
    if results:
        all_sims = np.concatenate([r[0] for r in results], axis=1).astype(np.float32, copy=False)
        all_ids = np.concatenate([r[1] for r in results], axis=1).astype(np.int64, copy=False)
        all_sims = np.where(all_ids >= 0, all_sims, _PAD_SIM)
        order = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
        width = order.shape[1]
        sims[:, :width] = np.take_along_axis(all_sims, order, axis=1)
        ids[:, :width] = np.take_along_axis(all_ids, order, axis=1)
    return sims, ids


# ---------------------------------------------------------------------------------------------- quality


def _recall(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None, k: int) -> float:
    """Mean |found ∩ truth| / |truth| over queries, top-k each, with each query's own row removed from both."""
    scores = []
    for i in range(len(truth)):
        t, f = truth[i], found[i]
        if self_ids is not None and self_ids[i] >= 0:
            t, f = t[t != self_ids[i]], f[f != self_ids[i]]
        t, f = t[t >= 0][:k], f[f >= 0][:k]
        if len(t):
            scores.append(len(np.intersect1d(t, f)) / len(t))
    return float(np.mean(scores)) if scores else 1.0


def measure_quality(index: SearchIndex, queries: np.ndarray, exact_top: np.ndarray | None = None, *,
                    k: int = 10, exclude_self: bool = False) -> dict[str, Any]:
    """Recall@k against exact search, single-query latency percentiles and memory, as autofaiss reports them.

    ``exact_top``: (n, >=k) exact neighbour ids; computed here by brute force over the stored rows when None.
    ``exclude_self``: the queries are rows of the index; drop each query's own row (cosine >= 1-1e-5, ranked
    first by exact search) from both lists so a query does not count finding itself.  With ``exact_top``
    given, its first column must then be each query's own id and it needs k+1 columns."""
    q = _unit(queries, index.dim)
    depth = k + 1 if exclude_self else k
    self_ids: np.ndarray | None = None
    if exact_top is None:
        exact_sims, truth = index.exact_search(q, depth)
        if exclude_self:
            self_ids = np.where(exact_sims[:, 0] >= _SELF_SIM, truth[:, 0], -1)
    else:
        truth = np.asarray(exact_top, np.int64)
        if exclude_self:
            self_ids = truth[:, 0]
    return _quality(index, q, truth, self_ids, k)


def _quality(index: SearchIndex, q: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None,
             k: int) -> dict[str, Any]:
    _, found = index.search(q, truth.shape[1])
    recall = _recall(found, truth, self_ids, k)
    latencies: list[float] = []
    budget_end = time.perf_counter() + defaults.VECTOR_LATENCY_SECONDS
    for row in q[: defaults.VECTOR_LATENCY_QUERIES]:
        start = time.perf_counter()
        index.search(row[None, :], k)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if start > budget_end and len(latencies) >= 10:
            break
    return {
        f"recall_at_{k}": round(recall, 4),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "memory_bytes": index.memory_bytes(),
        "mapped_bytes": int(index.mapped_bytes),
        "queries": len(q),
        "latency_queries": len(latencies),
        "rows": index.ntotal,
        "kind": index.kind,
        "nprobe": index.nprobe if index.kind == "ivf" else None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _tune_and_measure(directory: Path, entry: dict[str, Any], queries: np.ndarray | None) -> dict[str, Any]:
    """Open ``entry``; for ivf pick the smallest power-of-two nprobe whose recall@10 reaches the tuning target
    on ``queries`` (rows of the space); record nprobe and the measured quality in the entry."""
    index = SearchIndex.open(directory, entry, mmap=True)
    if index.ntotal == 0:
        return entry
    if queries is None or not len(queries):
        _, queries = index.sample_rows(defaults.VECTOR_QUALITY_QUERIES, seed=1)
    q = _unit(queries, index.dim)
    k = 10
    exact_sims, truth = index.exact_search(q, k + 1)
    self_ids = np.where(exact_sims[:, 0] >= _SELF_SIM, truth[:, 0], -1)
    tuning: list[dict[str, float]] = []
    if index.kind == "ivf":
        nlist = int(entry["params"]["nlist"])
        nprobe = 1
        while True:
            index.nprobe = nprobe
            recall = _recall(index.search(q, k + 1)[1], truth, self_ids, k)
            tuning.append({"nprobe": nprobe, "recall_at_10": round(recall, 4)})
            if recall >= defaults.VECTOR_NPROBE_TUNING_TARGET or nprobe >= nlist:
                break
            nprobe = min(nprobe * 2, nlist)
        entry["params"]["nprobe"] = nprobe
    quality = _quality(index, q, truth, self_ids, k)
    quality["nprobe_tuning"] = tuning
    quality["target_recall_at_10"] = defaults.VECTOR_RECALL_TARGET
    entry["quality"] = quality
    return entry


# ---------------------------------------------------------------------------------------------- writing API


def _train_sample(rows: int, sample: Callable[[int], np.ndarray] | None,
                  fallback: Callable[[int], np.ndarray], dim: int) -> tuple[np.ndarray, int]:
    nlist = nlist_for(rows)
    want = min(rows, defaults.VECTOR_TRAIN_POINTS_PER_LIST * nlist)
    got = sample(want) if sample is not None else None
    train = _unit(got, dim) if got is not None and len(got) else _unit(fallback(want), dim)
    return train, max(1, min(nlist, len(train) // 39 if len(train) >= 39 else 1))


def _build_ivf(directory: Path, dim: int, rows: int, blocks: Iterator[tuple[np.ndarray, np.ndarray]],
               train: np.ndarray, nlist: int) -> dict[str, Any]:
    """Train a template on ``train``, add every block (chunked through temp shard files, so memory stays at one
    chunk), and merge the shards into one on-disk segment."""
    start = time.perf_counter()
    template = _train_template(train, dim, nlist)
    train_s = time.perf_counter() - start
    tinfo = _write_template(directory, template)
    shards: list[Path] = []
    add_start = time.perf_counter()
    digest_sum = 0
    try:
        for ids, vecs in _rechunk(blocks, defaults.VECTOR_BUILD_CHUNK_ROWS):
            seg: Any = faiss.clone_index(template)
            seg.add_with_ids(np.ascontiguousarray(vecs, np.float32), ids)
            digest_sum = (digest_sum + int(ids_digest(ids), 16)) % 2**64
            tmp = _temp_path(directory, "shard")
            faiss.write_index(seg, str(tmp))
            shards.append(tmp)
            del seg
        opened = [_read(p, faiss.IO_FLAG_MMAP) for p in shards]  # mapped, not loaded: memory stays flat
        segment = _write_ondisk_segment(directory, directory / tinfo["file"], [o.invlists for o in opened],
                                        f"{digest_sum:016x}")
        del opened
    finally:
        for p in shards:  # our own temporaries, never referenced by an entry
            p.unlink(missing_ok=True)
    entry = _empty_entry("ivf", dim)
    entry.update(rows=segment["rows"], segments=[segment], template=tinfo,
                 params={"nlist": nlist, "nprobe": min(16, nlist), "trained_rows": len(train),
                         "sized_for_rows": rows, "train_seconds": round(train_s, 2),
                         "add_seconds": round(time.perf_counter() - add_start, 2)})
    return entry


def _rechunk(blocks: Iterator[tuple[np.ndarray, np.ndarray]], rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0
    for ids, vecs in blocks:
        pending.append((ids, vecs))
        size += len(ids)
        if size >= rows:
            yield np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])
            pending, size = [], 0
    if pending:
        yield np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])


def build(directory: Path, faiss_ids: np.ndarray, vectors: np.ndarray, *, kind: str = "auto") -> dict[str, Any]:
    """A whole index from scratch (a retrained model's space, or a repair from the table), with measured
    quality.  Costs O(rows); the rows may be raw (they are normalised here)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unit = _unit(vectors)
    ids = _ids(faiss_ids, len(unit))
    dim = int(unit.shape[1])
    kind = choose_kind(len(ids), dim, kind)
    if kind == "flat":
        entry = _empty_entry("flat", dim)
        if len(ids):
            seg = _write_flat_segment(directory, ids, unit)
            entry.update(rows=len(ids), segments=[seg])
        return _tune_and_measure(directory, entry, None)
    if not len(ids):
        raise ValueError("an ivf index needs rows to train on")
    rng = np.random.default_rng(0)

    def rows_of_input(n: int) -> np.ndarray:
        return unit[np.sort(rng.choice(len(unit), n, replace=False))]

    train, nlist = _train_sample(len(ids), None, rows_of_input, dim)
    blocks = ((ids[s:s + defaults.VECTOR_BUILD_CHUNK_ROWS], unit[s:s + defaults.VECTOR_BUILD_CHUNK_ROWS])
              for s in range(0, len(ids), defaults.VECTOR_BUILD_CHUNK_ROWS))
    entry = _build_ivf(directory, dim, len(ids), blocks, train, nlist)
    return _tune_and_measure(directory, entry, None)


def append_rows(directory: Path, entry: Mapping[str, Any] | None, faiss_ids: np.ndarray, vectors: np.ndarray, *,
                kind: str = "auto", sample: Callable[[int], np.ndarray] | None = None) -> dict[str, Any]:
    """Write only the new rows as one new segment file and return the new entry (``entry`` is not changed).

    Cost is proportional to the rows added: an IVF index adds them with its trained template (no retraining);
    a flat index stays flat even past the threshold (``optimize`` converts it).  Training happens only for a
    new space whose first rows are above the threshold (``build``), or when ``kind`` asks for another kind
    than the entry's (the rows are appended, then ``optimize(kind=...)`` converts, training on ``sample(n)``:
    up to n existing vectors of the space, raw or unit, any order)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not {kind!r}")
    if entry is None:
        raw = np.asarray(vectors)
        if raw.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array, not shape {raw.shape}")
        if choose_kind(len(raw), raw.shape[1], kind) == "ivf":
            return build(directory, faiss_ids, vectors, kind="ivf")
        entry = _empty_entry("flat", raw.shape[1])
    new = _copy_entry(entry)
    unit = _unit(vectors, int(new["dim"]))
    ids = _ids(faiss_ids, len(unit))
    if len(ids):
        if new["kind"] == "flat":
            seg = _write_flat_segment(directory, ids, unit)
        else:
            tpath = _checked_path(directory, new["template"]["file"], new["template"].get("bytes"))
            seg = _write_ivf_segment(directory, _read(tpath), ids, unit)
        new["segments"].append(seg)
        new["rows"] = int(new["rows"]) + len(ids)
    if kind != "auto" and kind != new["kind"]:
        return optimize(directory, new, sample=sample, kind=kind)
    return new


def optimize(directory: Path, entry: Mapping[str, Any], *, sample: Callable[[int], np.ndarray] | None = None,
             kind: str = "auto") -> dict[str, Any]:
    """Maintenance outside append commits; returns the new entry and never deletes a file.

    * flat above the threshold (or ``kind="ivf"``): train a template on ``sample(n)`` (else on rows drawn from
      the index itself) and convert every row into one on-disk IVF segment;
    * ivf that grew ``VECTOR_RETRAIN_GROWTH`` times past the rows its lists were sized for: retrain the same way;
    * otherwise merge small segments (tiered: each < rows / ``VECTOR_MERGE_FACTOR``) into one, or all of them
      past ``VECTOR_MAX_SEGMENTS``;
    * then tune nprobe and measure recall@10, latency and memory into ``entry["quality"]``."""
    directory = Path(directory)
    new = _copy_entry(entry)
    index = SearchIndex.open(directory, new, mmap=True)
    rows, dim = index.ntotal, index.dim
    current = new["kind"]
    target = kind if kind != "auto" else ("ivf" if current == "ivf" else choose_kind(rows, dim))
    target = choose_kind(rows, dim, target)
    queries = None
    if sample is not None and rows:
        got = sample(defaults.VECTOR_QUALITY_QUERIES)
        queries = _unit(got, dim) if got is not None and len(got) else None
    if rows == 0:
        return _empty_entry(target, dim) if target == "flat" else new
    params = new.get("params") or {}
    retrain = (target == "ivf" and current == "ivf"
               and rows > defaults.VECTOR_RETRAIN_GROWTH * int(params.get("sized_for_rows", rows))
               and nlist_for(rows) > int(params.get("nlist", 0)))
    if target != current or retrain:
        if target == "flat":
            segs = [_write_flat_segment(directory, ids, np.ascontiguousarray(vecs))
                    for ids, vecs in _rechunk(index.iter_rows(_EXACT_CHUNK_ROWS), defaults.VECTOR_BUILD_CHUNK_ROWS)]
            new = _empty_entry("flat", dim)
            new.update(rows=rows, segments=segs)
        else:

            def rows_of_index(n: int) -> np.ndarray:
                return index.sample_rows(n)[1]

            train, nlist = _train_sample(rows, sample, rows_of_index, dim)
            new = _build_ivf(directory, dim, rows, index.iter_rows(_EXACT_CHUNK_ROWS), train, nlist)
    else:
        new = _merge_small_segments(directory, new)
    return _tune_and_measure(directory, new, queries)


def _merge_small_segments(directory: Path, entry: dict[str, Any]) -> dict[str, Any]:
    segs = entry["segments"]
    rows = int(entry["rows"])
    small = [i for i, s in enumerate(segs) if int(s["rows"]) * defaults.VECTOR_MERGE_FACTOR < rows]
    if len(segs) > defaults.VECTOR_MAX_SEGMENTS:
        small = list(range(len(segs)))
    if len(small) < 2:
        return entry
    part = dict(entry, segments=[segs[i] for i in small], rows=sum(int(segs[i]["rows"]) for i in small))
    merged_from = SearchIndex.open(directory, part, mmap=True)
    digest = f"{sum(int(segs[i]['ids_digest'], 16) for i in small) % 2**64:016x}"
    if entry["kind"] == "flat":
        ids, vecs = next(_rechunk(merged_from.iter_rows(_EXACT_CHUNK_ROWS), 2**62))
        merged = _write_flat_segment(directory, ids, np.ascontiguousarray(vecs))
    else:
        template = directory / entry["template"]["file"]
        merged = _write_ondisk_segment(directory, template, [p.invlists for p in merged_from._ivf], digest)
    del merged_from
    # The merged segment takes the place of the first small one: flat ties keep (almost) their order.
    out = [s for i, s in enumerate(segs) if i not in small]
    out.insert(small[0], merged)
    entry["segments"] = out
    return entry


def check(directory: Path, entry: Mapping[str, Any], expected_faiss_ids: np.ndarray) -> None:
    """Raise ``IndexFileError`` unless the entry's files hold exactly ``expected_faiss_ids`` (the space's table):
    a missing/garbage/truncated file, wrong dim, a foreign index (other ids), fewer or more rows, duplicates.

    Opens the index memory-mapped (vectors are not read) and compares sorted ids."""
    directory = Path(directory)
    index = SearchIndex.open(directory, entry, mmap=True)
    expected = np.sort(np.asarray(expected_faiss_ids, np.int64).reshape(-1))
    # Per segment for flat (names the file); per opened part for ivf.
    names = [s["file"] for s in entry["segments"]] if index.kind == "flat" else [directory.name] * len(index._ivf)
    for name, ids in zip(names, index.all_ids(), strict=True):
        foreign = ~np.isin(ids, expected)
        if foreign.any():
            raise IndexFileError(f"{directory / name}: {int(foreign.sum())} of its {len(ids)} ids are not in the "
                                 "space's table (an index of another space or store?)")
    found = np.sort(np.concatenate(index.all_ids()) if index.all_ids() else np.empty(0, np.int64))
    if len(found) != len(expected) or not np.array_equal(found, expected):
        dup = int(len(found) - len(np.unique(found)))
        missing = int((~np.isin(expected, found)).sum())
        raise IndexFileError(f"{directory}: the index holds {len(found)} rows, the table {len(expected)} "
                             f"({missing} table rows missing, {dup} duplicated)")
