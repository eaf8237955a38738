"""A chat run through ``python -m src.train data=chat``: it trains, samples and predicts with the chat template."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from src import chat
from src.bundled import DATA_DIR
from src.runs import compare, predict
from tests.conftest import ROOT
from tests.unit import test_chat
from tests.unit.test_chat import MULTI_TURN, _write

tokenizer = test_chat.tokenizer  # the in-process tests' fixture


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """``python -m src.train data=chat train.max_steps=2`` as a user types it, in its own store."""
    root = tmp_path_factory.mktemp("chat-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "src.train", "data=chat", "train.max_steps=2"),
            *("data.num_sample_prompts=2", f"tracking.tracking_uri={uri}", f"hydra.run.dir={root / 'out'}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run_, uri, client


@pytest.mark.slow  # about 30 s on 2 cores: a training subprocess
def test_a_chat_run_trains_and_samples_with_the_chat_template(chat_run, tokenizer, capsys):
    run_, uri, client = chat_run
    assert run_.info.status == "FINISHED"
    assert run_.data.params["data.format"] == "messages" and run_.data.params["data.name"] == "chat"
    assert run_.data.params["data.train_rows"] == "160" and run_.data.metrics["objective"] > 0
    samples = json.loads(Path(client.download_artifacts(run_.info.run_id, "samples.json")).read_text())
    rows = dict(zip(samples["columns"], zip(*samples["data"])))
    validation = [json.loads(line) for line in (DATA_DIR / "chat_validation.jsonl").read_text().splitlines()]
    for i, prompt in enumerate(rows["prompt"]):  # the first eval rows, rendered as predict renders them
        context, reply = chat.split_at_last_reply(validation[i]["messages"])
        assert prompt == tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        assert rows["reference"][i] == reply["content"]
    capsys.readouterr()
    assert compare.main(["--runs", run_.info.run_id, "--tracking-uri", uri, "--samples"]) == 0
    shown = capsys.readouterr().out
    first = validation[0]["messages"]
    assert "<\\|user\\|> Repeat the words" in shown and f"| {first[-1]['content']} |" in shown


@pytest.mark.slow
def test_predict_on_the_chat_validation_file_prompts_as_training_did(chat_run, tmp_path, capsys):
    run_, uri, _ = chat_run
    out = tmp_path / "predictions.jsonl"
    path = DATA_DIR / "chat_validation.jsonl"
    code = predict.main(
        ["--run", run_.info.run_id, "--tracking-uri", uri, "--input", str(path), "--output", str(out)]
        + ["--max-new-tokens", "4", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    validation = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(validation) == 40
    for record, row in zip(records, validation):
        context, reply = chat.split_at_last_reply(row["messages"])
        # every input column comes back as it was; the reply the conversation ends in is the reference
        assert record["id"] == row["id"] and record["messages"] == row["messages"] and context == row["messages"][:-1]
        assert record["reference"] == reply["content"] and isinstance(record["generation"], str)

    lines = tmp_path / "lines.txt"
    lines.write_text("Give the plural of the word: guitar\n")
    assert (
        predict.main(
            [
                "--run",
                run_.info.run_id,
                "--tracking-uri",
                uri,
                "--input",
                str(lines),
                "--output",
                str(tmp_path / "p.csv"),
                "--max-new-tokens",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    (row,) = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert row[predict.LINE_COLUMN] == "Give the plural of the word: guitar"  # one user turn, prompted for a reply
    assert "generation" in row and "reference" not in row

    bad = _write(tmp_path / "bad.jsonl", [MULTI_TURN, [{"role": "robot", "content": "hi"}]])
    capsys.readouterr()
    code = predict.main(["--run", run_.info.run_id, "--tracking-uri", uri, "--input", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown role(s) 'robot'" in err and "at row 1" in err and "Traceback" not in err
