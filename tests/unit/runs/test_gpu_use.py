"""src.runs.gpu_use and compare's GPU util % column, on runs logged through MLflow's API with known samples."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric

from src.runs import compare
from src.runs.gpu_use import gpu_utilization, own_gpus
from tests.unit.runs.test_compare import CHILD_PARAMS, CHILDREN, _make_run

# What MLflow's system metrics monitor logs on a two-GPU host: NVML's index in the name, a sample per step.
SAMPLES = {"system/gpu_0_utilization_percentage": [90.0, 100.0], "system/gpu_1_utilization_percentage": [0, 10, 20]}


def _log_samples(client, run_id: str) -> None:
    metrics = [Metric(key, v, 1000 + step, step) for key, values in SAMPLES.items() for step, v in enumerate(values)]
    metrics.append(Metric("system/cpu_utilization_percentage", 50.0, 1000, 0))  # not a GPU's
    client.log_batch(run_id, metrics=metrics)


@pytest.mark.parametrize(
    ("visible", "gpus"), [(None, None), ("1", {1}), ("0,1", {0, 1}), ("", set()), ("GPU-1234abcd", None)]
)
def test_own_gpus_reads_the_run_s_cuda_visible_devices_tag(visible, gpus):
    assert own_gpus({} if visible is None else {"cuda_visible_devices": visible}) == gpus


def test_the_mean_counts_every_sample_of_the_run_s_own_gpus(mlflow_store, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("gpus", artifact_location=(tmp_path / "artifacts").as_uri())
    start, params, metrics, status = CHILDREN["C"]
    pinned, unpinned, cpu = (
        _make_run(client, experiment_id, name, start + i, {**CHILD_PARAMS, **params}, metrics, status, tags)
        for i, (name, tags) in enumerate([("pinned", {"cuda_visible_devices": "1"}), ("unpinned", {}), ("cpu", {})])
    )
    for run_id in (pinned, unpinned):
        _log_samples(client, run_id)
    assert gpu_utilization(client, client.get_run(pinned)) == pytest.approx(10.0)  # GPU 1's samples alone
    assert gpu_utilization(client, client.get_run(unpinned)) == pytest.approx(44.0)  # all five samples
    assert gpu_utilization(client, client.get_run(cpu)) is None

    assert compare.main(["--experiment", "gpus", "--no-group-seeds"]) == 0
    header, _, *rows = [
        [c.strip() for c in line.strip("|").split(" | ")] for line in capsys.readouterr().out.strip().split("\n")
    ]
    at = header.index("GPU util %")
    assert {row[1]: row[at] for row in rows} == {"pinned": "10", "unpinned": "44", "cpu": "-"}
    assert compare.main(["--runs", cpu]) == 0  # no run with GPU samples: no column
    assert "GPU util %" not in capsys.readouterr().out
