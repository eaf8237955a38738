"""The import graph of src/: no circle, and the core never imports the sweep layer.

Every ``import src.x`` / ``from src import x`` / ``from src.x import y`` counts, at module level or inside a
function (an import inside a function still makes a circle, only a hidden one).
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

SRC = ROOT / "src"
# The layers below the entry points: they must not know that sweeps exist (sweeps hand them what they need).
CORE = {"config", "data", "modeling", "training", "tracking", "plan", "guards", "tiny", "bundled", "distributed"}
SWEEP = {"sweeping", "sweeping_optuna", "sweeping_trial", "sweep_records", "doctor"}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        imported: set[str] = set()
        for node in ast.walk(ast.parse((SRC / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "src":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("src.")}
        graph[name] = (imported & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle once, as the path that closes it (depth-first search)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            circle = path[path.index(node) :] + [node]
            if not any(set(circle) == set(c) for c in found):
                found.append(circle)
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert {"train", "sweeping", "sweeping_trial", "training"} <= set(graph)  # the walk sees the real modules
    assert not cycles(graph), cycles(graph)


def test_the_core_imports_no_sweep_module():
    graph = import_graph()
    assert CORE <= set(graph)
    offenders = {name: sorted(graph[name] & SWEEP) for name in CORE if graph[name] & SWEEP}
    assert not offenders, offenders


def test_the_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
