"""Sweeps as real subprocesses on the tiny model, and the runs they leave in a store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow

from tests.conftest import ROOT


def sweep(args: list[str], tmp_path: Path, timeout: int = 900, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m src.train`` with ``args`` as a subprocess, outputs under tmp_path."""
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **popen)


def runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lora-sweeps")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def split_runs(uri: str):
    all_runs = runs(uri)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children
