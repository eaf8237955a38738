"""Evaluation metrics (src.training): each average counts every class, every label gets its metric name, and a run's
metrics are the ones its report holds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from src.config import ConfigError
from tests.conftest import compose_config


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------
# Silent data corruption: a run finishes and is wrong
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Files the loader cannot read: one DataError naming the file and the line or row
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Values the validator did not check: they failed inside a library after the model loaded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_task_metric_names_are_those_training_computes(task):
    """src.config.TASK_METRICS (what objective.metric is checked against) matches ClassificationMetrics."""
    from types import SimpleNamespace

    from src.config import PER_LABEL_METRIC, TASK_METRICS
    from src.training import ClassificationMetrics

    labels = ["a+b", "c"]  # "+" is not allowed in an MLflow metric name: "a_b"
    rng = np.random.default_rng(0)
    if task == "multilabel":
        y = rng.integers(0, 2, (20, 2))
    else:
        y = rng.integers(0, 2, 20)
    metrics = ClassificationMetrics(task, labels, 0.5)(
        SimpleNamespace(predictions=rng.normal(size=(20, 2)), label_ids=y)
    )
    computed = {f"eval_{k}" for k in metrics}
    per_label = {f"{PER_LABEL_METRIC[task]}a_b", f"{PER_LABEL_METRIC[task]}c"}
    assert computed == (set(TASK_METRICS[task]) - {"eval_loss"}) | per_label


def _scores(task: str, labels: list[str], y_true, y_pred):
    """ClassificationMetrics on predictions given as classes (or 0/1 rows), and its classification report."""
    from types import SimpleNamespace

    from src.training import ClassificationMetrics

    y_pred = np.asarray(y_pred)
    logits = np.eye(len(labels))[y_pred] * 10 if task == "classification" else (y_pred * 20.0 - 10.0)
    metrics = ClassificationMetrics(task, labels, 0.5)
    return metrics(SimpleNamespace(predictions=logits, label_ids=np.asarray(y_true))), metrics.last_report


@pytest.mark.parametrize(
    ("labels", "y_true", "y_pred", "macro"),
    [
        (["major", "minor"], [0] * 20, [0] * 20, 1 / 2),  # the 999:1 split: no minority eval row
        (["a", "b", "c"], [0, 1, 0, 1], [0, 1, 0, 1], 2 / 3),  # perfect on the classes present, "c" absent
        (["a", "b", "c", "d"], [0, 0, 0, 0], [0, 0, 2, 0], (6 / 7) / 4),  # "c" predicted, never true
    ],
    ids=["999:1", "absent class", "predicted absent class"],
)
def test_every_average_counts_every_class_as_the_report_does(labels, y_true, y_pred, macro):
    """eval_f1_macro read 1.0 where classification_report.json said 0.5: sklearn averaged over the classes
    present. Every average is now over the run's classes, as the report is."""
    out, report = _scores("classification", labels, y_true, y_pred)
    assert out["f1_macro"] == pytest.approx(macro) == pytest.approx(report["macro avg"]["f1-score"])
    assert out["f1_weighted"] == pytest.approx(report["weighted avg"]["f1-score"])
    assert out["balanced_accuracy"] == pytest.approx(report["macro avg"]["recall"])
    assert out["balanced_accuracy"] < 1.0


def test_multilabel_averages_count_every_label_column():
    y_true = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]  # "c" has no positive
    out, report = _scores("multilabel", ["a", "b", "c"], y_true, y_true)
    assert out["f1_macro"] == pytest.approx(2 / 3) == pytest.approx(report["macro avg"]["f1-score"])
    assert out["f1_label_c"] == 0.0


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_every_label_gets_its_own_valid_metric_name(task):
    """R&D and R+D both logged as eval_f1_class_R_D, and one overwrote the other."""
    from mlflow.utils.validation import _validate_metric_name

    from src.config import per_label_metrics

    labels = ["R&D", "R+D", "R_D", "a/b", "a/../b", "x/", "café", "cafe", "日本", "中国", ":", ".", "l" * 400]
    names = per_label_metrics(task, labels)
    assert len(set(names.values())) == len(labels), names
    for name in names.values():
        _validate_metric_name(name)  # raises on a name MLflow refuses
        assert len(name) <= 250
    assert names["R_D"].endswith("_R_D") and names["cafe"].endswith("_cafe")  # a valid label keeps its name
    assert per_label_metrics(task, labels[::-1]) == names  # the same whatever the order of the labels
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (30, len(labels))) if task == "multilabel" else rng.integers(0, len(labels), 30)
    pred = rng.integers(0, 2, (30, len(labels))) if task == "multilabel" else rng.integers(0, len(labels), 30)
    out, _ = _scores(task, labels, y, pred)
    prefix = "f1_class_" if task == "classification" else "f1_label_"
    assert {f"eval_{k}" for k in out if k.startswith(prefix)} == set(names.values())


def test_objective_naming_a_class_the_data_lacks_fails_before_the_model_loads(tmp_path, mlflow_store, monkeypatch):
    """With labels inferred from the data, validation cannot know them: the run checks once the data is read."""
    import mlflow

    from src import modeling
    from tests.conftest import train_run

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(modeling, "load_model", no_model)
    for metric, key in (("eval_f1_class_music", "objective.metric"), ("f1_class_art", "train.metric_for_best_model")):
        raw = compose_config([f"objective.metric={metric}" if key == "objective.metric" else f"{key}={metric}"])
        raw["output_dir"] = str(tmp_path / key)
        with pytest.raises(ConfigError) as info:
            train_run(raw)
        assert f"{key}: task 'classification' does not log" in str(info.value)
        assert "eval_f1_class_food, eval_f1_class_sports, eval_f1_class_tech" in str(info.value)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]


def test_a_999_to_1_run_logs_the_macro_f1_its_report_holds(tmp_path, mlflow_store, caplog):
    """The issue's run: one minority row, data.class_weights=balanced. The made eval split cannot hold the row
    (it is the class's only one), so the class is named in a warning, and eval_f1_macro is what
    classification_report.json says (0.5 for a model that predicts the majority), not 1.0."""
    import mlflow

    from tests.conftest import train_run

    rows = [[f"common words {i}", "major"] for i in range(60)] + [["rare words", "R&D"], ["other", "R+D"]]
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    raw = compose_config(
        ["data=file", f"data.path={path}", "data.task=classification", "data.label_column=label",
         "data.id_column=null", "data.class_weights=balanced", "data.eval_fraction=0.2", "train.max_steps=2",
         "train.eval_strategy=no", "train.per_device_train_batch_size=8"]
    )  # fmt: skip
    raw["output_dir"] = str(tmp_path / "out")
    with caplog.at_level("WARNING", logger="src"):
        train_run(raw)
    assert any("no eval row: 'R&D', 'R+D'" in r.getMessage() for r in caplog.records)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    report = json.loads(
        Path(client.download_artifacts(run.info.run_id, "classification_report.json", str(tmp_path))).read_text()
    )
    names = json.loads(Path(client.download_artifacts(run.info.run_id, "metric_names.json", str(tmp_path))).read_text())
    metrics = run.data.metrics
    assert metrics["eval_f1_macro"] == pytest.approx(report["macro avg"]["f1-score"]) and metrics["eval_f1_macro"] < 1
    assert metrics["eval_balanced_accuracy"] == pytest.approx(report["macro avg"]["recall"])
    assert set(names) == {"major", "R&D", "R+D"} and len(set(names.values())) == 3
    for label, name in names.items():
        assert metrics[name] == pytest.approx(report[label]["f1-score"]), label


# ---------------------------------------------------------------------------------------------
# Scale edges
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Precision that cannot run on this machine
# ---------------------------------------------------------------------------------------------


def test_train_run_refuses_gpu_precision_before_loading_anything(monkeypatch, tmp_path, mlflow_store):
    import mlflow
    import torch

    from src import modeling
    from tests.conftest import train_run

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded"))
    raw = compose_config(["train=gpu"])
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="no CUDA GPU here: use train=default"):
        train_run(raw)
    (failed,) = mlflow.MlflowClient(mlflow_store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(mlflow_store).search_experiments()]
    )
    assert failed.info.status == "FAILED" and failed.data.tags["error_type"] == "ConfigError"
