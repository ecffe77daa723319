"""The segmented vector index (indexer/store/vectors.py): exactness, append-only files, conversion, damage.

Small clustered synthetic spaces (<= 30k rows, 64-d) keep the whole file to a few seconds; the 1M-row targets
are measured by benchmarks/bench_vectors.py, not here.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import defaults
from indexer.store import vectors as vx
from indexer.store.vectors import IndexFileError, SearchIndex

DIM = 64


def clustered(n: int, *, seed: int = 0, centres: int = 200, noise: float = 0.35, dim: int = DIM) -> np.ndarray:
    """Raw (not unit) rows around ``centres`` shared centres: neighbours are meaningful, as in real spaces."""
    rng = np.random.default_rng(1000)  # the same centres for every seed: one space
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    x = c[r.integers(0, centres, n)] + r.normal(0.0, noise / np.sqrt(dim), (n, dim)).astype(np.float32)
    return (x * r.uniform(0.5, 3.0, (n, 1))).astype(np.float32)  # raw lengths: the index must normalise


def ids_for(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n, dtype=np.int64) * 7919 + 13) % (2**62)  # not positions


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def append_batches(directory: Path, sizes: list[int], *, kind: str = "auto") -> tuple[dict, np.ndarray, np.ndarray]:
    entry: dict | None = None
    all_ids, all_x, start = [], [], 0
    for i, n in enumerate(sizes):
        x, ids = clustered(n, seed=i), ids_for(start, n)
        entry = vx.append_rows(directory, entry, ids, x, kind=kind)
        all_ids.append(ids)
        all_x.append(x)
        start += n
    assert entry is not None
    return entry, np.concatenate(all_ids), np.concatenate(all_x)


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------------------ kinds


def test_choose_kind_threshold() -> None:
    assert defaults.VECTOR_EXACT_MAX_CELLS == 50_000 * 1280
    assert vx.choose_kind(50_000, 1280) == "flat"
    assert vx.choose_kind(50_001, 1280) == "ivf"
    assert vx.choose_kind(1_000_000, 64) == "flat"
    assert vx.choose_kind(10, 64, "ivf") == "ivf"
    with pytest.raises(ValueError, match="index kind"):
        vx.choose_kind(10, 64, "hnsw-ish")
    assert vx.nlist_for(1_000_000) == defaults.VECTOR_NLIST_MAX
    assert vx.nlist_for(10_000) == 256  # capped by 39 training points per list


# ------------------------------------------------------------------------------------------------ flat


@pytest.mark.parametrize("mmap", [False, True])
def test_flat_segments_equal_one_flat_index(tmp_path: Path, mmap: bool) -> None:
    entry, ids, x = append_batches(tmp_path, [5000, 3000, 7, 2000])
    assert entry["kind"] == "flat" and entry["rows"] == 10_007 and len(entry["segments"]) == 4
    index = SearchIndex.open(tmp_path, entry, mmap=mmap)
    assert (index.ntotal, index.dim, index.kind) == (10_007, DIM, "flat")

    one = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    one.add_with_ids(unit(x).astype(np.float32), ids)
    queries = clustered(300, seed=99)
    want_sims, want_ids = one.search(unit(queries).astype(np.float32), 20)
    sims, found = index.search(queries, 20)  # raw queries: normalised by the index
    assert sims.dtype == np.float32 and found.dtype == np.int64 and found.shape == (300, 20)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)

    quality = vx.measure_quality(index, queries)
    assert quality["recall_at_10"] == 1.0  # measured against brute force, not assumed
    assert quality["memory_bytes"] > 0 and quality["p50_ms"] is not None


def test_k_beyond_rows_pads_and_zero_rows_stay_zero(tmp_path: Path) -> None:
    x = clustered(5)
    x[2] = 0.0
    entry = vx.append_rows(tmp_path, None, ids_for(0, 5), x)
    sims, found = SearchIndex.open(tmp_path, entry).search(x[:1], 8)
    assert found[0, 0] == ids_for(0, 5)[0] and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert (found[0, 5:] == -1).all() and set(found[0, :5]) == set(ids_for(0, 5))
    assert sims[0, list(found[0]).index(ids_for(0, 5)[2])] == 0.0  # the zero row: cosine 0, not NaN


def test_append_writes_only_new_files_and_old_entry_still_reads(tmp_path: Path, umask_022: None) -> None:
    entry1, ids1, x1 = append_batches(tmp_path, [3000, 2000])
    frozen = copy.deepcopy(entry1)
    before = {f: sha(tmp_path / f) for f in vx.entry_files(entry1)}
    listing = set(os.listdir(tmp_path))

    entry2 = vx.append_rows(tmp_path, entry1, ids_for(10_000, 1000), clustered(1000, seed=7))
    assert entry1 == frozen  # the old entry object is not mutated
    new_files = set(os.listdir(tmp_path)) - listing
    assert new_files == set(vx.entry_files(entry2)) - set(vx.entry_files(entry1)) and len(new_files) == 1
    assert {f: sha(tmp_path / f) for f in vx.entry_files(entry1)} == before  # old files byte-identical
    for f in os.listdir(tmp_path):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f  # honours the umask (not mkstemp's 0600)

    old = SearchIndex.open(tmp_path, entry1, mmap=True)
    assert old.ntotal == 5000
    _, found = old.search(x1[:50], 1)
    np.testing.assert_array_equal(found[:, 0], ids1[:50])
    assert SearchIndex.open(tmp_path, entry2).ntotal == 6000
    vx.check(tmp_path, entry2, np.concatenate([ids1, ids_for(10_000, 1000)]))


def test_optimize_merges_small_flat_segments(tmp_path: Path) -> None:
    entry, ids, _ = append_batches(tmp_path, [20_000, 500, 500, 500])
    files = set(os.listdir(tmp_path))
    merged = vx.optimize(tmp_path, entry)
    assert merged["kind"] == "flat" and len(merged["segments"]) == 2  # the three small ones became one
    assert files <= set(os.listdir(tmp_path))  # optimize never deletes
    assert merged["quality"]["recall_at_10"] == 1.0
    q = clustered(100, seed=42)
    np.testing.assert_array_equal(SearchIndex.open(tmp_path, merged).search(q, 10)[1],
                                  SearchIndex.open(tmp_path, entry).search(q, 10)[1])
    vx.check(tmp_path, merged, ids)


# ------------------------------------------------------------------------------------------------ approximate


def test_optimize_converts_flat_to_ivf_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       umask_022: None) -> None:
    monkeypatch.setattr(defaults, "VECTOR_EXACT_MAX_CELLS", 10_000 * DIM)
    entry, ids, x = append_batches(tmp_path, [8000, 8000, 8000])
    assert entry["kind"] == "flat"  # appends stay cheap and flat past the threshold

    calls: list[int] = []

    def sample(n: int) -> np.ndarray:
        calls.append(n)
        return x[np.random.default_rng(n).choice(len(x), min(n, len(x)), replace=False)]

    ivf = vx.optimize(tmp_path, entry, sample=sample)
    assert ivf["kind"] == "ivf" and ivf["rows"] == 24_000 and calls
    assert ivf["params"]["nlist"] == vx.nlist_for(24_000)
    assert ivf["quality"]["recall_at_10"] >= 0.9
    assert ivf["params"]["nprobe"] < ivf["params"]["nlist"]

    held_out = clustered(300, seed=123)
    for mmap in (False, True):
        index = SearchIndex.open(tmp_path, ivf, mmap=mmap)
        assert vx.measure_quality(index, held_out)["recall_at_10"] >= 0.9

    # Appending to an IVF adds one segment with the trained template: no retraining, no rewrite.
    template_bytes = sha(tmp_path / ivf["template"]["file"])
    extra_x, extra_ids = clustered(1500, seed=5), ids_for(50_000, 1500)
    ivf2 = vx.append_rows(tmp_path, ivf, extra_ids, extra_x)
    assert ivf2["template"] == ivf["template"] and sha(tmp_path / ivf["template"]["file"]) == template_bytes
    assert len(set(vx.entry_files(ivf2)) - set(vx.entry_files(ivf))) == 1
    for mmap in (False, True):
        index = SearchIndex.open(tmp_path, ivf2, mmap=mmap)
        assert index.ntotal == 25_500
        _, found = index.search(extra_x[:200], 1)
        assert (found[:, 0] == extra_ids[:200]).mean() >= 0.95
    ivf3 = vx.append_rows(tmp_path, ivf2, ids_for(60_000, 1500), clustered(1500, seed=6))
    all_ids = np.concatenate([ids, extra_ids, ids_for(60_000, 1500)])
    vx.check(tmp_path, ivf3, all_ids)

    merged = vx.optimize(tmp_path, ivf3)  # the two small segments become one on-disk segment
    assert merged["kind"] == "ivf" and len(merged["segments"]) == 2
    assert merged["quality"]["recall_at_10"] >= 0.9
    vx.check(tmp_path, merged, all_ids)
    for f in os.listdir(tmp_path):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f


def test_build_forced_ivf_and_back_to_flat(tmp_path: Path) -> None:
    x, ids = clustered(12_000, seed=3), ids_for(0, 12_000)
    ivf = vx.build(tmp_path / "ivf", ids, x, kind="ivf")
    assert ivf["kind"] == "ivf" and ivf["quality"]["recall_at_10"] >= 0.9
    flat = vx.optimize(tmp_path / "ivf", ivf, kind="flat")
    assert flat["kind"] == "flat" and flat["quality"]["recall_at_10"] == 1.0
    vx.check(tmp_path / "ivf", flat, ids)


@pytest.mark.parametrize("mmap", [False, True])
def test_vectors_of_reads_rows_by_id_from_every_kind_of_part(tmp_path: Path, mmap: bool) -> None:
    flat, ids, x = append_batches(tmp_path / "flat", [300, 200])
    ivf_dir = tmp_path / "ivf"
    ivf = vx.build(ivf_dir, ids[:400], x[:400], kind="ivf")  # an on-disk segment
    ivf = vx.append_rows(ivf_dir, ivf, ids[400:], x[400:])  # and a small one: two parts when mapped, one if not
    pick = np.random.default_rng(0).permutation(len(ids))[:50]
    for directory, entry in ((tmp_path / "flat", flat), (ivf_dir, ivf)):
        index = SearchIndex.open(directory, entry, mmap=mmap)
        np.testing.assert_allclose(index.vectors_of(ids[pick]), unit(x[pick]), rtol=0, atol=1e-6)
        assert index.vectors_of([]).shape == (0, DIM)
        with pytest.raises(KeyError, match="no row with faiss id 5"):
            index.vectors_of([ids[0], 5])


# ------------------------------------------------------------------------------------------------ damage


def _apply(case: str, path: Path, entry: dict, other_path: Path, other_dim_path: Path, fewer_path: Path) -> dict:
    """Damage ``path`` one way; return the entry a reader would then hold (sizes patched where the point is to
    get past the size check and hit the deeper one)."""
    entry = copy.deepcopy(entry)
    seg = entry["segments"][0]
    size = path.stat().st_size
    if case == "missing":
        path.unlink()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(size))  # same size: passes the size check
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif case == "foreign":
        shutil.copyfile(other_path, path)  # another store's segment of the same shape
    elif case in ("fewer", "wrong_dim"):
        shutil.copyfile(fewer_path if case == "fewer" else other_dim_path, path)
        seg["bytes"] = path.stat().st_size
        seg.pop("ids_digest")
    return entry


@pytest.mark.parametrize("case", ["missing", "empty", "random", "truncated", "foreign", "fewer", "wrong_dim"])
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_damaged_segment_raises_index_file_error(tmp_path: Path, case: str, kind: str) -> None:
    x = clustered(2000, seed=1)
    entry = vx.build(tmp_path / "s", ids_for(0, 2000), x, kind=kind)
    other = vx.build(tmp_path / "o", ids_for(90_000, 2000), x, kind=kind)  # same shape, other ids
    if kind == "ivf":  # another store's IVF template would differ; the same template keeps the shape equal
        other = vx.append_rows(tmp_path / "s", entry, ids_for(90_000, 2000), x)
        other_path = tmp_path / "s" / other["segments"][-1]["file"]
        fewer_entry = vx.append_rows(tmp_path / "s", entry, ids_for(70_000, 100), x[:100])
        fewer_path = tmp_path / "s" / fewer_entry["segments"][-1]["file"]
        wrong = vx.build(tmp_path / "w", ids_for(0, 2000), clustered(2000, dim=32), kind="ivf")
        target = tmp_path / "s" / entry["segments"][0]["file"]
        if case in ("fewer", "foreign"):  # compare like with like: an appended (array) segment
            entry = vx.append_rows(tmp_path / "s", entry, ids_for(80_000, 2000), x)
            entry["segments"] = entry["segments"][::-1]
            target = tmp_path / "s" / entry["segments"][0]["file"]
    else:
        other_path = tmp_path / "o" / other["segments"][0]["file"]
        fewer = vx.build(tmp_path / "f", ids_for(0, 100), x[:100], kind="flat")
        fewer_path = tmp_path / "f" / fewer["segments"][0]["file"]
        wrong = vx.build(tmp_path / "w", ids_for(0, 2000), clustered(2000, dim=32), kind="flat")
        target = tmp_path / "s" / entry["segments"][0]["file"]
    wrong_path = tmp_path / "w" / wrong["segments"][0]["file"]
    if kind == "ivf" and case == "wrong_dim":
        target = tmp_path / "s" / entry["template"]["file"]
        wrong_path = tmp_path / "w" / wrong["template"]["file"]
        damaged = copy.deepcopy(entry)
        shutil.copyfile(wrong_path, target)
        damaged["template"]["bytes"] = target.stat().st_size
    else:
        damaged = _apply(case, target, entry, other_path, wrong_path, fewer_path)
    for attempt in (lambda: SearchIndex.open(tmp_path / "s", damaged),
                    lambda: SearchIndex.open(tmp_path / "s", damaged, mmap=True),
                    lambda: vx.check(tmp_path / "s", damaged, ids_for(0, 2000))):
        with pytest.raises(IndexFileError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and len(message) < 400
        assert target.name in message, message


def test_damaged_ivfdata_and_template(tmp_path: Path) -> None:
    entry = vx.build(tmp_path, ids_for(0, 3000), clustered(3000), kind="ivf")
    data = tmp_path / entry["segments"][0]["data_file"]
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(IndexFileError, match="truncated"):
        SearchIndex.open(tmp_path, entry, mmap=True)
    template = tmp_path / entry["template"]["file"]
    template.write_bytes(b"\0" * template.stat().st_size)
    with pytest.raises(IndexFileError, match="not a readable"):
        SearchIndex.open(tmp_path, entry)


def test_check_rejects_a_foreign_or_short_index(tmp_path: Path) -> None:
    x = clustered(2000)
    entry = vx.build(tmp_path, ids_for(0, 2000), x, kind="flat")
    vx.check(tmp_path, entry, ids_for(0, 2000)[::-1])  # order does not matter
    with pytest.raises(IndexFileError, match="not in the space's table"):
        vx.check(tmp_path, entry, ids_for(5000, 2000))  # the files are another store's index
    with pytest.raises(IndexFileError, match="2000 rows, the table 2100"):
        vx.check(tmp_path, entry, ids_for(0, 2100))  # the index has fewer rows than the table
    with pytest.raises(IndexFileError, match="malformed"):
        SearchIndex.open(tmp_path, {"kind": "flat"})


def test_flat_search_uses_gpu_copies_when_faiss_sees_gpus_and_falls_back_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    entry, _, _ = append_batches(tmp_path, [300, 200])
    queries = clustered(20, seed=5)
    want = SearchIndex.open(tmp_path, entry).search(queries, 5)
    assert not vx.gpu_search_enabled()  # faiss-cpu here: no GPU to see (a GPU build on a GPU machine: True)
    # A GPU build that sees one: the search goes through the copies it makes (an identity "copy" here).
    copied: list[object] = []

    def to_gpus(index: object) -> object:
        copied.append(index)
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    assert vx.gpu_search_enabled()
    got = SearchIndex.open(tmp_path, entry).search(queries, 5)
    assert len(copied) == 2 and np.array_equal(got[1], want[1])
    monkeypatch.setenv("MAMMALS_FAISS_GPU", "0")
    assert not vx.gpu_search_enabled()
    monkeypatch.delenv("MAMMALS_FAISS_GPU")

    def fails(index: object) -> object:
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fails, raising=False)
    with caplog.at_level("WARNING"):
        got = SearchIndex.open(tmp_path, entry).search(queries, 5)
    assert np.array_equal(got[1], want[1]) and "searching on the CPU" in caplog.text
