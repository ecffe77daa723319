"""The house's layering, checked on the source: which package may import which, and no import cycles.

Layers, bottom up: ``indexer`` (the store at its bottom) < ``data`` and ``analysis`` < ``dashboard``.  A module
may import its own layer and the ones below; commands (``cli``/``commands`` modules) are leaves that nothing but
the CLI machinery loads, through the ``mammals.commands`` entry points.  Every import counts, including those
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("indexer", "data", "analysis", "dashboard")
# What each top-level package may import from the others (its own modules always).
ALLOWED = {
    "indexer": set(),
    "data": {"indexer"},
    "analysis": {"indexer"},
    "dashboard": {"analysis", "indexer"},
}
# The dashboard reads the store (the shared database) and the CLI machinery; all else comes through analysis.
DASHBOARD_FROM_INDEXER = ("indexer.store", "indexer.cli", "indexer.errors")
COMMAND_MODULES = {"indexer.cli", "indexer.commands", "analysis.cli", "dashboard.cli", "data.cli"}
# The store is the bottom of indexer: it knows the defaults, the version, the error type and the lazy-namespace
# helper, nothing above.
STORE_MAY_IMPORT = ("indexer.store", "indexer.defaults", "indexer.errors", "indexer.lazy", "indexer")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The modules of this repo that ``name`` imports (``from a.b import c`` is ``a.b.c`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text("utf-8"), str(path))
    # A script's `if __name__ == "__main__":` block runs only as a script: it may call the CLI.
    script = {id(n) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
              for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in script:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import indexer.store.schema` names the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                yield t


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def test_the_walk_sees_the_imports() -> None:
    # A check that found nothing would pass for the wrong reason.
    assert len(MODULES) > 50
    assert "indexer.store" in GRAPH["analysis.maps"] or "indexer.store.store" in GRAPH["analysis.maps"]
    assert "analysis.neighbours" in GRAPH["analysis.evaluate"]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_import_only_the_layers_below(pkg: str) -> None:
    bad = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() if mod.split(".")[0] == pkg for dep in deps
           if dep.split(".")[0] != pkg and dep.split(".")[0] not in ALLOWED[pkg]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_dashboard_reaches_indexer_only_for_the_store() -> None:
    bad = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() if mod.startswith("dashboard") for dep in deps
           if dep.startswith("indexer") and not dep.startswith(DASHBOARD_FROM_INDEXER)]
    assert not bad, "the dashboard calls analysis, not the indexer:\n" + "\n".join(bad)


def test_only_commands_import_commands() -> None:
    # Commands and scripts (a module run as `python -m`) may use the CLI machinery in indexer.cli; libraries
    # never import a command module.
    scripts = {m for m, path in MODULES.items() if '__name__ == "__main__"' in path.read_text("utf-8")}
    bad = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() for dep in deps
           if dep in COMMAND_MODULES and not (mod in COMMAND_MODULES | scripts and dep == "indexer.cli")]
    assert not bad, "\n".join(bad)


def test_the_store_sits_at_the_bottom() -> None:
    bad = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() if mod.startswith("indexer.store") for dep in deps
           if not (dep == "indexer" or dep.startswith(STORE_MAY_IMPORT[:-1]))]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph: every component must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_importing_the_cli_loads_no_analysis_or_dashboard() -> None:
    code = ("import sys, indexer.cli; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'dashboard', 'data'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
