"""Atomic file writes: write a temp file beside the target, fsync, then rename over it.

A reader (or a run killed at any moment) therefore sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.  Created with mode 0o666 so
    # the umask decides (mkstemp's 0600 would make a lab's shared store unreadable to everyone else).
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the finished file onto ``target`` in one rename."""
    with _temp_beside(target) as tmp:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(target, write)


def atomic_write_json(target: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write_bytes(target, text.encode("utf-8"))


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files a killed run left behind (they are never read); return how many.

    Only the holder of the store's writer lock may call this: any other writer's temp file may be in use.
    """
    removed = 0
    if directory.is_dir():
        for p in directory.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
