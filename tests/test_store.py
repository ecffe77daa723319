"""The store as a database: one writer at a time, readers that never see half a commit, kill -9 at any moment,
damaged files that end recomputed or as one clear line, never a silent loss.  All on the real pets photos."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main as cli
from indexer.store import Store, StoreError, schema
from tests.conftest import PETS, REPO, sample_photos
from tests.helpers_store import append_batches, check_consistent

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MAMMALS = [sys.executable, "-m", "indexer.cli"]
# A crash test SIGKILLs itself at each of these steps of a commit (see indexer.store.store._failpoint).
COMMIT_STEPS = ("commit:start", "commit:space-table", "commit:space-index", "commit:spaces", "commit:sparsity",
                "commit:errors", "commit:images", "commit:published")


def _photos_folder(root: Path, photos: list[Path]) -> Path:
    root.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, root / f"{p.parent.name}-{p.name}")
    return root


def _writer(store: Path, tag: str, batches: int, per_batch: int, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers_store", str(store), tag, str(batches),
                             str(per_batch)], env={**ENV, **env}, cwd=REPO, stderr=subprocess.PIPE)


# ------------------------------------------------------------------------------------------------- one writer


def test_second_writer_refuses_with_one_line_or_waits(tmp_path: Path) -> None:
    from indexer.store.lock import WriterLock

    a = _photos_folder(tmp_path / "a", sample_photos(30, step=31))
    b = _photos_folder(tmp_path / "b", sample_photos(30, step=37))
    store = tmp_path / "store"
    args = ["--no-sparsity", "-q", "--layout", "flat", "--species", "dog", "--workers", "0"]
    holder = WriterLock(store)
    holder.acquire()  # this test process is the writer the runs below meet
    try:
        refused = subprocess.run([*MAMMALS, "index", str(a), "--store", str(store), *args], env=ENV, cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        # Two concurrent runs that both wait: they run one after the other once the lock is free.
        runs = [subprocess.Popen([*MAMMALS, "index", str(d), "--store", str(store), "--wait", *args], env=ENV,
                                 cwd=REPO, stderr=subprocess.PIPE, text=True) for d in (a, b)]
        time.sleep(3.0)
        assert [r.poll() for r in runs] == [None, None], "a --wait run went ahead while the store was locked"
    finally:
        holder.release()
    for r in runs:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"being written by PID {os.getpid()} on " in lines[0] and "since" in lines[0]
    assert "--wait" in lines[0] and "Traceback" not in refused.stderr
    ids = check_consistent(store)
    # Every photo of both folders exactly once (the same bytes in both folders count once).
    distinct = {p.read_bytes() for d in (a, b) for p in d.iterdir()}
    assert len(ids) == len(distinct) >= 50
    assert cli(["verify", str(store), "-q"]) == 0


def test_train_refuses_at_once_when_the_store_is_being_written(pets_store_copy: Path) -> None:
    from analysis.training import train_store_mapper
    from indexer.store.lock import WriterLock

    with WriterLock(pets_store_copy), pytest.raises(StoreError, match="being written by PID"):
        train_store_mapper(pets_store_copy, progress=False)


# ------------------------------------------------------------------------------------------------- readers


def test_readers_never_see_half_a_commit(pets_store_copy: Path) -> None:
    """Opening and searching, round after round, for as long as a writer publishes a commit every 3 rows.

    Only rounds that overlap the writer can catch half a commit, so the loop stops when it exits (at most 200
    rounds). 60 commits keep readers busy for about a minute on 2 cores; 120 took three times as long and checked
    nothing more."""
    writer = _writer(pets_store_copy, "live", 60, 3)
    seen: list[int] = []
    errors: list[str] = []
    try:
        for round_ in range(200):
            if writer.poll() is not None and round_ >= 20:
                break
            try:  # every 20th round also through deltalake + duckdb alone and the sparsity table
                seen.append(len(check_consistent(pets_store_copy, deep=round_ % 20 == 0)))
            except Exception as e:  # every failure is counted and reported, none stops the loop
                errors.append(f"{e.__class__.__name__}: {e}")
    finally:
        _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err.decode()[-2000:]
    assert errors == []
    assert seen == sorted(seen) and seen[-1] > seen[0], "readers saw the store grow, version by version"
    assert len(set(seen)) >= 10, "reads overlapped many commits"
    assert len(check_consistent(pets_store_copy)) == 1140 + 180


# ------------------------------------------------------------------------------------------------- kill -9


def test_kill_at_every_step_of_a_commit_and_at_random_moments(pets_store_copy: Path) -> None:
    store = pets_store_copy
    committed = check_consistent(store)
    kills = 0
    for step in COMMIT_STEPS:  # a SIGKILL exactly at each step of the third commit of a run
        proc = _writer(store, f"step-{step}", 5, 4, MAMMALS_CRASH_AT=step)
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, step
        kills += 1
        now = check_consistent(store)
        assert committed <= now, f"{step}: committed rows lost"
        assert len(now) - len(committed) in (0, 4), step  # the killed commit is all or nothing
        committed = now
    rng = random.Random(8)
    for round_ in range(16):  # and at random moments of a run of many small commits
        proc = _writer(store, f"random-{round_}", 200, 2)
        time.sleep(rng.uniform(1.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1 if proc.returncode == -signal.SIGKILL else 0
        now = check_consistent(store)
        assert committed <= now, f"round {round_}: committed rows lost"
        committed = now
    assert kills >= len(COMMIT_STEPS) + 14
    # The next writer finishes what was started, and verify finds every invariant intact.
    append_batches(store, "after", 2, 3)
    assert len(check_consistent(store)) == len(committed) + 6
    assert cli(["verify", str(store), "-q"]) == 0


def test_umask_decides_file_modes(tmp_path: Path) -> None:
    src = _photos_folder(tmp_path / "src", sample_photos(4))
    store = tmp_path / "store"
    old = os.umask(0o022)
    try:
        assert cli(["index", str(src), "--store", str(store), "-q", "--workers", "0", "--species", "cat",
                    "--layout", "flat"]) == 0
    finally:
        os.umask(old)
    files = [p for p in store.rglob("*") if p.is_file()]
    assert len(files) > 10
    private = [str(p.relative_to(store)) for p in files if p.stat().st_mode & 0o044 != 0o044]
    assert private == []


# ------------------------------------------------------------------------------------------------- damage


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, Path]:
    src = _photos_folder(tmp_path / "src", sample_photos(12))
    store = tmp_path / "store"
    assert cli(["index", str(src), "--store", str(store), "-q", "--workers", "0", "--species", "dog",
                "--layout", "flat"]) == 0
    return store, src


def _index_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / schema.INDEXES_DIR / "encoder").iterdir() if p.is_file())


def _one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "foreign"])
def test_damaged_index_is_a_clear_error_then_rebuilt(small_store: tuple[Path, Path], tmp_path: Path, damage: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = small_store
    image_id = Store.open(store).image_ids()[0]
    target = max(_index_files(store), key=lambda p: p.stat().st_size)
    if damage == "garbage":
        target.write_bytes(os.urandom(target.stat().st_size))
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # the same-named index of another store (other images)
        other = tmp_path / "other"
        src = _photos_folder(tmp_path / "other-src", sample_photos(5, step=53))
        assert cli(["index", str(src), "--store", str(other), "-q", "--workers", "0", "--species", "cat",
                    "--layout", "flat"]) == 0
        shutil.copy(max(_index_files(other), key=lambda p: p.stat().st_size), target)
    err = _one_line_exit_2(["query", "--store", str(store), "--id", image_id, "-q"], capsys)
    assert "verify" in err
    capsys.readouterr()
    assert cli(["verify", str(store)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert cli(["verify", str(store), "--repair", "-q"]) == 0
    assert cli(["verify", str(store), "-q"]) == 0
    assert cli(["query", "--store", str(store), "--id", image_id, "-q", "--json"]) == 0
    check_consistent(store)


def test_damaged_space_table_is_recomputed_from_the_photos(small_store: tuple[Path, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = small_store
    before = Store.open(store).space("encoder")
    parts = sorted((store / "spaces" / "encoder").glob("*.parquet"), key=lambda p: p.stat().st_size)
    parts[-1].write_bytes(b"PAR1 this is not parquet PAR1")
    capsys.readouterr()
    assert cli(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "FAILED   space encoder" in out
    assert cli(["verify", str(store), "--repair", "-q"]) == 0
    after = Store.open(store).space("encoder")
    assert after.ids == before.ids  # nothing lost
    cos = np.sum(after.vectors * before.vectors, axis=1)
    assert cos.min() > 0.9999
    assert cli(["verify", str(store), "-q"]) == 0


def test_manifest_without_encoder_is_one_line(small_store: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = small_store
    m = json.loads((store / schema.MANIFEST).read_text())
    del m["encoder"]
    (store / schema.MANIFEST).write_text(json.dumps(m))
    for args in (["info", str(store)], ["query", "--store", str(store), "--id", "0" * 64],
                 ["index", "--store", str(store)], ["verify", str(store)]):
        err = _one_line_exit_2(args, capsys)
        assert "encoder" in err


def test_map_on_a_three_photo_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _photos_folder(tmp_path / "src", sample_photos(3))
    store = tmp_path / "store"
    assert cli(["index", str(src), "--store", str(store), "-q", "--workers", "0", "--no-sparsity"]) == 0
    err = _one_line_exit_2(["map", str(store), "-q"], capsys)
    assert "3" in err


def test_pets_store_passes_verify(pets_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli(["verify", str(pets_store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["findings"]) >= 8
    assert PETS.is_dir()


def test_schema_1_store_is_refused_then_migrated_without_reembedding(pets_store: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Store.open(pets_store)
    images = src.images.head(50).drop(columns=["seq"])
    enc = src.space("encoder")
    vecs = enc.vectors[:50]
    sparsity = src.sparsity()
    sparsity = sparsity[sparsity["id"].isin(set(images["id"]))]
    old = tmp_path / "old"  # the files schema 1 wrote: one Parquet file per table, a manifest of schema 1
    (old / "spaces").mkdir(parents=True)
    images.assign(indexed_at=images["indexed_at"].astype("datetime64[s, UTC]")).to_parquet(old / "images.parquet")
    flat = pa.array(vecs.ravel(), pa.float32())
    pq.write_table(pa.table({"id": images["id"], "faiss_id": images["faiss_id"],
                             "vector": pa.FixedSizeListArray.from_arrays(flat, 1280)}),
                   old / "spaces" / "encoder.parquet")
    sparsity.to_parquet(old / "sparsity.parquet")
    m = {k: v for k, v in src.manifest.items() if k in ("encoder", "sparsity", "created_at", "parameters")}
    m.update(schema_version=1, spaces={"encoder": {"kind": "encoder", "dim": 1280, "count": 50}},
             counts={"images": 50}, models={})
    (old / "manifest.json").write_text(json.dumps(m))
    err = _one_line_exit_2(["info", str(old)], capsys)
    assert "mammals migrate" in err
    assert cli(["migrate", str(old), "-q"]) == 0
    new = Store.open(old)
    assert new.images["id"].tolist() == images["id"].tolist()
    np.testing.assert_array_equal(new.space("encoder").vectors, vecs)
    assert len(new.sparsity()) == len(sparsity)
    assert (tmp_path / "old.v1-backup" / "images.parquet").is_file()
    check_consistent(old)
    assert cli(["verify", str(old), "-q"]) == 0


def test_photo_unreadable_at_vae_backfill_is_left_out_not_zeroed(tmp_path: Path) -> None:
    from analysis.training import train_store_vae
    from indexer.models.vae import VAEConfig
    from indexer.pipeline import run_index

    src = _photos_folder(tmp_path / "src", sample_photos(16))
    store = tmp_path / "store"
    run_index([src], store, species="dog", layout="flat", progress=False, workers=0, sparsity=False)
    train_store_vae(store, VAEConfig(epochs=1, batch_size=16), progress=False, workers=0)
    gone = sorted(src.iterdir())[3]
    gone_id = Store.open(store).images.set_index("path").loc[str(gone), "id"]
    gone.unlink()  # moved away after indexing: the VAE backfill cannot read it again
    rep = run_index([], store, progress=False, workers=0, sparsity=False)
    assert sorted(rep.recomputed) == ["vae_logvar", "vae_mu"]
    s = Store.open(store)
    for name in ("vae_mu", "vae_logvar"):
        ids = s.space_ids(name)
        assert len(ids) == 15 and gone_id not in ids, name
        assert s.manifest["spaces"][name]["missing"] == 1
        assert np.abs(s.space(name).vectors).sum(axis=1).min() > 0  # no made-up zero vectors
        assert s.vector_index(name).ntotal == 15
    assert len(s) == 16 and gone_id in s.space_ids("encoder")  # nothing else is lost
    assert cli(["verify", str(store), "-q"]) == 0


def test_files_of_old_versions_are_removed_only_when_no_version_names_them(small_store: tuple[Path, Path]) -> None:
    store_path, _ = small_store
    old_files = set(_index_files(store_path))
    with Store.open(store_path, write=True) as store:
        sp = store.space("encoder")
        store.set_space("encoder", sp.ids, sp.vectors, sp.meta)  # a new version of the space: new files
        store.commit()
        store.collect_garbage()  # the default keeps them for an hour: a reader may still use the old version
        assert old_files <= set(_index_files(store_path))
        removed = store.collect_garbage(keep_seconds=0)
    now = set(_index_files(store_path))
    assert removed >= 1 and not (old_files & now)
    assert check_consistent(store_path) and cli(["verify", str(store_path), "-q"]) == 0
