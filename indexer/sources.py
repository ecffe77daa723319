"""Dataset layouts -> catalog rows: which photos a dataset holds and what its folders and CSVs say about them.

Labels are only ever read from what the dataset states (folder names, the Oxford-IIIT Pet
file-name convention, CSV columns); a label the layout does not give is ``None``, never
guessed from free-form file names.

Layouts (``detect_layout`` picks one; ``scan(layout=...)`` forces one):

- ``species-breed``: ``<root>/<cat|cats|dog|dogs>/<breed>/*.jpg`` (any case). Images directly
  in a species folder get breed ``None``.
- ``stanford-dogs``: ``<root>/n02085620-Chihuahua/*.jpg`` (WordNet id + "-" + breed), also one
  level deeper (``<root>/Images/n02...-X/``, ``<root>/train/n02...-X/``). Species is "dog".
- ``oxford-pet``: flat ``Abyssinian_12.jpg`` files in ``<root>`` or ``<root>/images/``; breed
  is the name before ``_<number>``, species "cat" when it starts with a capital letter
  (the Oxford-IIIT convention). Only that one folder is read, so the Oxford download's
  ``annotations/trimaps/*.png`` masks are not taken for photos.
- ``breed-folders``: ``<root>/<breed>/*.jpg`` (a leading ``train/``/``val/``/``test/`` folder
  is skipped); species comes only from the ``species`` argument.
- ``flat``: a folder of unlabelled images (recursively); species from the argument, breed ``None``.
- ``csv``: ``root`` is a ``.csv`` with a ``path`` column (relative to the CSV's folder, or
  absolute); ``species``/``breed`` columns fill those fields, every other column goes to
  ``labels`` with its type (int, float, bool, str; empty cells -> ``None``).

Every image file under a folder root is a row (stray files a layout says nothing about get
``None`` labels), except in ``oxford-pet`` as said above. The ``species`` argument never
overrides a species the layout states; it only fills rows whose species is unknown.

File and folder names that are not valid UTF-8 (``b"bad\\xff.jpg"``) are listed like any other:
``CatalogRow.path`` and ``relpath`` keep Python's surrogate-escaped spelling so the file can still
be opened and reported (``is_utf8_path(row.path)`` is False; ``printable_path(...)`` is the
storable spelling); the text labels taken from names (``breed``, ``dataset``) are always valid
UTF-8, with undecodable bytes written as ``\\xNN``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from indexer.defaults import IMAGE_EXTENSIONS
from indexer.images import is_utf8_path, printable_path

__all__ = [
    "LAYOUTS",
    "CatalogRow",
    "SourceError",
    "detect_layout",
    "is_utf8_path",
    "join_labels",
    "local_path",
    "normalise_breed",
    "printable_path",
    "scan",
]

LAYOUTS: tuple[str, ...] = ("species-breed", "stanford-dogs", "oxford-pet", "breed-folders", "flat", "csv")

_SPECIES_FOLDERS = {"cat": "cat", "cats": "cat", "dog": "dog", "dogs": "dog"}
_SYNSET_DIR = re.compile(r"^n\d{8}-(.+)$")
_OXFORD_FILE = re.compile(r"^([A-Za-z_]+)_(\d+)\.\w+$")
_SPLIT_DIRS = {"train", "training", "val", "valid", "validation", "test", "testing"}
# A file-name stem holding one of these words names a picture, not a breed
# ("cat_images_image_1.jpg", "IMG_0042.jpg", "Screenshot_3.png").
_MEDIA_WORDS = {
    "image", "images", "img", "imgs", "photo", "photos", "pic", "pics", "picture", "pictures",
    "screenshot", "screenshots", "snapshot", "frame", "scan", "dsc", "dscn", "dcim", "file",
    "untitled", "download", "copy", "thumb", "thumbnail", "sample", "wallpaper",
}  # fmt: skip
# A stem made only of these words ("cat_1.jpg", "dog_pet_4.jpg") names no breed either.
_GENERIC_WORDS = {
    "cat", "cats", "dog", "dogs", "pet", "pets", "kitten", "kittens", "kitty", "puppy",
    "puppies", "animal", "animals", "train", "test", "val",
}  # fmt: skip
_MAJORITY = 0.5


class SourceError(ValueError):
    """A dataset the user must fix or point at differently; the message is one line naming the path and the reason."""


@dataclass(frozen=True)
class CatalogRow:
    """One photo of a dataset and the labels its layout states."""

    path: Path  # absolute; the root is resolved, a symlinked file is kept as the link (so a broken one is reported)
    relpath: str  # posix, relative to the dataset root (the CSV's folder for csv)
    species: str | None  # "cat" | "dog" | None
    breed: str | None  # normalise_breed()d, or None
    dataset: str  # the root folder's name, or the CSV file's stem
    layout: str  # one of LAYOUTS
    labels: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a plain dict: picklable


def local_path(value: str) -> Path:
    """A command-line path: a plain path or a ``file://`` URL (fsspec's spelling of one). Other URL schemes
    (``s3://``, ``gs://``...) are refused with a ValueError saying what to do: photos and stores are read and
    written through the local file system, so an object store must be mounted (s3fs, gcsfuse, a cluster's shared
    file system) and given by its mount path."""
    from urllib.parse import unquote, urlparse

    if "://" not in value:
        return Path(value)
    url = urlparse(value)
    if url.scheme == "file" and url.netloc in ("", "localhost"):
        return Path(unquote(url.path))
    raise ValueError(f"{value}: {url.scheme}:// URLs are not read directly; mount the storage and give its path")


def normalise_breed(name: str) -> str:
    """``"German Shorthaired"`` / ``"german-shorthaired"`` -> ``"german_shorthaired"``.

    Always valid UTF-8: undecodable bytes of a folder name become ``\\xNN`` (``printable_path``).
    """
    text = re.sub(r"[\s\-]+", "_", printable_path(name).strip().lower())
    return re.sub(r"_+", "_", text).strip("_")


def _species(value: Any, where: str) -> str | None:
    """``"Cats"`` -> ``"cat"``; empty -> None; anything else is a SourceError naming ``where``."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in _SPECIES_FOLDERS:
        raise SourceError(f"{where}: species {value!r} is not cat or dog")
    return _SPECIES_FOLDERS[text]


def _breed(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return normalise_breed(str(value)) or None


# --------------------------------------------------------------------------- walking


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(root: Path) -> list[tuple[str, ...]]:
    """Relative path parts of every image file under ``root``, sorted.

    Hidden entries are skipped and symlinked folders are not followed.
    """

    def fail(e: OSError) -> None:
        raise SourceError(f"{printable_path(e.filename or root)}: cannot list folder ({e.strerror or e})")

    found: list[tuple[str, ...]] = []
    # followlinks=False: a symlinked folder could loop back on itself. Symlinked files are
    # kept (they appear in `files`, broken ones too) and reported later by the extractor.
    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).parts
        # A folder named like an image ("x.jpg/") is listed too, so it is reported ("is a directory")
        # instead of vanishing; it is still walked into like any folder.
        found.extend((*rel, name) for name in (*files, *dirs) if _is_image_name(name))
    found.sort(key=lambda parts: "/".join(parts))
    return found


def _no_images(root: Path) -> SourceError:
    return SourceError(f"{printable_path(root)}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")


def _check_root(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise SourceError(f"{printable_path(root)}: no such directory")
    if not root.is_dir():
        raise SourceError(f"{printable_path(root)}: not a directory or a .csv file")
    return root.resolve()


# --------------------------------------------------------------------------- per-layout parsing
# Each returns (species, breed) for one file's relative parts, or None when the layout says nothing.


def _synset_breed(parts: tuple[str, ...]) -> str | None:
    for folder in parts[:-1][:2]:  # a synset folder at depth 1 or 2
        m = _SYNSET_DIR.match(folder)
        if m:
            return normalise_breed(m.group(1)) or None
    return None


def _oxford_label(name: str) -> tuple[str, str] | None:
    m = _OXFORD_FILE.match(name)
    if not m:
        return None
    stem = m.group(1).strip("_")
    if not stem:
        return None
    return ("cat" if stem[0].isupper() else "dog"), normalise_breed(stem)


def _stem_names_a_breed(stem: str) -> bool:
    words = [w for w in stem.lower().split("_") if w]
    return bool(words) and not _MEDIA_WORDS.intersection(words) and not set(words) <= _GENERIC_WORDS


def _oxford_folder(paths: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The one folder an oxford-pet layout reads: the root if it holds images, else ``images/``."""
    if any(len(p) == 1 for p in paths):
        return ()
    subs = {p[0] for p in paths if len(p) == 2 and p[0].lower() == "images"}
    return (sorted(subs)[0],) if subs else None


def _looks_oxford(paths: list[tuple[str, ...]]) -> bool:
    folder = _oxford_folder(paths)
    if folder is None:
        return False
    files = [p[-1] for p in paths if p[:-1] == folder]
    if folder == () and len(files) < _MAJORITY * len(paths):
        return False  # mostly a nested dataset with a few loose files at the top
    stems = []
    for name in files:
        m = _OXFORD_FILE.match(name)
        if m and _stem_names_a_breed(m.group(1)):
            stems.append(m.group(1))
    # One stem for every file ("beagle_1", "beagle_2", ...) is just a naming scheme, not a
    # labelled set; and most files must follow the pattern.
    return len(set(stems)) >= 2 and len(stems) >= _MAJORITY * len(files)


def _fraction(paths: list[tuple[str, ...]], pred: Any) -> float:
    return sum(1 for p in paths if pred(p)) / len(paths) if paths else 0.0


def _in_species_folder(p: tuple[str, ...]) -> bool:
    return len(p) >= 2 and p[0].lower() in _SPECIES_FOLDERS


def _detect(paths: list[tuple[str, ...]]) -> str:
    if _fraction(paths, _in_species_folder) >= _MAJORITY:
        return "species-breed"
    if _fraction(paths, lambda p: _synset_breed(p) is not None) >= _MAJORITY:
        return "stanford-dogs"
    if _looks_oxford(paths):
        return "oxford-pet"
    if _fraction(paths, lambda p: len(p) >= 2) >= _MAJORITY:
        return "breed-folders"
    return "flat"


def _is_csv(root: Path) -> bool:
    return root.suffix.lower() == ".csv"


def detect_layout(root: Path) -> str:
    """The layout of ``root`` (a folder, or a ``.csv`` file -> ``"csv"``).

    SourceError if it is missing or holds no image files.
    """
    root = Path(root)
    if _is_csv(root):
        if not root.is_file():
            raise SourceError(f"{printable_path(root)}: no such file")
        return "csv"
    root = _check_root(root)
    paths = _walk_images(root)
    if not paths:
        raise _no_images(root)
    return _detect(paths)


def _folder_rows(root: Path, paths: list[tuple[str, ...]], layout: str, species: str | None) -> list[CatalogRow]:
    where = printable_path(root)
    if layout == "oxford-pet":
        folder = _oxford_folder(paths)
        if folder is None or not any(p[:-1] == folder and _OXFORD_FILE.match(p[-1]) for p in paths):
            raise SourceError(f"{where}: layout 'oxford-pet' does not fit: no files named like Abyssinian_12.jpg")
        paths = [p for p in paths if p[:-1] == folder]
    elif layout == "species-breed" and not any(_in_species_folder(p) for p in paths):
        raise SourceError(f"{where}: layout 'species-breed' does not fit: no cat/ or dog/ folders")
    elif layout == "stanford-dogs" and not any(_synset_breed(p) for p in paths):
        raise SourceError(
            f"{where}: layout 'stanford-dogs' does not fit: no folders named like n02085620-Chihuahua at depth 1 or 2"
        )
    elif layout == "breed-folders" and not any(len(p) >= 2 for p in paths):
        raise SourceError(f"{where}: layout 'breed-folders' does not fit: no images inside sub-folders")

    rows = []
    for parts in paths:
        sp: str | None = None
        breed: str | None = None
        if layout == "species-breed":
            if _in_species_folder(parts):
                sp = _SPECIES_FOLDERS[parts[0].lower()]
                if len(parts) >= 3:
                    breed = normalise_breed(parts[1]) or None
        elif layout == "stanford-dogs":
            breed = _synset_breed(parts)
            sp = "dog" if breed else None
        elif layout == "oxford-pet":
            label = _oxford_label(parts[-1])
            if label:
                sp, breed = label
        elif layout == "breed-folders":
            folders = list(parts[:-1])
            if folders and folders[0].lower() in _SPLIT_DIRS:
                folders = folders[1:]
            if folders:
                breed = normalise_breed(folders[0]) or None
        rows.append(
            CatalogRow(
                path=root.joinpath(*parts),
                relpath="/".join(parts),
                species=sp or species,
                breed=breed,
                dataset=printable_path(root.name),
                layout=layout,
            )
        )
    return rows


# --------------------------------------------------------------------------- CSV


def _py(value: Any) -> Any:
    """A pandas cell as a plain Python value (int, float, bool, str or None) so rows pickle and serialise cleanly."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _read_csv(csv_path: Path) -> pd.DataFrame:
    """A labels CSV with a unique, non-empty ``path`` column.

    Nullable dtypes keep an int column int despite empty cells.
    """
    try:
        df = pd.read_csv(csv_path, dtype_backend="numpy_nullable", dtype={"path": str, "species": str, "breed": str})
    except FileNotFoundError:
        raise SourceError(f"{printable_path(csv_path)}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise SourceError(f"{printable_path(csv_path)}: cannot read CSV ({str(e).strip().splitlines()[0]})") from None
    if "path" not in df.columns:
        raise SourceError(f"{printable_path(csv_path)}: no 'path' column (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise SourceError(f"{printable_path(csv_path)}: no rows")
    paths = df["path"].astype("string").str.strip()
    empty = paths.isna() | (paths == "")
    if empty.any():
        line = int(empty.to_numpy().nonzero()[0][0]) + 2  # +1 for the header, +1 for 1-based lines
        raise SourceError(f"{printable_path(csv_path)}: line {line}: empty path")
    dup = paths[paths.duplicated()]
    if not dup.empty:
        raise SourceError(f"{printable_path(csv_path)}: path {dup.iloc[0]!r} is listed more than once")
    df["path"] = paths
    return df


def _csv_file_path(csv_dir: Path, value: str) -> Path:
    # normpath, not resolve(): ".." is folded but a symlinked file stays the link.
    return Path(os.path.normpath(csv_dir / value))


def _csv_rows(csv_path: Path, species: str | None) -> list[CatalogRow]:
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise SourceError(f"{printable_path(csv_path)}: no such file")
    csv_path = csv_path.resolve()
    df = _read_csv(csv_path)
    csv_dir = csv_path.parent
    extra = [c for c in df.columns if c not in ("path", "species", "breed")]
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        path = _csv_file_path(csv_dir, rec["path"])
        try:
            relpath = path.relative_to(csv_dir).as_posix()
        except ValueError:
            relpath = path.as_posix()  # outside the CSV's folder: the absolute path is the only honest name
        rows.append(
            CatalogRow(
                path=path,
                relpath=relpath,
                # Listed-but-missing files stay: the extractor records them as "file not found".
                species=_species(rec.get("species"), f"{printable_path(csv_path)}: line {i + 2}") or species,
                breed=_breed(rec.get("breed")),
                dataset=printable_path(csv_path.stem),
                layout="csv",
                labels={str(c): _py(rec[c]) for c in extra},
            )
        )
    rows.sort(key=lambda r: r.relpath)
    return rows


# --------------------------------------------------------------------------- public


def scan(root: Path, *, layout: str = "auto", species: str | None = None) -> list[CatalogRow]:
    """Every photo of a dataset as a ``CatalogRow``, sorted by ``relpath``.

    ``layout`` is ``"auto"`` or one of ``LAYOUTS``; a forced layout that does not fit the
    folder is a SourceError. ``species`` ("cat"/"dog") fills the species of rows whose
    layout does not state one (flat, breed-folders, csv without a value) and never
    overrides a stated one.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise SourceError(f"{printable_path(root)}: unknown layout {layout!r} (choose from auto, {', '.join(LAYOUTS)})")
    fill = _species(species, f"{printable_path(root)}: species argument")
    root = Path(root)
    if _is_csv(root) and layout in ("auto", "csv"):
        return _csv_rows(root, fill)
    if layout == "csv":
        raise SourceError(f"{printable_path(root)}: layout 'csv' needs a .csv file, not a folder")
    if _is_csv(root):
        raise SourceError(f"{printable_path(root)}: layout {layout!r} needs a folder, not a .csv file")
    resolved = _check_root(root)
    paths = _walk_images(resolved)
    if not paths:
        raise _no_images(resolved)
    chosen = _detect(paths) if layout == "auto" else layout
    return _folder_rows(resolved, paths, chosen, fill)


def join_labels(rows: list[CatalogRow], csv_path: Path) -> tuple[list[CatalogRow], int]:
    """Add a CSV's columns to matching rows; returns ``(rows, number of rows matched)``.

    A row matches a CSV line by absolute path (CSV paths are relative to the CSV's folder),
    else by ``relpath``, else by file name when that name is unique both in the CSV and in
    ``rows``. Other columns are merged into ``labels`` (CSV values win over earlier labels);
    ``species``/``breed`` columns fill those fields only where they are ``None``. Unmatched
    rows are returned unchanged, so the count is how the caller tells how well it joined.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise SourceError(f"{printable_path(csv_path)}: no such file")
    csv_path = csv_path.resolve()
    df = _read_csv(csv_path)
    extra = [c for c in df.columns if c not in ("path", "species", "breed")]
    records = df.to_dict("records")

    by_abs: dict[Path, int] = {}
    by_rel: dict[str, int] = {}
    for n, rec in enumerate(records):
        by_abs.setdefault(_csv_file_path(csv_path.parent, rec["path"]), n)
        by_rel.setdefault(PurePosixPath(rec["path"].replace("\\", "/")).as_posix(), n)
    csv_names = Counter(Path(rec["path"]).name for rec in records)
    row_names = Counter(r.path.name for r in rows)
    by_name = {Path(rec["path"]).name: n for n, rec in enumerate(records) if csv_names[Path(rec["path"]).name] == 1}

    def match(row: CatalogRow) -> int | None:
        if row.path in by_abs:
            return by_abs[row.path]
        if row.relpath in by_rel:
            return by_rel[row.relpath]
        # A bare file name is only trusted when it picks out one CSV line and one row.
        return by_name.get(row.path.name) if row_names[row.path.name] == 1 else None

    out: list[CatalogRow] = []
    matched = 0
    for row in rows:
        i = match(row)
        if i is None:
            out.append(row)
            continue
        matched += 1
        rec = records[i]
        out.append(
            replace(
                row,
                species=row.species or _species(rec.get("species"), f"{printable_path(csv_path)}: line {i + 2}"),
                breed=row.breed or _breed(rec.get("breed")),
                labels={**row.labels, **{str(c): _py(rec[c]) for c in extra}},
            )
        )
    return out, matched
