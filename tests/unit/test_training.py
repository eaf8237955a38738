"""Bad input from an adversarial pass: each class ends in one DataError or ConfigError before any model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.config import ConfigError, validate
from src.data import DataError, load_data, read_table
from tests.conftest import compose_config


def _data_cfg(overrides: list[str]):
    return validate(compose_config(overrides)).data


def _file_cfg(path: Path, *extra: str, task: str = "classification"):
    label = ["data.label_column=label"] if task == "classification" else []
    return _data_cfg(["data=file", f"data.path={path}", f"data.task={task}", "data.id_column=null", *label, *extra])


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _problems(overrides: list[str], **kwargs) -> str:
    """The ConfigError's problems as one text, or "" when the config validates."""
    try:
        validate(compose_config(overrides), **kwargs)
    except ConfigError as exc:
        return "\n".join(exc.problems)
    return ""


def _all_labels(data) -> list[str]:
    """The class name of every row of both splits, in row_id order."""
    rows = [(r, data.labels[y]) for split in (data.train, data.eval) for r, y in zip(split["row_id"], split["label"])]
    return [name for _, name in sorted(rows, key=lambda x: int(x[0]))]


# ---------------------------------------------------------------------------------------------
# Silent data corruption: a run finishes and is wrong
# ---------------------------------------------------------------------------------------------


def test_integer_label_cells_are_values_not_positions(tmp_path):
    """Cell 1 is class "1" whatever the order of data.labels (it used to index data.labels: all inverted)."""
    cells = [0, 1] * 10
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"text {i}", c] for i, c in enumerate(cells)])
    assert read_table(path)["label"].tolist()[:2] == ["0", "1"]  # the file's text: no reader turns it into ints
    data = load_data(_file_cfg(path, "data.labels=['1','0']", "data.eval_fraction=0.2"))
    assert data.labels == ["1", "0"]
    assert _all_labels(data) == [str(c) for c in cells]


@pytest.mark.parametrize("missing", ["", "   ", None, float("nan")], ids=["empty", "blank", "null", "nan"])
def test_empty_or_null_labels_are_faults_naming_the_rows(tmp_path, missing):
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    rows[3]["label"] = rows[6]["label"] = missing
    if isinstance(missing, float):  # JSON has no NaN: Parquet
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    elif missing is None:
        path = _write_jsonl(tmp_path / "d.jsonl", rows)
    else:
        path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[r["text"], r["label"]] for r in rows])
    with pytest.raises(DataError) as info:
        load_data(_file_cfg(path))
    assert info.value.faults == ["train: 2 empty or missing label(s) in column 'label' at row 3, 6"]


def test_one_label_spelled_several_ways_is_one_class(tmp_path):
    """Strings that read as integral numbers are those numbers: "1", 1, 1.0 and "1.0" are one class "1"."""
    spellings = ["1", 1, "1.0", 1.0, " 1 ", "0", 0, 0.0, "0.0", "0"]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(spellings * 2)])
    data = load_data(_file_cfg(path, "data.eval_fraction=0.25"))
    assert data.labels == ["0", "1"]
    assert _all_labels(data) == ["1"] * 5 + ["0"] * 5 + ["1"] * 5 + ["0"] * 5
    # A code with a leading zero is not a number: "01" stays its own class (a fault here, as data.labels lacks it).
    path = _write_jsonl(tmp_path / "codes.jsonl", [{"text": "a", "label": "01"}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match=r"outside the label set \['0', '1'\]: '01' at row 0"):
        load_data(_file_cfg(path, "data.labels=['0','1']"))


def test_structured_cells_are_rejected_naming_column_and_rows(tmp_path):
    # Parquet: a list column reads as np.ndarray cells, a struct column as dicts.
    frame = pd.DataFrame({"text": [["food"], ["tech", "x"]], "label": [{"name": "a"}, {"name": "b"}]})
    frame.to_parquet(tmp_path / "d.parquet")
    df = read_table(tmp_path / "d.parquet")
    assert isinstance(df["text"][1], np.ndarray) and isinstance(df["label"][0], dict)
    # JSONL: arrays and objects among plain cells.
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    rows[1]["text"], rows[4]["text"], rows[2]["label"] = ["food"], {"title": "x"}, ["a"]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    for name, text_rows, label_rows in (("d.parquet", "0, 1", "0, 1"), ("d.jsonl", "1, 4", "2")):
        with pytest.raises(DataError) as info:
            load_data(_file_cfg(tmp_path / name))
        assert info.value.faults == [
            f"train: column 'text' holds lists, arrays or mappings, not text, at row {text_rows}",
            f"train: column 'label' holds lists, arrays or mappings, not text, at row {label_rows}",
        ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.text_columns=[]"], "data.text_columns: required for task 'classification'"),
        (["data=topics_multilabel", "data.text_columns=[]"], "data.text_columns: required for task 'multilabel'"),
        (["data.text_columns=[text,text]"], "data.text_columns: duplicate column 'text'"),
        (["data.labels=[food,sports,food,tech]"], "data.labels: duplicate label 'food'"),
        (["data.labels=['1','1.0','2']"], "data.labels: '1' and '1.0' are the same label"),
        (["data.labels=[food,'',tech]"], "data.labels: empty label at position 1"),
        (["data.class_weights=[1.0,-2.0,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[1.0,nan,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[1.0,inf,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[0.0,0.0,0.0]"], "data.class_weights: all weights are 0"),
        (["data=topics_multilabel", "data.pos_weight=[1.0,-1.0,1.0,1.0]"], "data.pos_weight: each weight must be"),
        (
            ["data=topics_multilabel", "data.label_columns=[sports,food,sports]"],
            "data.label_columns: duplicate column 'sports'",
        ),
    ],
    ids=lambda x: x[-1] if isinstance(x, list) else None,
)
def test_nonsense_data_settings_are_config_errors(overrides, expected):
    assert expected in _problems(overrides)


# ---------------------------------------------------------------------------------------------
# Files the loader cannot read: one DataError naming the file and the line or row
# ---------------------------------------------------------------------------------------------


def _bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken data file of one kind and the fragment its DataError must hold (besides the path)."""
    if kind == "invalid_utf8":
        path = tmp_path / "d.csv"
        path.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
        return path, "is not valid UTF-8 at line 3 (byte offset 21: 0xe9)"
    if kind == "broken_jsonl_line":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
        return path, "line 3 is not valid JSON"
    if kind == "jsonl_line_not_an_object":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
        return path, "line 2 is not a JSON object"
    if kind == "broken_json":
        path = tmp_path / "d.json"
        path.write_text('[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]')
        return path, "not valid JSON (line 2"
    if kind == "empty_csv":
        path = tmp_path / "d.csv"
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if kind == "header_only_csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\n")
        return path, "has no rows, only a header"
    if kind == "ragged_csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\na,x\nb,y,extra\n")
        return path, "line 3"
    if kind == "directory":
        path = tmp_path / "x.csv"
        path.mkdir()
        return path, "is a directory, not a file"
    if kind == "not_parquet":
        path = tmp_path / "d.parquet"
        path.write_text("text,label\na,x\n")
        return path, "cannot read it as Parquet"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "invalid_utf8",
        "broken_jsonl_line",
        "jsonl_line_not_an_object",
        "broken_json",
        "empty_csv",
        "header_only_csv",
        "ragged_csv",
        "directory",
        "not_parquet",
    ],
)
def test_unreadable_files_are_one_data_error_naming_the_file(tmp_path, kind):
    path, expected = _bad_file(tmp_path, kind)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert len(info.value.faults) == 1 and str(path) in info.value.faults[0] and expected in info.value.faults[0]
    with pytest.raises(DataError):  # and through load_data, as training reads it
        load_data(_file_cfg(path))


def test_an_eval_file_that_cannot_be_read_names_that_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    (tmp_path / "eval.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"eval\.csv has no rows"):
        load_data(_file_cfg(train, f"data.eval_path={tmp_path / 'eval.csv'}"))


# ---------------------------------------------------------------------------------------------
# Values the validator did not check: they failed inside a library after the model loaded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learning_rate=nan"], "train.learning_rate: must be finite, got nan"),
        (["train.learning_rate=inf"], "train.learning_rate: must be finite, got inf"),
        (["train.learning_rate=0"], "train.learning_rate: must be > 0, got 0.0"),
        (["train.num_train_epochs=0", "train.max_steps=-1"], "train.num_train_epochs: must be > 0 when train.max_st"),
        (["train.num_train_epochs=nan"], "train.num_train_epochs: must be finite, got nan"),
        (["train.num_train_epochs=inf", "train.max_steps=-1"], "train.num_train_epochs: must be finite, got inf"),
        (["train.logging_steps=0"], "train.logging_steps: must be >= 1, got 0"),
        (["train.optim=adamw_torchh"], "train.optim: unknown optimizer 'adamw_torchh'"),
        (["train.lr_scheduler_type=cosine_warm"], "train.lr_scheduler_type: unknown scheduler 'cosine_warm'"),
        (["train.per_device_eval_batch_size=0"], "train.per_device_eval_batch_size: must be >= 1, got 0"),
        (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size: must be >= 1, got 0"),
        (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps: must be >= 1, got 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0, got -1.0"),
        (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
        (["train.max_grad_norm=nan"], "train.max_grad_norm: must be finite, got nan"),
        (["train.dataloader_num_workers=-1"], "train.dataloader_num_workers: must be >= 0, got -1"),
        (["train.eval_strategy=steps", "train.eval_steps=-5"], "train.eval_steps: must be >= 1, got -5"),
        (["train.seed=-1"], "train.seed: must be in [0, 4294967296), got -1"),
        (["lora.r=0"], "lora.r: must be >= 1, got 0"),
        (["lora.r=100000"], "lora.r: must be <= 4096 (a rank that wide is no longer low-rank), got 100000"),
        (["lora.alpha=0"], "lora.alpha: must be > 0, got 0"),
        (["lora.dropout=1.0"], "lora.dropout: must be in [0, 1), got 1.0"),
        (["lora.dropout=nan"], "lora.dropout: must be finite, got nan"),
        (
            ["data=instructions", "objective.metric=eval_f1_macro"],
            "objective.metric: task 'sft' does not log 'eval_f1_macro'",
        ),
        (["objective.metric=eval_f1_marco"], "objective.metric: task 'classification' does not log 'eval_f1_marco'"),
        (["objective.metric=eval_f1_class_"], "does not log 'eval_f1_class_'"),
        (["data.labels=[food,sports,tech]", "objective.metric=eval_f1_class_music"], "does not log 'eval_f1_class_m"),
        (["data=topics_multilabel", "objective.metric=eval_f1_label_art"], "does not log 'eval_f1_label_art'"),
        (["train.metric_for_best_model=f1_marco"], "train.metric_for_best_model: task 'classification' does not log"),
        (["data.text_template='{title'"], "data.text_template: not a valid format string"),
        (["data.text_template='{} and {}'"], "data.text_template: positional field '{}'"),
        (["data.text_template='{0}'"], "data.text_template: positional field '{0}'"),
        (["data.text_template='{text.upper}'"], "data.text_template: field '{text.upper}'"),
        (["data=red_dot", "model=openllama3b", "data.instruction_template='Describe {product'"], "data.instruction_t"),
        (["data.split_seed=-1"], "data.split_seed: must be >= 0, got -1"),
        (["data.split_seed=1.5"], "data.split_seed: expected int, got 1.5"),
        (["data.split_seed=abc"], "data.split_seed: expected int, got 'abc'"),
        (["data.subsample_seed=-3"], "data.subsample_seed: must be >= 0, got -3"),
    ],
    ids=lambda x: x[-1] if isinstance(x, list) else None,
)
def test_values_that_failed_inside_a_library_are_config_errors(overrides, expected):
    assert expected in _problems(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective.metric=eval_f1_class_food"],  # per-class F1 of a label the data has (labels inferred)
        ["data.labels=[food,sports,tech]", "objective.metric=eval_f1_class_tech"],
        ["objective.metric=eval_mcc"],
        ["data=topics_multilabel", "objective.metric=eval_f1_label_music"],
        ["data=topics_multilabel", "objective.metric=eval_subset_accuracy"],
        ["data=instructions", "objective.metric=eval_perplexity"],
        ["data=instructions", "objective.metric=eval_loss"],
        ["train.metric_for_best_model=f1_macro"],  # the Trainer adds the eval_ prefix
        ["train.metric_for_best_model=loss"],
        ["train.num_train_epochs=0", "train.max_steps=5"],  # max_steps wins; epochs are unused
        ["lora.r=4096"],
        ["data.text_template='Text: {text} ({{literal braces}})'"],
        ["train.optim=paged_adamw_8bit"],
    ],
    ids=lambda x: " ".join(x),
)
def test_sensible_values_still_validate(overrides):
    assert _problems(overrides) == ""


def test_the_new_checks_are_collected_into_one_error():
    problems = _problems(["train.learning_rate=nan", "train.optim=sgdd", "lora.r=0", "data.split_seed=-1"])
    assert len(problems.splitlines()) == 4, problems


def test_optimizer_and_scheduler_names_are_the_installed_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from src.config import LR_SCHEDULERS, OPTIMIZERS

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


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


def test_objective_naming_a_class_is_checked_against_the_named_labels():
    problems = _problems(["data.labels=['R&D','R+D']", "objective.metric=eval_f1_class_R_D"])
    assert "objective.metric: task 'classification' does not log 'eval_f1_class_R_D'" in problems
    assert "eval_f1_class_R_D_" in problems  # the valid names are listed
    from src.config import per_label_metrics

    valid = per_label_metrics("classification", ["R&D", "R+D"])["R+D"]
    assert _problems(["data.labels=['R&D','R+D']", f"objective.metric={valid}"]) == ""


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


def test_a_made_eval_split_that_would_be_empty_is_refused(tmp_path):
    # One row per class: a class of two or more rows always keeps one in each split.
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", f"c{i}"] for i in range(6)])
    with pytest.raises(DataError) as info:
        load_data(_file_cfg(path, "data.eval_fraction=0.1"))
    assert info.value.faults == [
        "eval split is empty: 6 row(s) with data.eval_fraction=0.1 (stratified by class); "
        "raise data.eval_fraction, or give data.eval_path"
    ]
    sft = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    with pytest.raises(DataError, match=r"train split is empty: 1 row\(s\) with data.eval_fraction=0.1"):
        load_data(_data_cfg(["data=file", f"data.path={sft}", "data.task=sft", "data.eval_fraction=0.1"]))


def test_a_made_train_split_that_would_be_empty_is_refused(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    with pytest.raises(DataError, match=r"train split is empty: 2 row\(s\) with data.eval_fraction=0.9"):
        load_data(_file_cfg(path, "data.eval_fraction=0.9"))


# ---------------------------------------------------------------------------------------------
# Precision that cannot run on this machine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train=gpu"], "train.bf16=true, train.tf32=true: no CUDA GPU here: use train=default, or "),
        (["train.bf16=true"], "train.bf16=true: no CUDA GPU here: use train=default, or train.bf16=false"),
        (["train.fp16=true"], "train.fp16=true: no CUDA GPU here: use train=default, or train.fp16=false"),
        (["train.tf32=true"], "train.tf32=true: no CUDA GPU here: use train=default, or train.tf32=null"),
    ],
)
def test_gpu_precision_without_cuda_fails_validation_for_training(monkeypatch, overrides, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert expected in _problems(overrides, for_training=True)
    assert _problems(overrides) == ""  # src.plan, src.bench and src.predict validate GPU configs on CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _problems(overrides, for_training=True) == ""


def test_plan_validates_a_gpu_config_on_a_machine_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = validate(compose_config(["model=openllama3b", "train=gpu"]))
    assert cfg.train.bf16 and cfg.train.tf32


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
