"""File hashes: the identity of weights files and models recorded in a store's manifest."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (path, mtime, size) so repeated loads (one per query) hash once."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _sha256_cached(real, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # only part of the cache key
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
