"""Find MLflow runs left RUNNING by a process that died without closing them, and mark them KILLED.

``python -m src.doctor`` runs :func:`mark_stale_runs` on a store.

A run stays RUNNING forever when its process is killed outright (SIGKILL, the OOM killer, a
lost node). :func:`src.tracking.tracked_run` tags every run with its ``host``, ``pid``,
``process_start`` and a ``heartbeat`` refreshed every minute. A RUNNING run is stale when its
process is gone from this host (the pid is free, or now belongs to a different process), or,
for a run of another host or container, when its heartbeat is older than ``--stale-after-s``. Runs without
those tags were not started by this project and are left alone. Sweeps call
:func:`mark_stale_runs` when they start, so a killed sweep's runs are closed by the next one.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from src import reserve, tracking
from src.sweeps.outcomes import ERROR_TAG, ERROR_TYPE_TAG

# Heartbeats come every minute; a few missed ones (a long lock wait, a paused VM) are not death.
STALE_AFTER_S = 900.0


@dataclass
class StaleRun:
    run_id: str
    run_name: str
    reason: str
    output_dir: Optional[str] = None
    status: str = "KILLED"  # how src.doctor ends it: KILLED, or what the run's own record says


def read_record(output_dir: Optional[str], run_id: str) -> Optional[dict]:
    """The last-resort record a run left beside its output when the store could not be written
    (``src.tracking.close_run``), if there is one for this run."""
    if not output_dir:
        return None
    path = Path(output_dir) / reserve.RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("run_id") != run_id:
        return None  # another run's record (the output directory was reused), or not a record
    return record


def _age_s(heartbeat: Optional[str], start_time_ms: int, now: float) -> float:
    if heartbeat:
        try:
            return now - datetime.datetime.fromisoformat(heartbeat).timestamp()
        except ValueError:
            pass
    return now - start_time_ms / 1000


def stale_reason(tags: dict[str, str], start_time_ms: int, stale_after_s: float, now: float) -> Optional[str]:
    """Why a RUNNING run with these tags has no live process, or None if it may still be running."""
    host, pid = tags.get("host"), tags.get("pid")
    if not host or not pid:
        return None  # not started by tracked_run: its owner is unknown
    alive = tracking.same_process(int(pid), tags.get("process_start")) if host == socket.gethostname() else None
    if alive is False:
        return f"process {pid} on {host} is gone (killed without closing its run)"
    if alive:
        return None  # alive here: a hung process is not a dead one
    age = _age_s(tags.get("heartbeat"), start_time_ms, now)
    if age > stale_after_s:
        return f"no heartbeat from process {pid} on {host} for {age:.0f} s (limit {stale_after_s:.0f} s)"
    return None


def find_stale_runs(uri: str, experiment: Optional[str] = None, stale_after_s: float = STALE_AFTER_S) -> list[StaleRun]:
    """RUNNING runs of the store (or of one experiment) whose process is gone."""
    import mlflow

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return []  # no store yet: nothing to check, and none to create
    client = mlflow.MlflowClient(uri)
    if experiment is not None:
        found = tracking.retry_locked(client.get_experiment_by_name, experiment)
        experiment_ids = [found.experiment_id] if found else []
    else:
        experiment_ids = [e.experiment_id for e in tracking.retry_locked(client.search_experiments)]
    if not experiment_ids:
        return []
    stale, page_token, now = [], None, time.time()
    while True:
        page = tracking.retry_locked(
            client.search_runs,
            experiment_ids,
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
            page_token=page_token,
        )
        for run in page:
            reason = stale_reason(run.data.tags, run.info.start_time, stale_after_s, now)
            if reason:
                output_dir = run.data.tags.get("output_dir") or run.data.params.get("output_dir")  # older runs
                stale.append(StaleRun(run.info.run_id, run.info.run_name, reason, output_dir))
        page_token = page.token
        if not page_token:
            return stale


def mark_stale_runs(
    uri: str, experiment: Optional[str] = None, stale_after_s: float = STALE_AFTER_S, dry_run: bool = False
) -> list[StaleRun]:
    """Mark every stale RUNNING run KILLED, with ``error_type=ProcessLost`` and the reason as ``error``;
    a run that left a record beside its output (the store could not be written as it ended, e.g. a full
    disk) ends as that record says instead, with its error.

    Returns the runs found (marked unless ``dry_run``). Safe to call while other jobs run:
    a run whose process is alive, or whose heartbeat is recent, is not touched.
    """
    import mlflow

    stale = find_stale_runs(uri, experiment, stale_after_s)
    client = mlflow.MlflowClient(uri) if stale and not dry_run else None
    for run in [] if client is None else stale:
        if tracking.retry_locked(client.get_run, run.run_id).info.status != "RUNNING":
            continue  # it ended meanwhile
        record = read_record(run.output_dir, run.run_id)
        if record is not None:
            status = record.get("status") if record.get("status") in ("FAILED", "KILLED") else "FAILED"
            tags = {str(k): str(v)[: tracking.MAX_TAG_LEN] for k, v in (record.get("tags") or {}).items()}
            tags["recorded_by"] = f"{reserve.RECORD_NAME} of {record.get('written_at')}, applied by src.doctor"
            run.reason = f"{run.reason}; its record says {status}: {tags.get(ERROR_TYPE_TAG, '?')}"
            run.status = status
        else:
            status = "KILLED"
            message = f"{run.reason}; marked KILLED by src.doctor at {tracking.utc_now()}"
            tags = {ERROR_TYPE_TAG: "ProcessLost", ERROR_TAG: message}
        tracking.terminate(client, run.run_id, status, tags)
        store_dir = reserve.sqlite_dir(uri)
        if store_dir is not None:  # the reserve it held beside the store (the one in its output dir is reused)
            reserve.release([store_dir / f"{reserve.RESERVE_NAME}-{run.run_id}"])
    return stale
