"""``python -m src.train`` as a process: signals end the run KILLED, the default run learns, offline hub errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT, start_training_until_it_logs


@pytest.mark.parametrize(
    ("signum", "error_type"), [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt")]
)
def test_sigterm_or_ctrl_c_ends_the_run_killed_in_one_line(tmp_path, mlflow_store, signum, error_type):
    """The run ends KILLED; the screen gets one line, no traceback, and the shell's code for the signal."""
    uri = mlflow_store
    proc = start_training_until_it_logs(tmp_path, uri)
    try:
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    output = (tmp_path / "train-output.log").read_text()
    client = mlflow.MlflowClient(uri)
    run_ = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run_.info.status == "KILLED"
    assert run_.data.tags["error_type"] == error_type
    assert "Traceback" not in output, output[-3000:]
    assert output.splitlines()[-1] == f"interrupted ({signum.name}): run {run_.info.run_id} ended KILLED", output[-500:]
    assert proc.returncode == 128 + signum


@pytest.mark.slow  # the default run end to end, shortened: tests/integration/test_console_cli.py
def test_offline_default_learns_above_the_majority_baseline(tmp_path):
    """The README's main command, as a user runs it (~15-30 s on 2 cores)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", f"tracking.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    run_ = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    majority = 0.5  # 'sports' share of the bundled topics data; a majority-class F1-macro would be 0.22
    assert run_.info.status == "FINISHED"
    assert run_.data.metrics["eval_accuracy"] > majority + 0.2
    assert run_.data.metrics["eval_f1_macro"] > 0.6
    label_map = json.loads((tmp_path / "out" / "adapter" / "label_map.json").read_text())
    assert label_map["labels"] == ["food", "sports", "tech"]


@pytest.mark.slow  # a training subprocess (~15 s on 2 idle cores)
def test_an_uncached_hub_model_without_network_fails_in_one_line_and_the_run_is_failed(tmp_path):
    import os

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # no hub: refused at once, as a machine without network is
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "model.name_or_path=nobody-here/not-cached",
            f"tracking.tracking_uri={uri}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.name_or_path=nobody-here/not-cached: ") and "cannot be reached" in last
    client = mlflow.MlflowClient(uri)
    run_ = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run_.info.status == "FAILED"
