"""The store: a directory of Delta Lake tables, FAISS index segments and a manifest that publishes versions."""

from indexer.store.store import Space, Store, StoreError, library_versions, unit_rows, utcnow

__all__ = ["Space", "Store", "StoreError", "library_versions", "unit_rows", "utcnow"]
