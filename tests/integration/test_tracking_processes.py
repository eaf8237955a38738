"""The store under several processes: parallel writers, a fresh store, runs of dead processes, two runs at once."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from src import tracking
from src.sweeps.stale import mark_stale_runs
from tests.conftest import ROOT, start_training_until_it_logs
from tests.unit.test_tracking import FAST, _runs


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


WRITER = """
import sys, time
from pathlib import Path
from src import tracking
from tests.unit.test_tracking import FAST, _runs

uri, index, go, n_params, n_steps = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
Path(f"{go}.ready{index}").touch()
while not go.exists():
    time.sleep(0.05)
with tracking.recorded_run(tracking.RunPlace(uri, "parallel", f"w{index}", None)):
    tracking.log_params({f"p{k}": f"{index}-{k}" for k in range(n_params)})
    for step in range(n_steps):
        tracking.log_metrics({"loss": index + step / 1000, "step_seen": step}, step=step)
    tracking.set_tags({"writer": str(index)})
"""


def _start_writers(uri: str, go: Path, n_params: int, n_steps: int, n: int = 8) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(i), str(go), str(n_params), str(n_steps)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    for i, proc in enumerate(procs):
        _wait_for(Path(f"{go}.ready{i}"), proc)
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs


@pytest.mark.slow
def test_eight_processes_starting_on_a_fresh_store_make_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    go = tmp_path / "go"
    procs = _start_writers(uri, go, n_params=3, n_steps=2)
    assert not (tmp_path / "fresh.db").exists()
    go.touch()  # all eight open the store at once
    outputs = _finish(procs)
    for out in outputs:
        assert "Traceback" not in out and "already exists" not in out, out[-3000:]
    client = mlflow.MlflowClient(uri)
    assert [e.name for e in client.search_experiments()].count("parallel") == 1
    runs = _runs(uri)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_eight_writers_on_one_sqlite_store_outlast_a_held_lock_and_lose_nothing(tmp_path):
    """A connection holds SQLite's write lock longer than MLflow's 20 s busy timeout while 8 jobs write."""
    db = tmp_path / "shared.db"
    uri = f"sqlite:///{db}"
    tracking.ensure_experiment("parallel", uri)  # the store and experiment exist before the jobs start
    go = tmp_path / "go"
    n_params, n_steps = 250, 30
    procs = _start_writers(uri, go, n_params, n_steps)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    go.touch()
    time.sleep(25)
    holder.execute("COMMIT")
    outputs = _finish(procs)
    assert any("store is locked, retrying" in out for out in outputs)  # the lock was really hit
    runs = _runs(uri)
    assert sorted(r.info.run_name for r in runs) == [f"w{i}" for i in range(8)]
    client = mlflow.MlflowClient(uri)
    for r in runs:
        index = int(r.data.tags["writer"])
        assert r.info.status == "FINISHED"
        assert r.data.params == {f"p{k}": f"{index}-{k}" for k in range(n_params)}
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(n_steps))
        assert {m.step: m.value for m in history}[n_steps - 1] == pytest.approx(index + (n_steps - 1) / 1000)


DIES = """
import sys, time
from pathlib import Path
from src import tracking

uri, ready = sys.argv[1], Path(sys.argv[2])
with tracking.recorded_run(tracking.RunPlace(uri, tracking.base_experiment(), "sigkilled", None)):
    tracking.log_metrics({"train_loss": 1.0}, step=1)
    ready.touch()
    time.sleep(600)
"""


def _iso(seconds_ago: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="seconds")


def test_doctor_marks_runs_of_dead_processes_killed_and_leaves_live_ones_running(tmp_path, mlflow_store):
    uri = mlflow_store
    experiment_id = tracking.ensure_experiment("lora-sweeps", uri)
    client = mlflow.MlflowClient(uri)
    proc = subprocess.Popen(
        [sys.executable, "-c", DIES, uri, str(tmp_path / "ready")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(tmp_path / "ready", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    namespace = tracking.process_start(os.getpid()).split("@")[0]
    this_host = tracking.process_tags()["host"]
    made = {
        "pid-reused": {"host": this_host, "pid": str(os.getpid()), "process_start": f"{namespace}@1"},
        "other-host-silent": {"host": "elsewhere", "pid": "7", "process_start": "x@1", "heartbeat": _iso(3600)},
        "other-host-beating": {"host": "elsewhere", "pid": "7", "process_start": "x@1", "heartbeat": _iso(5)},
        "not-ours": {},
    }
    ids = {name: client.create_run(experiment_id, run_name=name, tags=tags).info.run_id for name, tags in made.items()}
    with tracking.recorded_run(tracking.RunPlace(uri, tracking.base_experiment(), "alive", None)) as alive:
        assert {r.info.run_name for r in _runs(uri) if r.info.status == "RUNNING"} == {"sigkilled", "alive", *made}
        result = subprocess.run(
            [sys.executable, "-m", "src.doctor", "--tracking-uri", uri],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "3 run(s) marked KILLED" in result.stderr
        status = {r.info.run_name: r for r in _runs(uri)}
        assert status["alive"].info.status == "RUNNING"
    killed = status["sigkilled"]
    assert killed.info.status == "KILLED" and killed.info.run_id in result.stdout
    assert killed.data.tags["error_type"] == "ProcessLost"
    assert "is gone" in killed.data.tags["error"] and "src.doctor" in killed.data.tags["error"]
    assert status["pid-reused"].info.status == "KILLED"
    assert status["other-host-silent"].info.status == "KILLED"
    assert "no heartbeat" in status["other-host-silent"].data.tags["error"]
    assert status["other-host-beating"].info.status == "RUNNING"
    assert status["not-ours"].info.status == "RUNNING"  # unknown owner: left alone
    assert client.get_run(alive.info.run_id).info.status == "FINISHED"
    for name in ("other-host-beating", "not-ours"):
        client.set_terminated(ids[name])
    assert mark_stale_runs(uri) == []
    assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_sigkilled_training_run_is_marked_killed_by_the_next_sweep_start(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = start_training_until_it_logs(tmp_path, uri)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _runs(uri)[0].info.status == "RUNNING"  # what MLflow alone leaves behind
    marked = mark_stale_runs(uri, experiment="lora-sweeps")  # what a sweep calls when it starts
    run_ = _runs(uri)[0]
    assert [m.run_id for m in marked] == [run_.info.run_id]
    assert run_.info.status == "KILLED" and run_.data.tags["error_type"] == "ProcessLost"


@pytest.mark.slow  # two trainings at once, ~40 s on 2 CPU cores
def test_two_runs_started_together_keep_their_own_output_and_adapter(tmp_path, mlflow_store):
    """Both runs resolve one time-stamped name (as two started in the same second do): each gets a directory,
    its adapter is its own (lora.r 4 and 8), and each run's output_dir tag names its directory."""
    base = tmp_path / "outputs" / "12-00-00-tiny-topics"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "src.train",
                *FAST,
                "train.max_steps=1",
                f"lora.r={r}",
                f"hydra.run.dir=${{unique_dir:{base}}}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (4, 8)
    ]
    _finish(procs)
    dirs = sorted(p for p in base.parent.iterdir())
    assert [d.name for d in dirs] == [base.name, f"{base.name}-2"]
    ranks = {json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] for d in dirs}
    assert ranks == {4, 8}
    for out in dirs:
        r = json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]
        assert f"r: {r}\n" in (out / "config.yaml").read_text()
    runs = _runs(mlflow_store)
    assert sorted(r.data.tags["output_dir"] for r in runs) == [str(d.resolve()) for d in dirs]
    assert all(r.info.status == "FINISHED" for r in runs)
