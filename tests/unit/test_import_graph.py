"""The package's import graph has no circles, and the layers below the command line never import it.

Every import counts: module level, inside functions, under TYPE_CHECKING. A lazy import inside a function still
ties the two modules together (one cannot be understood or moved without the other), so it is an edge here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "llama3_hyperpod"
CLI = f"{PACKAGE}.cli"
BELOW_CLI = (f"{PACKAGE}.torch_backend", f"{PACKAGE}.cache")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module a dotted name lives in (`pkg.mod.func` -> `pkg.mod`), None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` imports pkg.mod; `from pkg.mod import func` imports pkg.mod.
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {target for name in names if (target := _resolve(name, modules)) is not None}
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    """The checks below mean something only if the graph holds the edges we know exist."""
    graph = import_graph()
    assert f"{PACKAGE}.plan" in graph[CLI]
    assert f"{PACKAGE}.cache.commands" in graph[CLI]  # a function-level import counts
    assert f"{PACKAGE}.config" in graph[f"{PACKAGE}.graphkey"]  # a TYPE_CHECKING import counts


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_command_line_imports_it() -> None:
    offenders = sorted(m for m, edges in import_graph().items() if m.startswith(BELOW_CLI) and CLI in edges)
    assert not offenders, f"{', '.join(offenders)} import {CLI}: move what they need below it (plan.py, errors.py)"


def test_the_cache_reads_plain_data() -> None:
    """The cache's core takes what the plan carries: it imports neither the plan, the config nor the image tools."""
    upward = (f"{PACKAGE}.plan", f"{PACKAGE}.config", f"{PACKAGE}.image")
    graph = import_graph()
    offenders = sorted(f"{m} -> {e}" for m, edges in graph.items()
                       if m.startswith(f"{PACKAGE}.cache.") and m != f"{PACKAGE}.cache.commands"
                       for e in edges if e.startswith(upward))
    assert not offenders, offenders
