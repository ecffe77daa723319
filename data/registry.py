"""The registry of public cat/dog datasets (``data/datasets.json``) and a stdlib-only downloader.

The registry says where each dataset comes from, its licence, the checksums published for its files,
and which Mammals Space layout reads the extracted folder.  The downloader streams each file to a
temporary file, verifies it, renames it into place atomically, and extracts archives while refusing
members that would land outside the destination folder.

Command line (run from the repository root)::

    python -m data.registry list [--json]
    python -m data.registry show NAME [--json]
    python -m data.registry download NAME DEST [--force] [--no-extract] [--delete-archives]

Exit codes: 0 success, 1 the download or extraction failed (network, checksum, bad archive),
2 a user error (unknown dataset, Kaggle-only dataset, bad arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TextIO

log = logging.getLogger("data.registry")

REGISTRY_PATH = Path(__file__).resolve().with_name("datasets.json")
# Local sets are recorded relative to the repository root (the folder holding data/).
REPO_ROOT = Path(__file__).resolve().parent.parent

# The layout names of indexer.sources.LAYOUTS (a test keeps them equal): the indexer detects the
# layout itself; the registry records which one a dataset's extracted folder is read with.
LAYOUTS: tuple[str, ...] = ("species-breed", "stanford-dogs", "oxford-pet", "breed-folders", "flat", "csv")
SPECIES: tuple[str, ...] = ("cat", "dog", "both")

# Same list as indexer.defaults.IMAGE_EXTENSIONS (a test keeps them equal); repeated here so that this
# module stays importable without the indexer and its heavy dependencies.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

REQUIRED_KEYS: tuple[str, ...] = (
    "name",
    "title",
    "homepage",
    "citation",
    "licence",
    "files",
    "layout",
    "species",
    "extract_to",
    "notes",
)
REQUIRED_FILE_KEYS: tuple[str, ...] = ("url", "filename", "size_bytes", "md5", "sha256", "source_of_checksum")
REQUIRED_LOCAL_KEYS: tuple[str, ...] = ("name", "path", "layout", "species", "images", "licence", "notes")

_HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}
_ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar", ".zip")
_CHUNK = 1024 * 1024
_USER_AGENT = "mammals-space-data-registry/1 (+python urllib)"
# Where download() records which archives were fully extracted, so a re-run skips them.
_STATE_DIR = ".mammals-registry"


# --------------------------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """A problem shown to the user as one line; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class RegistryFormatError(RegistryError):
    """``datasets.json`` is missing, not JSON, or breaks the schema."""


class UnknownDatasetError(RegistryError):
    """No dataset of that name in the registry."""

    exit_code = 2


class KaggleOnlyError(RegistryError):
    """The dataset can only be fetched with a Kaggle account; the message says how."""

    exit_code = 2


class NetworkError(RegistryError):
    """The file could not be fetched from any of its URLs.

    ``http_status`` is set when a server answered with an HTTP error (the network itself works).
    """

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class IntegrityError(RegistryError):
    """A downloaded file's checksum or size differs from the registry's; the file was deleted."""


class UnsafeArchiveError(RegistryError):
    """An archive member would be written outside the destination (absolute path, ``..``, bad link)."""


class ArchiveError(RegistryError):
    """An archive is corrupt or of a kind this module cannot extract."""


# ------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where to fetch it and how to check it."""

    url: str | None
    filename: str
    size_bytes: int | None
    md5: str | None
    sha256: str | None
    source_of_checksum: str
    mirrors: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        """True when a published checksum exists for this file."""
        return bool(self.md5 or self.sha256)

    @property
    def is_archive(self) -> bool:
        """True when :func:`extract_archive` knows how to unpack this file."""
        return archive_kind(self.filename) is not None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RemoteFile:
        """Build from one entry of a dataset's ``files`` list."""
        return cls(
            url=raw.get("url"),
            filename=str(raw["filename"]),
            size_bytes=raw.get("size_bytes"),
            md5=raw.get("md5"),
            sha256=raw.get("sha256"),
            source_of_checksum=str(raw.get("source_of_checksum", "")),
            mirrors=tuple(raw.get("mirrors") or ()),
        )


@dataclass(frozen=True)
class Dataset:
    """One public dataset of the registry."""

    name: str
    title: str
    homepage: str
    citation: str
    licence: str
    files: tuple[RemoteFile, ...]
    layout: str
    species: str
    extract_to: str
    notes: str
    kaggle: str | None = None
    images: int | None = None
    breeds: int | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)

    @property
    def kaggle_only(self) -> bool:
        """True when some file has no direct URL and must come through the Kaggle API."""
        return any(f.url is None for f in self.files)

    @property
    def size_bytes(self) -> int | None:
        """Total download size, or None when any file's size is unknown."""
        sizes = [f.size_bytes for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Dataset:
        """Build from one entry of the registry's ``datasets`` list."""
        return cls(
            name=str(raw["name"]),
            title=str(raw["title"]),
            homepage=str(raw["homepage"]),
            citation=str(raw["citation"]),
            licence=str(raw["licence"]),
            files=tuple(RemoteFile.from_dict(f) for f in raw["files"]),
            layout=str(raw["layout"]),
            species=str(raw["species"]),
            extract_to=str(raw["extract_to"]),
            notes=str(raw["notes"]),
            kaggle=raw.get("kaggle"),
            images=raw.get("images"),
            breeds=raw.get("breeds"),
            label_map=dict(raw.get("label_map") or {}),
        )


@dataclass(frozen=True)
class LocalSet:
    """A photo set shipped beside the repository (``../shared/data``) for tests and benchmarks."""

    name: str
    path: str  # relative to the repository root
    layout: str
    species: str
    images: int
    licence: str
    notes: str
    breeds: int | None = None

    def resolve(self, repo_root: Path = REPO_ROOT) -> Path:
        """The set's folder on this machine."""
        return (repo_root / self.path).resolve()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LocalSet:
        """Build from one entry of the registry's ``local`` list."""
        return cls(
            name=str(raw["name"]),
            path=str(raw["path"]),
            layout=str(raw["layout"]),
            species=str(raw["species"]),
            images=int(raw["images"]),
            licence=str(raw["licence"]),
            notes=str(raw["notes"]),
            breeds=raw.get("breeds"),
        )


# ------------------------------------------------------------------------------------------ registry


def load_registry(path: Path | str = REGISTRY_PATH) -> dict[str, Any]:
    """Read and validate the registry JSON; raise :class:`RegistryFormatError` if it is broken."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RegistryFormatError(f"registry not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise RegistryFormatError(f"registry {path} is not valid JSON: {exc}") from exc
    problems = validate_registry(raw)
    if problems:
        raise RegistryFormatError(f"registry {path} is invalid: " + "; ".join(problems))
    if not isinstance(raw, dict):  # validate_registry already reported this; narrows the type for mypy
        raise RegistryFormatError(f"registry {path} is not a JSON object")
    return raw


def validate_registry(raw: Any) -> list[str]:
    """Every schema problem in a parsed registry, as readable strings (empty when it is valid)."""
    if not isinstance(raw, dict):
        return ["top level is not a JSON object"]
    problems: list[str] = []
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        return ["'datasets' must be a non-empty list"]
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"datasets[{i}] is not an object")
            continue
        name = str(entry.get("name", f"datasets[{i}]"))
        problems += [f"{name}: missing key '{k}'" for k in REQUIRED_KEYS if k not in entry]
        if name in seen:
            problems.append(f"{name}: duplicate name")
        seen.add(name)
        if entry.get("layout") not in LAYOUTS:
            problems.append(f"{name}: layout {entry.get('layout')!r} is not one of {', '.join(LAYOUTS)}")
        if entry.get("species") not in SPECIES:
            problems.append(f"{name}: species {entry.get('species')!r} is not one of {', '.join(SPECIES)}")
        if not _is_safe_relative(str(entry.get("extract_to", ""))):
            problems.append(f"{name}: extract_to must be a relative path without '..'")
        files = entry.get("files")
        if not isinstance(files, list) or not files:
            problems.append(f"{name}: 'files' must be a non-empty list")
            continue
        for j, f in enumerate(files):
            problems += [f"{name}: files[{j}]: {p}" for p in _validate_file(f, entry)]
    for i, local in enumerate(raw.get("local") or []):
        name = str(local.get("name", f"local[{i}]")) if isinstance(local, dict) else f"local[{i}]"
        if not isinstance(local, dict):
            problems.append(f"{name} is not an object")
            continue
        problems += [f"local {name}: missing key '{k}'" for k in REQUIRED_LOCAL_KEYS if k not in local]
        if local.get("layout") not in LAYOUTS:
            problems.append(f"local {name}: layout {local.get('layout')!r} is not one of {', '.join(LAYOUTS)}")
        if local.get("species") not in SPECIES:
            problems.append(f"local {name}: species {local.get('species')!r} is not one of {', '.join(SPECIES)}")
    return problems


def _validate_file(f: Any, entry: Mapping[str, Any]) -> list[str]:
    """Schema problems of one ``files`` entry."""
    if not isinstance(f, dict):
        return ["not an object"]
    problems = [f"missing key '{k}'" for k in REQUIRED_FILE_KEYS if k not in f]
    filename = str(f.get("filename", ""))
    # A filename is joined onto the user's destination folder, so it must not be able to leave it.
    if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        problems.append(f"filename {filename!r} must be a plain file name")
    for algo, pattern in _HEX.items():
        value = f.get(algo)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            problems.append(f"{algo} {value!r} is not {_hex_len(algo)} lower-case hex digits")
    size = f.get("size_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        problems.append(f"size_bytes {size!r} must be a positive integer or null")
    if f.get("md5") is None and f.get("sha256") is None and "unverified" not in str(f.get("source_of_checksum", "")):
        problems.append("no checksum: source_of_checksum must say 'unverified'")
    if f.get("url") is None and not entry.get("kaggle"):
        problems.append("url is null but the dataset has no 'kaggle' slug")
    return problems


def _hex_len(algo: str) -> int:
    """Number of hex digits of a digest."""
    return 32 if algo == "md5" else 64


def _is_safe_relative(path: str) -> bool:
    """True for a non-empty relative POSIX path with no ``..`` part."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and not PureWindowsPath(path).drive


def list_datasets(registry: Mapping[str, Any] | Path | str | None = None) -> list[Dataset]:
    """All datasets of the registry, in file order."""
    raw = _as_registry(registry)
    return [Dataset.from_dict(d) for d in raw["datasets"]]


def get_dataset(name: str, registry: Mapping[str, Any] | Path | str | None = None) -> Dataset:
    """The dataset called ``name``; :class:`UnknownDatasetError` (listing valid names) otherwise."""
    datasets = list_datasets(registry)
    for ds in datasets:
        if ds.name == name:
            return ds
    names = ", ".join(d.name for d in datasets)
    raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {names}")


def local_sets(registry: Mapping[str, Any] | Path | str | None = None) -> list[LocalSet]:
    """The photo sets shipped beside the repository."""
    raw = _as_registry(registry)
    return [LocalSet.from_dict(d) for d in raw.get("local") or []]


def _as_registry(registry: Mapping[str, Any] | Path | str | None) -> Mapping[str, Any]:
    """Accept a parsed registry, a path to one, or None for the default file."""
    if registry is None:
        return load_registry()
    if isinstance(registry, (str, Path)):
        return load_registry(registry)
    return registry


def count_images(folder: Path | str) -> int:
    """Number of files under ``folder`` (recursively) whose extension is an image extension."""
    return sum(1 for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# ----------------------------------------------------------------------------------------- checksums


def file_digest(path: Path | str, algo: str) -> str:
    """Hex digest (``md5`` or ``sha256``) of a file, read in chunks so large archives fit in memory."""
    h = _new_hash(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _new_hash(algo: str) -> Any:
    """A fresh hashlib object; md5 is flagged as not-for-security (it is only an integrity check)."""
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unsupported checksum algorithm {algo!r} (use md5 or sha256)")


def _expected_digests(expected: str | None, md5: str | None, sha256: str | None) -> dict[str, str]:
    """Normalise the ways a checksum can be given into ``{algo: hex}``; the algorithm of a bare
    ``expected`` value is inferred from its length (32 hex digits = md5, 64 = sha256)."""
    digests: dict[str, str] = {}
    if expected is not None:
        value = expected.strip().lower()
        algo = {32: "md5", 64: "sha256"}.get(len(value))
        if algo is None:
            raise ValueError(f"checksum {expected!r} is neither an md5 (32 hex) nor a sha256 (64 hex)")
        digests[algo] = value
    for algo, given in (("md5", md5), ("sha256", sha256)):
        if given is not None:
            digests[algo] = given.strip().lower()
    if not digests:
        raise ValueError("no checksum given")
    for algo, value in digests.items():
        if not _HEX[algo].fullmatch(value):
            raise ValueError(f"{algo} checksum {value!r} is not {_hex_len(algo)} hex digits")
    return digests


def verify_file(
    path: Path | str, expected: str | None = None, *, md5: str | None = None, sha256: str | None = None
) -> bool:
    """True when the file exists and matches every checksum given.

    ``expected`` may be an md5 or a sha256 (told apart by length); ``md5=``/``sha256=`` name the
    algorithm explicitly.  A malformed checksum raises ValueError (a registry bug, not a bad file).
    """
    digests = _expected_digests(expected, md5, sha256)
    path = Path(path)
    if not path.is_file():
        return False
    return all(file_digest(path, algo) == value for algo, value in digests.items())


# ------------------------------------------------------------------------------------------ download


class _Progress:
    """A throttled progress line on stderr: rewritten in place on a terminal, a line every few seconds
    otherwise (so logs stay short)."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int) -> None:
        """Count ``n`` more bytes and redraw if enough time has passed."""
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.5 if self.tty else 5.0):
            self.last = now
            self._write(final=False)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._write(final=True)

    def _write(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        text = f"{self.label}: {_human(self.done)}"
        if self.total:
            text += f" / {_human(self.total)} ({100.0 * self.done / self.total:5.1f}%)"
        text += f"  {_human(int(self.done / elapsed))}/s"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _human(n: int | None) -> str:
    """Bytes as a short human-readable string."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def fetch_file(
    url: str,
    dest: Path | str,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    mirrors: Sequence[str] = (),
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` (falling back to ``mirrors``) to ``dest`` and verify it; return ``dest``.

    * Resume-safe: an existing ``dest`` whose checksum matches (or, with no checksum known, whose size
      matches or is unknown) is kept and nothing is fetched, unless ``force``.
    * Atomic: bytes go to a temporary file beside ``dest`` that is renamed over it only after the
      checksum and size checks pass, so ``dest`` is never a partial or unverified file.
    * Failures raise :class:`NetworkError` (all URLs failed) or :class:`IntegrityError` (wrong
      checksum/size; the temporary file is deleted).
    """
    dest = Path(dest)
    digests = _expected_digests(None, md5, sha256) if (md5 or sha256) else {}
    if dest.exists() and not force:
        if digests:
            if verify_file(dest, md5=md5, sha256=sha256):
                log.info("%s: already present, checksum OK; skipping download", dest.name)
                return dest
            log.warning("%s: present but its checksum differs; downloading it again", dest.name)
        elif size_bytes is None or dest.stat().st_size == size_bytes:
            log.info("%s: already present (no checksum published: unverified); skipping download", dest.name)
            return dest
        else:
            log.warning("%s: present but its size differs; downloading it again", dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    candidates = [url, *mirrors]
    failures: list[NetworkError] = []
    described: list[str] = []
    for i, candidate in enumerate(candidates):
        try:
            _download_verified(candidate, dest, digests, size_bytes, timeout, progress)
            return dest
        except NetworkError as exc:
            # Only network failures move on to a mirror: a checksum mismatch means the published
            # file changed, and the user has to know that rather than get a silently different copy.
            failures.append(exc)
            described.append(f"{candidate} ({exc})")
            if i + 1 < len(candidates):
                log.warning("%s: %s failed (%s); trying the next mirror", dest.name, candidate, exc)
    if all(f.http_status is not None for f in failures):
        # Every server answered, so the network is fine: the file has moved or access is refused.
        raise NetworkError(
            f"could not download {dest.name}: " + "; ".join(described) + ". The file may have moved or "
            "the server refuses the request; check the dataset's homepage.",
            http_status=failures[-1].http_status,
        )
    raise NetworkError(
        f"no network? could not download {dest.name} from "
        + "; ".join(described)
        + ". Check your connection or proxy (urllib honours the https_proxy/http_proxy variables) and retry."
    )


def _download_verified(
    url: str, dest: Path, digests: Mapping[str, str], size_bytes: int | None, timeout: float, progress: bool
) -> None:
    """Stream ``url`` into a temp file next to ``dest``, hashing as it goes, then check and rename."""
    # Same folder as dest, so os.replace is an atomic rename on one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    hashers = {algo: _new_hash(algo) for algo in digests}
    moved = False
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
                status = exc.code if isinstance(exc, urllib.error.HTTPError) else None
                raise NetworkError(_reason(exc), http_status=status) from exc
            with response:
                length = response.headers.get("Content-Length")
                announced = int(length) if length and length.isdigit() else None
                bar = _Progress(dest.name, size_bytes or announced, enabled=progress)
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise NetworkError(f"connection lost after {_human(bar.done)}: {_reason(exc)}") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    bar.update(len(chunk))
                bar.close()
            out.flush()
            os.fsync(out.fileno())
        got = tmp.stat().st_size
        if announced is not None and got != announced:
            raise NetworkError(f"connection closed early: got {got} of {announced} bytes")
        if size_bytes is not None and got != size_bytes:
            raise IntegrityError(
                f"{dest.name}: size mismatch: expected {size_bytes} bytes, got {got} (from {url}); "
                "the download was deleted. The file may have changed upstream; retry, and report it if it persists."
            )
        for algo, expected in digests.items():
            actual = hashers[algo].hexdigest()
            if actual != expected:
                raise IntegrityError(
                    f"{dest.name}: {algo} checksum mismatch: expected {expected}, got {actual} (from {url}); "
                    "the download was deleted. The file was corrupted in transit or changed upstream; "
                    "retry, and report it if it persists."
                )
        os.replace(tmp, dest)
        moved = True
        if digests:
            log.info("%s: downloaded and verified (%s)", dest.name, ", ".join(sorted(digests)))
        else:
            log.info("%s: downloaded (no checksum published: unverified)", dest.name)
    finally:
        if not moved:
            tmp.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """A short, traceback-free description of a network exception."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------------------------- extract


def archive_kind(filename: str | Path) -> str | None:
    """``"tar"`` or ``"zip"`` for the archive names this module extracts, else None."""
    name = str(filename).lower()
    if not name.endswith(_ARCHIVE_SUFFIXES):
        return None
    return "zip" if name.endswith(".zip") else "tar"


def _check_member(name: str, archive: Path) -> None:
    """Reject a member name that is absolute or climbs out with ``..`` (zip-slip / tar-slip)."""
    posix = name.replace("\\", "/")
    win = PureWindowsPath(name)
    if posix.startswith("/") or win.drive or win.root:
        raise UnsafeArchiveError(f"{archive.name}: refusing member with an absolute path: {name!r}")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(f"{archive.name}: refusing member with '..' in its path: {name!r}")


def extract_archive(archive: Path | str, dest_dir: Path | str) -> Path:
    """Extract a .tar/.tgz/.tar.gz/.zip into ``dest_dir`` and return ``dest_dir``.

    Every member name is checked before anything is written, so an unsafe archive extracts nothing.
    Tar members also go through tarfile's ``"data"`` filter, which additionally rejects links that
    point outside ``dest_dir``, device files, and strips setuid bits.
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    kind = archive_kind(archive)
    if kind is None:
        raise ArchiveError(f"{archive.name}: not an archive this tool extracts ({', '.join(_ARCHIVE_SUFFIXES)})")
    dest_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: extracting into %s", archive.name, dest_dir)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                zf.extractall(dest_dir)
        else:
            with tarfile.open(archive, "r:*") as tf:
                # Listing first costs one extra pass over a compressed tar, but guarantees that a bad
                # member is found before any file is written.
                for member in tf.getmembers():
                    _check_member(member.name, archive)
                tf.extractall(dest_dir, filter="data")
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive.name}: refusing unsafe member: {exc}") from exc
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: corrupt or unreadable archive: {exc}") from exc
    return dest_dir


# ------------------------------------------------------------------------------------------ datasets


def kaggle_instructions(ds: Dataset, dest_dir: Path | str = "DEST") -> str:
    """How to fetch a Kaggle-only dataset by hand."""
    target = PurePosixPath(str(dest_dir)) / ds.extract_to
    return (
        f"{ds.name!r} is only distributed through Kaggle, which needs an account and an API token, so this "
        f"downloader cannot fetch it. With the Kaggle CLI: `pip install kaggle`, save your API token as "
        f"~/.kaggle/kaggle.json (Kaggle > Settings > API > Create New Token), then run "
        f"`kaggle datasets download -d {ds.kaggle} -p {dest_dir} --unzip` and index {target} "
        f"(layout {ds.layout})."
    )


def index_command(ds: Dataset, folder: Path | str, store: str | None = None) -> str:
    """The ``mammals index`` command for a downloaded dataset's photo folder.

    ``--species`` is added only where the layout cannot tell the species from the path
    (breed-folders and flat) and the whole dataset is one species.
    """
    cmd = f"mammals index {folder} --store {store or 'stores/' + ds.name}"
    if ds.layout in ("breed-folders", "flat") and ds.species in ("cat", "dog"):
        cmd += f" --species {ds.species}"
    return cmd


def download(
    name: str,
    dest_dir: Path | str,
    *,
    force: bool = False,
    extract: bool = True,
    delete_archives: bool = False,
    progress: bool = True,
    registry: Mapping[str, Any] | Path | str | None = None,
) -> Path:
    """Download (and extract) dataset ``name`` into ``dest_dir``; return the folder to index.

    Re-running is cheap: archives already extracted are skipped, files already present with the
    published checksum are not fetched again.  ``force`` re-downloads and re-extracts everything.
    With ``extract=False`` the archives are only fetched and ``dest_dir`` is returned.
    """
    ds = get_dataset(name, registry)
    dest_dir = Path(dest_dir).expanduser()
    if ds.kaggle_only:
        if ds.kaggle:
            raise KaggleOnlyError(kaggle_instructions(ds, dest_dir))
        raise KaggleOnlyError(f"{ds.name!r} has no download URL; see its homepage: {ds.homepage}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    state = dest_dir / _STATE_DIR
    for rf in ds.files:
        if rf.url is None:  # unreachable after the kaggle_only check; keeps mypy's narrowing honest
            continue
        marker = state / f"{rf.filename}.extracted.json"
        if extract and rf.is_archive and marker.exists() and not force:
            log.info("%s: already extracted (%s); skipping", rf.filename, marker)
            continue
        archive = fetch_file(
            rf.url,
            dest_dir / rf.filename,
            md5=rf.md5,
            sha256=rf.sha256,
            size_bytes=rf.size_bytes,
            mirrors=rf.mirrors,
            force=force,
            progress=progress,
        )
        if extract and rf.is_archive:
            extract_archive(archive, dest_dir)
            state.mkdir(exist_ok=True)
            marker.write_text(
                json.dumps(
                    {
                        "dataset": ds.name,
                        "file": rf.filename,
                        "md5": rf.md5,
                        "sha256": rf.sha256,
                        "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
            if delete_archives:
                archive.unlink()
                log.info("%s: archive deleted after extraction", rf.filename)
    if not extract:
        return dest_dir
    photos = dest_dir / ds.extract_to
    if not photos.is_dir():
        log.warning("expected photo folder %s is missing after extraction; the archive layout may have changed", photos)
    return photos


# ----------------------------------------------------------------------------------------------- CLI


def _short_licence(licence: str) -> str:
    """The licence up to its first clause, for tables."""
    return re.split(r"[:;(]", licence, maxsplit=1)[0].strip()


def _dataset_json(ds: Dataset, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The registry entry of ``ds`` as stored (keeps keys this module does not model)."""
    for entry in raw["datasets"]:
        if entry.get("name") == ds.name:
            return dict(entry)
    return {}


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    raw = load_registry(args.registry)
    datasets = list_datasets(raw)
    if args.json:
        json.dump({"datasets": raw["datasets"], "local": raw.get("local", [])}, out, indent=2)
        out.write("\n")
        return 0
    rows: list[tuple[str, ...]] = [("name", "species", "layout", "size", "get", "licence")]
    for ds in datasets:
        how = f"kaggle {ds.kaggle}" if ds.kaggle_only else "download"
        rows.append((ds.name, ds.species, ds.layout, _human(ds.size_bytes), how, _short_licence(ds.licence)))
    _table(rows, out)
    out.write("\nlocal sets (relative to the repository root):\n")
    rows = [("name", "species", "layout", "images", "path")]
    for ls in local_sets(raw):
        rows.append((ls.name, ls.species, ls.layout, str(ls.images), ls.path))
    _table(rows, out)
    return 0


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    raw = load_registry(args.registry)
    ds = get_dataset(args.name, raw)
    if args.json:
        json.dump(_dataset_json(ds, raw), out, indent=2)
        out.write("\n")
        return 0
    lines = [
        f"{ds.name}: {ds.title}",
        f"  homepage:   {ds.homepage}",
        f"  species:    {ds.species}",
        f"  layout:     {ds.layout} (index the extracted {ds.extract_to})",
        f"  images:     {ds.images if ds.images is not None else 'unknown'}"
        + (f" in {ds.breeds} breeds" if ds.breeds else ""),
        f"  size:       {_human(ds.size_bytes)}",
        f"  licence:    {ds.licence}",
        f"  citation:   {ds.citation}",
    ]
    if ds.kaggle:
        lines.append(f"  kaggle:     {ds.kaggle}")
    for rf in ds.files:
        lines.append(f"  file:       {rf.filename} ({_human(rf.size_bytes)})")
        lines.append(f"    url:      {rf.url or '(none: Kaggle only)'}")
        for mirror in rf.mirrors:
            lines.append(f"    mirror:   {mirror}")
        lines.append(f"    md5:      {rf.md5 or '-'}")
        lines.append(f"    sha256:   {rf.sha256 or '-'}")
        lines.append(f"    checksum: {rf.source_of_checksum}")
    if ds.label_map:
        lines.append("  labels:     " + ", ".join(f"{k}={v}" for k, v in ds.label_map.items()))
    lines.append(f"  notes:      {ds.notes}")
    out.write("\n".join(lines) + "\n")
    return 0


def _cmd_download(args: argparse.Namespace, out: TextIO) -> int:
    ds = get_dataset(args.name, args.registry)  # unknown names fail before anything is created
    folder = download(
        args.name,
        args.dest,
        force=args.force,
        extract=not args.no_extract,
        delete_archives=args.delete_archives,
        progress=not args.quiet,
        registry=args.registry,
    )
    # The one line on stdout is the folder, so scripts can capture it.
    out.write(f"{folder}\n")
    if not args.no_extract:
        log.info("index it with: %s   (layout %s, detected automatically)", index_command(ds, folder), ds.layout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.registry`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m data.registry",
        description="Registry of public cat/dog photo datasets: list them, show details, download and verify.",
        epilog="Exit codes: 0 ok, 1 download/extraction failed, 2 user error, 130 interrupted.",
    )
    parser.add_argument("--registry", type=Path, default=REGISTRY_PATH, help="registry JSON (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list the datasets and the local sets")
    p_list.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    p_list.set_defaults(func=_cmd_list)

    p_show = sub.add_parser("show", help="show one dataset: URLs, checksums, licence, layout")
    p_show.add_argument("name")
    p_show.add_argument("--json", action="store_true", help="print the registry entry as JSON")
    p_show.set_defaults(func=_cmd_show)

    p_dl = sub.add_parser("download", help="download, verify and extract a dataset into DEST")
    p_dl.add_argument("name")
    p_dl.add_argument("dest", type=Path, help="destination folder (created if missing)")
    p_dl.add_argument("--force", action="store_true", help="download and extract again even if already done")
    p_dl.add_argument("--no-extract", action="store_true", help="only download and verify the archives")
    p_dl.add_argument("--delete-archives", action="store_true", help="delete each archive once extracted")
    p_dl.set_defaults(func=_cmd_download)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting (tests call this directly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    out = out if out is not None else sys.stdout
    try:
        code: int = args.func(args, out)
        return code
    except RegistryError as exc:
        log.error("error: %s", exc)
        return exc.exit_code
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # disk full, permission denied, ...: one line, not a traceback
        log.error("error: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
