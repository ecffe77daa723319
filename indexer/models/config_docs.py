"""What the model configs (``MapperConfig``, ``VAEConfig``) share: the help text of their fields, read from the
source, and the refusal of keys they do not know.

A field is documented by an attribute docstring (PEP 257): a string literal on the line(s) right after it::

    id_dim: int = 64
    \"\"\"Size of z_id.\"\"\"

:func:`field_docs` reads these with ``ast`` (they are not kept at run time), e.g. for ``--help`` texts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any


def _class_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built-in or defined where there is no source (a REPL)
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: attribute docstring}`` of a class, base classes' fields included (a subclass's doc wins).

    Docstrings are dedented as ``inspect.cleandoc`` does. A field without one is absent. For a dataclass only its
    fields count, in field order.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_class_docs(klass))
    if dataclasses.is_dataclass(cls):
        return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}
    return docs


def check_config_keys(cls: type, d: Mapping[str, Any], error: type[Exception], what: str) -> None:
    """Raise ``error`` naming the keys of ``d`` that are not fields of the dataclass ``cls``.

    A config from a newer version: refuse it rather than silently train or build a different model.
    """
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise error(f"unknown {what} config keys: {sorted(unknown)}")
