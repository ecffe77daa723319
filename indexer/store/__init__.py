"""The store: a directory of Delta Lake tables, FAISS index segments and a manifest that publishes versions.

The names below load on first use (indexer/lazy.py), so that importing a light submodule (``schema``,
``atomic``, ``hashing``) does not import deltalake and FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexer.lazy import lazy_attributes

if TYPE_CHECKING:
    from indexer.store.store import Space, Store, StoreError, library_versions, unit_rows, utcnow

_WHERE = {name: "store" for name in ("Space", "Store", "StoreError", "library_versions", "unit_rows", "utcnow")}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
