"""A disk that fills up during a run: the run ends FAILED with the real cause, never RUNNING, and the cause is
kept beside the output even when the store itself is on the full disk.

The disk is real: a 8 MiB tmpfs mounted in a private mount namespace (``unshare -m``, or ``unshare -rm`` where
user namespaces allow it without root), holding the run's output directory and, in most cases, its SQLite
store. A filler waits until the run has started (its ``config.yaml``, written after it took its reserve), then
writes zeros until the disk is full, as a checkpoint or a neighbour's job would; or the disk is nearly full
before the run starts. What happened is read inside
the namespace (the tmpfs is gone with it) and printed as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from src import reserve
from tests.conftest import ROOT

INSPECT = """
import json, sys
from pathlib import Path

import mlflow

uri, out = sys.argv[1], Path(sys.argv[2])
client = mlflow.MlflowClient(uri)
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
record = out / "run_failed.json"
print(json.dumps({
    "runs": [{"status": r.info.status, "tags": r.data.tags, "run_id": r.info.run_id} for r in runs],
    "record": json.loads(record.read_text()) if record.is_file() else None,
    "reserve_left": (out / ".lora_sweeps_reserve").exists(),
}))
"""

SCRIPT = """
set -u
disk=$1 uri=$2 log=$3 free_kb=$4
mount -t tmpfs -o size=8m tmpfs "$disk" || exit 97
if [ "$free_kb" = during ]; then
  (
    for _ in $(seq 2400); do [ -f "$disk/out/config.yaml" ] && break; sleep 0.05; done  # the run has started
    sleep 1
    dd if=/dev/zero of="$disk/fill" bs=64k 2>/dev/null
  ) &
else  # nearly full before the run starts: free_kb left once its store exists
  MLFLOW_TRACKING_URI=$uri "$PYTHON" -c "from src import tracking; tracking.ensure_experiment('lora-sweeps', '$uri')"
  dd if=/dev/zero of="$disk/fill" bs=64k 2>/dev/null
  truncate -s $(( $(stat -c %s "$disk/fill") - free_kb * 1024 )) "$disk/fill"
fi
MLFLOW_TRACKING_URI=$uri "$PYTHON" -m src.train model=tiny train.max_steps=400 train.logging_steps=1 \
  train.eval_strategy=no data.subsample=64 hydra.run.dir="$disk/out" >"$log" 2>&1
echo "exit code $?" >>"$log"
wait
MLFLOW_TRACKING_URI=$uri "$PYTHON" -c "$INSPECT" "$uri" "$disk/out"
"""


def _namespace() -> list[str]:
    """The unshare prefix that gives this process a private mount namespace where it may mount a tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("cannot mount a tmpfs in a private mount namespace here (no root, no user namespaces)")


def _fill_during_a_run(tmp_path, store_on_full_disk: bool, free_kb: str = "during") -> tuple[dict, str]:
    disk = tmp_path / "disk"
    disk.mkdir()
    uri = f"sqlite:///{disk / 'mlflow.db'}" if store_on_full_disk else f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHON": sys.executable, "INSPECT": INSPECT}
    done = subprocess.run(
        [*_namespace(), "bash", "-c", SCRIPT, "disk-full", str(disk), uri, str(log), free_kb],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = log.read_text() if log.exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + output[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), output


def _disk_error(text: str) -> bool:
    return "disk is full" in text or "No space left on device" in text


def _assert_failed_with_the_cause_on_disk(seen: dict) -> dict:
    (run,) = seen["runs"]
    assert run["status"] == "FAILED", run
    assert _disk_error(run["tags"]["error"]), run["tags"]
    record = seen["record"]  # beside the output, written in the space the reserve held
    assert record is not None and record["run_id"] == run["run_id"] and record["status"] == "FAILED", seen
    assert record["tags"]["error"] == run["tags"]["error"], record
    assert not seen["reserve_left"]
    return run


def test_a_full_disk_under_the_store_and_the_output_ends_the_run_failed_with_the_cause(tmp_path):
    """Before the fix the run stayed RUNNING (its status write failed on the full disk), or ended FINISHED
    with error tags (MLflow's exit hook closed the still-active run)."""
    seen, output = _fill_during_a_run(tmp_path, store_on_full_disk=True)
    assert "exit code 1" in output, output[-3000:]
    _assert_failed_with_the_cause_on_disk(seen)


def test_a_nearly_full_disk_fails_the_run_before_training_with_the_free_space(tmp_path):
    """150 KiB free under the store and the output, less than the reserve: before the fix the reserve was
    silently not taken, the run trained, and it was left RUNNING with no record when the disk filled."""
    seen, output = _fill_during_a_run(tmp_path, store_on_full_disk=True, free_kb="150")
    assert "exit code 2" in output, output[-3000:]
    run = _assert_failed_with_the_cause_on_disk(seen)
    assert run["tags"]["error_type"] == "DiskFullError" and "MiB free" in run["tags"]["error"], run
    assert f"error: {run['tags']['error']}" in output and "Traceback" not in output, output[-3000:]
    assert "train_loss" not in output and "step 1/" not in output  # it never trained


@pytest.mark.slow  # ~1 min: the run trains, then the disk fills as it saves
def test_a_disk_with_room_for_the_reserve_only_ends_the_run_failed_with_the_cause(tmp_path):
    seen, output = _fill_during_a_run(tmp_path, store_on_full_disk=True, free_kb="4300")
    assert "exit code 1" in output, output[-3000:]
    _assert_failed_with_the_cause_on_disk(seen)


@pytest.mark.slow  # ~1.5 min; a full disk: the store-and-output test above
def test_a_full_output_disk_ends_the_run_failed_with_the_cause_in_the_store(tmp_path):
    """The store is elsewhere: the run's own write to the full disk fails, and the store says so."""
    seen, output = _fill_during_a_run(tmp_path, store_on_full_disk=False)
    assert "exit code 1" in output, output[-3000:]
    _assert_failed_with_the_cause_on_disk(seen)
    assert not list(tmp_path.glob(f"{reserve.RESERVE_NAME}*"))  # the one beside the store (another disk) is freed
