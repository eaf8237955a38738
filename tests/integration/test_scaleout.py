"""Scale-out: several workers on one Optuna study in PostgreSQL, an MLflow tracking server, launchers.

Each test that needs PostgreSQL starts its own throwaway cluster (initdb in a temp dir, loopback
only, as the ``postgres`` user when run as root) and skips when the binaries are missing:
``apt-get install postgresql`` (``.ci/run`` does it). The slow tier holds the end-to-end runs:

    python -m pytest -q -m slow tests/integration/test_scaleout.py
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from src.sweeps.study import counted, fail_stale, in_budget
from src.trial import open_storage
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL cluster and MLflow server
# ---------------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the cluster as the ``postgres`` user there."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster on a free loopback port, for this test session only; yields its base URL."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'psycopg[binary]'")
    home = Path(tempfile.mkdtemp(prefix="lora-sweeps-pg-"))  # not pytest's tmp: the postgres user can't enter it
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    subprocess.run(
        as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off"
    subprocess.run(
        as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), check=False)
        shutil.rmtree(home, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    """A fresh database in the cluster; returns its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(base_url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """``mlflow server`` on loopback, PostgreSQL as the backend store, a local artifact root."""
    backend = create_database(postgres, "mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        "--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts",
    ]  # fmt: skip
    with open(tmp_path / "mlflow-server.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                mlflow.MlflowClient(uri).search_experiments()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def worker(args: list[str], tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    """One sweep worker: ``python -m src.train --multirun ...`` as its own process, logging to a file."""
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / name}"]
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115  closed with the process by the OS
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})


def shared_study_args(storage: str, study: str, n_trials: int, heartbeat: int, grace: int) -> list[str]:
    return [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra/sweeper/sampler=random",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.heartbeat_interval={heartbeat}",
        f"hydra.sweeper.grace_period={grace}",
        "hydra.sweeper.isolate=false",  # in the worker's process: a kill -9 kills the trial with it
        "lora.r=choice(2,4,8,16)",
        "lora.dropout=interval(0.0,0.2)",
        *TINY,
    ]


def wait_all(procs: list[subprocess.Popen], tmp_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"worker {i} did not finish:\n" + (tmp_path / f"w{i}.log").read_text()[-3000:])


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def _numbered(states: list[tuple[TrialState, dict]]) -> list[optuna.trial.FrozenTrial]:
    """Trials #0, #1, ... in the given states (a COMPLETE one has value 1.0)."""
    return [
        optuna.trial.FrozenTrial(
            number=number,
            state=state,
            value=1.0 if state == TrialState.COMPLETE else None,
            datetime_start=None,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs=attrs,
            system_attrs={},
            intermediate_values={},
            trial_id=number,
        )  # fmt: skip
        for number, (state, attrs) in enumerate(states)
    ]


def test_a_trial_is_in_budget_while_fewer_than_n_trials_older_ones_are_done_running_or_queued():
    done, running, waiting = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING
    trials = _numbered(
        [
            (done, {}),
            (TrialState.FAIL, {"fail_reason": "OOM"}),  # failed with a reason: it counts
            (TrialState.FAIL, {}),  # interrupted: retried, so it takes no place
            (done, {"duplicate_of": 0}),  # answered from #0: no place
            (TrialState.FAIL, {"over_budget": True}),  # another worker's extra ask: no place
            (running, {}),  # another worker's trial
            (waiting, {"retry_of": 2}),  # the retry of #2, queued
            (running, {}),  # the trial being checked
        ]
    )
    assert [counted(t) for t in trials[:5]] == [True, True, False, False, False]
    assert in_budget(7, trials, n_trials=5)  # 4 places taken: #0, #1, #5, #6
    assert not in_budget(7, trials, n_trials=4)
    assert in_budget(5, trials, n_trials=3)  # only older trials count: #0, #1
    assert not in_budget(5, trials, n_trials=2)


def test_a_trial_whose_worker_stops_beating_is_failed_and_queued_again(postgres):
    storage = open_storage(create_database(postgres, "heartbeat"), heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    with pytest.warns(UserWarning):  # "heartbeat is supposed to be used with Study.optimize"
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study._storage.record_heartbeat(trial._trial_id)  # one beat, then the worker "dies"
    fail_stale(study)
    assert study.trials[0].state == TrialState.RUNNING  # within the grace period
    time.sleep(3)
    fail_stale(study)
    first, retry = study.trials
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert retry.system_attrs["failed_trial"] == 0


# ---------------------------------------------------------------------------------------------
# Real workers (subprocesses, tiny model)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_workers_share_one_study_and_one_mlflow_parent(postgres, mlflow_server, tmp_path):
    storage = create_database(postgres, "optuna_shared")
    args = shared_study_args(storage, "shared", n_trials=20, heartbeat=5, grace=20)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    start = time.monotonic()
    procs = [worker(args, tmp_path, f"w{i}", env) for i in range(4)]
    wait_all(procs, tmp_path, timeout=900)
    print(f"4 workers, 20 trials: {time.monotonic() - start:.0f} s")
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    ran = [t for t in study.trials if counted(t)]
    assert len(ran) == 20 and all(t.state == TrialState.COMPLETE for t in ran)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.user_attrs["sweeper_pid"] for t in ran}) >= 2  # the work was shared
    run_ids = [t.user_attrs["mlflow_run_id"] for t in ran]
    assert len(set(run_ids)) == 20  # none duplicated

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("lora-sweeps")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["sweep_id"] == "shared"
    assert parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 20 and {r.info.run_id for r in children} == set(run_ids)
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all("objective" in r.data.metrics for r in children)


@pytest.mark.slow
def test_a_trial_of_a_killed_worker_is_retried_by_the_others(postgres, tmp_path):
    storage = create_database(postgres, "optuna_kill")
    args = shared_study_args(storage, "kill", n_trials=6, heartbeat=1, grace=5)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    victim, *others = procs = [worker(args, tmp_path, f"w{i}", env) for i in range(3)]

    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="kill", storage=storage).trials
        except KeyError:
            continue  # not created yet
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("sweeper_pid") == victim.pid]
        if running:
            time.sleep(1)  # mid-trial
            victim.send_signal(signal.SIGKILL)
            killed = running[0].number
    assert killed is not None, "the victim never ran a trial"
    victim.wait()
    killed_at = time.monotonic()
    wait_all(others, tmp_path, timeout=600)
    for i, proc in enumerate(others, start=1):
        assert proc.returncode == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]

    study = optuna.load_study(study_name="kill", storage=storage)
    lost = study.trials[killed]
    assert lost.state == TrialState.FAIL and "fail_reason" not in lost.user_attrs
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert retry.user_attrs["sweeper_pid"] in {p.pid for p in others}
    assert retry.datetime_start.timestamp() >= lost.datetime_start.timestamp() + 5  # after the grace period
    ran = [t for t in study.trials if counted(t)]
    assert len(ran) == 6 and all(t.state == TrialState.COMPLETE for t in ran)
    print(f"retried trial #{killed} as #{retry.number}; others done {time.monotonic() - killed_at:.0f} s after")
    del procs


LOAD_WORKER = r"""
import sys, time, warnings
import optuna
from optuna.trial import TrialState
from src.sweeps.study import counted, in_budget, occupies
from src.trial import open_storage
from tests.conftest import TINY

storage_url, total, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="load", storage=open_storage(storage_url, heartbeat_interval=60))
space = {"x": optuna.distributions.FloatDistribution(-10, 10)}
mine = spent = 0.0
while time.time() < deadline:
    began = time.perf_counter()
    trials = study.get_trials(deepcopy=False)
    done = sum(counted(t) for t in trials)
    if done >= total:
        break
    if total - done - sum(occupies(t) and t.state == TrialState.RUNNING for t in trials) <= 0:
        time.sleep(0.05)
        continue
    trial = study.ask(space)
    if not in_budget(trial.number, study.get_trials(deepcopy=False), total):
        trial.set_user_attr("over_budget", True)
        study.tell(trial, state=TrialState.FAIL)
        continue
    study.tell(trial, trial.params["x"] ** 2)  # the no-op objective
    spent += time.perf_counter() - began
    mine += 1
print(f"{int(mine)} {spent:.3f}")
"""


@pytest.mark.slow
def test_bookkeeping_of_2000_trials_through_32_workers_loses_none(postgres, tmp_path):
    storage = create_database(postgres, "optuna_load")
    optuna.create_study(study_name="load", storage=storage)
    total, workers, limit_s = 2000, 32, 600
    deadline = time.time() + limit_s
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_WORKER, storage, str(total), str(deadline)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    outputs = [p.communicate(timeout=limit_s + 120) for p in procs]
    wall_s = time.monotonic() - start
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs if err]
    counts = [out.split() for out, _ in outputs]
    trials_run = sum(int(n) for n, _ in counts)
    busy_s = sum(float(s) for _, s in counts)

    study = optuna.load_study(study_name="load", storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert trials_run == len(complete) == total  # none lost, none run twice
    assert all(t.value == t.params["x"] ** 2 for t in complete)
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    extra = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    print(
        f"\n{total} no-op trials, {workers} workers: {wall_s:.1f} s wall (incl. start-up), "
        f"{1000 * wall_s / total:.1f} ms/trial of wall time, {1000 * busy_s / total:.1f} ms/trial "
        f"worker time (get_trials + ask + budget check + tell); {extra} over-budget asks dropped"
    )


# ---------------------------------------------------------------------------------------------
# Launchers: submitit's local executor (as on SLURM, one job per trial) and joblib
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "joblib"])
def test_a_study_runs_through_a_hydra_launcher_one_job_per_trial(launcher, tmp_path, mlflow_store):
    if launcher == "local":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    else:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra/sweeper/sampler=random",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=launched",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        f"hydra/launcher={launcher}",
        # joblib's loky workers can't start the isolating child process; they are processes already
        *(["hydra.sweeper.isolate=false"] if launcher == "joblib" else []),
        "lora.r=choice(2,4,8,16)",
        "lora.dropout=interval(0.0,0.2)",
        *TINY,
    ]
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    study = optuna.load_study(study_name="launched", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("lora-sweeps").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" and "objective" in r.data.metrics for r in children)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    if launcher == "local":  # one submitit job, with its own folder and process, per trial
        jobs = [p for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()]  # job ids
        assert len(jobs) == 2
