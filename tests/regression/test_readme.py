"""The README's commands run as written: every block fenced as ```bash cpu``` is run here, line by line.

Each runs in a scratch directory that links the project's conf/ and sweeps/ (so it looks like the project root,
but its outputs/ are its own), with the project on PYTHONPATH and a scratch MLflow store, beside which a study
keeps its optuna.db; nothing else about the command is changed.
"""

from __future__ import annotations

import os
import re
import subprocess

import optuna
import pytest

from tests.conftest import ROOT

BLOCK = re.compile(r"^```bash cpu\n(.*?)^```", re.S | re.M)


def runnable_commands() -> list[str]:
    commands = []
    for block in BLOCK.findall((ROOT / "README.md").read_text()):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment is documentation
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_marks_runnable_blocks():
    commands = runnable_commands()
    assert len(commands) >= 4 and any("-cn rank_alpha" in c for c in commands), commands


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
