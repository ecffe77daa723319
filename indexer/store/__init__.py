"""The store: a directory of Delta Lake tables, FAISS index segments and a manifest that publishes versions.

The names below load on first use (PEP 562), so that importing a light submodule (``schema``, ``atomic``,
``hashing``) does not import deltalake and FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.store.store import Space, Store, StoreError, library_versions, unit_rows, utcnow

__all__ = ["Space", "Store", "StoreError", "library_versions", "unit_rows", "utcnow"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("indexer.store.store"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
