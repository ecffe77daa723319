"""The registry of public cat/dog datasets (``data/datasets.json``) and its downloader.

The registry says where each dataset comes from, its licence, the checksums published for its files,
and which Mammals Space layout reads the extracted folder.  Downloads go through `pooch`: it streams
each file to a temporary file beside the target, shows a `tqdm` progress bar, verifies the published
checksum, retries failed attempts and renames the file into place only once it is verified.  This
module adds the mirrors, one-line errors, and extraction that refuses members that would land outside
the destination folder.

Command line: ``mammals data list|show|download`` (see :mod:`data.cli`); ``python -m data.registry``
runs the same subcommand.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tarfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from indexer.errors import UsageError
from indexer.store import hashing

log = logging.getLogger("data.registry")

REGISTRY_PATH = Path(__file__).resolve().with_name("datasets.json")
# Local sets are recorded relative to the repository root (the folder holding data/).
REPO_ROOT = Path(__file__).resolve().parent.parent

# The layout names of indexer.sources.LAYOUTS (a test keeps them equal): the indexer detects the
# layout itself; the registry records which one a dataset's extracted folder is read with.
LAYOUTS: tuple[str, ...] = ("species-breed", "stanford-dogs", "oxford-pet", "breed-folders", "flat", "csv")
SPECIES: tuple[str, ...] = ("cat", "dog", "both")

# Same list as indexer.defaults.IMAGE_EXTENSIONS (a test keeps them equal); repeated here so that this
# module stays importable without the indexer's heavy dependencies.
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
_CHUNK = 1024 * 1024  # bytes per read while streaming a download
_USER_AGENT = "mammals-space-data-registry/2 (+pooch)"
# Where download() records which archives were fully extracted, so a re-run skips them.
_STATE_DIR = ".mammals-registry"


# --------------------------------------------------------------------------------------------- errors


class RegistryError(UsageError):
    """A problem the user can act on, shown as one line (``mammals data`` exits with code 2)."""


class RegistryFormatError(RegistryError):
    """``datasets.json`` is missing, not JSON, or breaks the schema."""


class UnknownDatasetError(RegistryError):
    """No dataset of that name in the registry."""


class KaggleOnlyError(RegistryError):
    """The dataset can only be fetched with a Kaggle account; the message says how."""


class NetworkError(RegistryError):
    """The file could not be fetched from any of its URLs.

    ``http_status`` is set when a server answered with an HTTP error (the network itself works).
    """

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class IntegrityError(RegistryError):
    """A downloaded file's checksum differs from the registry's; the download was deleted."""


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
    """Hex digest (``md5`` or ``sha256``) of a file (md5 only ever serves as an integrity check here)."""
    if algo not in _HEX:
        raise ValueError(f"unsupported checksum algorithm {algo!r} (use md5 or sha256)")
    return hashing.file_digest(path, algo)


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


def known_hash(md5: str | None, sha256: str | None) -> str | None:
    """pooch's ``known_hash`` for a file: ``"sha256:…"`` where one is published (the stronger), else
    ``"md5:…"``, else None (the file is then downloaded unverified)."""
    if md5 is None and sha256 is None:
        return None
    digests = _expected_digests(None, md5, sha256)
    algo = "sha256" if "sha256" in digests else "md5"
    return f"{algo}:{digests[algo]}"


# ------------------------------------------------------------------------------------------ download


class _PoochToLog(logging.Handler):
    """Hands pooch's messages ("Downloading file …", "Failed to download … will attempt again") to this
    module's logger, so that they follow ``-q``/``-v`` and the CLI's format (pooch's own logger is not
    part of the logging tree and prints to stderr by itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        log.log(record.levelno, "%s", record.getMessage())


def _reason(exc: Exception) -> str:
    """A short, traceback-free description of a failed request: the HTTP status, or the socket error."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_file(
    url: str,
    dest: Path | str,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    mirrors: Sequence[str] = (),
    force: bool = False,
    retries: int = 2,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` (falling back to ``mirrors``) to ``dest`` with pooch and verify it; return ``dest``.

    * Resumable: an existing ``dest`` that matches the checksum (any existing file when none is
      published) is kept and nothing is fetched, unless ``force``; one that differs is fetched again.
    * Atomic: pooch writes to a temporary file beside ``dest`` and renames it over ``dest`` only once
      the checksum matches, so ``dest`` is never a partial or unverified file.
    * Each URL is tried ``1 + retries`` times (pooch waits 1 s, 2 s, … in between) before the next mirror.
    * Failures raise :class:`NetworkError` (every URL failed) or :class:`IntegrityError` (the checksum
      differs; nothing is left behind).  Only network failures move on to a mirror: a checksum mismatch
      means the published file changed, and the user has to know that rather than get a different copy.
    """
    import pooch
    import requests

    dest = Path(dest).expanduser().absolute()
    expected = known_hash(md5, sha256)
    pooch.get_logger().handlers[:] = [_PoochToLog()]
    downloader = pooch.HTTPDownloader(
        progressbar=progress, chunk_size=_CHUNK, timeout=timeout, headers={"User-Agent": _USER_AGENT}
    )
    if force:
        dest.unlink(missing_ok=True)
    failures: list[tuple[str, str, int | None]] = []  # (url, reason, HTTP status)
    for i, candidate in enumerate((url, *mirrors)):
        files = pooch.Pooch(
            path=dest.parent,
            base_url="",
            registry={dest.name: expected},
            urls={dest.name: candidate},
            retry_if_failed=retries,
        )
        try:
            files.fetch(dest.name, downloader=downloader)
        except requests.RequestException as exc:
            status = exc.response.status_code if exc.response is not None else None
            failures.append((candidate, _reason(exc), status))
            if i < len(mirrors):
                log.warning("%s: %s failed (%s); trying the next mirror", dest.name, candidate, _reason(exc))
            continue
        except ValueError as exc:  # pooch's checksum mismatch (after its retries); the download is deleted
            raise IntegrityError(f"{dest.name}: checksum mismatch for {candidate}: {exc}") from exc
        log.info("%s: ready (%s)", dest.name, expected.split(":")[0] + " verified" if expected else "unverified")
        return dest
    described = "; ".join(f"{u} ({reason})" for u, reason, _ in failures)
    if all(status is not None for _, _, status in failures):
        # Every server answered, so the network is fine: the file has moved or access is refused.
        raise NetworkError(
            f"could not download {dest.name}: {described}. The file may have moved or the server refuses "
            "the request; check the dataset's homepage.",
            http_status=failures[-1][2],
        )
    raise NetworkError(
        f"no network? could not download {dest.name} from {described}. Check your connection or proxy "
        "(the https_proxy/http_proxy variables are honoured) and retry."
    )


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
        raise ArchiveError(f"{archive.name}: corrupt or unreadable archive: {' '.join(str(exc).split())}") from exc
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
    retries: int = 2,
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
            mirrors=rf.mirrors,
            force=force,
            retries=retries,
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


if __name__ == "__main__":  # `python -m data.registry ARGS` is `mammals data ARGS`
    from indexer.cli import main

    sys.exit(main(["data", *sys.argv[1:]]))
