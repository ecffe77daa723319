"""Package namespaces that import their submodules on first use (PEP 562).

A package ``__init__`` that re-exports its submodules' names eagerly makes importing any one submodule import
them all: reading ``MapperConfig`` for `mammals --help` would import torch, and ``indexer.store.schema`` would
import deltalake and FAISS.  ``__getattr__ = lazy_attributes(__name__, {"Name": "submodule", ...})`` keeps the
short import path (``from indexer.models.mapper import MapperConfig``) without that cost.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<where[name]>`` when ``name`` is first looked up."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
