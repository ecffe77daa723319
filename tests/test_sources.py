"""indexer.sources: layout detection and labels for every layout, on the real shared photos and small trees of them."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from indexer.sources import (
    LAYOUTS,
    CatalogRow,
    SourceError,
    detect_layout,
    is_utf8_path,
    join_labels,
    normalise_breed,
    printable_path,
    scan,
)
from tests.conftest import CATS, PETS, WOOF
from tests.helpers_badfiles import add_duplicates, make_bad_corpus

pytestmark = pytest.mark.skipif(not PETS.is_dir(), reason=f"{PETS} is missing")

_PHOTOS = sorted(PETS.glob("*/*/*.jpg"))


def link_photos(root: Path, relpaths: list[str]) -> Path:
    """A tree of symlinks to real photos (nothing copied), one per relpath."""
    for i, rel in enumerate(relpaths):
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(_PHOTOS[(i * 41) % len(_PHOTOS)])
    return root


def labels(rows: list[CatalogRow]) -> dict[str, tuple[str | None, str | None]]:
    return {r.relpath: (r.species, r.breed) for r in rows}


# ------------------------------------------------------------------------------------------------- real datasets


def test_real_pets_is_species_breed() -> None:
    assert detect_layout(PETS) == "species-breed"
    rows = scan(PETS)
    assert len(rows) == 1140
    assert Counter(r.species for r in rows) == {"cat": 480, "dog": 660}
    assert len({r.breed for r in rows if r.species == "cat"}) == 12
    assert len({r.breed for r in rows if r.species == "dog"}) == 33
    assert {r.layout for r in rows} == {"species-breed"} and {r.dataset for r in rows} == {"pets"}
    assert [r.relpath for r in rows] == sorted(r.relpath for r in rows)
    assert all(r.path.is_absolute() and r.path == PETS.resolve() / r.relpath and not r.labels for r in rows)
    # Agrees with the manifest the photos were published with, row by row.
    manifest = pd.read_csv(PETS / "manifest.csv")
    assert labels(rows) == {p: (s, b) for p, s, b in zip(manifest.path, manifest.species, manifest.breed, strict=True)}


def test_real_imagewoof_is_breed_folders_without_species() -> None:
    assert detect_layout(WOOF) == "breed-folders"
    rows = scan(WOOF)
    assert len(rows) == 8645
    assert len({r.breed for r in rows}) == 10
    assert {r.species for r in rows} == {None}  # not in the path, so not invented
    manifest = pd.read_csv(WOOF / "manifest.csv")
    assert {r.relpath: r.breed for r in rows} == dict(zip(manifest.path, manifest.breed, strict=True))
    assert {r.species for r in scan(WOOF, species="dog")} == {"dog"}


def test_real_cats_unlabelled_is_flat() -> None:
    # Names like cat_images_image_1.jpg / house_cat_image_7.jpg / ragdoll_cat_image_3.jpg carry several
    # "stems" but are not Oxford breed names.
    assert detect_layout(CATS) == "flat"
    rows = scan(CATS)
    assert len(rows) == 1249
    assert {(r.species, r.breed) for r in rows} == {(None, None)}
    assert {(r.species, r.breed) for r in scan(CATS, species="cat")} == {("cat", None)}


# ------------------------------------------------------------------------------------------------- small trees


def test_stanford_dogs(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "stanford", [
        "n02085620-Chihuahua/n02085620_10074.jpg",
        "n02085620-Chihuahua/n02085620_10131.jpg",
        "n02085782-Japanese_spaniel/n02085782_1039.jpg",
        "n02096294-Australian_terrier/n02096294_1111.jpg",
    ])  # fmt: skip
    assert detect_layout(root) == "stanford-dogs"
    rows = scan(root)
    assert labels(rows) == {
        "n02085620-Chihuahua/n02085620_10074.jpg": ("dog", "chihuahua"),
        "n02085620-Chihuahua/n02085620_10131.jpg": ("dog", "chihuahua"),
        "n02085782-Japanese_spaniel/n02085782_1039.jpg": ("dog", "japanese_spaniel"),
        "n02096294-Australian_terrier/n02096294_1111.jpg": ("dog", "australian_terrier"),
    }
    assert {r.dataset for r in rows} == {"stanford"} and {r.layout for r in rows} == {"stanford-dogs"}


def test_stanford_dogs_one_level_deeper(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "cropped", [
        "train/n02085620-Chihuahua/a.jpg",
        "test/n02085782-Japanese_spaniel/b.jpg",
        "Images/n02110806-basenji/c.JPEG",
    ])  # fmt: skip
    assert detect_layout(root) == "stanford-dogs"
    assert sorted(str(r.breed) for r in scan(root)) == ["basenji", "chihuahua", "japanese_spaniel"]


def test_oxford_pet_flat_files(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "oxford", [
        "Abyssinian_12.jpg", "Abyssinian_13.jpg", "american_bulldog_3.jpg", "Russian_Blue_5.jpg",
        "german_shorthaired_101.jpg",
    ])  # fmt: skip
    assert detect_layout(root) == "oxford-pet"
    assert labels(scan(root)) == {
        "Abyssinian_12.jpg": ("cat", "abyssinian"),
        "Abyssinian_13.jpg": ("cat", "abyssinian"),
        "Russian_Blue_5.jpg": ("cat", "russian_blue"),
        "american_bulldog_3.jpg": ("dog", "american_bulldog"),
        "german_shorthaired_101.jpg": ("dog", "german_shorthaired"),
    }


def test_oxford_pet_download_reads_images_folder_only(tmp_path: Path) -> None:
    # The Oxford-IIIT download: images/ plus annotations/trimaps/*.png masks, which are not photos.
    root = link_photos(tmp_path / "oxford-iiit-pet", [
        "images/Bengal_1.jpg", "images/beagle_7.jpg", "images/pug_2.jpg",
        "annotations/trimaps/Bengal_1.png", "annotations/trimaps/beagle_7.png", "annotations/trimaps/pug_2.png",
    ])  # fmt: skip
    assert detect_layout(root) == "oxford-pet"
    assert labels(scan(root)) == {
        "images/Bengal_1.jpg": ("cat", "bengal"),
        "images/beagle_7.jpg": ("dog", "beagle"),
        "images/pug_2.jpg": ("dog", "pug"),
    }


@pytest.mark.parametrize(
    "names",
    [
        ["cat_images_image_1.jpg", "cute_cat_image_2.jpg", "house_cat_image_3.jpg", "ragdoll_cat_image_4.jpg"],
        ["beagle_1.jpg", "beagle_2.jpg", "beagle_3.jpg"],  # one stem for all files: a naming scheme
        ["IMG_0001.jpg", "IMG_0002.jpg", "DSC_0003.jpg", "Screenshot_4.png"],
        ["cat_1.jpg", "dog_2.jpg", "cats_3.jpg"],
        ["a.jpg", "b.png", "Abyssinian_1.jpg"],  # a minority matching the Oxford pattern
    ],
)
def test_file_names_are_not_taken_for_breeds(tmp_path: Path, names: list[str]) -> None:
    root = link_photos(tmp_path / "photos", names)
    assert detect_layout(root) == "flat"
    rows = scan(root, species="cat")
    assert {(r.species, r.breed) for r in rows} == {("cat", None)}
    assert {r.layout for r in rows} == {"flat"}


def test_flat_species_argument(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "flat", ["x.jpg", "y.jpeg", "sub/z.png"])
    assert {r.species for r in scan(root)} == {None}
    assert {r.species for r in scan(root, species="Cats")} == {"cat"}
    with pytest.raises(SourceError, match="horse"):
        scan(root, species="horse")


def test_species_breed_small_tree_and_species_only_fills(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "mine", [
        "Cats/Maine Coon/1.jpg", "DOGS/german-shorthaired/2.jpg", "dog/3.jpg", "loose.jpg",
    ])  # fmt: skip
    assert detect_layout(root) == "species-breed"
    assert labels(scan(root)) == {
        "Cats/Maine Coon/1.jpg": ("cat", "maine_coon"),
        "DOGS/german-shorthaired/2.jpg": ("dog", "german_shorthaired"),
        "dog/3.jpg": ("dog", None),
        "loose.jpg": (None, None),
    }
    # A species argument never overrides what the folders say; it only fills the unknown.
    assert labels(scan(root, species="cat"))["DOGS/german-shorthaired/2.jpg"] == ("dog", "german_shorthaired")
    assert labels(scan(root, species="cat"))["loose.jpg"] == ("cat", None)


def test_breed_folders_skip_a_split_folder(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "splits", ["train/beagle/a.jpg", "val/Border Terrier/b.jpg", "pug/c.jpg"])
    assert detect_layout(root) == "breed-folders"
    assert {r.breed for r in scan(root)} == {"beagle", "border_terrier", "pug"}


def test_scanning_rules(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "rules", ["b/UPPER.JPG", "b/mixed.Jpeg", "a/ok.webp", "a/.hidden.jpg",
                                             ".cache/x.jpg", "a/notes.txt", "a/raw.cr2"])  # fmt: skip
    (root / "a" / "broken.jpg").symlink_to(root / "gone.jpg")  # kept: the extractor reports it
    outside = link_photos(tmp_path / "outside", ["o.jpg"])
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)  # not followed
    rows = scan(root, layout="flat")
    assert [r.relpath for r in rows] == ["a/broken.jpg", "a/ok.webp", "b/UPPER.JPG", "b/mixed.Jpeg"]
    assert rows[0].path == root.resolve() / "a" / "broken.jpg" and rows[0].path.is_symlink()


def test_bad_corpus_files_are_all_candidates(tmp_path: Path) -> None:
    # The indexer must report every bad file, so the scanner must list every one (directory, broken link, symlink
    # loop, FIFO, socket, device and a name that is not valid UTF-8 too), and list them without opening any.
    expected = make_bad_corpus(tmp_path / "bad", non_utf8_name=True)
    dups = add_duplicates(tmp_path / "bad")
    rows = scan(tmp_path / "bad")
    assert {r.relpath for r in rows} == set(expected) | set(dups)
    assert [r.relpath for r in rows] == sorted(r.relpath for r in rows)
    assert [r.relpath for r in rows if not is_utf8_path(r.path)] == ["bad\udcff.jpg"]


def _bytes_tree(root: Path, relpaths: list[bytes]) -> None:
    """Files under ``root`` whose names are raw bytes (not necessarily UTF-8), each holding a real photo."""
    for i, rel in enumerate(relpaths):
        full = os.path.join(os.fsencode(root), rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(_PHOTOS[i].read_bytes())


def test_names_that_are_not_utf8_are_listed_and_labels_stay_utf8(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _bytes_tree(root, [b"cat/persian/ok.jpg", b"cat/bad\xffbreed/1.jpg", b"dog/pug/caf\xe9.jpg", b"dog/pug/2.jpg"])
    assert detect_layout(root) == "species-breed"
    rows = scan(root)
    assert labels(rows) == {
        "cat/bad\udcffbreed/1.jpg": ("cat", "bad\\xffbreed"),  # the label is valid UTF-8, the bad byte spelled out
        "cat/persian/ok.jpg": ("cat", "persian"),
        "dog/pug/2.jpg": ("dog", "pug"),
        "dog/pug/caf\udce9.jpg": ("dog", "pug"),
    }
    bad = [r for r in rows if not is_utf8_path(r.path)]
    assert [r.relpath for r in bad] == ["cat/bad\udcffbreed/1.jpg", "dog/pug/caf\udce9.jpg"]
    assert all(r.path.is_file() for r in rows)  # the path still opens the file
    assert [printable_path(r.relpath) for r in bad] == ["cat/bad\\xffbreed/1.jpg", "dog/pug/caf\\xe9.jpg"]
    for r in rows:
        for text in (r.breed or "", r.dataset, printable_path(r.path), printable_path(r.relpath)):
            text.encode("utf-8")
    for layout in ("flat", "breed-folders", "species-breed"):
        assert len(scan(root, layout=layout)) == 4
    # A dataset folder whose own name is not valid UTF-8: the dataset label is printable.
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"s\xe9t")))
    _bytes_tree(odd, [b"a.jpg", b"b.jpg"])
    rows = scan(odd, species="dog")
    assert {r.dataset for r in rows} == {"s\\xe9t"} and not any(is_utf8_path(r.path) for r in rows)
    assert is_utf8_path(rows[0].relpath)
    with pytest.raises(SourceError) as info:
        scan(odd, layout="oxford-pet")
    assert "s\\xe9t: layout 'oxford-pet' does not fit" in str(info.value)
    str(info.value).encode("utf-8")  # messages are printable too


# ------------------------------------------------------------------------------------------------- csv


def write_csv(path: Path, frame: dict[str, list[object]]) -> Path:
    pd.DataFrame(frame).to_csv(path, index=False)
    return path


def test_csv_layout(tmp_path: Path) -> None:
    link_photos(tmp_path / "set", ["p/one.jpg", "p/two.jpg", "p/three.jpg"])
    absolute = _PHOTOS[7]
    csv = tmp_path / "set" / "my_labels.csv"
    csv.write_text(
        "path,species,breed,rating,count,colour\n"
        "p/one.jpg,Cat,Maine Coon,4.5,1,grey\n"
        "p/two.jpg,dogs,german-shorthaired,3.0,2,brown\n"
        "p/three.jpg,,,,,white\n"
        f"{absolute},dog,Beagle,5.0,4,\n"
        "p/missing.jpg,cat,,1.25,5,black\n"
    )
    assert detect_layout(csv) == "csv"
    rows = scan(csv, species="cat")
    by = {r.relpath: r for r in rows}
    assert [r.relpath for r in rows] == sorted(by)
    assert len(rows) == 5  # the missing file stays: the extractor records "file not found"
    one, two, three, missing = by["p/one.jpg"], by["p/two.jpg"], by["p/three.jpg"], by["p/missing.jpg"]
    assert (one.species, one.breed) == ("cat", "maine_coon")
    assert (two.species, two.breed) == ("dog", "german_shorthaired")
    assert (three.species, three.breed) == ("cat", None)  # empty cell filled by the species argument
    assert by[absolute.as_posix()].path == absolute  # outside the CSV's folder: absolute relpath
    assert one.path == (tmp_path / "set" / "p").resolve() / "one.jpg"  # the link itself, not its target
    assert not missing.path.exists()
    assert dict(one.labels) == {"rating": 4.5, "count": 1, "colour": "grey"}
    assert type(one.labels["rating"]) is float and type(one.labels["count"]) is int
    assert dict(three.labels) == {"rating": None, "count": None, "colour": "white"}  # int stays int despite a gap
    assert {r.dataset for r in rows} == {"my_labels"} and {r.layout for r in rows} == {"csv"}


def test_real_manifest_as_csv_keeps_provenance_columns() -> None:
    rows = scan(WOOF / "manifest.csv")
    assert len(rows) == 8645 and {r.species for r in rows} == {"dog"}
    first = rows[0]
    assert first.path == WOOF.resolve() / first.relpath and first.path.exists()
    assert set(first.labels) == {"width", "height", "source_repo", "source_path", "license"}
    assert type(first.labels["width"]) is int


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,species\na.jpg,cat\n", "no 'path' column"),
        ("path,species\na.jpg,cat\na.jpg,dog\n", "listed more than once"),
        ("path,species\na.jpg,cat\n,dog\n", "line 3: empty path"),
        ("path,species\na.jpg,horse\n", "line 2: species 'horse' is not cat or dog"),
        ("path,species\n", "no rows"),
        ("", "cannot read CSV"),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(content)
    with pytest.raises(SourceError, match=message) as info:
        scan(csv)
    assert str(csv) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- forcing, errors


def test_forced_layouts(tmp_path: Path) -> None:
    stanford = link_photos(tmp_path / "s", ["n02085620-Chihuahua/a.jpg", "n02085620-Chihuahua/b.jpg"])
    assert {(r.species, r.breed, r.layout) for r in scan(stanford, layout="flat")} == {(None, None, "flat")}
    assert {r.breed for r in scan(stanford, layout="breed-folders")} == {"n02085620_chihuahua"}
    flat = link_photos(tmp_path / "f", ["a.jpg", "b.jpg"])
    for layout, why in [
        ("stanford-dogs", "n02085620-Chihuahua"),
        ("species-breed", "no cat/ or dog/ folders"),
        ("oxford-pet", "Abyssinian_12.jpg"),
        ("breed-folders", "no images inside sub-folders"),
        ("csv", "needs a .csv file"),
    ]:
        with pytest.raises(SourceError, match=why) as info:
            scan(flat, layout=layout)
        assert str(flat) in str(info.value)
    with pytest.raises(SourceError, match="unknown layout 'imagenet'"):
        scan(flat, layout="imagenet")
    csv = write_csv(tmp_path / "l.csv", {"path": ["f/a.jpg"]})
    with pytest.raises(SourceError, match="needs a folder"):
        scan(csv, layout="flat")
    assert [r.layout for r in scan(csv, layout="csv")] == ["csv"]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such directory"):
        scan(tmp_path / "nope")
    with pytest.raises(SourceError, match="no such directory"):
        detect_layout(tmp_path / "nope")
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "x.jpg").write_bytes(b"x")
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(SourceError, match=r"no image files found \(looked for \.jpg, \.jpeg, \.png") as info:
        scan(empty)
    assert str(info.value).startswith(str(empty.resolve()))
    with pytest.raises(SourceError, match="no such file"):
        scan(tmp_path / "missing.csv")
    with pytest.raises(SourceError, match=r"not a directory or a \.csv file"):
        scan(empty / "notes.txt")
    assert issubclass(SourceError, ValueError)


# ------------------------------------------------------------------------------------------------- join_labels


def test_join_labels(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "photos", ["a/one.jpg", "b/two.jpg", "c/three.jpg", "d/dup.jpg", "e/dup.jpg",
                                              "f/nolabel.jpg"])  # fmt: skip
    rows = scan(root)  # breed-folders, species unknown
    extra = tmp_path / "extra"
    extra.mkdir()
    csv = write_csv(extra / "labels.csv", {
        "path": [str(root / "a/one.jpg"), "b/two.jpg", "elsewhere/three.jpg", "dup.jpg"],
        "species": ["cat", "dog", None, "cat"],
        "breed": ["persian", "pug", "boxer", None],
        "weight_kg": [4.2, 8.0, 30.5, 1.0],
        "age": [3, 5, 7, 9],
    })  # fmt: skip
    joined, matched = join_labels(rows, csv)
    assert matched == 3  # absolute path, relpath, unique file name; "dup.jpg" names two rows: not matched
    by = {r.relpath: r for r in joined}
    assert [r.relpath for r in joined] == [r.relpath for r in rows]
    assert (by["a/one.jpg"].species, by["a/one.jpg"].breed) == ("cat", "a")  # the folder's breed is kept
    assert (by["b/two.jpg"].species, by["b/two.jpg"].breed) == ("dog", "b")
    assert dict(by["c/three.jpg"].labels) == {"weight_kg": 30.5, "age": 7}
    assert type(by["a/one.jpg"].labels["age"]) is int
    assert by["d/dup.jpg"].labels == {} and by["f/nolabel.jpg"] == rows[-1]


def test_join_labels_fills_unknown_species_and_breed(tmp_path: Path) -> None:
    root = link_photos(tmp_path / "flat", ["x.jpg", "y.jpg"])
    csv = write_csv(tmp_path / "flat" / "l.csv", {"path": ["x.jpg"], "species": ["Dog"], "breed": ["Shiba Inu"]})
    joined, matched = join_labels(scan(root), csv)
    assert matched == 1
    assert labels(joined) == {"x.jpg": ("dog", "shiba_inu"), "y.jpg": (None, None)}
    assert joined[0].labels == {}  # species/breed fill the fields, not labels
    with pytest.raises(SourceError, match="no 'path' column"):
        join_labels(joined, write_csv(tmp_path / "bad.csv", {"file": ["x.jpg"]}))


# ------------------------------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Chihuahua", "chihuahua"),
        ("Japanese_spaniel", "japanese_spaniel"),
        ("German Shorthaired", "german_shorthaired"),
        ("  german-shorthaired ", "german_shorthaired"),
        ("Russian_Blue", "russian_blue"),
        ("Black-and-tan  coonhound", "black_and_tan_coonhound"),
    ],
)
def test_normalise_breed(raw: str, expected: str) -> None:
    assert normalise_breed(raw) == expected


def test_rows_pickle_and_layout_names() -> None:
    assert LAYOUTS == ("species-breed", "stanford-dogs", "oxford-pet", "breed-folders", "flat", "csv")
    row = CatalogRow(Path("/a/b.jpg"), "b.jpg", "cat", None, "a", "csv", {"rating": 4.5})
    assert pickle.loads(pickle.dumps(row)) == row
    assert hash(row) == hash(CatalogRow(Path("/a/b.jpg"), "b.jpg", "cat", None, "a", "csv", {"rating": 1}))
    assert os.fspath(row.path) == "/a/b.jpg"
