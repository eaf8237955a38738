"""src.predict on real tiny runs: from a run id, a sweep's best run, an adapter directory and stdin; the errors."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from src.config import validate
from src.data import load_data
from src.runs import inference, predict
from tests.conftest import ROOT, compose_config, train_run

TASK_DATA = {"classification": "topics", "multilabel": "topics_multilabel", "sft": "instructions"}
SMALL = [
    "train.max_steps=3",
    "train.per_device_train_batch_size=8",
    "data.subsample=64",
    "data.eval_subsample=48",
    "data.num_sample_prompts=3",
]
TEXTS = [
    "the striker scored a late goal in the match",
    "garlic pasta from the oven",
    "a new laptop and a fast server",
    "the chef baked a dessert",
    "our coach and the referee argued",
]


@dataclass
class TrainedRun:
    task: str
    run_id: str
    tracking_uri: str
    output_dir: Path

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "adapter"


def trained_run(task: str, tmp_path_factory, overrides: tuple[str, ...] = ()) -> TrainedRun:
    """A real tiny run of the task in its own store, trained once per test session (shared by the test modules)."""
    root = tmp_path_factory.getbasetemp() / "-".join(["trained", task, *overrides]).replace("=", "_")
    record = root / "run.json"
    if not record.exists():
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        # Artifacts inside the temp dir, not the default ./mlruns of the working directory.
        mlflow.MlflowClient().create_experiment("lora-sweeps", artifact_location=(root / "artifacts").as_uri())
        raw = compose_config([f"data={TASK_DATA[task]}", *SMALL, *overrides])
        raw["output_dir"] = str(root / "out")
        raw["tracking"]["tracking_uri"] = uri
        train_run(raw)
        record.write_text(json.dumps({"run_id": mlflow.last_active_run().info.run_id, "tracking_uri": uri}))
    saved = json.loads(record.read_text())
    return TrainedRun(task, saved["run_id"], saved["tracking_uri"], root / "out")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> TrainedRun:
    return trained_run("classification", tmp_path_factory)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory) -> TrainedRun:
    return trained_run("multilabel", tmp_path_factory)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> TrainedRun:
    return trained_run("sft", tmp_path_factory)


def _predict(args: list[str], capsys) -> tuple[int, list[dict], str]:
    capsys.readouterr()  # drop what came before (a fixture's training logs)
    code = predict.main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def _report_of(records: list[dict], eval_ds, task: str, labels: list[str], threshold: float) -> dict:
    from sklearn.metrics import classification_report

    if task == "multilabel":
        y_true = np.asarray(eval_ds["labels"]).astype(int)
        y_pred = np.array([[int(name in r["prediction"]) for name in labels] for r in records])
    else:
        y_true = np.asarray(eval_ds["label"])
        y_pred = np.array([labels.index(r["prediction"]) for r in records])
    report = classification_report(
        y_true, y_pred, labels=range(len(labels)), target_names=labels, output_dict=True, zero_division=0
    )
    return _flat_report(report)


def _flat_report(report: dict) -> dict[str, float]:
    """sklearn's nested report as {"row/metric": value}; "accuracy" is a bare number."""
    flat = {}
    for row, cells in report.items():
        flat.update({f"{row}/{k}": v for k, v in cells.items()} if isinstance(cells, dict) else {row: cells})
    return flat


# --- from a run id ----------------------------------------------------------------------------------------------


def test_classification_from_run_id_writes_labels_and_probabilities(cls_run, tmp_path, capsys):
    rows = [{"id": f"r{i}", "text": t, "extra": "ignored"} for i, t in enumerate(TEXTS)]
    source = tmp_path / "in.csv"
    with source.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "pred.csv"
    code = predict.main(
        [
            "--run",
            cls_run.run_id,
            "--tracking-uri",
            cls_run.tracking_uri,
            "--input",
            str(source),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    with out.open() as f:
        result = list(csv.DictReader(f))
    labels = json.loads((cls_run.adapter_dir / "label_map.json").read_text())["labels"]
    assert list(result[0]) == ["id", "text", "extra", "prediction", *[f"prob_{name}" for name in labels]]
    assert [r["id"] for r in result] == [r["id"] for r in rows] and [r["text"] for r in result] == TEXTS
    for r in result:
        probs = np.array([float(r[f"prob_{name}"]) for name in labels])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5) and (probs > 0).all()
        assert r["prediction"] == labels[int(probs.argmax())] and r["extra"] == "ignored"


def test_reloaded_classifier_reproduces_the_training_process_predictions(cls_run, tmp_path, capsys):
    """Save, reload, same predictions: the eval report rebuilt from predict equals the one logged in training."""
    _assert_predict_rebuilds_the_logged_report(cls_run, cls_run.adapter_dir, tmp_path, capsys)


@pytest.mark.parametrize("variant", ["lora.init=pissa", "lora.use_dora=true"])
def test_a_lora_variants_saved_adapter_predicts_as_its_run_evaluated(tmp_path_factory, tmp_path, capsys, variant):
    """PiSSA trained on a base it changed, and saved a plain LoRA for the original base; DoRA saved its magnitudes:
    each, loaded by src.predict, gives the report its run logged."""
    trained = trained_run("classification", tmp_path_factory, (variant,))
    _assert_predict_rebuilds_the_logged_report(trained, trained.adapter_dir, tmp_path, capsys)


def _assert_predict_rebuilds_the_logged_report(trained: TrainedRun, saved: Path, tmp_path, capsys) -> None:
    """src.predict from the run id on the run's eval split gives the classification report the run logged."""
    cfg = validate(yaml.safe_load((trained.output_dir / "config.yaml").read_text()))
    eval_ds = load_data(cfg.data).eval
    source = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in eval_ds["text"]])
    code, records, err = _predict(
        ["--run", trained.run_id, "--tracking-uri", trained.tracking_uri, "--input", str(source)], capsys
    )
    assert code == 0 and len(records) == len(eval_ds)
    assert "scores" not in err  # no label column, nothing to score
    mlflow.set_tracking_uri(trained.tracking_uri)
    logged = mlflow.artifacts.load_dict(f"runs:/{trained.run_id}/classification_report.json")
    labels = json.loads((saved / "label_map.json").read_text())["labels"]
    assert _report_of(records, eval_ds, "classification", labels, 0.5) == pytest.approx(_flat_report(logged))

    # With the run's label column in the input, predict scores the rows as training did: the same report.
    labelled = _write_jsonl(
        tmp_path / "labelled.jsonl",
        [{"text": t, "label": labels[y]} for t, y in zip(eval_ds["text"], eval_ds["label"])],
    )
    out = tmp_path / "scored.jsonl"
    args = ["--run", trained.run_id, "--tracking-uri", trained.tracking_uri, "--input", str(labelled)]
    code, _, err = _predict([*args, "--output", str(out)], capsys)
    assert code == 0
    scores = json.loads(Path(f"{out}.scores.json").read_text())
    assert scores["rows_scored"] == len(eval_ds) and scores["label_columns"] == ["label"]
    assert _flat_report(scores["report"]) == pytest.approx(_flat_report(logged))
    logged_metrics = mlflow.MlflowClient().get_run(trained.run_id).data.metrics
    assert scores["metrics"]["f1_macro"] == pytest.approx(logged_metrics["eval_f1_macro"])
    assert f"accuracy {logged['accuracy']:.4f}" in err and "f1_macro" in err


def _cls_labels(run: TrainedRun) -> list[str]:
    return json.loads((run.adapter_dir / "label_map.json").read_text())["labels"]


def test_input_columns_are_kept_and_labels_scored_by_trainings_rule(cls_run, tmp_path, capsys):
    """Every input column comes back as it was (the label column too); labels are read as training reads them
    (" food", "Food" is another class), a label the run does not know is named by row and left out, and the report
    covers every one of the run's labels, those with no row too."""
    from sklearn.metrics import classification_report

    labels = _cls_labels(cls_run)
    given = [f" {labels[0]}", labels[1], "weather", "", labels[1].upper(), labels[0] + "\u200b"]
    rows = [{"id": f"r{i}", "text": t, "label": g, "note": i} for i, (t, g) in enumerate(zip(TEXTS + TEXTS, given))]
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label", "note"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "pred.csv"
    args = ["--adapter", str(cls_run.adapter_dir), "--input", str(source), "--output", str(out)]
    code, _, err = _predict(args, capsys)
    assert code == 0, err
    with out.open(encoding="utf-8") as f:
        result = list(csv.DictReader(f))
    assert list(result[0])[:5] == ["id", "text", "label", "note", "prediction"]
    assert [r["label"] for r in result] == given and [r["note"] for r in result] == [str(i) for i in range(6)]
    scores = json.loads(Path(f"{out}.scores.json").read_text())
    known = [0, 1, 5]  # " sports" and "sports<ZWSP>" are sports; "" has no label; "weather" and "FOOD" are unknown
    assert scores["rows_scored"] == 3 and scores["unlabeled_rows"] == [3]
    assert scores["unknown_labels"] == [
        {"row": 2, "column": "label", "label": "weather"},
        {"row": 4, "column": "label", "label": labels[1].upper()},
    ]
    assert "row 2 label='weather'" in err and "no label: row 3" in err
    y_true = [labels.index(given[i].strip().replace("\u200b", "")) for i in known]
    y_pred = [labels.index(result[i]["prediction"]) for i in known]
    expected = classification_report(
        y_true, y_pred, labels=range(len(labels)), target_names=labels, output_dict=True, zero_division=0
    )
    assert set(scores["report"]) >= set(labels)  # every class of the run, with or without rows here
    assert _flat_report(scores["report"]) == pytest.approx(_flat_report(expected))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_input_column_named_as_a_prediction_column_is_kept(cls_run, tmp_path, capsys, suffix):
    labels = _cls_labels(cls_run)
    rows = [{"text": t, "prediction": "mine", f"prob_{labels[0]}": "x", "prediction_1": "also mine"} for t in TEXTS]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / f"pred{suffix}"
    code, _, err = _predict(
        ["--adapter", str(cls_run.adapter_dir), "--input", str(source), "--output", str(out)], capsys
    )
    assert code == 0 and "predictions go to prediction_2" in err
    if suffix == ".csv":
        with out.open() as f:
            result = list(csv.DictReader(f))
        assert all(f"prob_{name}_2" in result[0] for name in labels)
    else:
        result = [json.loads(line) for line in out.read_text().splitlines()]
        assert set(result[0]["probabilities_2"]) == set(labels)
    assert all(r["prediction"] == "mine" and r["prediction_1"] == "also mine" for r in result)
    assert all(r[f"prob_{labels[0]}"] == "x" and r["prediction_2"] in labels for r in result)


def test_the_tiny_model_says_once_it_is_a_demo_on_a_users_text(cls_run, tmp_path, capsys, monkeypatch):
    import io

    common = ["--adapter", str(cls_run.adapter_dir)]
    shipped = ROOT / "src/assets/data/topics_validation.csv"
    code, _, err = _predict([*common, "--input", str(shipped)], capsys)
    assert code == 0 and "demo model" not in err
    mine = _write_jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in TEXTS])
    code, _, err = _predict([*common, "--input", str(mine)], capsys)
    assert code == 0 and err.count("2-layer demo model") == 1 and "model=qwen25_05b" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXTS[0] + "\n"))
    code, _, err = _predict(common, capsys)
    assert code == 0 and err.count("2-layer demo model") == 1


def test_multilabel_scores_need_every_label_column(tmp_path, capsys):
    """A multi-label input scores only with all of the run's label columns (a row's labels are all of them); with
    some, a note names the missing ones; with none, predict says nothing about scores."""
    import pandas as pd

    cfg = validate(compose_config(["data=topics_multilabel"]))
    labels = list(cfg.data.label_columns)
    source = inference.Source(adapter_dir=tmp_path, cfg=cfg, task="multilabel", labels=labels, threshold=0.5)
    logits = np.array([[3.0, -3.0, -3.0, -3.0], [-3.0, 3.0, 3.0, -3.0]])
    predicted = predict.Predicted([{}, {}], logits, 0.5)
    full = pd.DataFrame({"text": ["a", "b"], **{c: [int(i == 0), int(i in (1, 2))] for i, c in enumerate(labels)}})
    predict.report_scores(source, full, predicted, str(tmp_path / "out.jsonl"))
    saved = json.loads((tmp_path / "out.jsonl.scores.json").read_text())
    assert saved["rows_scored"] == 2 and saved["metrics"]["subset_accuracy"] == 1.0
    predict.report_scores(source, full[["text", *labels[:2]]], predicted, None)
    assert f"the input lacks the run's label column(s) {labels[2:]}" in capsys.readouterr().err
    predict.report_scores(source, full[["text"]], predicted, None)
    assert capsys.readouterr().err == ""


# --- from an adapter directory, a sweep, stdin ------------------------------------------------------------------


def test_adapter_directory_predicts_as_the_run_does(cls_run, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    code, from_run, _ = _predict(  # the short id, as src.compare prints it
        ["--run", cls_run.run_id[:8], "--tracking-uri", cls_run.tracking_uri, "--input", str(source)], capsys
    )
    assert code == 0
    code, from_dir, _ = _predict(["--adapter", str(cls_run.adapter_dir), "--input", str(source)], capsys)
    assert code == 0
    assert [r["prediction"] for r in from_dir] == [r["prediction"] for r in from_run]
    for a, b in zip(from_dir, from_run):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)

    # Without config.yaml beside it, the base model comes from adapter_config.json and the rest from the defaults.
    bare = tmp_path / "bare" / "adapter"
    shutil.copytree(cls_run.adapter_dir, bare)
    code, from_bare, err = _predict(["--adapter", str(bare), "--input", str(source)], capsys)
    assert code == 0 and "no config.yaml" in err
    for a, b in zip(from_bare, from_run):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def _sweep_run(
    client,
    experiment_id: str,
    sweep_id: str,
    objective: float,
    status: str = "FINISHED",
    parent: str | None = None,
    direction: str = "null",
) -> str:
    tags = {"sweep_id": sweep_id, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_param(run_id, "data.task", "classification")
    client.log_param(run_id, "objective.direction", direction)
    client.log_metric(run_id, "objective", objective)
    client.set_terminated(run_id, status)
    return run_id


def test_sweep_best_follows_the_objective_direction(cls_run):
    mlflow.set_tracking_uri(cls_run.tracking_uri)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(cls_run.run_id).info.experiment_id
    parent = _sweep_run(client, experiment_id, "s-max", 0.99)  # the parent's summary is not a candidate
    _sweep_run(client, experiment_id, "s-max", 0.95, status="FAILED", parent=parent)  # nor a failed child
    best = _sweep_run(client, experiment_id, "s-max", 0.7, parent=parent)
    _sweep_run(client, experiment_id, "s-max", 0.6, parent=parent)
    assert inference.best_sweep_run("s-max", cls_run.tracking_uri) == best  # classification: maximize f1_macro

    _sweep_run(client, experiment_id, "s-min", 0.7, direction="minimize")
    lowest = _sweep_run(client, experiment_id, "s-min", 0.2, direction="minimize")
    assert inference.best_sweep_run("s-min", cls_run.tracking_uri) == lowest
    with pytest.raises(inference.InferenceError, match="no finished run"):
        inference.best_sweep_run("no-such-sweep", cls_run.tracking_uri)


def test_sweep_best_predicts_with_the_best_run(cls_run, tmp_path, capsys):
    mlflow.set_tracking_uri(cls_run.tracking_uri)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(cls_run.run_id).info.experiment_id
    objective = client.get_run(cls_run.run_id).data.metrics["objective"]
    parent = _sweep_run(client, experiment_id, "s-real", objective + 1)
    _sweep_run(client, experiment_id, "s-real", objective - 0.1, parent=parent)
    client.set_tag(cls_run.run_id, "sweep_id", "s-real")
    client.set_tag(cls_run.run_id, "mlflow.parentRunId", parent)
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:2]])
    code, records, err = _predict(
        ["--sweep-best", "s-real", "--tracking-uri", cls_run.tracking_uri, "--input", str(source)], capsys
    )
    assert code == 0 and len(records) == 2
    assert f"best run of sweep s-real is {cls_run.run_id}" in err


def test_a_txt_file_is_one_text_per_line(cls_run, tmp_path, capsys):
    source = tmp_path / "new.txt"
    source.write_text("\n".join([TEXTS[0], "", TEXTS[1]]) + "\n", encoding="utf-8")
    code, from_file, err = _predict(
        ["--run", cls_run.run_id, "--tracking-uri", cls_run.tracking_uri, "--input", str(source)], capsys
    )
    assert code == 0, err
    assert [r["text"] for r in from_file] == TEXTS[:2]
    table = _write_jsonl(tmp_path / "same.jsonl", [{"text": t} for t in TEXTS[:2]])
    code, from_table, _ = _predict(
        ["--run", cls_run.run_id, "--tracking-uri", cls_run.tracking_uri, "--input", str(table)], capsys
    )
    assert [r["prediction"] for r in from_file] == [r["prediction"] for r in from_table]


# --- errors: one line, exit code 2, no traceback ----------------------------------------------------------------


def test_unknown_run_id(cls_run, capsys):
    code, _, err = _predict(
        [
            "--run",
            "0123456789abcdef",
            "--tracking-uri",
            cls_run.tracking_uri,
            "--input",
            str(ROOT / "src/assets/data/topics_validation.csv"),
        ],
        capsys,
    )
    _assert_one_line_error(code, err, "no MLflow run '0123456789abcdef'")


def test_run_without_adapter_artifact(cls_run, capsys):
    mlflow.set_tracking_uri(cls_run.tracking_uri)
    client = mlflow.MlflowClient()
    bare = client.create_run(client.get_run(cls_run.run_id).info.experiment_id)
    client.set_terminated(bare.info.run_id, "FAILED")
    code, _, err = _predict(
        [
            "--run",
            bare.info.run_id,
            "--tracking-uri",
            cls_run.tracking_uri,
            "--input",
            str(ROOT / "src/assets/data/topics_validation.csv"),
        ],
        capsys,
    )
    _assert_one_line_error(code, err, bare.info.run_id, "no 'adapter/' artifact", "FAILED")


def test_base_model_not_available_names_it_and_the_way_out(cls_run, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "moved"
    shutil.copytree(cls_run.adapter_dir, out / "adapter")
    config = yaml.safe_load((cls_run.output_dir / "config.yaml").read_text())
    config["model"]["name_or_path"] = "no-such-org/no-such-model"
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": TEXTS[0]}])
    code, _, err = _predict(["--adapter", str(out / "adapter"), "--input", str(source)], capsys)
    _assert_one_line_error(code, err, "base model 'no-such-org/no-such-model'", "model.name_or_path", "--base-model")
    code, records, _ = _predict(
        ["--adapter", str(out / "adapter"), "--input", str(source), "--base-model", str(tiny_model_dir)], capsys
    )
    assert code == 0 and len(records) == 1


def test_bad_input_file_and_column(cls_run, tmp_path, capsys):
    common = ["--adapter", str(cls_run.adapter_dir)]
    code, _, err = _predict([*common, "--input", str(tmp_path / "missing.csv")], capsys)
    _assert_one_line_error(code, err, "not found", "missing.csv")
    (tmp_path / "in.xml").write_text("<hello/>\n")
    code, _, err = _predict([*common, "--input", str(tmp_path / "in.xml")], capsys)
    _assert_one_line_error(code, err, "unsupported")
    source = _write_jsonl(tmp_path / "body.jsonl", [{"body": t} for t in TEXTS[:2]])
    code, _, err = _predict([*common, "--input", str(source)], capsys)
    _assert_one_line_error(code, err, "['text']", "'body'", "--text-column")
    code, records, _ = _predict([*common, "--input", str(source), "--text-column", "body"], capsys)
    assert code == 0 and [r["body"] for r in records] == TEXTS[:2] and "text" not in records[0]
    code, _, err = _predict([*common, "--input", str(source), "--output", str(tmp_path / "out.parquet")], capsys)
    _assert_one_line_error(code, err, "--output must end in .csv or .jsonl")
    code, _, err = _predict([*common, "--input", str(_write_jsonl(tmp_path / "empty.jsonl", []))], capsys)
    assert code == 2 and "error:" in err


def test_list_or_mapping_cells_are_refused_naming_the_rows(cls_run, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "odd.jsonl", [{"text": TEXTS[0]}, {"text": ["a", "list"]}, {"text": {"k": 1}}])
    code, _, err = _predict(["--adapter", str(cls_run.adapter_dir), "--input", str(source)], capsys)
    _assert_one_line_error(code, err, "input column 'text' holds lists or mappings, not text, at row 1, 2")


def test_not_an_adapter_directory(tmp_path, capsys):
    code, _, err = _predict(
        ["--adapter", str(tmp_path), "--input", str(_write_jsonl(tmp_path / "in.jsonl", []))], capsys
    )
    _assert_one_line_error(code, err, "not an adapter directory")


# --- multi-label and SFT (slow: one more tiny training run each) -------------------------------------------------


@pytest.mark.slow
def test_multilabel_from_run_id_applies_the_threshold(multilabel_run, tmp_path, capsys):
    cfg = validate(yaml.safe_load((multilabel_run.output_dir / "config.yaml").read_text()))
    eval_ds = load_data(cfg.data).eval
    source = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in eval_ds["text"]])
    common = ["--run", multilabel_run.run_id, "--tracking-uri", multilabel_run.tracking_uri, "--input", str(source)]
    code, records, _ = _predict(common, capsys)
    assert code == 0 and len(records) == len(eval_ds)
    label_map = json.loads((multilabel_run.adapter_dir / "label_map.json").read_text())
    labels, threshold = label_map["labels"], label_map["threshold"]
    for r in records:
        assert set(r["probabilities"]) == set(labels)
        assert r["prediction"] == [name for name in labels if r["probabilities"][name] >= threshold]
    mlflow.set_tracking_uri(multilabel_run.tracking_uri)
    logged = mlflow.artifacts.load_dict(f"runs:/{multilabel_run.run_id}/classification_report.json")
    assert _report_of(records, eval_ds, "multilabel", labels, threshold) == pytest.approx(_flat_report(logged))

    # The label columns in the input: scored with the run's threshold, as the run's report was; a cell that is not
    # 0/1 is named and its row left out.
    columns = label_map["labels"]
    labelled = [
        {"text": t, **{c: int(v) for c, v in zip(columns, y)}} for t, y in zip(eval_ds["text"], eval_ds["labels"])
    ]
    scored = _write_jsonl(
        tmp_path / "labelled.jsonl", [*labelled, {"text": "odd", **{c: 0 for c in columns}, columns[0]: "maybe"}]
    )
    out = tmp_path / "scored.jsonl"
    code, _, err = _predict([*common[:-1], str(scored), "--output", str(out)], capsys)
    assert code == 0
    scores = json.loads(Path(f"{out}.scores.json").read_text())
    assert scores["rows_scored"] == len(eval_ds) and scores["label_columns"] == columns
    assert scores["unknown_labels"] == [{"row": len(eval_ds), "column": columns[0], "label": "maybe"}]
    assert _flat_report(scores["report"]) == pytest.approx(_flat_report(logged))
    assert "subset_accuracy" in err

    code, low, _ = _predict([*common, "--threshold", "0.01"], capsys)
    assert code == 0 and all(r["prediction"] == labels for r in low)  # sigmoid > 0.01 everywhere after 3 steps
    out = tmp_path / "pred.csv"
    assert predict.main([*common, "--output", str(out), "--no-progress"]) == 0
    with out.open() as f:
        first = next(csv.DictReader(f))
    assert first["prediction"] == ";".join(records[0]["prediction"]) and f"prob_{labels[0]}" in first


@pytest.mark.slow
def test_sft_generations_after_reload_equal_the_training_process(sft_run, tmp_path, capsys):
    mlflow.set_tracking_uri(sft_run.tracking_uri)
    table = mlflow.artifacts.load_dict(f"runs:/{sft_run.run_id}/samples.json")
    samples = [dict(zip(table["columns"], row)) for row in table["data"]]
    cfg = validate(yaml.safe_load((sft_run.output_dir / "config.yaml").read_text()))
    eval_ds = load_data(cfg.data).eval
    assert [s["prompt"] for s in samples] == eval_ds["prompt"][: len(samples)]
    rows = {str(r["id"]): r for r in map(json.loads, Path(cfg.data.eval_path).read_text().splitlines())}
    inputs = [rows[row_id] for row_id in eval_ds["row_id"][: len(samples)]]
    source = _write_jsonl(tmp_path / "in.jsonl", inputs)
    # training.generate decodes greedily, 48 new tokens, all sample prompts in one batch.
    code, records, _ = _predict(
        [
            "--run",
            sft_run.run_id,
            "--tracking-uri",
            sft_run.tracking_uri,
            "--input",
            str(source),
            "--max-new-tokens",
            "48",
        ],
        capsys,
    )
    assert code == 0
    assert any(s["after"] for s in samples), "the run generated nothing: the comparison below would be vacuous"
    assert [r["generation"] for r in records] == [s["after"] for s in samples]
    assert [r["instruction"] for r in records] == [row["instruction"] for row in inputs]
    assert [r["id"] for r in records] == [row["id"] for row in inputs]


@pytest.mark.slow
def test_sft_stdin_lines_are_instructions_and_sampling_is_seeded(sft_run, tmp_path, capsys, monkeypatch):
    import io

    common = ["--adapter", str(sft_run.adapter_dir), "--max-new-tokens", "8"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name the topic of this sentence.\nRepeat the words.\n"))
    code, greedy, _ = _predict(common, capsys)
    assert code == 0 and [r["text"] for r in greedy] == ["Name the topic of this sentence.", "Repeat the words."]
    assert all("input" not in r for r in greedy)
    sampled = []
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Name the topic of this sentence.\n"))
        code, records, _ = _predict([*common, "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"], capsys)
        assert code == 0
        sampled.append(records[0]["generation"])
    assert sampled[0] == sampled[1]


@pytest.mark.slow
def test_a_4bit_run_is_loaded_quantized_and_reproduces_its_report(tmp_path_factory, tmp_path, capsys):
    run_4bit = trained_run("classification", tmp_path_factory, ("quant=4bit",))
    with inference.open_source(run=run_4bit.run_id, tracking_uri=run_4bit.tracking_uri) as source:
        assert source.cfg.quant.bits == 4
        model = inference.load_finetuned(source, inference.load_run_tokenizer(source))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    cfg = validate(yaml.safe_load((run_4bit.output_dir / "config.yaml").read_text()))
    eval_ds = load_data(cfg.data).eval
    source_file = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in eval_ds["text"]])
    code, records, _ = _predict(
        ["--run", run_4bit.run_id, "--tracking-uri", run_4bit.tracking_uri, "--input", str(source_file)], capsys
    )
    assert code == 0
    mlflow.set_tracking_uri(run_4bit.tracking_uri)
    logged = mlflow.artifacts.load_dict(f"runs:/{run_4bit.run_id}/classification_report.json")
    labels = json.loads((run_4bit.adapter_dir / "label_map.json").read_text())["labels"]
    assert _report_of(records, eval_ds, "classification", labels, 0.5) == pytest.approx(_flat_report(logged))


def test_a_full_fine_tuning_run_predicts_and_exports_as_it_trained(tmp_path_factory, tmp_path, capsys):
    """lora=none saves the whole model (model/, no adapter): predict from the run id rebuilds the eval report the
    run logged, and export writes it as a plain transformers model with the same logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from src.runs import export

    full = trained_run("classification", tmp_path_factory, ("lora=none",))
    saved = full.output_dir / "model"
    assert (saved / "model.safetensors").is_file() and not (saved / "adapter_config.json").exists()
    _assert_predict_rebuilds_the_logged_report(full, saved, tmp_path, capsys)

    out = tmp_path / "exported"
    assert export.main(["--run", full.run_id, "--tracking-uri", full.tracking_uri, "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits
    trained = AutoModelForSequenceClassification.from_pretrained(saved).eval()(**batch).logits
    assert torch.allclose(exported, trained, atol=1e-6)


def test_a_decoder_classifier_predicts_packed_rows_as_it_would_padded_ones(cls_run):
    """src.predict classifies each batch as one packed row (as it trained): the logits of the padded batches."""
    with inference.open_source(run=cls_run.run_id, tracking_uri=cls_run.tracking_uri) as source:
        tokenizer = inference.load_run_tokenizer(source)
        model = inference.load_finetuned(source, tokenizer)
        texts = [*TEXTS, " ".join(TEXTS * 3)]  # lengths of a few tokens to about 100 in one batch
        padded = inference.classify_logits(model, tokenizer, texts, 128, batch_size=4, packed=False)
        packed = inference.classify_logits(model, tokenizer, texts, 128, batch_size=4)
    assert packed.shape == padded.shape == (len(texts), 3)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=1e-5)


SFT_ROWS = [  # each input cell as a file may hold it: no key, null, NaN, empty, blank, text with spaces, a number
    {"id": 1, "instruction": "Name the topic.", "topic": "sport", "output": "sport"},
    {"id": 2, "instruction": "Name the topic.", "input": None, "topic": None, "output": "food"},
    {"id": 3, "instruction": "Summarize.", "input": float("nan"), "topic": "tech", "output": "tech"},
    {"id": 4, "instruction": "Summarize.", "input": "", "topic": "", "output": "x"},
    {"id": 5, "instruction": "Repeat.", "input": "   ", "output": "y"},
    {"id": 6, "instruction": "Repeat.", "input": "  the chef baked  ", "topic": "food", "output": "z"},
    {"id": 7, "instruction": "Count.", "input": 3, "topic": 2.5, "output": "3"},
]


@pytest.mark.parametrize("template", ["alpaca", "plain"])
@pytest.mark.parametrize("instruction_template", [None, "{instruction} (topic: {topic})"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_sft_prompts_of_predict_equal_training_for_missing_inputs(
    tmp_path, monkeypatch, template, instruction_template, suffix
):
    """A row with no input (no key, null, NaN, empty or blank) is prompted by predict byte for byte as in training,
    never with the text "nan" or "None"."""
    import pandas as pd

    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":  # json.dumps writes NaN, which the reader takes back as NaN
        path.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS))
    else:
        pd.DataFrame(SFT_ROWS).to_csv(path, index=False)
    overrides = ["data=instructions", f"data.path={path}", f"data.eval_path={path}", f"data.prompt_template={template}"]
    if instruction_template:
        overrides.append(f"data.instruction_template='{instruction_template}'")
    cfg = validate(compose_config(overrides))
    trained = load_data(cfg.data).train["prompt"]
    seen: list[str] = []
    monkeypatch.setattr(predict, "generate", lambda _m, _t, prompts, *_: seen.extend(prompts) or [""] * len(prompts))
    args = predict.parse_args(["--adapter", str(tmp_path), "--input", str(path), "--no-progress"])
    source = inference.Source(adapter_dir=tmp_path, cfg=cfg, task="sft", labels=None, threshold=0.5)
    predicted = predict.predict(source, None, None, predict.read_inputs(str(path), sys.stdin)[0], args)
    assert seen == trained and len(seen) == len(predicted.outputs) == len(SFT_ROWS)
    assert not any("nan" in p or "None" in p for p in seen), seen
