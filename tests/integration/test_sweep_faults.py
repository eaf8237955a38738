"""Faults inside real trial processes of an Optuna sweep: a CUDA OOM, a NaN or inf objective.

The faults are injected by tests/fault_injection/sitecustomize.py, which Python loads at
start-up in every process of the sweep (through PYTHONPATH); the project has no test hooks.
"""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, TINY
from tests.integration.sweeping import split_runs, sweep

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


@pytest.mark.slow
def test_one_of_six_grid_jobs_fails_and_the_five_others_are_recorded(tmp_path, mlflow_store):
    result = sweep(["--multirun", "lora.r=0,2,4,8,16,32", *TINY[1:]], tmp_path)
    assert result.returncode != 0, "the exit code must say a job failed"
    assert "1 job(s) failed (#0)" in result.stderr
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and len(children) == 6
    finished = sorted(int(c.data.params["lora.r"]) for c in children if c.info.status == "FINISHED")
    assert finished == [2, 4, 8, 16, 32]
    assert all("objective" in c.data.metrics for c in children if c.info.status == "FINISHED")
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert "-r0-" in failed.info.run_name


@pytest.mark.slow
def test_a_sigkilled_joblib_worker_loses_no_other_result(tmp_path, mlflow_store):
    """Issue 6 row 14: kill -9 one joblib worker mid-sweep; finished jobs stay recorded, nothing stays RUNNING."""
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")
    args = [
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.isolate=false",
        "lora.r=2,4,8,16",
        *TINY[1:],
        "train.max_steps=150",
        "train.logging_steps=1",
    ]
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = mlflow.MlflowClient(mlflow_store)
    try:
        deadline, victim, finished = time.time() + 500, None, []
        while victim is None:  # wait for a finished job and a job in training, then kill the latter's worker
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            time.sleep(1)
            _, children = split_runs(mlflow_store)
            finished = [c for c in children if c.info.status == "FINISHED"]
            training = [c for c in children if c.info.status == "RUNNING" and "train_loss" in c.data.metrics]
            if finished and training:
                victim = training[0]
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)
        proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode != 0, "the sweep must say that a job was lost"
    for run in finished:  # the results of the jobs that finished are kept
        kept = client.get_run(run.info.run_id)
        assert kept.info.status == "FINISHED" and kept.data.metrics["objective"] == run.data.metrics["objective"]
    subprocess.run(
        [sys.executable, "-m", "src.doctor", "--tracking-uri", mlflow_store],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    _, children = split_runs(mlflow_store)
    assert not [c for c in children if c.info.status == "RUNNING"], "a run was left RUNNING"
    assert client.get_run(victim.info.run_id).info.status == "KILLED"
