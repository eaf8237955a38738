"""Scale-out settings in process: parallel trials follow CUDA_VISIBLE_DEVICES, the launcher configs compose."""

from __future__ import annotations

import pytest

from src.sweeps.placement import assign_gpus, batch_size, visible_gpus
from tests.conftest import compose_hydra


def test_parallel_trials_follow_the_gpus_in_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpus = visible_gpus()
    assert gpus == ["3", "5"]
    assert batch_size(None, gpus) == 2 and batch_size(8, gpus) == 2  # never two trials on one GPU
    assert assign_gpus(2, gpus) == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb,GPU-cc")
    assert assign_gpus(batch_size(None, visible_gpus()), visible_gpus()) == ["GPU-aa", "GPU-bb", "GPU-cc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # hidden GPUs: CPU trials, one at a time by default
    assert visible_gpus() == [] and batch_size(None, visible_gpus()) == 1


def test_launcher_configs_compose():
    """conf/hydra/launcher: submitit on SLURM (one GPU per trial) and its local executor, and joblib."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")

    expected = {
        "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    }
    for name, target in expected.items():
        assert compose_hydra(overrides=(f"hydra/launcher={name}",)).hydra.launcher._target_ == target
    cfg = compose_hydra(overrides=("hydra/launcher=slurm",))
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
