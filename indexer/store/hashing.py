"""File hashes: the identity of weights files and models recorded in a store's manifest (one helper for all)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file as it is now (``hashlib.file_digest``: chunked, no whole-file read).

    ``algorithm`` is any ``hashlib.new`` name; md5 (dataset checksums) is flagged as not used for security."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, functools.partial(hashlib.new, algorithm, usedforsecurity=False)).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of the file as it is now: the identity of weights files and models in a manifest."""
    return file_digest(path, "sha256")


def file_sha256_cached(path: str | Path) -> str:
    """:func:`file_sha256` cached per (real path, mtime, size), so repeated model loads (one per query) hash once.

    Not for verification: a same-sized file swapped within one mtime tick would keep its old digest."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _cached(real, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _cached(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # only part of the cache key
    return file_sha256(path)
