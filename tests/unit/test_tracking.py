"""The MLflow store (src.tracking): a held SQLite lock is waited out, the heartbeat is refreshed, a run whose artifacts
cannot be written ends FAILED with the path, and the documented UI commands bind to loopback."""

from __future__ import annotations

import datetime
import re
import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import pytest

from src import tracking
from tests.conftest import ROOT, compose_config, train_run

FAST = [
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "data.subsample=48",
    "data.eval_subsample=24",
    "train.per_device_train_batch_size=8",
]


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])


# ---------------------------------------------------------------------------------------------
# 1-2: parallel writers on one SQLite store, and parallel starts on a fresh one
# ---------------------------------------------------------------------------------------------


def test_retry_locked_waits_out_a_held_sqlite_lock(tmp_path):
    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x INTEGER)")
    writer = sqlite3.connect(db, timeout=0.05, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):  # what an unprotected write sees
        writer.execute("INSERT INTO t VALUES (1)")
    threading.Timer(1.5, holder.execute, ["COMMIT"]).start()
    start = time.monotonic()
    tracking.retry_locked(writer.execute, "INSERT INTO t VALUES (2)")
    assert time.monotonic() - start >= 1.0
    assert writer.execute("SELECT x FROM t").fetchall() == [(2,)]
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # other errors are not retried
        tracking.retry_locked(writer.execute, "INSERT INTO missing VALUES (1)")
    assert time.monotonic() - start < 1.0


def test_mlflow_s_traceback_of_a_lock_is_not_shown_other_database_errors_are(caplog):
    """MLflow's store logs each failed transaction with its traceback before raising; a lock is retried here with a
    one-line note, so its traceback is filtered out (a Ctrl-C during a write put one on the screen); another
    database error still shows."""
    import logging

    from sqlalchemy.exc import OperationalError

    store_log = logging.getLogger("mlflow.store.db.utils")  # where MLflow logs them (make_managed_session)
    with caplog.at_level(logging.ERROR, logger="mlflow.store.db.utils"):
        for message in ("database is locked", "disk I/O error"):
            try:
                raise OperationalError("COMMIT", {}, sqlite3.OperationalError(message))
            except OperationalError as exc:
                store_log.exception("SQLAlchemy database error. The following exception is caught.\n%s", exc)
    shown = [r for r in caplog.records if r.name == "mlflow.store.db.utils"]
    assert len(shown) == 1 and "disk I/O error" in shown[0].getMessage() and shown[0].exc_info


# ---------------------------------------------------------------------------------------------
# 4: SIGKILL leaves a RUNNING run; the doctor marks it KILLED and leaves live runs alone
# ---------------------------------------------------------------------------------------------


def test_heartbeat_tag_is_refreshed_while_the_run_lives(tmp_path, mlflow_store):
    uri = mlflow_store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(tracking.ensure_experiment("e", uri), tags={"heartbeat": "2000-01-01T00:00:00+00:00"})
    run_id = run_id.info.run_id
    with tracking.heartbeat(uri, run_id, interval_s=0.2):
        deadline = time.time() + 60
        while client.get_run(run_id).data.tags["heartbeat"].startswith("2000") and time.time() < deadline:
            time.sleep(0.2)
    beat = datetime.datetime.fromisoformat(client.get_run(run_id).data.tags["heartbeat"])
    assert abs(time.time() - beat.timestamp()) < 120


# ---------------------------------------------------------------------------------------------
# 5: NaN or inf loss
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 8: resume from checkpoint-N continues as the uninterrupted run
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 9-10: a decoder classifier without a pad token, and padding that does not change the logits
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 11-12: bad data is reported once, with row ids, before any model loads; CSV read exactly
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 15: pickles are refused; only safetensors are loaded
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 16: remote code needs model.trust_remote_code=true
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 17: the documented MLflow UI command listens on loopback only
# ---------------------------------------------------------------------------------------------


def test_documented_mlflow_ui_and_server_commands_bind_to_loopback():
    readme = ROOT / "README.md"
    commands = [
        line.strip()
        for line in (readme.read_text() if readme.exists() else "").splitlines()
        if re.match(r"^\s*(\$\s*)?mlflow (ui|server)\b", line)
    ]
    if not commands:
        pytest.skip("README.md documents no `mlflow ui` or `mlflow server` command yet")
    for command in commands:
        assert re.search(r"--host[ =]127\.0\.0\.1\b", command), f"not bound to 127.0.0.1: {command}"
        assert "0.0.0.0" not in command


# ---------------------------------------------------------------------------------------------
# An unwritable or full disk: a clear error and a FAILED run, not a hang
# ---------------------------------------------------------------------------------------------


def _failed_run(raw: dict, uri: str) -> mlflow.entities.Run:
    with pytest.raises(OSError):
        train_run(raw)
    run_ = _runs(uri)[0]
    assert run_.info.status == "FAILED"
    return run_


def test_unwritable_artifact_location_fails_the_run_with_the_path(tmp_path, mlflow_store):
    (tmp_path / "a-file").write_text("not a directory")
    mlflow.MlflowClient(mlflow_store).create_experiment(
        "unwritable", artifact_location=(tmp_path / "a-file" / "artifacts").as_uri()
    )
    raw = compose_config([*FAST, "tracking.experiment=unwritable"])
    raw["output_dir"] = str(tmp_path / "out")
    run_ = _failed_run(raw, mlflow_store)
    assert "a-file" in run_.data.tags["error"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_full_disk_fails_the_run_with_no_space_left(tmp_path, mlflow_store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").symlink_to("/dev/full")  # every write there fails with ENOSPC
    raw = compose_config(FAST)
    raw["output_dir"] = str(out)
    run_ = _failed_run(raw, mlflow_store)
    assert "No space left on device" in run_.data.tags["error"]


# ---------------------------------------------------------------------------------------------
# Output directories: two runs started in the same second get one each
# ---------------------------------------------------------------------------------------------
