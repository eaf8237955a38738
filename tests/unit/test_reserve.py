"""The disk reserve (src.reserve), disk-full errors through their wrappers, and the doctor on a lost run."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from src import reserve, tracking
from src.sweeps.stale import mark_stale_runs

DEAD_TAGS = {"host": "elsewhere", "pid": "7", "process_start": "x@1", "heartbeat": "2000-01-01T00:00:00+00:00"}


def test_doctor_ends_a_lost_run_as_its_record_says(tmp_path, mlflow_store):
    """A run whose store write failed even on the second try is left RUNNING; its record beside the output
    holds the cause, and src.doctor applies it (FAILED with the error), not ProcessLost. A record of another
    run in a reused output directory is ignored."""
    uri = mlflow_store
    client = mlflow.MlflowClient(uri)
    experiment_id = tracking.ensure_experiment("lora-sweeps", uri)
    ids = {}
    for name in ("recorded", "foreign-record"):
        out = tmp_path / name
        out.mkdir()
        run_id = client.create_run(experiment_id, run_name=name, tags=DEAD_TAGS).info.run_id
        client.set_tag(run_id, "output_dir", str(out))
        ids[name] = run_id
        owner = run_id if name == "recorded" else "0" * 32
        error = {"error_type": "OSError", "error": "[Errno 28] No space left on device"}
        (out / reserve.RECORD_NAME).write_text(
            json.dumps({"run_id": owner, "status": "FAILED", "tags": error, "written_at": "2026-12-01T00:00:00"})
        )
    marked = {m.run_name: m for m in mark_stale_runs(uri)}
    assert set(marked) == {"recorded", "foreign-record"}
    recorded = client.get_run(ids["recorded"])
    assert recorded.info.status == "FAILED" and marked["recorded"].status == "FAILED"
    assert recorded.data.tags["error_type"] == "OSError" and "No space left" in recorded.data.tags["error"]
    assert "run_failed.json" in recorded.data.tags["recorded_by"]
    foreign = client.get_run(ids["foreign-record"])
    assert foreign.info.status == "KILLED" and foreign.data.tags["error_type"] == "ProcessLost"


def test_a_disk_full_error_is_known_through_the_errors_that_wrap_it():
    import errno
    import sqlite3

    from mlflow.exceptions import MlflowException

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise MlflowException("(sqlite3.OperationalError) ...") from exc
    except MlflowException as wrapped:
        assert reserve.is_disk_full(wrapped)
    assert reserve.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not reserve.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not reserve.is_disk_full(RuntimeError("CUDA out of memory"))


def _raises(code: int):
    def fallocate(fd, offset, length):
        raise OSError(code, os.strerror(code))

    return fallocate


def test_the_reserve_is_real_space_and_a_disk_without_it_is_refused(tmp_path, monkeypatch):
    import errno

    (made,) = reserve.reserve_space([tmp_path / "fallocated"])
    assert os.stat(made).st_blocks * 512 >= reserve.RESERVE_BYTES  # allocated, not a sparse file
    monkeypatch.setattr(os, "posix_fallocate", _raises(errno.EOPNOTSUPP))  # a filesystem without it: written out
    (written,) = reserve.reserve_space([tmp_path / "written"])
    assert os.stat(written).st_blocks * 512 >= reserve.RESERVE_BYTES

    calls = []

    def full_on_the_second_disk(fd, offset, length):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_on_the_second_disk)
    first, second = tmp_path / "output-reserve", tmp_path / "store-reserve"
    with pytest.raises(reserve.DiskFullError, match=r"MiB free, less than the 4 MiB"):
        reserve.reserve_space([first, second])
    assert not first.exists() and not second.exists()  # none left behind
