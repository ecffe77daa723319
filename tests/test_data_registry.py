"""Tests of the dataset registry (data/datasets.json), its downloader and `mammals data`, all without network.

Downloads go to a stdlib HTTP server on 127.0.0.1 started by the test, through a temporary registry file, so the
real code path (pooch streaming into a temporary file, checksum, retry, rename, extraction) runs.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from data import registry as reg
from data.cli import DATA
from data.registry import (
    LAYOUTS,
    Dataset,
    IntegrityError,
    KaggleOnlyError,
    NetworkError,
    RegistryError,
    UnknownDatasetError,
    UnsafeArchiveError,
)
from indexer import cli as mammals_cli
from indexer.errors import UsageError

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


# ------------------------------------------------------------------------------------------- checksums


def test_file_digest_and_verify_file(tmp_path: Path) -> None:
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello")
    md5 = "5d41402abc4b2a76b9719d911017c592"  # md5(b"hello"), a well-known value
    sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # sha256(b"hello")
    assert reg.file_digest(f, "md5") == md5 and reg.file_digest(f, "sha256") == sha
    with pytest.raises(ValueError, match="unsupported checksum algorithm"):
        reg.file_digest(f, "sha1")
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


def test_known_hash_prefers_the_sha256() -> None:
    assert reg.known_hash("A" * 32, "b" * 64) == "sha256:" + "b" * 64
    assert reg.known_hash("A" * 32, None) == "md5:" + "a" * 32
    assert reg.known_hash(None, None) is None
    with pytest.raises(ValueError):
        reg.known_hash("abc", None)


def test_registry_errors_are_usage_errors() -> None:
    """So that `mammals data` prints them as one line and exits 2 (indexer.cli.run_main)."""
    for cls in (NetworkError, IntegrityError, KaggleOnlyError, UnknownDatasetError, UnsafeArchiveError):
        assert issubclass(cls, RegistryError) and issubclass(cls, UsageError)


# ----------------------------------------------------------------------------------- a local HTTP server


@dataclass
class Server:
    """A stdlib HTTP server on 127.0.0.1 serving ``root``; it records the paths asked for and can break the
    next ``truncate`` answers (headers announce the whole file, half the body is sent, the connection closes)."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)
    truncate: int = 0


class _Handler(http.server.SimpleHTTPRequestHandler):
    state: Server

    def do_GET(self) -> None:
        self.state.requests.append(self.path)
        target = self.state.root / self.path.lstrip("/")
        if self.state.truncate and target.is_file():
            self.state.truncate -= 1
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


def _make_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _free_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    state = Server(root)
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def toy_archive(server: Server) -> Path:
    return _make_tar_gz(
        server.root / "toy.tar.gz",
        {"toy/beagle/1.jpg": b"\xff\xd8beagle", "toy/samoyed/2.jpg": b"\xff\xd8samoyed", "toy/README": b"hi"},
    )


def _registry_with(tmp_path: Path, archive: Path, url: str, **file_overrides: Any) -> Path:
    """A registry file with one dataset 'toy' whose archive is fetched from ``url``."""
    file_entry: dict[str, Any] = {
        "url": url,
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
    assert reg.validate_registry(json.loads(path.read_text(encoding="utf-8"))) == []
    return path


# ---------------------------------------------------------------------------------------------- download


def test_download_verifies_extracts_and_resumes(tmp_path: Path, server: Server, toy_archive: Path) -> None:
    registry = _registry_with(tmp_path, toy_archive, f"{server.url}/toy.tar.gz")
    dest = tmp_path / "datasets" / "toy"
    folder = reg.download("toy", dest, registry=registry, progress=False, retries=0)
    assert folder == dest / "toy"
    assert (folder / "beagle" / "1.jpg").read_bytes() == b"\xff\xd8beagle"
    assert (folder / "samoyed" / "2.jpg").is_file()
    assert _md5(dest / "toy.tar.gz") == _md5(toy_archive)
    assert sorted(p.name for p in dest.iterdir()) == [".mammals-registry", "toy", "toy.tar.gz"], "no temp file left"
    assert server.requests == ["/toy.tar.gz"]

    # A second run asks the server nothing: the extraction marker says it is done.
    assert reg.download("toy", dest, registry=registry, progress=False) == folder
    # Without extraction, the archive present with the right checksum is kept as well.
    assert reg.download("toy", dest, registry=registry, progress=False, extract=False) == dest
    assert server.requests == ["/toy.tar.gz"]
    # A corrupt archive in place is fetched again; --force fetches even a good one.
    (dest / "toy.tar.gz").write_bytes(b"truncated garbage")
    reg.download("toy", dest, registry=registry, progress=False, extract=False)
    assert _md5(dest / "toy.tar.gz") == _md5(toy_archive) and len(server.requests) == 2
    reg.download("toy", dest, registry=registry, progress=False, force=True)
    assert len(server.requests) == 3


def test_checksum_mismatch_is_one_line_and_leaves_no_file(tmp_path: Path, server: Server, toy_archive: Path) -> None:
    url = f"{server.url}/toy.tar.gz"
    dest = tmp_path / "out"
    registry = _registry_with(tmp_path, toy_archive, url, md5="0" * 32, sha256=None)
    with pytest.raises(IntegrityError) as info:
        reg.download("toy", dest, registry=registry, progress=False, retries=0)
    message = str(info.value)
    assert message.startswith(f"toy.tar.gz: checksum mismatch for {url}: MD5 hash") and "\n" not in message
    assert f"expected md5:{'0' * 32} but got {_md5(toy_archive)}" in message
    assert list(dest.iterdir()) == [], "neither the archive nor a temp file may remain"
    # Where both are published the sha256 is the one checked: a wrong sha256 fails although the md5 is right.
    registry = _registry_with(tmp_path, toy_archive, url, sha256="0" * 64)
    with pytest.raises(IntegrityError, match="SHA256 hash"):
        reg.download("toy", dest, registry=registry, progress=False, retries=0)
    assert list(dest.iterdir()) == []


def test_a_failed_attempt_is_retried(
    tmp_path: Path, server: Server, toy_archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="data")
    registry = _registry_with(tmp_path, toy_archive, f"{server.url}/toy.tar.gz")
    server.truncate = 1  # the first answer breaks off half-way
    folder = reg.download("toy", tmp_path / "d", registry=registry, progress=False, retries=1)
    assert (folder / "beagle" / "1.jpg").read_bytes() == b"\xff\xd8beagle"
    assert server.requests == ["/toy.tar.gz", "/toy.tar.gz"]
    # pooch's own messages come through this package's logger.
    retried = [r for r in caplog.records if "Failed to download 'toy.tar.gz'" in r.getMessage()]
    assert retried and retried[0].name == "data.registry"

    # Without a retry the broken transfer is a network error, and nothing partial is left behind.
    server.truncate = 1
    with pytest.raises(NetworkError, match=r"^no network\? could not download toy\.tar\.gz from http://127"):
        reg.download("toy", tmp_path / "e", registry=registry, progress=False, retries=0)
    assert list((tmp_path / "e").iterdir()) == []


def test_network_errors_name_the_url_and_the_reason(tmp_path: Path, server: Server, toy_archive: Path) -> None:
    dead = f"{_free_port_url()}/toy.tar.gz"
    registry = _registry_with(tmp_path, toy_archive, dead)
    with pytest.raises(NetworkError) as info:
        reg.download("toy", tmp_path / "a", registry=registry, progress=False, retries=0)
    assert str(info.value).startswith(f"no network? could not download toy.tar.gz from {dead} (Connection refused)")
    assert info.value.http_status is None and list((tmp_path / "a").iterdir()) == []
    # A 404 means the server answered: the message must not blame the network.
    moved = f"{server.url}/moved.tar.gz"
    registry = _registry_with(tmp_path, toy_archive, moved)
    with pytest.raises(NetworkError) as info:
        reg.download("toy", tmp_path / "b", registry=registry, progress=False, retries=0)
    assert str(info.value).startswith(f"could not download toy.tar.gz: {moved} (HTTP 404 File not found)")
    assert info.value.http_status == 404
    # A working mirror after a dead URL is used.
    registry = _registry_with(tmp_path, toy_archive, dead, mirrors=[moved, f"{server.url}/toy.tar.gz"])
    folder = reg.download("toy", tmp_path / "c", registry=registry, progress=False, retries=0)
    assert (folder / "beagle" / "1.jpg").is_file()
    assert server.requests == ["/moved.tar.gz", "/moved.tar.gz", "/toy.tar.gz"]


def test_a_file_without_checksum_is_fetched_once(tmp_path: Path, server: Server) -> None:
    (server.root / "notes.txt").write_text("unverified")
    target = tmp_path / "notes.txt"
    assert reg.fetch_file(f"{server.url}/notes.txt", target, progress=False) == target.absolute()
    assert target.read_text() == "unverified"
    reg.fetch_file(f"{server.url}/notes.txt", target, progress=False)
    assert server.requests == ["/notes.txt"]


# ----------------------------------------------------------------------------------------------- extract


def test_tar_with_parent_dir_member_is_rejected(tmp_path: Path, server: Server) -> None:
    evil = _make_tar_gz(server.root / "evil.tar.gz", {"ok/1.jpg": b"x", "../evil": b"pwned"})
    registry = _registry_with(tmp_path, evil, f"{server.url}/evil.tar.gz")
    dest = tmp_path / "datasets" / "toy"
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        reg.download("toy", dest, registry=registry, progress=False, retries=0)
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
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive")
    with pytest.raises(reg.ArchiveError, match=r"^garbage\.tar\.gz: corrupt or unreadable archive: ") as info:
        reg.extract_archive(garbage, tmp_path / "c")
    assert "\n" not in str(info.value)


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


# ------------------------------------------------------------------------------------------ mammals data


def cli(argv: list[str]) -> int:
    """`mammals ARGV` with only the data subcommand installed: the framework's own parser and error handling,
    without loading the other packages' commands (the entry point itself is tested below)."""
    return mammals_cli.run_main("mammals", mammals_cli.build_parser({"data": DATA}), DATA.run, argv)


def test_data_command_is_installed_as_an_entry_point(raw: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert mammals_cli.commands()["data"] is DATA
    assert mammals_cli.main(["data", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"datasets": raw["datasets"], "local": raw["local"]}


def test_cli_list_and_show(raw: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["data", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"datasets": raw["datasets"], "local": raw["local"]}
    assert cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^oxford-iiit-pet +both +oxford-pet +811\.1 MB +download +CC BY-SA 4\.0$", out, re.M)
    assert re.search(r"^cat-breeds-kaggle .* kaggle ma7555/cat-breeds-dataset ", out, re.M)
    assert re.search(r"^cats-unlabelled +cat +flat +1249 +\.\./shared/data/cats-unlabelled$", out, re.M)
    assert cli(["data", "show", "stanford-dogs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == next(d for d in raw["datasets"] if d["name"] == "stanford-dogs")
    assert cli(["data", "show", "imagewoof2-320"]) == 0
    assert "n02088364=beagle" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["data", "show", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mammals data: error: unknown dataset 'nope'; known datasets: oxford-iiit-pet")
    assert len(captured.err.splitlines()) == 1
    assert cli(["data", "download", "nope", str(tmp_path / "n")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err and not (tmp_path / "n").exists()
    assert cli(["data", "download", "cat-breeds-kaggle", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "kaggle datasets download -d ma7555/cat-breeds-dataset" in err and len(err.splitlines()) == 1
    for argv in (["data"], ["data", "download", "toy"], ["data", "list", "--bogus"]):
        with pytest.raises(SystemExit) as exc:  # argparse: missing or unknown arguments
            cli(argv)
        assert exc.value.code == 2


def test_cli_download_network_failure_is_one_line(
    tmp_path: Path, toy_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = _registry_with(tmp_path, toy_archive, f"{_free_port_url()}/toy.tar.gz")
    code = cli(["data", "--registry", str(registry), "-q", "download", "toy", str(tmp_path / "d"), "--retries", "0"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("mammals data: error: no network? could not download toy.tar.gz from http://")
    assert len(captured.err.splitlines()) == 1
    # A destination that cannot be written (here: a file) is one line as well, not a traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli(["data", "--registry", str(registry), "-q", "download", "toy", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mammals data: error: toy: cannot write under {blocker}: ") and len(err.splitlines()) == 1


def test_cli_download_prints_the_folder_to_index(
    tmp_path: Path, server: Server, toy_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = _registry_with(tmp_path, toy_archive, f"{server.url}/toy.tar.gz")
    dest = tmp_path / "d"
    argv = ["data", "download", "toy", str(dest), "--delete-archives", "--registry", str(registry)]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    folder = Path(captured.out.strip())
    assert captured.out.count("\n") == 1 and folder == dest / "toy" and (folder / "beagle" / "1.jpg").is_file()
    assert not (dest / "toy.tar.gz").exists()
    assert f"index it with: mammals index {folder} --store stores/toy --species dog" in captured.err
    # -q after the action: warnings only, and still the folder on stdout.
    assert cli([*argv, "--force", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{folder}\n" and "index it with" not in captured.err
    assert len(server.requests) == 2


def test_cli_parser_imports_nothing_heavy() -> None:
    code = (
        "import argparse, sys\n"
        "from data.cli import DATA\n"
        "DATA.configure(argparse.ArgumentParser())\n"
        "print(sorted(m for m in ('torch', 'pooch', 'requests', 'tqdm', 'data.registry') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_module_runs_the_data_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data.registry", "show", "stanford-dogs", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "stanford-dogs"
