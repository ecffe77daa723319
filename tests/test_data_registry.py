"""Tests of the dataset registry (data/datasets.json) and its downloader, all without network.

Downloads are exercised against ``file://`` URLs of archives the tests build, through a temporary
registry file, so the real code path (urllib streaming, hashing, atomic rename, extraction) runs.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import re
import subprocess
import sys
import tarfile
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from data import registry as reg
from data.registry import (
    LAYOUTS,
    Dataset,
    IntegrityError,
    KaggleOnlyError,
    NetworkError,
    UnknownDatasetError,
    UnsafeArchiveError,
)

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"name", "title", "homepage", "citation", "licence", "files", "layout", "species", "extract_to", "notes"}
FILE_KEYS = {"url", "filename", "size_bytes", "md5", "sha256", "source_of_checksum"}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return reg.load_registry()


# ------------------------------------------------------------------------------------ registry file


def test_registry_loads_and_every_entry_is_complete(raw: dict[str, Any]) -> None:
    names = [d["name"] for d in raw["datasets"]]
    assert len(names) == len(set(names)), "duplicate dataset names"
    for expected in ("oxford-iiit-pet", "stanford-dogs", "imagewoof2-320", "imagewoof2-160", "cats-vs-dogs"):
        assert expected in names
    for entry in raw["datasets"]:
        assert entry.keys() >= REQUIRED, f"{entry['name']} lacks {REQUIRED - entry.keys()}"
        assert entry["layout"] in LAYOUTS, entry["name"]
        assert entry["species"] in ("cat", "dog", "both"), entry["name"]
        assert entry["licence"].strip() and entry["citation"].strip() and entry["homepage"].startswith("http")
        assert not entry["extract_to"].startswith("/") and ".." not in Path(entry["extract_to"]).parts
        assert entry["files"], entry["name"]
        for f in entry["files"]:
            assert f.keys() >= FILE_KEYS, f"{entry['name']}: {f.get('filename')} lacks {FILE_KEYS - f.keys()}"
            assert "/" not in f["filename"] and f["filename"] not in ("", ".", "..")
            if f["url"] is None:
                # Only Kaggle-hosted files may lack a URL, and then the slug must say where they are.
                assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.get("kaggle") or ""), entry["name"]
            else:
                assert f["url"].startswith(("https://", "http://"))
                assert f["url"].rsplit("/", 1)[-1] == f["filename"]
    assert reg.validate_registry(raw) == []


def test_kaggle_entries_are_recorded_as_kaggle_only(raw: dict[str, Any]) -> None:
    kaggle = {d["kaggle"]: d for d in raw["datasets"] if d.get("kaggle")}
    assert "jessicali9530/stanford-dogs-dataset" in kaggle
    assert any(d["species"] == "cat" for d in kaggle.values()), "a Kaggle cat set is recorded"
    for d in kaggle.values():
        assert all(f["url"] is None for f in d["files"])


def test_every_present_checksum_is_well_formed_hex(raw: dict[str, Any]) -> None:
    n_checked = 0
    for entry in raw["datasets"]:
        for f in entry["files"]:
            if f["md5"] is not None:
                assert re.fullmatch(r"[0-9a-f]{32}", f["md5"]), (entry["name"], f["md5"])
                n_checked += 1
            if f["sha256"] is not None:
                assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), (entry["name"], f["sha256"])
                n_checked += 1
            assert f["size_bytes"] is None or (isinstance(f["size_bytes"], int) and f["size_bytes"] > 0)
            assert f["source_of_checksum"].strip()
            if f["md5"] is None and f["sha256"] is None:
                assert "unverified" in f["source_of_checksum"], (entry["name"], f["filename"])
    assert n_checked >= 8  # Oxford (4), Stanford Dogs (3), Imagewoof (2), cats-vs-dogs (1)


def test_published_checksums_are_pinned(raw: dict[str, Any]) -> None:
    """Values copied from torchvision / tensorflow_datasets / huggingface: an edit here must be deliberate."""
    files = {f["filename"] + "@" + d["name"]: f for d in raw["datasets"] for f in d["files"]}
    oxford = files["images.tar.gz@oxford-iiit-pet"]
    assert oxford["md5"] == "5c4f3ee8e5d25df40f4fd59a7f44e54c"  # torchvision OxfordIIITPet._RESOURCES
    assert oxford["size_bytes"] == 791918971
    assert files["annotations.tar.gz@oxford-iiit-pet"]["md5"] == "95a8c909bbe2e81eed6a22bccdf3f68f"
    assert files["images.tar@stanford-dogs"]["sha256"].startswith("a443fc2f")  # tfds url_checksums
    assert files["kagglecatsanddogs_5340.zip@cats-vs-dogs"]["sha256"].startswith("b7974bd0")  # HF datasets


def test_get_dataset_returns_a_typed_record() -> None:
    ds = reg.get_dataset("oxford-iiit-pet")
    assert isinstance(ds, Dataset)
    assert ds.layout == "oxford-pet" and ds.species == "both" and ds.extract_to == "images/"
    assert ds.size_bytes == 791918971 + 19173078
    assert not ds.kaggle_only and all(f.verified and f.is_archive for f in ds.files)
    assert reg.get_dataset("stanford-dogs-kaggle").kaggle_only
    with pytest.raises(UnknownDatasetError, match=r"known datasets: .*oxford-iiit-pet"):
        reg.get_dataset("no-such-set")


def test_image_extensions_match_the_indexer() -> None:
    from indexer import defaults

    assert tuple(reg.IMAGE_EXTENSIONS) == tuple(defaults.IMAGE_EXTENSIONS)


# Each dataset's extracted tree, as documented in its notes, in miniature (paths under the download folder).
EXTRACTED_TREES: dict[str, list[str]] = {
    "oxford-iiit-pet": [
        "images/Abyssinian_1.jpg",
        "images/Bengal_2.jpg",
        "images/american_bulldog_1.jpg",
        "images/beagle_7.jpg",
        "annotations/trimaps/Abyssinian_1.png",
    ],
    "stanford-dogs": ["Images/n02085620-Chihuahua/n02085620_10074.jpg", "Images/n02085782-Japanese_spaniel/a.jpg"],
    "imagewoof2-320": ["imagewoof2-320/train/n02086240/a.JPEG", "imagewoof2-320/val/n02088364/b.JPEG"],
    "imagewoof2-160": ["imagewoof2-160/train/n02086240/a.JPEG", "imagewoof2-160/val/n02088364/b.JPEG"],
    "stanford-dogs-kaggle": [
        "images/Images/n02085620-Chihuahua/a.jpg",
        "images/Images/n02085782-Japanese_spaniel/b.jpg",
    ],
    "cat-breeds-kaggle": ["images/Abyssinian/1.jpg", "images/American Shorthair/2.jpg", "data/cats.csv"],
    "cats-vs-dogs": ["PetImages/Cat/0.jpg", "PetImages/Dog/0.jpg", "PetImages/Cat/Thumbs.db", "readme[1].txt"],
}


def test_recorded_layout_is_what_the_indexer_detects(raw: dict[str, Any], tmp_path: Path) -> None:
    """The layout name of each entry must be the one the indexer picks for its extract_to folder."""
    from indexer.sources import LAYOUTS as INDEXER_LAYOUTS
    from indexer.sources import detect_layout

    assert tuple(INDEXER_LAYOUTS) == LAYOUTS
    assert set(EXTRACTED_TREES) == {d["name"] for d in raw["datasets"]}
    for entry in raw["datasets"]:
        root = tmp_path / entry["name"]
        for rel in EXTRACTED_TREES[entry["name"]]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")
        assert detect_layout(root / entry["extract_to"]) == entry["layout"], entry["name"]


def test_index_command_adds_species_only_where_the_path_cannot_say() -> None:
    assert reg.index_command(reg.get_dataset("oxford-iiit-pet"), "/d/images") == (
        "mammals index /d/images --store stores/oxford-iiit-pet"
    )
    assert reg.index_command(reg.get_dataset("imagewoof2-160"), "/d/w", "stores/w").endswith("--species dog")
    assert "--species" not in reg.index_command(reg.get_dataset("cats-vs-dogs"), "/d/PetImages")


# ---------------------------------------------------------------------------------------- local sets


def test_local_sets_exist_and_their_image_counts_match(raw: dict[str, Any]) -> None:
    local = {ls.name: ls for ls in reg.local_sets(raw)}
    assert set(local) == {"pets", "imagewoof-scale", "cats-unlabelled"}
    expected = {
        "pets": ("species-breed", "both", 1140),
        "imagewoof-scale": ("breed-folders", "dog", 8645),
        "cats-unlabelled": ("flat", "cat", 1249),
    }
    for name, (layout, species, images) in expected.items():
        ls = local[name]
        assert (ls.layout, ls.species, ls.images) == (layout, species, images)
        folder = ls.resolve(REPO)
        assert folder.is_dir(), f"{name}: {folder} is missing"
        assert folder == (REPO.parent / "shared" / "data" / name).resolve()
        assert reg.count_images(folder) == images, name


def test_local_set_folder_shapes_match_their_layouts() -> None:
    pets = REPO.parent / "shared" / "data" / "pets"
    species = sorted(p.name for p in pets.iterdir() if p.is_dir())
    assert species == ["cat", "dog"]
    assert len([p for p in (pets / "cat").iterdir() if p.is_dir()]) == 12
    assert len([p for p in (pets / "dog").iterdir() if p.is_dir()]) == 33
    woof = REPO.parent / "shared" / "data" / "imagewoof-scale"
    assert len([p for p in woof.iterdir() if p.is_dir()]) == 10
    cats = REPO.parent / "shared" / "data" / "cats-unlabelled"
    assert not [p for p in cats.iterdir() if p.is_dir()], "the flat set has no sub-folders"


# ------------------------------------------------------------------------------------- verify_file


def test_verify_file(tmp_path: Path) -> None:
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello")
    md5 = "5d41402abc4b2a76b9719d911017c592"  # md5(b"hello"), a well-known value
    sha = hashlib.sha256(b"hello").hexdigest()
    assert reg.verify_file(f, md5)  # algorithm inferred from the length
    assert reg.verify_file(f, sha)
    assert reg.verify_file(f, md5.upper())
    assert reg.verify_file(f, md5=md5, sha256=sha)
    assert not reg.verify_file(f, md5="0" * 32)
    assert not reg.verify_file(f, md5=md5, sha256="0" * 64)  # every given checksum must match
    assert not reg.verify_file(tmp_path / "missing", md5)
    with pytest.raises(ValueError):
        reg.verify_file(f, "abc")
    with pytest.raises(ValueError):
        reg.verify_file(f, md5="z" * 32)
    with pytest.raises(ValueError):
        reg.verify_file(f)


# ---------------------------------------------------------------------------------------- download


def _make_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _registry_with(tmp_path: Path, archive: Path, **file_overrides: Any) -> Path:
    """A registry file with one dataset 'toy' whose archive is served from a file:// URL."""
    file_entry: dict[str, Any] = {
        "url": archive.as_uri(),
        "filename": archive.name,
        "size_bytes": archive.stat().st_size,
        "md5": _md5(archive),
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "source_of_checksum": "computed by the test",
    }
    file_entry.update(file_overrides)
    entry = {
        "name": "toy",
        "title": "Toy set",
        "homepage": "https://example.org/toy",
        "citation": "none",
        "licence": "CC0",
        "files": [file_entry],
        "layout": "breed-folders",
        "species": "dog",
        "extract_to": "toy/",
        "notes": "built by the test",
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"datasets": [entry], "local": []}), encoding="utf-8")
    return path


@pytest.fixture
def toy_archive(tmp_path: Path) -> Path:
    src = tmp_path / "server"
    src.mkdir()
    return _make_tar_gz(
        src / "toy.tar.gz",
        {"toy/beagle/1.jpg": b"\xff\xd8beagle", "toy/samoyed/2.jpg": b"\xff\xd8samoyed", "toy/README": b"hi"},
    )


def test_download_verifies_extracts_and_resumes(tmp_path: Path, toy_archive: Path, monkeypatch: Any) -> None:
    registry = _registry_with(tmp_path, toy_archive)
    dest = tmp_path / "datasets" / "toy"
    folder = reg.download("toy", dest, registry=registry, progress=False)
    assert folder == dest / "toy/"
    assert (folder / "beagle" / "1.jpg").read_bytes() == b"\xff\xd8beagle"
    assert (folder / "samoyed" / "2.jpg").is_file()
    assert _md5(dest / "toy.tar.gz") == _md5(toy_archive)
    assert not list(dest.glob("*.part")) and not list(dest.glob(".*.part"))

    # A second run must not touch the network at all: the extraction marker says it is done.
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("urlopen called on a resumed download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert reg.download("toy", dest, registry=registry, progress=False) == folder
    # Without extraction, a present archive with the right checksum is kept as well.
    assert reg.download("toy", dest, registry=registry, progress=False, extract=False) == dest


def test_download_replaces_a_corrupt_existing_file(tmp_path: Path, toy_archive: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "toy.tar.gz").write_bytes(b"truncated garbage")
    path = reg.fetch_file(toy_archive.as_uri(), dest / "toy.tar.gz", md5=_md5(toy_archive), progress=False)
    assert _md5(path) == _md5(toy_archive)


def test_checksum_mismatch_leaves_no_partial_file(tmp_path: Path, toy_archive: Path) -> None:
    registry = _registry_with(tmp_path, toy_archive, md5="0" * 32, sha256=None)
    dest = tmp_path / "out"
    with pytest.raises(IntegrityError, match="md5 checksum mismatch"):
        reg.download("toy", dest, registry=registry, progress=False)
    assert list(dest.iterdir()) == [], "neither the archive nor a temp file may remain"

    # A wrong size is caught the same way, before any checksum.
    registry = _registry_with(tmp_path, toy_archive, size_bytes=toy_archive.stat().st_size + 1)
    with pytest.raises(IntegrityError, match="size mismatch"):
        reg.download("toy", dest, registry=registry, progress=False)
    assert list(dest.iterdir()) == []


def test_unreachable_url_is_one_clear_network_error(tmp_path: Path, toy_archive: Path) -> None:
    missing = (tmp_path / "nowhere" / "toy.tar.gz").as_uri()
    dest = tmp_path / "out"
    registry = _registry_with(tmp_path, toy_archive, url=missing)
    with pytest.raises(NetworkError, match=r"^no network\? could not download toy.tar.gz"):
        reg.download("toy", dest, registry=registry, progress=False)
    assert list(dest.iterdir()) == []
    # A working mirror after a dead URL is used.
    registry = _registry_with(tmp_path, toy_archive, url=missing, mirrors=[toy_archive.as_uri()])
    assert (reg.download("toy", dest, registry=registry, progress=False) / "beagle" / "1.jpg").is_file()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def http_root(toy_archive: Path) -> Iterator[str]:
    """A localhost HTTP server (stdlib, in a thread) serving the folder of ``toy_archive``."""
    handler = functools.partial(_QuietHandler, directory=str(toy_archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_over_http_and_http_errors(tmp_path: Path, toy_archive: Path, http_root: str) -> None:
    registry = _registry_with(tmp_path, toy_archive, url=f"{http_root}/{toy_archive.name}")
    folder = reg.download("toy", tmp_path / "h", registry=registry, progress=False)
    assert (folder / "samoyed" / "2.jpg").read_bytes() == b"\xff\xd8samoyed"
    # A 404 means the server answered: the message must not blame the network.
    registry = _registry_with(tmp_path, toy_archive, url=f"{http_root}/moved.tar.gz")
    with pytest.raises(NetworkError, match="HTTP 404") as info:
        reg.download("toy", tmp_path / "h404", registry=registry, progress=False)
    assert info.value.http_status == 404 and not str(info.value).startswith("no network?")
    assert list((tmp_path / "h404").iterdir()) == []


def test_tar_with_parent_dir_member_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "server"
    src.mkdir()
    evil = _make_tar_gz(src / "evil.tar.gz", {"ok/1.jpg": b"x", "../evil": b"pwned"})
    registry = _registry_with(tmp_path, evil)
    dest = tmp_path / "datasets" / "toy"
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        reg.download("toy", dest, registry=registry, progress=False)
    assert not (dest.parent / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (dest / "ok").exists(), "nothing is extracted from an unsafe archive"
    assert not (dest / ".mammals-registry").exists()


def test_tar_with_absolute_member_or_escaping_link_is_rejected(tmp_path: Path) -> None:
    absolute = _make_tar_gz(tmp_path / "abs.tar.gz", {"/tmp/mammals-abs-evil": b"x"})
    with pytest.raises(UnsafeArchiveError, match="absolute"):
        reg.extract_archive(absolute, tmp_path / "a")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("innocent")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../outside"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError):  # caught by tarfile's "data" filter
        reg.extract_archive(link, tmp_path / "b")


def test_zip_with_parent_dir_member_is_rejected(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("PetImages/Cat/0.jpg", b"cat")
    assert (reg.extract_archive(good, tmp_path / "g") / "PetImages" / "Cat" / "0.jpg").read_bytes() == b"cat"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("fine.jpg", b"x")
        zf.writestr("../evil", b"pwned")
    with pytest.raises(UnsafeArchiveError):
        reg.extract_archive(evil, tmp_path / "z")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "z" / "fine.jpg").exists()


def test_kaggle_only_dataset_explains_the_kaggle_cli(tmp_path: Path) -> None:
    with pytest.raises(KaggleOnlyError) as info:
        reg.download("stanford-dogs-kaggle", tmp_path / "sd")
    message = str(info.value)
    assert "kaggle datasets download -d jessicali9530/stanford-dogs-dataset" in message
    assert "images/Images" in message
    assert not (tmp_path / "sd").exists()


# --------------------------------------------------------------------------------------------- CLI


def test_cli_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert reg.main(["list"], out=out) == 0
    assert "oxford-iiit-pet" in out.getvalue() and "cats-unlabelled" in out.getvalue()
    out = io.StringIO()
    assert reg.main(["list", "--json"], out=out) == 0
    parsed = json.loads(out.getvalue())
    assert {d["name"] for d in parsed["datasets"]} >= {"oxford-iiit-pet", "stanford-dogs"}
    out = io.StringIO()
    assert reg.main(["show", "stanford-dogs", "--json"], out=out) == 0
    assert json.loads(out.getvalue())["layout"] == "stanford-dogs"
    out = io.StringIO()
    assert reg.main(["show", "imagewoof2-320"], out=out) == 0
    assert "n02088364=beagle" in out.getvalue()


def test_cli_user_errors_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert reg.main(["show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'nope'") and "Traceback" not in err
    assert reg.main(["download", "cat-breeds-kaggle", str(tmp_path / "c")]) == 2
    assert "kaggle datasets download -d ma7555/cat-breeds-dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        reg.main(["download"])  # argparse: missing arguments
    assert exc.value.code == 2


def test_cli_download_network_failure_is_one_line(
    tmp_path: Path, toy_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = _registry_with(tmp_path, toy_archive, url=(tmp_path / "gone.tar.gz").as_uri())
    code = reg.main(["--registry", str(registry), "-q", "download", "toy", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: no network? could not download toy.tar.gz") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_download_prints_the_folder_to_index(
    tmp_path: Path, toy_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = _registry_with(tmp_path, toy_archive)
    out = io.StringIO()
    code = reg.main(["--registry", str(registry), "download", "toy", str(tmp_path / "d"), "--delete-archives"], out=out)
    assert code == 0
    folder = Path(out.getvalue().strip())
    assert folder == tmp_path / "d" / "toy" and (folder / "beagle" / "1.jpg").is_file()
    assert not (tmp_path / "d" / "toy.tar.gz").exists()
    assert "mammals index" in capsys.readouterr().err


def test_module_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data.registry", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "download" in result.stdout and "Exit codes" in result.stdout
