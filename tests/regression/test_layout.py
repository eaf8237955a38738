"""The tests' layout: tests/unit/ runs in process (no subprocess, no new interpreter), and every test file sits in
a layer's folder."""

from __future__ import annotations

import ast

from tests.conftest import LONGEST_FIRST, ROOT

TESTS = ROOT / "tests"
LAYERS = ("unit", "integration", "gpu", "regression")
# Modules whose import means another process: the integration helpers run sweeps as processes.
PROCESS_MODULES = ("subprocess", "multiprocessing", "torch.multiprocessing", "pexpect", "pty", "tests.integration")
PROCESS_CALLS = {"sys": {"executable"}, "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}}


def process_starts(source: str) -> list[str]:
    """What in ``source`` starts, or imports a way to start, another process (``os.spawn*``, ``os.exec*`` too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_process_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _is_process_module(node.module):
                found.append(node.module)
            elif node.module in PROCESS_CALLS:
                found += [f"{node.module}.{a.name}" for a in node.names if _is_process_call(node.module, a.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PROCESS_CALLS:
            if _is_process_call(node.value.id, node.attr):
                found.append(f"{node.value.id}.{node.attr}")
    return found


def _is_process_module(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in PROCESS_MODULES)


def _is_process_call(module: str, name: str) -> bool:
    return name in PROCESS_CALLS[module] or (module == "os" and name.startswith(("spawn", "exec")))


def test_unit_tests_start_no_process():
    found = {
        path.relative_to(ROOT).as_posix(): starts
        for path in sorted((TESTS / "unit").rglob("*.py"))
        if (starts := process_starts(path.read_text()))
    }
    assert not found, f"tests/unit/ runs in process; move these tests to tests/integration/: {found}"


def test_the_check_sees_each_way_to_start_a_process():
    starts = [
        "import subprocess",
        "from subprocess import run",
        "def f():\n    import multiprocessing",
        "import torch.multiprocessing as mp",
        "cmd = [sys.executable, '-m', 'src.train']",
        "os.system('true')",
        "os.execv('/bin/true', [])",
        "from os import spawnl",
        "from tests.integration.sweeping import sweep",
    ]
    assert [source for source in starts if not process_starts(source)] == []
    in_process = "import os, sys\nfrom src.sweeps.job import run_pack_job\nx = os.path.join(sys.prefix, 'os.system')"
    assert process_starts(in_process) == []


def test_every_test_file_sits_in_a_layer():
    stray = [
        path.relative_to(ROOT).as_posix()
        for path in TESTS.rglob("test_*.py")
        if path.relative_to(TESTS).parts[0] not in LAYERS
    ]
    assert not stray, f"test files outside tests/{{{','.join(LAYERS)}}}/: {stray}"


def test_the_files_started_first_exist():
    assert [path for path in LONGEST_FIRST if not (ROOT / path).is_file()] == []
