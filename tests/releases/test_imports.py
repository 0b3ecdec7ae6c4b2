"""The release wing's shape, kept by a test: no import cycle among `modelcd.releases`
modules, and the three drivers (local runner, external-pipeline driver, stage commands)
reach the engine without importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

import modelcd.releases

PACKAGE = "modelcd.releases"
DRIVERS = {f"{PACKAGE}.runner", f"{PACKAGE}.external", f"{PACKAGE}.stage_commands"}


def _imports(path: Path) -> set[str]:
    """Every module of the package this file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith(PACKAGE + ".") and n.count(".") == 2}
    return found


def _graph() -> dict[str, set[str]]:
    folder = Path(modelcd.releases.__file__).parent
    modules = {f"{PACKAGE}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_release_wing() -> None:
    assert _cycle(_graph()) is None, " → ".join(_cycle(_graph()) or [])


def test_the_drivers_use_the_engine_and_not_each_other() -> None:
    graph = _graph()
    for driver in sorted(DRIVERS):
        assert f"{PACKAGE}.engine" in graph[driver], driver
        assert not graph[driver] & (DRIVERS - {driver}), (driver, graph[driver] & DRIVERS)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
