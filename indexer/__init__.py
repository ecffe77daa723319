"""Mammals Space indexer: photos -> catalog rows -> embeddings -> a store of Parquet tables and FAISS indexes."""

__version__ = "0.1.0"
