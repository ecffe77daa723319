"""The label columns of a store's images: which exist, and which are groups rather than a numeric scale."""

from __future__ import annotations

import pandas as pd

from indexer.store import Store, schema

# Integer columns with at most this many distinct values are groups (a 1-5 rating), not a scale.
MAX_INTEGER_GROUPS = 20


def label_columns(store: Store) -> list[str]:
    """Columns an image can be grouped or coloured by: species, breed, then any joined label column."""
    extra = [c for c in store.images.columns if c not in schema.IMAGE_COLUMNS]
    return ["species", "breed", *extra]


def is_categorical(series: pd.Series) -> bool:
    """Strings, booleans and small-valued integers are groups; other numbers are a scale."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return True
    return bool(pd.api.types.is_integer_dtype(series) and series.nunique() <= MAX_INTEGER_GROUPS)
