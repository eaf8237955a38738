"""No process of a sweep but its trials starts CUDA: the sweeper, the forkserver and launcher workers stay clean.

A process that starts CUDA and then forks leaves its children unable to use the GPU ("Cannot re-initialize CUDA
in forked subprocess"): on a GPU machine every isolated trial then fails. CI has no GPU, so
tests/integration/cuda_probe/sitecustomize.py records, in every process of the sweep, each call that would start CUDA,
and makes the CPU build of torch look like a CUDA build so that the GPU code paths run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.integration.sweeping import split_runs, sweep

PROBE_DIR = ROOT / "tests" / "integration" / "cuda_probe"


def _probe_env(log: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{PROBE_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LORA_SWEEPS_TEST_CUDA_PROBE": str(log),
    }


def _starts(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _report(starts: list[dict]) -> str:
    return "\n\n".join(
        f"{s['call']} in pid {s['pid']} ({s['process']}, {s['argv']}):\n{''.join(s['stack'])}" for s in starts
    )


def test_the_probe_sees_a_cuda_start_outside_a_trial(tmp_path):
    """The probe itself can fail: a plain process that asks torch.cuda.is_available() is recorded."""
    import subprocess
    import sys

    log = tmp_path / "cuda.jsonl"
    code = "import torch; assert torch.backends.cuda.is_built(); torch.cuda.is_available(); torch.cuda.device_count()"
    subprocess.run([sys.executable, "-c", code], env=_probe_env(log), check=True, cwd=ROOT)
    (start,) = _starts(log)
    assert start["call"] == "torch.cuda.is_available" and start["process"] == "MainProcess"


@pytest.mark.slow  # the joblib case below is a grid too, and the one that caught a regression
def test_grid_sweep_starts_cuda_only_in_its_trials(tmp_path, mlflow_store):
    log = tmp_path / "cuda.jsonl"
    result = sweep(["--multirun", "lora.r=2,4", *TINY[1:]], tmp_path, env=_probe_env(log))
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = split_runs(mlflow_store)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert len({c.data.tags["pid"] for c in children}) == 2, "each job must train in its own trial process"
    starts = _starts(log)
    assert not starts, "CUDA started outside a trial process:\n" + _report(starts)


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], id="joblib"),
        pytest.param(["hydra/launcher=local"], id="local", marks=pytest.mark.slow),
    ],
)
def test_parallel_launchers_start_cuda_only_in_their_trials(tmp_path, mlflow_store, launcher):
    """Launcher workers (joblib's loky processes, submitit's) keep the default isolation, and stay CUDA-free.

    joblib runs in the default tier: both broke once while only the slow tier ran them (the trial function was
    passed as ``__main__.run``, which a launcher worker cannot unpickle)."""
    log = tmp_path / "cuda.jsonl"
    args = ["--multirun", *launcher, "hydra.sweeper.max_batch_size=2", "lora.r=2,4", *TINY[1:]]
    result = sweep(args, tmp_path, env=_probe_env(log))
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = split_runs(mlflow_store)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    starts = _starts(log)
    assert not starts, "CUDA started outside a trial process:\n" + _report(starts)


@pytest.mark.slow
def test_optuna_study_starts_cuda_only_in_its_trials(tmp_path, mlflow_store):
    log = tmp_path / "cuda.jsonl"
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "lora.r=choice(2,4)",
        "hydra/sweeper/sampler=random",
        *TINY[1:],
    ]
    result = sweep(args, tmp_path, env=_probe_env(log))
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = split_runs(mlflow_store)
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    starts = _starts(log)
    assert not starts, "CUDA started outside a trial process:\n" + _report(starts)
