"""What a user can fix is one line, through the real command as a process (``src.train``, a sweep, ``src.predict``,
``src.export``) exits 2 with exactly one ``error:`` line and no traceback, and a run that started ends FAILED with
the cause. Where the store itself is broken, the line says the run is not recorded.

The cases that fail before a model loads run in the default tier; the others are slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT, read_only
from tests.unit.test_errors import SMALL, _corrupt, _one_error_line


@pytest.mark.parametrize(
    ("broken", "cause"),
    [("corrupt", "file is not a database"), ("read-only", "attempt to write a readonly database")],
)
def test_a_broken_optuna_storage_is_one_line(tmp_path, broken, cause):
    import optuna

    path = tmp_path / "optuna.db"
    storage = f"sqlite:///{path}"
    if broken == "read-only":
        optuna.create_study(storage=storage, study_name="another")  # a valid database, with its tables
    args = ["src.train", "--multirun", "hydra/sweeper=lora_optuna", "hydra.sweeper.n_trials=1"]
    args += [f"hydra.sweeper.storage={storage}", "lora.r=choice(4,8)", *SMALL]
    args += [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    with _corrupt(path) if broken == "corrupt" else read_only(path):
        line = _one_error_line(_command(args), cause)
    assert f"Optuna storage {storage} cannot be used" in line and "hydra.sweeper.storage" in line


# --- src.predict and src.export on edited adapter files ---------------------------------------------------------


# --- after the model loads ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_unset_environment_variable_in_a_sweep_fails_its_jobs_with_the_cause(tmp_path, empty_mlflow_db):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "LORA_TEST_UNSET_PATH"}
    args = ["src.train", "--multirun", "lora.r=4,8", "data=file", "data.path=${oc.env:LORA_TEST_UNSET_PATH}"]
    args += [
        "data.task=classification",
        "data.label_column=label",
        *SMALL,
        f"tracking.tracking_uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    proc = _command(args, env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(jobs) == 2 and all(r.info.status == "FAILED" for r in jobs), [(r.info.status, r.data.tags) for r in runs]
    assert all("environment variable LORA_TEST_UNSET_PATH is not set" in r.data.tags["error"] for r in jobs)


def test_a_sweep_of_a_file_without_its_task_is_one_line(tmp_path):
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'multirun'}"
    proc = _command(["src.train", "--multirun", "lora.r=4,8", "data=file", "data.path=x.csv", sweep_dir])
    _one_error_line(proc, "data.task: missing; one of ['classification', 'multilabel', 'sft']")


def _command(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
