"""The import graph of src/: no circle, and every import runs down the layers, never up.

The layers, top down: the entry points (``src/<name>.py``, what users type); ``src.runs`` (finished runs) and
``src.sweeps`` (many runs); ``src.packs`` (trials sharing one base); ``src.fit`` (one run); ``src.engine`` (the fast
path's flat batches, CUDA graphs and memory budget; ``src.runs`` predicts with it); then the core (the other flat
modules). ``docs/architecture.md`` draws the same table.
Every ``import src.x`` / ``from src import x`` / ``from src.x import y`` counts, at module level or inside a
function (an import inside a function still makes a circle, only a hidden one).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SRC = ROOT / "src"
ENTRY_POINTS = {"src.train", "src.compare", "src.predict", "src.export", "src.bench", "src.doctor", "src.plan"}
CORE = {
    f"src.{name}"
    for name in (
        "config",
        "config_rules",
        "config_schema",
        "config_checks",
        "data",
        "modeling",
        "training",
        "tracking",
        "memory",
        "errors",
        "console",
        "logger",
        "paths",
        "guards",
        "hub",
        "distributed",
        "tiny",
        "bundled",
        "fp8",
        "names",
        "labels",
        "tables",
        "splits",
        "outputs",
        "reserve",
        "overrides",
        "chat",
        "classifier",
        "trial",
        "optuna_compat",
        "training_args",
        "ui_links",
        "system_metrics",
    )
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules an ast imports anywhere in it: ``from src.a import b`` counts src.a.b where that is a
    module, else src.a."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "src"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "src":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        imported = imported_names(ast.parse(path.read_text()), modules)
        # A package's __init__ runs before any module of it: importing src.x.y imports src.x too; src itself imports
        # only src.console.
        graph[name] = {m for m in imported if m != "src"} - {name}
    return graph


def layer(name: str) -> str:
    if name in ENTRY_POINTS:
        return "entry"
    if name in CORE:
        return "core"
    package = name.split(".")[1]
    assert package in ALLOWED, f"{name}: not in a known layer; add it to tests/regression/test_imports.py"
    return package


# What each layer may import, besides its own modules.
ALLOWED = {
    "entry": {"entry", "runs", "sweeps", "packs", "fit", "engine", "core"},
    "runs": {"core", "engine"},  # predict classifies flat rows, as training does
    "sweeps": {"core", "packs", "fit"},  # a job runs src.fit.run, a pack job src.packs.runtime, both by name
    "packs": {"core", "engine", "fit"},
    "fit": {"core", "engine"},
    "engine": {"core"},
    "core": {"core"},
}


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
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    expected = {"src.train", "src.sweeps.job", "src.sweeps.grid", "src.engine.trainer", "src.training", "src.fit"}
    assert expected <= set(graph)
    assert "src.fit" in graph["src.train"] and "src.sweeps.job" in graph["src.train"]  # the walk sees imports
    assert not cycles(graph), cycles(graph)


def test_the_core_imports_no_sweep_module():
    graph = import_graph()
    assert CORE <= set(graph)
    offenders = {name: sorted(m for m in graph[name] if m.startswith("src.sweeps")) for name in CORE}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_every_import_runs_down_the_layers():
    """Each layer imports only the layers ALLOWED says, all below it: no import runs back
    up (the sweeps never import src.train, which hands them its training function), and no other package knows
    another."""
    graph = import_graph()
    offenders = {}
    for name, imported in graph.items():
        if name == "src":
            continue
        here = layer(name)
        for other in imported:
            there = layer(other)
            if there == here or there in ALLOWED[here]:
                continue
            offenders.setdefault(name, []).append(other)
    assert not offenders, offenders


def test_the_entry_points_stay_where_users_type_them():
    for name in ENTRY_POINTS | {"src.plan"}:
        tree = ast.parse((ROOT / f"{name.replace('.', '/')}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        defined |= {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}
        assert "main" in defined, name  # its own, or the one of the module it delegates to
        assert any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body), name


def test_the_walk_sees_function_level_imports():
    tree = ast.parse("def f():\n    from src.sweeps import job\n    import src.engine.trainer\n")
    assert imported_names(tree, {"src.sweeps", "src.sweeps.job", "src.engine.trainer"}) == {
        "src.sweeps.job",
        "src.engine.trainer",
    }


def test_the_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


# The names several modules define on purpose, each meaning the same thing in its own module: a command's entry and
# argument parser, the module logger, a type variable.
SAME_IDEA_EVERYWHERE = {"main", "parse_args", "log", "T", "__all__"}


def top_level_names(paths, base: Path = ROOT) -> dict[str, list[str]]:
    """Each public top-level function, class and constant of the modules, with the modules (relative to ``base``)
    that define it."""
    defined: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("_"):
                    defined.setdefault(name, []).append(str(path.relative_to(base)))
    return defined


def test_no_two_modules_give_one_name_to_two_things():
    """One word per idea: a public name defined in two modules (``SAMPLERS`` a dict here and a tuple there,
    ``format_table`` three times) reads as one thing and is two; import aliases then dodge the clash."""
    paths = [*SRC.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    twins = {n: where for n, where in top_level_names(paths).items() if len(where) > 1}
    assert not {n: w for n, w in twins.items() if n not in SAME_IDEA_EVERYWHERE}, twins


def test_the_twin_check_finds_a_twin(tmp_path):
    (tmp_path / "a.py").write_text("SAMPLERS = {}\ndef _private(): ...\nclass Pack: ...\n")
    (tmp_path / "b.py").write_text("SAMPLERS: tuple = ()\ndef _private(): ...\ndef main(): ...\n")
    found = top_level_names(sorted(tmp_path.glob("*.py")), base=tmp_path)
    assert found == {"SAMPLERS": ["a.py", "b.py"], "Pack": ["a.py"], "main": ["b.py"]}
