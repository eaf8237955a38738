"""The commands of README.md and docs/*.md are the project's: every block fenced as ```bash cpu``` runs as written,
line by line, and every other ``python -m src.X`` command (in a ```bash``` block or inline code) names only real
config keys, group options and flags.

A ``bash cpu`` command runs in a scratch directory that links the project's conf/ and sweeps/ (so it looks like the
project root, but its outputs/ are its own), with the project on PYTHONPATH and a scratch MLflow store, beside which a
study keeps its optuna.db; nothing else about the command is changed. The other commands are not run: the overrides
of ``src.train`` and ``src.plan`` are checked as ``src.train`` checks them before Hydra reads them (the keys against
the schema, the options against the config groups, with the command's ``-cd`` and ``-cn``), and every ``--flag`` of
the other entry points must be one their ``--help`` lists.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import optuna
import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```bash(?P<cpu> cpu)?\n(?P<body>.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:python|torchrun)\b[^`]*-m src\.\w+(?: [^`]*)?)`")


def block_lines(body: str) -> list[str]:
    """The block's commands: continued lines joined, comments dropped (a trailing comment is documentation)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def blocks(cpu: bool) -> list[str]:
    return [
        command
        for page in PAGES
        for match in BLOCK.finditer(page.read_text())
        if bool(match["cpu"]) == cpu
        for command in block_lines(match["body"])
    ]


def runnable_commands() -> list[str]:
    return blocks(cpu=True)


def commands_in(line: str) -> list[list[str]]:
    """Each ``python -m src.X ...`` (or ``torchrun ... -m src.X ...``) of a shell line, as its argv from ``src.X`` on:
    the line split at ``&&``, ``|`` and ``;``, a redirection and its file left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    words, found, segment = list(lexer), [], []
    for i, word in enumerate([*words, ";"]):
        if set(word) & set("|&;"):
            if "-m" in segment[:-1] and segment[segment.index("-m") + 1].startswith("src."):
                found.append(segment[segment.index("-m") + 1 :])
            segment = []
        elif not (set(word) <= set("<>") or (i and set(words[i - 1]) <= set("<>"))):
            segment.append(word)
    return found


def project_commands() -> list[list[str]]:
    """The pages' commands that are not run: those of the other bash blocks, and those in inline code."""
    lines = blocks(cpu=False) + [m for page in PAGES for m in INLINE.findall(page.read_text())]
    unique = dict.fromkeys(tuple(argv) for line in lines for argv in commands_in(line))  # the README repeats some
    return [list(argv) for argv in unique]


def test_the_pages_mark_runnable_blocks():
    commands = runnable_commands()
    assert len(commands) >= 4 and any("-cn rank_alpha" in c for c in commands), commands
    checked = project_commands()
    modules = {argv[0] for argv in checked}
    assert {"src.train", "src.plan", "src.compare", "src.predict", "src.export", "src.doctor", "src.bench"} <= modules
    assert ["src.train", "-cd", "sweeps", "-cn", "rank_alpha"] in checked  # a block line
    assert ["src.doctor", "--dry-run"] in checked  # inline code in the README's table


def test_the_split_finds_each_command():
    line = 'echo "a b" | X=0 python -m src.predict --adapter DIR && python -m src.compare -f x > o.csv'
    assert commands_in(line) == [["src.predict", "--adapter", "DIR"], ["src.compare", "-f", "x"]]
    assert commands_in("pip install optuna-dashboard && optuna-dashboard sqlite:///optuna.db") == []


@functools.cache
def listed_flags(module: str) -> frozenset[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])--[a-z][\w-]*", done.stdout))


@functools.cache
def config_groups(primary: Path, name: str, extra: Optional[Path]) -> Optional[dict[str, list[str]]]:
    from src import overrides

    return overrides.group_options(primary, name, extra)


def override_problems(argv: list[str]) -> list[str]:
    """What ``src.train``'s preflight says of these arguments (``src.plan``'s ``--pack OVERRIDES`` too)."""
    from src import overrides
    from src.config import CONF_DIR, Config

    args, packed = [], []
    for i, word in enumerate(argv):
        if i and argv[i - 1] == "--pack":
            packed += shlex.split(word)
        elif word != "--pack":
            args.append(word)
    line = overrides.parse_command_line(args)
    primary = overrides.primary_dir(line.config_path, CONF_DIR, ROOT / "src")
    extra = ROOT / line.config_dir if line.config_dir else None
    name = line.config_name or "config"
    if not any((folder / f"{name}.yaml").is_file() for folder in (extra, primary) if folder):
        return [f"-cn {name}: no such config"]
    groups = config_groups(primary, name, extra)
    if groups is None:
        return [f"the config {name} cannot be read"]
    return overrides.problems([*line.overrides, *packed], Config, groups)


def test_the_check_finds_a_wrong_key_option_or_flag():
    assert override_problems(["lora.rank=8"]) and override_problems(["-cd", "sweeps", "-cn", "rank_alfa"])
    assert override_problems(["--pack", "lora=attn_vq"])
    assert not override_problems(["-cd", "sweeps", "-cn", "rank_alpha", "lora.r=4", "--pack", "lora=attn_qv"])
    assert "--dry-run" in listed_flags("src.doctor") and "--dry-runs" not in listed_flags("src.doctor")


@pytest.mark.parametrize("argv", project_commands(), ids=lambda argv: " ".join(argv)[:70])
def test_documented_command_names_real_keys_and_flags(argv):
    module, args = argv[0], argv[1:]
    assert (ROOT / f"{module.replace('.', '/')}.py").is_file(), f"{module}: no such module"
    if module in ("src.train", "src.plan"):
        assert not override_problems(args), override_problems(args)
        return
    flags = {word.split("=", 1)[0] for word in args if word.startswith("--")}
    if flags:
        assert flags <= listed_flags(module), f"{module}: {sorted(flags - listed_flags(module))} not in its --help"


# The default tier runs the study; the four training runs (over a minute together) run in the slow tier, where
# tests/integration/test_train_cli.py also checks that the default run learns. Their tasks stay in the default tier end
# to end: `python -m src.train` shortened in tests/integration/test_console_cli.py, SFT, chat and multilabel in
# tests/unit/test_fit.py.
SLOW_COMMANDS = ("data=instructions", "data=chat", "data=topics_multilabel")
OPTUNA_SWEEPS = ("rank_alpha", "pareto")


def slow(command: str) -> bool:
    words = command.split()
    return words == ["python", "-m", "src.train"] or any(key in words for key in SLOW_COMMANDS)


def tiered(commands: list[str]) -> list:
    return [pytest.param(c, marks=pytest.mark.slow) if slow(c) else c for c in commands]


@pytest.mark.parametrize("command", tiered(runnable_commands()), ids=lambda c: c[:70])
def test_readme_command_runs_as_written(command, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for folder in ("conf", "sweeps"):  # the commands are written for the project root (-cd sweeps)
        (tmp_path / folder).symlink_to(ROOT / folder)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    if any(f"-cn {name}" in command for name in OPTUNA_SWEEPS):
        # The study's storage is optuna.db beside the MLflow store (its first line says so), and a shrunk study
        # must learn something: its trials differ.
        storage = f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
        assert f"Optuna study in {storage} (default: beside the MLflow store)" in done.stdout, done.stdout[-2000:]
        summaries = optuna.get_all_study_summaries(storage)
        assert len(summaries) == 1, summaries
        study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
        values = [t.value for t in study.get_trials() if t.value is not None]
        assert len(values) >= 2 and len(set(values)) > 1, values
