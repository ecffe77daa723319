"""`mammals data list|show|download`: the dataset registry (``data/datasets.json``) on the command line.

Building the parser imports nothing beyond argparse: the registry module (and pooch, which it imports only to
download) are loaded when the command runs.  Data goes to stdout (``--json`` where it is data; the one line of
``download`` is the folder to index), logs and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.cli import EXIT_OK, Command

if TYPE_CHECKING:
    from data.registry import Dataset


def _conf(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=None, help="registry JSON (default: data/datasets.json)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        # -q/-v/--registry also after ACTION; SUPPRESS keeps a flag given before ACTION from being reset here.
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        sp.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    sp = add("list", "list the public datasets and the local photo sets")
    sp.add_argument("--json", action="store_true", help="print the registry entries as JSON")

    sp = add("show", "show one dataset: URLs, checksums, licence, layout")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true", help="print the registry entry as JSON")

    sp = add("download", "download, verify and extract a dataset into DEST; print the folder to index")
    sp.add_argument("name")
    sp.add_argument("dest", type=Path, help="destination folder (created if missing)")
    sp.add_argument("--force", action="store_true", help="download and extract again even if already done")
    sp.add_argument("--no-extract", action="store_true", help="only download and verify the archives")
    sp.add_argument("--delete-archives", action="store_true", help="delete each archive once extracted")
    sp.add_argument("--retries", type=int, default=2, metavar="N",
                    help="attempts after a failed one, per URL, before the next mirror (default %(default)s)")


def _run(a: argparse.Namespace) -> int:
    from data import registry as reg

    raw = reg.load_registry(a.registry or reg.REGISTRY_PATH)
    if a.action == "list":
        _list(raw, a.json)
    elif a.action == "show":
        _show(reg.get_dataset(a.name, raw), raw, a.json)
    else:
        ds = reg.get_dataset(a.name, raw)  # unknown names fail before anything is created
        if a.retries < 0:
            raise reg.RegistryError("--retries must be >= 0")
        try:
            folder = reg.download(a.name, a.dest, force=a.force, extract=not a.no_extract,
                                  delete_archives=a.delete_archives, progress=not a.quiet, retries=a.retries,
                                  registry=raw)
        except OSError as exc:  # disk full, permission denied: the user's to fix, one line
            raise reg.RegistryError(f"{a.name}: cannot write under {a.dest}: {exc}") from exc
        print(folder)  # the one line on stdout, so that scripts can capture it
        if not a.no_extract:
            reg.log.info("index it with: %s   (layout %s, detected automatically)", reg.index_command(ds, folder),
                         ds.layout)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- output
def _human(n: int | None) -> str:
    """Bytes as a short human-readable string."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _list(raw: dict[str, Any], as_json: bool) -> None:
    from data.registry import list_datasets, local_sets

    if as_json:
        print(json.dumps({"datasets": raw["datasets"], "local": raw.get("local", [])}, indent=2))
        return
    rows: list[tuple[str, ...]] = [("name", "species", "layout", "size", "get", "licence")]
    for ds in list_datasets(raw):
        how = f"kaggle {ds.kaggle}" if ds.kaggle_only else "download"
        licence = re.split(r"[:;(]", ds.licence, maxsplit=1)[0].strip()  # up to its first clause
        rows.append((ds.name, ds.species, ds.layout, _human(ds.size_bytes), how, licence))
    _table(rows)
    print("\nlocal sets (relative to the repository root):")
    rows = [("name", "species", "layout", "images", "path")]
    rows += [(ls.name, ls.species, ls.layout, str(ls.images), ls.path) for ls in local_sets(raw)]
    _table(rows)


def _show(ds: Dataset, raw: dict[str, Any], as_json: bool) -> None:
    if as_json:  # the entry as stored, with the keys the Dataset record does not model
        print(json.dumps(next(e for e in raw["datasets"] if e.get("name") == ds.name), indent=2))
        return
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
        lines += [f"    mirror:   {m}" for m in rf.mirrors]
        lines.append(f"    md5:      {rf.md5 or '-'}")
        lines.append(f"    sha256:   {rf.sha256 or '-'}")
        lines.append(f"    checksum: {rf.source_of_checksum}")
    if ds.label_map:
        lines.append("  labels:     " + ", ".join(f"{k}={v}" for k, v in ds.label_map.items()))
    lines.append(f"  notes:      {ds.notes}")
    print("\n".join(lines))


DATA = Command("data", "list, show and download the public cat and dog datasets", _conf, _run)
