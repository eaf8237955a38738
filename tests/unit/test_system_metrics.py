"""tracking.system_metrics: MLflow's system metrics on a run, on or off as the config (else the machine) says."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
import torch

from src import tracking
from src.config import validate
from src.system_metrics import wanted
from tests.conftest import compose_config, train_run

FAST = ["train.max_steps=4", "train.eval_strategy=no", "data.subsample=32", "data.eval_subsample=8"]


def test_the_setting_decides_else_a_cuda_gpu_does():
    assert wanted(True) and not wanted(False)
    assert wanted(None) == (torch.cuda.device_count() > 0)
    cfg = validate({**compose_config(["tracking.system_metrics=true"]), "output_dir": "out"})
    assert tracking.RunPlace.of(cfg).system_metrics


@pytest.mark.parametrize("on", [True, False])
def test_the_run_s_setting_wins_over_mlflow_s_environment(tmp_path, mlflow_store, monkeypatch, on):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false" if on else "true")
    place = tracking.RunPlace(mlflow_store, "sysmetrics", "run", str(tmp_path), system_metrics=on)
    with tracking.recorded_run(place) as active:
        time.sleep(2)
    metrics = mlflow.get_run(active.info.run_id).data.metrics
    assert bool([name for name in metrics if name.startswith("system/")]) == on
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]  # ended with its run


def test_a_run_with_system_metrics_on_logs_them_at_a_short_interval(tmp_path, mlflow_store, monkeypatch):
    # a sample every 0.1 s, each logged at once: a run of a few seconds logs several, however loaded the machine
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    raw = compose_config([*FAST, "tracking.system_metrics=true"])
    train_run({**raw, "output_dir": str(tmp_path / "out")})
    run_id = mlflow.last_active_run().info.run_id
    metrics = mlflow.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    samples = mlflow.MlflowClient().get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(samples) >= 2 and all(0 <= m.value <= 100 for m in samples)  # the run lasts seconds: a few samples


def test_each_trial_of_a_pack_logs_the_system_metrics_of_the_machine_it_shares(tmp_path, mlflow_store, monkeypatch):
    from src.sweeps.job import run_pack_job

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    jobs = []
    for i, rank in enumerate((2, 4)):
        raw = compose_config(["data=instructions", *FAST, "tracking.system_metrics=true", f"lora.r={rank}"])
        jobs.append(({**raw, "output_dir": str(tmp_path / f"t{i}")}, None))
    trials = run_pack_job(jobs)["pack"]
    assert [t["status"] for t in trials] == ["ok", "ok"], trials
    for trial in trials:
        assert "system/cpu_utilization_percentage" in mlflow.get_run(trial["run_id"]).data.metrics
