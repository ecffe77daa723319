"""End to end: index the real pets photos, query them, re-run, add, break, resume — through the API and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.evaluate import knn_label_accuracy
from analysis.neighbours import query_images
from indexer.cli import main as cli
from indexer.pipeline import run_index
from indexer.store import Store, schema
from tests.conftest import PETS, WOOF, sample_photos

# ------------------------------------------------------------------------------------------------- quality


def test_pets_knn_accuracy_from_store_alone(pets_store: Path) -> None:
    store = Store.open(pets_store)
    assert len(store) == 1140
    breed = knn_label_accuracy(store, label="breed", k=10)
    species = knn_label_accuracy(store, label="species", k=10)
    print(f"leave-one-out kNN k=10: breed {breed:.3f}, species {species:.3f}")
    assert breed >= 0.78
    assert species >= 0.97


def test_store_tables_agree_and_open_without_our_code(pets_store: Path) -> None:
    manifest = json.loads((pets_store / schema.MANIFEST).read_text())
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["encoder"]["name"] == "efficientnet-lite0"
    assert manifest["encoder"]["dim"] == 1280
    assert manifest["counts"]["images"] == 1140
    assert manifest["counts"]["by_species"] == {"cat": 480, "dog": 660}
    assert {"torch", "faiss-cpu", "pyarrow"} <= set(manifest["versions"])

    # Without our code: the manifest names each Delta table's version; deltalake reads it, duckdb queries it.
    from deltalake import DeltaTable

    images_dt = DeltaTable(str(pets_store / "images"), version=manifest["tables"]["images"]["version"])
    sp = manifest["spaces"]["encoder"]
    space_dt = DeltaTable(str(pets_store / sp["table"]), version=sp["table_version"])
    images = images_dt.to_pandas().sort_values("seq")
    table = space_dt.to_pyarrow_table()
    assert len(images) == table.num_rows == 1140
    assert images["id"].is_unique and set(table.column("id").to_pylist()) == set(images["id"])
    # The FAISS segments return the table's faiss_ids.
    vecs = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert vecs.shape == (1140, 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    segments = [faiss.read_index(str(pets_store / sp["index_dir"] / seg["file"])) for seg in sp["index"]["segments"]]
    assert sum(ix.ntotal for ix in segments) == 1140
    first = next(ix for ix in segments if ix.ntotal)
    _, found = first.search(vecs[:1], 1)
    assert found[0, 0] in set(table.column("faiss_id").to_pylist())
    # duckdb queries the same tables (as Arrow datasets of the pinned versions).
    con = duckdb.connect()
    con.register("space", space_dt.to_pyarrow_dataset())
    con.register("images", images_dt.to_pyarrow_dataset())
    n, dim = con.sql("select count(*), max(len(vector)) from space").fetchall()[0]
    assert (n, dim) == (1140, 1280)
    assert con.sql("select count(distinct breed) from images").fetchall()[0] == (45,)
    joined = con.sql("select count(*) from images join space using (id)").fetchall()[0]
    assert joined == (1140,)


# ------------------------------------------------------------------------------------------------- query


def test_query_indexed_photo_returns_itself_first(pets_store: Path) -> None:
    store = Store.open(pets_store)
    photos = sample_photos(10)
    results = query_images(store, photos, k=10)
    top_vote_right = 0
    for photo, res in zip(photos, results, strict=True):
        assert res.error is None
        assert Path(res.neighbours[0].path) == photo.resolve()
        assert res.neighbours[0].similarity > 0.999
        assert [n.rank for n in res.neighbours] == list(range(1, 11))
        assert abs(sum(v.share for v in res.breed_votes) - 1.0) < 1e-6
        top_vote_right += res.breed_votes[0].breed == photo.parent.name
    assert top_vote_right >= 7  # the vote includes the photo itself, so it should rarely lose


def test_query_altered_copy_finds_original_in_top3(pets_store: Path, tmp_path: Path) -> None:
    store = Store.open(pets_store)
    photos = sample_photos(8, step=131)
    altered = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        img = img.resize((int(img.width * 0.7), int(img.height * 0.7)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        out = tmp_path / f"altered_{p.name}"
        out.write_bytes(buf.getvalue())
        altered.append(out)
    for original, res in zip(photos, query_images(store, altered, k=10), strict=True):
        top3 = [Path(n.path) for n in res.neighbours[:3]]
        assert original.resolve() in top3, (original, top3)


def test_cli_query_json_is_stable(pets_store: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    photo = sample_photos(1)[0]
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    code = cli(["query", str(photo), str(bad), "--store", str(pets_store), "-k", "3", "--json", "-q"])
    assert code == 1  # one query failed, the other ran
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "mammals.query/1"
    assert out["k"] == 3 and out["space"] == "encoder" and out["encoder"] == "efficientnet-lite0"
    good, failed = out["results"]
    assert set(good) == {"query", "kind", "neighbours", "breed_votes", "error"} and good["kind"] == "image"
    assert set(good["neighbours"][0]) == {"rank", "id", "path", "species", "breed", "similarity"}
    assert set(good["breed_votes"][0]) == {"species", "breed", "votes", "score", "share"}
    assert len(good["neighbours"]) == 3 and good["error"] is None
    assert failed["error"] and failed["neighbours"] == []


def test_cli_info(pets_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", str(pets_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["images"] == 1140
    assert info["counts"]["by_breed"]["cat"]["persian"] == 40
    assert info["spaces"]["encoder"]["dim"] == 1280
    assert cli(["info", str(pets_store)]) == 0
    text = capsys.readouterr().out
    assert "efficientnet-lite0" in text and "persian" in text


# ------------------------------------------------------------------------------------------------- incremental


def test_rerun_adds_nothing_and_new_folder_adds_exactly_its_rows(pets_store_copy: Path, tmp_path: Path) -> None:
    again = run_index([PETS], pets_store_copy, progress=False)
    assert (again.added, again.already_indexed) == (0, 1140)

    extra = tmp_path / "woof"
    breeds = sorted(p for p in WOOF.iterdir() if p.is_dir())[:2]
    for b in breeds:
        (extra / b.name).mkdir(parents=True)
        for f in sorted(b.glob("*.jpg"))[:6]:
            shutil.copy(f, extra / b.name / f.name)
    added = run_index([extra], pets_store_copy, species="dog", progress=False)
    assert added.added == 12
    store = Store.open(pets_store_copy)
    assert len(store) == 1152
    assert store.vector_index("encoder").ntotal == len(store.space_ids("encoder")) == 1152
    assert store.space_ids("encoder") == store.images["id"].tolist()
    new = store.images.tail(12)
    assert set(new["breed"]) == {b.name for b in breeds} and set(new["species"]) == {"dog"}
    assert set(new["layout"]) == {"breed-folders"}


def test_labels_csv_given_later_reaches_already_indexed_images(pets_store_copy: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = Store.open(pets_store_copy).images
    photos = sorted(PETS.rglob("*.jpg"))[::3]
    rng = np.random.default_rng(0)
    ratings = rng.integers(1, 6, len(photos)).astype(float)
    ratings[::10] = np.nan  # an empty cell keeps no value
    labels = pd.DataFrame({"path": [str(p.relative_to(PETS)) for p in photos], "rating": ratings,
                           "owner": [f"o{i % 7}" for i in range(len(photos))], "breed": "not-a-breed"})
    csv = tmp_path / "ratings.csv"
    labels.to_csv(csv, index=False)

    code = cli(["index", str(PETS), "--store", str(pets_store_copy), "--labels", str(csv), "-q", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 0 and report["labels_matched"] == len(photos)
    assert report["labels_updated"] == len(photos)  # every matched image gains an owner

    after = Store.open(pets_store_copy).images
    assert after["id"].tolist() == before["id"].tolist()
    assert after["rating"].dtype == np.float64 and after["owner"].dtype != object
    by_path = after.set_index("path")
    got = by_path.loc[[str(p.resolve()) for p in photos], "rating"].to_numpy()  # the store keeps real paths
    np.testing.assert_array_equal(got, ratings)  # NaN where the cell was empty
    assert by_path["rating"].notna().sum() == np.isfinite(ratings).sum()
    assert (after["breed"] == before["breed"]).all()  # a CSV never overrides the layout's breed

    # Numeric labels from the store are what the sparsity statistics read (no labels= argument needed).
    from analysis.sparsity_stats import numeric_correlations

    corr = numeric_correlations(Store.open(pets_store_copy), "encoder", "hoyer", "rating")
    assert (corr["n"] == np.isfinite(ratings).sum()).all()

    again = run_index([PETS], pets_store_copy, labels_csv=csv, progress=False)
    assert again.labels_updated == 0


def test_duplicate_bytes_are_indexed_once(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    photo = sample_photos(1)[0]
    shutil.copy(photo, src / "a.jpg")
    shutil.copy(photo, src / "b.jpg")
    shutil.copy(sample_photos(2)[1], src / "c.jpg")
    rep = run_index([src], tmp_path / "store", species="cat", progress=False, workers=0)
    assert (rep.added, rep.duplicates) == (2, 1)
    # Both copies went through the network in one batch: their sparsity rows are still recorded once.
    store = Store.open(tmp_path / "store")
    sp = store.sparsity()
    assert set(sp["id"]) == set(store.images["id"])
    assert not sp.duplicated(["id", "model", "layer_index", "metric"]).any()
    from analysis.sparsity_stats import depth_curves

    assert len(depth_curves(store, "encoder", "hoyer", "species"))


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_files_are_skipped_with_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from indexer.sources import printable_path
    from tests.helpers_badfiles import add_duplicates, make_bad_corpus

    folder = tmp_path / "mixed"
    folder.mkdir()
    expected = make_bad_corpus(folder, non_utf8_name=True)
    assert len(expected) >= 40
    good = sample_photos(3)
    for p in good:
        shutil.copy(p, folder / p.name)
    add_duplicates(folder)  # two copies of one more photo: indexed once, not an error
    store = tmp_path / "store"
    code = cli(["index", str(folder), "--store", str(store), "--species", "cat", "--layout", "flat", "-q",
                "--workers", "1"])
    assert code == 0
    err = capsys.readouterr().err
    errors = Store.open(store).errors
    by_name = {Path(p).name: r for p, r in zip(errors["path"], errors["reason"], strict=True)}
    for name, keyword in expected.items():
        if (folder / name).suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
            continue  # not an image extension: never a candidate, so never an error
        shown = printable_path(name)
        assert shown in by_name, f"{shown} missing from the errors table"
        assert keyword.lower() in by_name[shown].lower(), (shown, by_name[shown])
        assert shown in err  # a one-line warning names the file
    s = Store.open(store)
    assert len(s) == 4 and s.images["id"].is_unique
    assert not s.sparsity().duplicated(["id", "model", "layer_index", "metric"]).any()
    # A second run over the same folder: nothing new, the same errors, no duplicates anywhere.
    assert cli(["index", str(folder), "--store", str(store), "--species", "cat", "--layout", "flat", "-q"]) == 0
    again = Store.open(store)
    assert len(again) == 4 and len(again.errors) == len(errors)
    assert cli(["verify", str(store), "-q"]) == 0


def test_cli_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken-store"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    future = tmp_path / "future-store"
    future.mkdir()
    (future / "manifest.json").write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION + 1}))
    cases = {
        "missing dir": ["index", str(tmp_path / "nope"), "--store", str(tmp_path / "s1")],
        "empty dir": ["index", str(empty), "--store", str(tmp_path / "s2")],
        "unreadable store": ["info", str(broken)],
        "newer schema": ["info", str(future)],
        "not a store": ["query", str(sample_photos(1)[0]), "--store", str(empty)],
    }
    # All at once: each process spends most of its ~6 s importing, and the cases do not share a path.
    procs = {what: subprocess.Popen([sys.executable, "-m", "indexer.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for what, args in cases.items()}
    for what, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (what, stderr)
        assert "Traceback" not in stderr, what
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error" in lines[0], (what, stderr)


def test_query_with_other_encoder_is_refused(tmp_path: Path) -> None:
    from tests.helpers_openclip import make_tiny_open_clip_checkpoint

    name = make_tiny_open_clip_checkpoint(tmp_path / "ckpt")
    src = tmp_path / "few"
    src.mkdir()
    for p in sample_photos(4):
        shutil.copy(p, src / p.name)
    store = tmp_path / "store"
    run_index([src], store, encoder=name, species="cat", progress=False, workers=0)
    # The same store with the default encoder: refused with a message naming both encoders.
    with pytest.raises(Exception, match="efficientnet-lite0") as exc:
        run_index([src], store, progress=False, workers=0)
    assert "open_clip:" in str(exc.value)


def test_open_clip_encoder_end_to_end(clip_store: tuple[Path, str, list[Path]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    store_path, name, photos = clip_store
    s = Store.open(store_path)
    assert len(s) == len(photos) and s.encoder["name"] == name
    assert s.space("encoder").dim == s.encoder["dim"]
    capsys.readouterr()
    assert cli(["query", str(photos[0]), "--store", str(store_path), "-k", "2", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["results"][0]["neighbours"][0]["path"]) == photos[0].resolve()


# ------------------------------------------------------------------------------------------------- crash safety


def test_unpublished_commit_is_invisible_and_rolled_back(tmp_path: Path) -> None:
    """A commit killed after its Delta appends but before the manifest: readers see the last published version,
    and the next writer rolls the tables back before writing (no duplicate rows)."""
    src = tmp_path / "src"
    src.mkdir()
    photos = sample_photos(6)
    for p in photos[:3]:
        shutil.copy(p, src / p.name)
    store = tmp_path / "store"
    run_index([src], store, species="dog", progress=False, workers=0)
    old_manifest = (store / "manifest.json").read_bytes()
    for p in photos[3:]:
        shutil.copy(p, src / p.name)
    run_index([src], store, species="dog", progress=False, workers=0)
    (store / "manifest.json").write_bytes(old_manifest)  # as if killed just before publishing
    s = Store.open(store)
    assert len(s) == 3 and s.space_ids("encoder") == s.images["id"].tolist()
    assert s.vector_index("encoder").ntotal == 3
    rep = run_index([src], store, species="dog", progress=False, workers=0)
    assert (rep.added, rep.already_indexed) == (3, 3)
    s = Store.open(store)
    assert len(s) == 6 and s.vector_index("encoder").ntotal == 6
    assert s.images["id"].is_unique and sorted(s.space_ids("encoder")) == sorted(s.images["id"])


def test_killed_run_resumes(tmp_path: Path) -> None:
    """Kill a real indexing process after its first commit; the next run keeps that work and finishes."""
    store = tmp_path / "store"
    script = (
        "import sys; from pathlib import Path; from indexer.pipeline import run_index;"
        f"run_index([Path({str(PETS)!r})], Path({str(store)!r}), progress=False, workers=0, batch_size=16,"
        " commit_every_seconds=0.0, sparsity=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        import time

        deadline = time.time() + 120
        while time.time() < deadline and not (store / "manifest.json").exists():
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    first = Store.open(store)
    done = len(first)
    assert 0 < done < 1140
    assert first.space("encoder").ids == first.images["id"].tolist()
    assert first.vector_index("encoder").ntotal == done
    rep = run_index([PETS], store, progress=False, sparsity=False)
    assert rep.already_indexed == done and rep.already_indexed + rep.added == 1140
    assert len(Store.open(store)) == 1140


def test_sparsity_method_is_recorded_kept_by_auto_and_a_new_one_recomputes_every_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for p in sample_photos(6, step=150):
        shutil.copy(p, src / f"{p.parent.name}-{p.name}")
    store = tmp_path / "store"

    def info() -> tuple[dict[str, object], pd.DataFrame]:
        s = Store.open(store)
        return s.sparsity_models()["encoder"], s.sparsity()

    assert cli(["index", str(src), "--store", str(store), "-q", "--workers", "0", "--species", "dog",
                "--layout", "flat"]) == 0
    first, rows = info()
    assert first["method"] == "sampled" and first["sample_units"] == 3072 and first["gini_units"] == 1536
    assert first["sample_design"] == "stratified-pixels-channels"
    assert first["gini_estimator"] == "pairs-within-blocks-of-512"
    assert rows["id"].nunique() == 6 and rows["value"].notna().all()
    assert Store.open(store).manifest["parameters"]["sparsity"] == "sampled:3072"
    # Another method recomputes every image's rows (one store, one method), and `auto` then keeps it.
    assert cli(["index", "--store", str(store), "-q", "--workers", "0", "--sparsity", "exact"]) == 0
    second, exact_rows = info()
    assert second["method"] == "exact" and "sample_units" not in second
    assert len(exact_rows) == len(rows) and not np.allclose(exact_rows["value"], rows["value"])
    assert cli(["index", "--store", str(store), "-q", "--workers", "0"]) == 0
    third, kept = info()
    assert third == second and kept["value"].tolist() == exact_rows["value"].tolist()
    assert cli(["index", "--store", str(store), "-q", "--no-sparsity", "--sparsity", "exact"]) == 2
