"""Faults inside real trial processes of an Optuna sweep: a CUDA OOM, a NaN or inf objective.

The faults are injected by tests/fault_injection/sitecustomize.py, which Python loads at
start-up in every process of the sweep (through PYTHONPATH); the project has no test hooks.
"""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.test_sweeps import TINY, split_runs, sweep

FAULTS_DIR = ROOT / "tests" / "fault_injection"


def _sweep_with_fault(tmp_path, fault: str):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "lora.r=choice(8,16)",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        *TINY[1:],
        "train.max_steps=3",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{FAULTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LORA_SWEEPS_TEST_FAULT": fault,
    }
    result = sweep(args, tmp_path, env=env)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    by_rank = {t.params["lora.r"]: t for t in trials}
    assert set(by_rank) == {8, 16}, [(t.number, t.params, t.state) for t in trials]
    return result, by_rank


@pytest.mark.slow
def test_cuda_oom_fails_its_trial_and_the_next_runs_in_a_fresh_process(tmp_path, mlflow_store):
    result, by_rank = _sweep_with_fault(tmp_path, "oom:16")
    assert result.returncode != 0  # the exit code says a trial failed
    assert by_rank[16].state == TrialState.FAIL
    assert "OutOfMemoryError" in by_rank[16].user_attrs["fail_reason"]
    assert by_rank[8].state == TrialState.COMPLETE and by_rank[8].value is not None
    _, children = split_runs(mlflow_store)
    status = {c.data.params["lora.r"]: c for c in children}
    assert status["16"].info.status == "FAILED" and status["16"].data.tags["error_type"] == "OutOfMemoryError"
    assert status["8"].info.status == "FINISHED"
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 2, "each trial must run in its own process"
    assert str(os.getpid()) not in pids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan_objective", "inf_objective"])
def test_non_finite_objective_fails_the_trial_and_the_study_goes_on(tmp_path, mlflow_store, kind):
    result, by_rank = _sweep_with_fault(tmp_path, f"{kind}:16")
    assert result.returncode != 0
    assert by_rank[16].state == TrialState.FAIL
    assert by_rank[8].state == TrialState.COMPLETE
    assert "objective" in by_rank[16].user_attrs["fail_reason"].lower()
