"""One logging rule: every line goes through the project logger (``src.logger``: ``log``, ``say``); ``print`` is
only for a command's stdout payload (a table, JSON, --help text, a path to pipe on).

The walk below reads every module of src/ with ``ast``: a ``print`` that writes to stderr (or a
``sys.stderr.write``) is a failure wherever it is, and a ``print`` to stdout is one outside the payload functions
named in :data:`STDOUT_PAYLOAD`.
"""

from __future__ import annotations

import ast
from collections import Counter

from tests.conftest import ROOT

SRC = ROOT / "src"

# "module:function" (nested functions joined by dots; "<module>" for module level, a ``__main__`` block) -> why
# its prints are the command's stdout payload.
STDOUT_PAYLOAD = {
    "src.runs.compare:main": "the comparison (a table, CSV, JSON or HTML), which a user pipes or redirects",
    "src.compare:main": "the comparison, or with --importance a study's importance table, which a user pipes",
    "src.doctor:main": "the stale runs, one per line (the count goes to stderr through the logger)",
    "src.plan:print_plans": "the memory plan: its table, then its JSON",
    "src.plan:print_pack": "a pack's plan: each trial's table, then the pack's table and JSON",
    "src.train:preflight": "--help text",
    "src.bundled:<module>": "python -m src.bundled: the paths of the files it wrote",
    "src.tiny:<module>": "python -m src.tiny: the model's directory",
}


def _is_stderr(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "stderr" and ast.unparse(node.value) == "sys"


def lines_out(tree: ast.AST, module: str) -> list[tuple[str, int, str]]:
    """Every print and ``sys.stderr.write`` in ``tree``: (``module:function``, line, "stdout" or "stderr")."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, where: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = [*where, child.name]
            if isinstance(child, ast.Call):
                key = f"{module}:{'.'.join(where) or '<module>'}"
                if isinstance(child.func, ast.Name) and child.func.id == "print":
                    file = next((k.value for k in child.keywords if k.arg == "file"), None)
                    to_stderr = file is not None and _is_stderr(file)
                    found.append((key, child.lineno, "stderr" if to_stderr else "stdout"))
                elif (
                    isinstance(child.func, ast.Attribute)
                    and child.func.attr == "write"
                    and _is_stderr(child.func.value)
                ):
                    found.append((key, child.lineno, "stderr"))
            visit(child, inner)

    visit(tree, [])
    return found


def refused(found: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The lines the rule refuses: every one to stderr, and those to stdout outside :data:`STDOUT_PAYLOAD`."""
    return [(key, line, stream) for key, line, stream in found if stream == "stderr" or key not in STDOUT_PAYLOAD]


def _all_lines_out() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found += lines_out(ast.parse(path.read_text(encoding="utf-8")), module)
    return found


def test_every_line_goes_through_the_logger_and_print_is_only_a_commands_stdout_payload():
    counts = Counter(key for key, _, _ in refused(_all_lines_out()))
    assert not counts, f"print to stderr, or outside a stdout payload: use src.logger.say / log instead: {counts}"


def test_every_stdout_payload_function_still_prints():
    printing = {key for key, _, stream in _all_lines_out() if stream == "stdout"}
    assert set(STDOUT_PAYLOAD) <= printing, set(STDOUT_PAYLOAD) - printing


def test_a_new_stderr_print_is_refused_even_in_a_payload_function():
    source = (
        "import sys\n"
        "def main():\n"
        "    print(table)\n"
        "    print('note: x', file=sys.stderr)\n"
        "    sys.stderr.write('y')\n"
        "def helper():\n"
        "    print('progress')\n"
        "    print(x, file=out)\n"
    )
    found = lines_out(ast.parse(source), "src.runs.compare")
    assert refused(found) == [
        ("src.runs.compare:main", 4, "stderr"),
        ("src.runs.compare:main", 5, "stderr"),
        ("src.runs.compare:helper", 7, "stdout"),
        ("src.runs.compare:helper", 8, "stdout"),
    ]


def test_the_walk_finds_module_level_and_nested_prints():
    source = "def main():\n    def body():\n        print(1)\nif __name__ == '__main__':\n    print(2)\n"
    assert lines_out(ast.parse(source), "src.x") == [("src.x:main.body", 3, "stdout"), ("src.x:<module>", 5, "stdout")]
