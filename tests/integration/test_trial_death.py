"""A trial process and its sweep die together, and a dead trial's run is closed at once, never ranked.

The trial processes here are real (``python -m src.train --multirun`` on the tiny model); the kills are real
signals. The sweeper closes the run of a trial that died without a word (``kill -9``) as FAILED, with no
help from ``src.doctor``; a trial whose sweeper was killed stops instead of training on to FINISHED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from tests.conftest import ROOT, TINY
from tests.integration.sweeping import split_runs

LONG = [*TINY[1:], "train.logging_steps=1"]


def _start(args, tmp_path):
    """The sweep, its output in a file (a pipe nobody drains would fill and block the trials in write)."""
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    log = open(tmp_path / "sweep.log", "w")  # the sweep writes it for its whole life
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = tmp_path / "sweep.log"
    return proc


def _output(proc) -> str:
    return proc.log_path.read_text()


def _training_child(proc, uri, timeout_s=300):
    deadline = time.time() + timeout_s
    while True:
        assert time.time() < deadline and proc.poll() is None, _output(proc)[-3000:]
        time.sleep(1)
        _, children = split_runs(uri)
        training = [c for c in children if c.info.status == "RUNNING" and "train_loss" in c.data.metrics]
        if training:
            return training[0]


@pytest.mark.slow  # a failing job's FAILED end: test_sweeps.py's test_a_failing_job_is_recorded_and_the_sweep_goes_on
def test_a_sigkilled_trial_ends_failed_and_the_sweep_goes_on(tmp_path, mlflow_store):
    # Job 0 trains until it is killed; job 1 is a normal short job.
    proc = _start(["--multirun", *LONG, "train.max_steps=100000,2"], tmp_path)
    try:
        victim = _training_child(proc, mlflow_store)
        assert victim.data.params["train.max_steps"] == "100000"
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        proc.kill()
    out = _output(proc)
    assert proc.returncode != 0, out[-3000:]
    client = mlflow.MlflowClient(mlflow_store)
    dead = client.get_run(victim.info.run_id)
    assert dead.info.status == "FAILED" and dead.data.tags["error_type"] == "TrialProcessDied", dead.data.tags
    assert "killed by signal 9" in dead.data.tags["error"]
    assert "TrialProcessDied" in out
    _, children = split_runs(mlflow_store)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]  # the sweep went on


@pytest.mark.slow
def test_a_trial_dies_with_its_sweeper(tmp_path, mlflow_store):
    proc = _start(["--multirun", "lora.r=2", *LONG, "train.max_steps=100000"], tmp_path)
    try:
        victim = _training_child(proc, mlflow_store)
        trial_pid = int(victim.data.tags["pid"])
        proc.send_signal(signal.SIGKILL)  # the sweeper, with no chance to stop its trial
        proc.wait(timeout=60)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                os.kill(trial_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
        else:
            os.kill(trial_pid, signal.SIGKILL)
            pytest.fail("the trial trained on after its sweeper was killed")
    finally:
        proc.kill()
    run = mlflow.MlflowClient(mlflow_store).get_run(victim.info.run_id)
    assert run.info.status == "KILLED", run.info.status  # not FINISHED under a dead sweep
