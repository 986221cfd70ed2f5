"""The layout holds: no import cycle inside `convert`, `train`, `benchmarks` or `edge_runtime`, nor across them,
and `edge_runtime` (the device layer) imports none of the others; counted from the source.

    python -m pytest -q tests/test_layout.py

Read with `ast`, not by importing: an import inside a function is an edge of
the graph too (it is how a cycle hides), while one under `if TYPE_CHECKING:`
is not (it never runs). An import of `a.b.c` is an edge to `a.b.c` alone, not
to the packages `a` and `a.b` it also initialises: a package's `__init__`
re-exporting its submodules would otherwise look like a cycle with each of
them, which Python resolves without trouble.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("convert", "train", "benchmarks", "edge_runtime")  # the project's own top-level packages


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of `packages` under `root`."""
    found = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = p
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name `tree` imports (top level and inside functions); `from a import b` as "a.b"."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # only the else branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.extend(f"{base}.{a.name}" if base else a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(package: str, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Counter]:
    """Module of `package` -> Counter of the project modules it imports (how many import statements name each).

    `packages`: what counts as the project's own (edges to other packages of it are kept, so a caller can
    look across packages; `find_cycle` on one package's graph ignores them).
    """
    known = _modules(root, packages)
    graph: dict[str, Counter] = {}
    for name, path in _modules(root, (package,)).items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: Counter = Counter()
        for n in _imported_names(tree, name, path.name == "__init__.py"):
            # "a.b.name" -> the longest known module: `from a.b import name` is an edge to a.b, or to the
            # submodule a.b.name when it is one.
            target = n
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges[target] += 1
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, Counter], within: str | None = None) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None; `within`: only modules of that package count."""

    def inside(m: str) -> bool:
        return within is None or m == within or m.startswith(within + ".")

    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph if inside(m)}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        colour[m] = GREY
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in colour:
                continue
            if colour[n] == GREY:
                return stack[stack.index(n):] + [n]
            if colour[n] == WHITE and (found := dfs(n)):
                return found
        stack.pop()
        colour[m] = BLACK
        return None

    for m in sorted(colour):
        if colour[m] == WHITE and (found := dfs(m)):
            return found
    return None


# ---------------------------------------------------------------- the helpers themselves


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_import_graph_sees_function_imports_and_skips_type_checking(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "import os\n\ndef f():\n    from pkg import b\n    from pkg.b import g\n    return b, g\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n\n"
                     "def g():\n    pass\n"),
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import f\nfrom . import d\n",
        "pkg/sub/d.py": "",
    })
    graph = import_graph("pkg", tmp_path, ("pkg",))
    assert graph["pkg.a"] == Counter({"pkg.b": 2})  # both inside a function; os is not the project's
    assert graph["pkg.b"] == Counter()  # TYPE_CHECKING only
    assert graph["pkg"] == Counter({"pkg.a": 1})
    assert graph["pkg.sub.c"] == Counter({"pkg.a": 1, "pkg.sub.d": 1})  # relative imports resolved
    assert find_cycle(graph) is None


def test_find_cycle_finds_one_hidden_in_a_function(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import g\n",
        "pkg/b.py": "def g():\n    from pkg.c import h\n",
        "pkg/c.py": "def h():\n    import pkg.a\n",
    })
    cycle = find_cycle(import_graph("pkg", tmp_path, ("pkg",)))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b", "pkg.c"}


# ---------------------------------------------------------------- the project


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) > 3  # the package was found and read
    cycle = find_cycle(graph, within=package)
    assert cycle is None, f"{package} has an import cycle: {' -> '.join(cycle)}"


def test_no_import_cycle_across_the_packages():
    graph: dict[str, Counter] = {}
    for package in PACKAGES:
        graph.update(import_graph(package))
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_edge_runtime_imports_none_of_the_other_packages():
    """The bottom layer: what a Pi installs imports nothing from train, convert or benchmarks, not even inside a
    function (their dependencies are not installed there)."""
    upward = sorted(f"{m} -> {t}" for m, edges in import_graph("edge_runtime").items() for t in edges
                    if not t.startswith("edge_runtime"))
    assert not upward, "edge_runtime imports from the layers above it: " + ", ".join(upward)
