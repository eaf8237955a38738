"""Faults, bad input and concurrency (issue 6): each test injects one and checks that nothing is lost.

Rows of the issue's table: 1-2 parallel writers and a fresh store, 4 SIGKILL and the doctor,
5 NaN/inf loss, 8 resume, 9-10 padding, 11-12 bad data, 15 pickles, 16 remote code, 17 the UI
command, and an unwritable or full disk. Rows 3, 6, 7, 13 and 14 are sweep tests (tests/test_sweeps.py);
SIGTERM is tests/test_train.py::test_sigterm_ends_the_run_killed.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments, set_seed

from src import guards, modeling, tracking, training
from src.config import validate
from src.data import DataError, load_data, read_table
from tests.conftest import ROOT, compose_config, train_run

FAST = [
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "data.subsample=48",
    "data.eval_subsample=24",
    "train.per_device_train_batch_size=8",
]


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])


# ---------------------------------------------------------------------------------------------
# 1-2: parallel writers on one SQLite store, and parallel starts on a fresh one
# ---------------------------------------------------------------------------------------------

def test_retry_locked_waits_out_a_held_sqlite_lock(tmp_path):
    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x INTEGER)")
    writer = sqlite3.connect(db, timeout=0.05, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):  # what an unprotected write sees
        writer.execute("INSERT INTO t VALUES (1)")
    threading.Timer(1.5, holder.execute, ["COMMIT"]).start()
    start = time.monotonic()
    tracking.retry_locked(writer.execute, "INSERT INTO t VALUES (2)")
    assert time.monotonic() - start >= 1.0
    assert writer.execute("SELECT x FROM t").fetchall() == [(2,)]
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # other errors are not retried
        tracking.retry_locked(writer.execute, "INSERT INTO missing VALUES (1)")
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------------------------
# 4: SIGKILL leaves a RUNNING run; the doctor marks it KILLED and leaves live runs alone
# ---------------------------------------------------------------------------------------------

def test_heartbeat_tag_is_refreshed_while_the_run_lives(tmp_path, mlflow_store):
    uri = mlflow_store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(tracking.ensure_experiment("e", uri), tags={"heartbeat": "2000-01-01T00:00:00+00:00"})
    run_id = run_id.info.run_id
    with tracking.heartbeat(uri, run_id, interval_s=0.2):
        deadline = time.time() + 60
        while client.get_run(run_id).data.tags["heartbeat"].startswith("2000") and time.time() < deadline:
            time.sleep(0.2)
    beat = datetime.datetime.fromisoformat(client.get_run(run_id).data.tags["heartbeat"])
    assert abs(time.time() - beat.timestamp()) < 120


# ---------------------------------------------------------------------------------------------
# 5: NaN or inf loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_guard_raises_on_a_non_finite_logged_loss(tmp_path, loss):
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=5, report_to="none")
    state = TrainerState()
    state.global_step = 10
    guard = guards.NonFiniteLossGuard()
    guard.on_log(args, state, TrainerControl(), logs={"loss": 0.7, "eval_loss": float("nan")})  # finite: goes on
    with pytest.raises(guards.NonFiniteLossError, match=rf"loss became {loss} at step 10 \(logged every 5 steps\)"):
        guard.on_log(args, state, TrainerControl(), logs={"loss": loss})


def test_nan_loss_fails_the_run_at_the_step_it_appears_and_is_logged(tmp_path, mlflow_store):
    # A learning rate of 1e30 overflows the adapter weights: on the tiny model the loss is NaN at step 4.
    raw = compose_config(
        [*FAST, "train.max_steps=10", "train.learning_rate=1e30", f"tracking.tracking_uri={mlflow_store}"]
    )
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(guards.NonFiniteLossError, match="training loss became nan at step 4"):
        train_run(raw)
    run_ = _runs(mlflow_store)[0]
    assert run_.info.status == "FAILED" and run_.data.tags["error_type"] == "NonFiniteLossError"
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(run_.info.run_id, "train_loss")
    by_step = {m.step: m.value for m in history}
    assert sorted(by_step) == [1, 2, 3, 4]  # stopped at the logging step that showed it
    assert all(math.isfinite(by_step[s]) for s in (1, 2, 3)) and math.isnan(by_step[4])  # unfiltered
    assert not (tmp_path / "out" / "adapter").exists()


class NanFromStep(TrainerCallback):
    """Make the hidden states NaN from training step ``step`` on (1-based), through a forward hook."""

    def __init__(self, model, step: int):
        self.step = step
        self.current = 0
        norm = next(m for name, m in model.named_modules() if name.endswith("model.norm"))  # before the head
        norm.register_forward_hook(self.hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1

    def hook(self, module, inputs, output):
        if module.training and self.current >= self.step:
            return output * float("nan")
        return output


@pytest.mark.parametrize("guard_on", [True, False])
def test_guard_stops_within_one_logging_step_of_the_first_nan(tmp_path, mlflow_store, guard_on):
    cfg = validate(
        compose_config(
            [*FAST, "train.max_steps=12", "train.logging_steps=3", f"train.stop_on_nonfinite_loss={guard_on}"]
        )
    )
    data = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, data.task)
    trainer, _, _ = training.build_trainer(cfg, model, tokenizer, data, str(tmp_path / "ckpt"))
    trainer.add_callback(NanFromStep(model, step=5))
    if guard_on:
        with pytest.raises(guards.NonFiniteLossError, match="at step 6"):  # steps 4-6 are one logging window
            trainer.train()
        assert trainer.state.global_step == 6
    else:
        trainer.train()  # without the guard, training runs on over NaN weights to the end
        assert trainer.state.global_step == 12
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert math.isfinite(losses[0]) and math.isnan(losses[1])


# ---------------------------------------------------------------------------------------------
# 8: resume from checkpoint-N continues as the uninterrupted run
# ---------------------------------------------------------------------------------------------

N = 4
RESUME = [
    *FAST,
    f"train.max_steps={N + 10}",
    "train.save_strategy=steps",
    f"train.save_steps={N}",
    "train.save_total_limit=null",
    "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must be restored too
]


class StopAt(TrainerCallback):
    """Stop training after ``step``, as a killed job would (its checkpoint-``step`` is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _fresh_trainer(cfg, data, tokenizer, output_dir: Path):
    """A new model and trainer, as a new process builds them."""
    set_seed(cfg.train.seed)
    model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, data.task)
    trainer, _, _ = training.build_trainer(cfg, model, tokenizer, data, str(output_dir))
    return trainer, model


def _losses(trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # two trainings and a resume, ~25 s
@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=pytest.mark.slow)])
def test_resumed_run_continues_as_the_uninterrupted_one(tmp_path, mlflow_store, quant):
    cfg = validate(compose_config([*RESUME, f"quant={quant}"]))
    data = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)

    whole, whole_model = _fresh_trainer(cfg, data, tokenizer, tmp_path / "whole")
    whole.train()

    first, _ = _fresh_trainer(cfg, data, tokenizer, tmp_path / "split")
    first.add_callback(StopAt(N))
    first.train()
    assert first.state.global_step == N and (tmp_path / "split" / f"checkpoint-{N}").is_dir()

    checkpoint = guards.resume_checkpoint("latest", tmp_path / "split")
    assert checkpoint == str(tmp_path / "split" / f"checkpoint-{N}")
    second, second_model = _fresh_trainer(cfg, data, tokenizer, tmp_path / "split")
    trained = StepRecorder()
    second.add_callback(trained)
    second.train(resume_from_checkpoint=checkpoint)

    assert trained.steps == list(range(N + 1, N + 11))  # only the steps after the checkpoint ran
    expected, got = _losses(whole), _losses(second)
    assert got == pytest.approx(expected, abs=2e-4)  # the Trainer rounds logged losses
    for name, value in _lora_state(second_model).items():
        torch.testing.assert_close(value, _lora_state(whole_model)[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_train_resume_from_checkpoint_latest_continues_the_loss_curve(tmp_path, mlflow_store):
    """Through the entrypoint: the second run resumes checkpoint-N and logs the steps after it."""
    constant = [*RESUME, "train.lr_scheduler_type=constant", "train.warmup_steps=0"]

    def history(overrides, out):
        raw = compose_config([*constant, *overrides])
        raw["output_dir"] = str(out)
        train_run(raw)
        run_ = _runs(mlflow_store)[0]
        steps = mlflow.MlflowClient(mlflow_store).get_metric_history(run_.info.run_id, "train_loss")
        return run_, {m.step: m.value for m in steps}

    _, whole = history([], tmp_path / "whole")
    history([f"train.max_steps={N}"], tmp_path / "split")
    assert (tmp_path / "split" / "checkpoints" / f"checkpoint-{N}" / guards.FINGERPRINT_NAME).is_file()
    resumed, tail = history(["train.resume_from_checkpoint=latest"], tmp_path / "split")
    assert resumed.data.tags["resumed_from"].endswith(f"checkpoint-{N}")
    assert sorted(tail) == list(range(N + 1, N + 11))
    assert tail == pytest.approx({s: whole[s] for s in tail}, abs=2e-4)


def test_resume_latest_without_a_checkpoint_starts_fresh_and_a_bad_path_is_an_error(tmp_path):
    assert guards.resume_checkpoint(None, tmp_path) is None
    assert guards.resume_checkpoint("latest", tmp_path / "none-yet") is None
    with pytest.raises(FileNotFoundError, match="not a Trainer checkpoint"):
        guards.resume_checkpoint(str(tmp_path), tmp_path)


def _checkpoint_of(cfg, tmp_path: Path) -> Path:
    """A checkpoint as the Trainer leaves one (safetensors weights, trainer_state.json), with ``cfg``'s fingerprint."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "trainer_state.json").write_text("{}")
    labels = load_data(cfg.data).labels
    (checkpoint / guards.FINGERPRINT_NAME).write_text(json.dumps(guards.run_fingerprint(cfg, "classification", labels)))
    return checkpoint


def test_resume_from_a_checkpoint_of_another_configuration_is_refused_naming_the_keys(
    tmp_path, mlflow_store, monkeypatch
):
    """Another data file with the same three classes, or another rank and max_length: refused before the model
    loads, with each differing key as checkpoint vs this run. Before the fix the run trained on without a word."""
    from src.config import ConfigError

    checkpoint = _checkpoint_of(validate(compose_config(FAST)), tmp_path)
    reordered = tmp_path / "other_topics.csv"  # the same label set, other rows
    lines = (ROOT / "src" / "assets" / "data" / "topics_train.csv").read_text().splitlines(keepends=True)
    reordered.write_text("".join([lines[0], *reversed(lines[1:])]))

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the resume was checked")

    monkeypatch.setattr(modeling, "load_model", no_model)
    cases = [
        ([f"data.path={reordered}"], ["data.path.sha256: "]),
        (["lora.r=4", "model.max_length=32"], ["lora.r: 8 vs 4", "model.max_length: 128 vs 32"]),
    ]
    for i, (overrides, named) in enumerate(cases):
        raw = compose_config([*FAST, f"train.resume_from_checkpoint={checkpoint}", *overrides])
        raw["output_dir"] = str(tmp_path / f"second-{i}")
        with pytest.raises(ConfigError) as refused:
            train_run(raw)
        message = str(refused.value)
        assert "was trained on another configuration" in message and all(n in message for n in named), message
        assert len(message.splitlines()) == 2 + len(named), message  # only the keys that differ
        run_ = _runs(mlflow_store)[0]
        assert run_.info.status == "FAILED" and named[0] in run_.data.tags["error"]


def test_resume_with_the_checkpoints_own_configuration_is_not_refused(tmp_path, capsys):
    cfg = validate(compose_config(FAST))
    checkpoint = _checkpoint_of(cfg, tmp_path)
    guards.check_resume(str(checkpoint), guards.run_fingerprint(cfg, "classification", load_data(cfg.data).labels))
    (checkpoint / guards.FINGERPRINT_NAME).unlink()  # saved before fingerprints: a note, not a refusal
    guards.check_resume(str(checkpoint), {"data.task": "sft"})
    assert "has no run_fingerprint.json" in capsys.readouterr().err
    assert guards.run_fingerprint(cfg, "sft", None)["data.labels"] is None  # SFT has no labels


# ---------------------------------------------------------------------------------------------
# 9-10: a decoder classifier without a pad token, and padding that does not change the logits
# ---------------------------------------------------------------------------------------------

TEXTS = [
    "the football match went to extra time",
    "garlic",
    "a new phone with a faster chip and a bigger battery was announced today",
    "bake the bread",
]


@pytest.fixture(scope="module")
def classifier():
    cfg = validate(compose_config([]))
    tokenizer = modeling.load_tokenizer(cfg.model)
    set_seed(0)
    model = modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b", "c"], tokenizer.pad_token_id)
    return tokenizer, modeling.apply_lora(model, cfg.lora, "classification").eval()


def test_decoder_classifier_takes_a_padded_batch_of_four_without_a_pad_token(tiny_model_dir, classifier):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir).pad_token is None  # Llama-style: no pad token
    assert json.loads((tiny_model_dir / "config.json").read_text())["pad_token_id"] is None
    tokenizer, model = classifier
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_example_alone_and_inside_a_padded_batch_gets_the_same_logits(classifier, side):
    tokenizer, model = classifier
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        with torch.no_grad():
            batch = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
            alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
    finally:
        tokenizer.padding_side = previous
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 11-12: bad data is reported once, with row ids, before any model loads; CSV read exactly
# ---------------------------------------------------------------------------------------------


def _tokenizer_only_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model directory with the tiny tokenizer but no config or weights: loading the model fails."""
    model_dir = tmp_path / "tokenizer-only"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    return model_dir


def test_every_data_fault_is_reported_in_one_report_before_the_model_loads(tmp_path, mlflow_store, tiny_model_dir):
    rows = [
        {"id": "r1", "text": "a fine row", "label": 0},
        {"id": "r2", "text": "", "label": 1},
        {"id": "r3", "text": None, "label": 1},
        {"id": "r4", "text": "a string label", "label": "two"},
        {"id": "r5", "text": "a label past the set", "label": 7},
        {"id": "r6", "text": "word " * 2000, "label": 2},
        {"id": "r7", "text": "fine again", "label": 1},
        {"id": "r8", "text": "and again", "label": 2},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    model_dir = _tokenizer_only_model(tmp_path, tiny_model_dir)
    raw = compose_config(
        [
            *FAST,
            "data=file",
            f"data.path={path}",
            "data.task=classification",
            "data.label_column=label",
            "data.labels=['0','1','2']",  # a label is its value: the int 1 is the class "1"
            "data.long_rows=error",  # the default truncates one far too long row
            f"model.name_or_path={model_dir}",
        ]
    )
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(DataError) as info:
        train_run(raw)
    faults = info.value.faults
    assert len(faults) == 3, faults
    assert "2 empty or missing text(s) in column 'text' at id r2, r3" in faults[0]
    assert "2 label(s) in column 'label' outside the label set ['0', '1', '2']" in faults[1]
    assert "'two' at id r4" in faults[1] and "7 at id r5" in faults[1]
    assert "1 row(s) longer than 10 x model.max_length=128 tokens" in faults[2] and "id r6" in faults[2]
    run_ = _runs(mlflow_store)[0]
    assert run_.info.status == "FAILED" and run_.data.tags["error_type"] == "DataError"  # not the model's OSError


def test_multilabel_faults_and_overlong_rows_share_one_report(tmp_path):
    path = tmp_path / "ml.csv"
    long_text = "word " * 1500
    path.write_text(f"id,text,a,b\n1,fine,1,0\n2,,0,1\n3,odd cell,2,1\n4,{long_text},0,yes\n5,ok,0,1\n")
    cfg = validate(
        compose_config(
            [
                "data=file",
                f"data.path={path}",
                "data.task=multilabel",
                "data.label_columns=[a,b]",
                "data.long_rows=error",
            ]
        )
    )
    tokenizer = modeling.load_tokenizer(cfg.model)
    with pytest.raises(DataError) as info:
        load_data(cfg.data, tokenizer, cfg.model.max_length)
    report = str(info.value)
    assert "empty or missing text(s) in column 'text' at id 2" in report
    assert "multi-label column 'a' must hold 0/1, found '2' at id 3" in report
    assert "multi-label column 'b' must hold 0/1, found 'yes' at id 4" in report
    assert "1 row(s) longer than 10 x model.max_length=128 tokens" in report and ": id 4" in report
    cfg.data.max_length_factor = None  # null: long rows are truncated in training, not faults
    with pytest.raises(DataError) as info:
        load_data(cfg.data, tokenizer, cfg.model.max_length)
    assert "longer than" not in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_and_tsv_with_a_byte_order_mark_quotes_and_newlines_are_read_exactly(tmp_path, suffix):
    import csv

    rows = [["1", 'She said "hi,\tthere"\nand left.', "ja"], ["2", "naïve café — 東京, 😀", "nein"]]
    path = tmp_path / f"bom{suffix}"
    with path.open("w", encoding="utf-8-sig", newline="") as f:  # Excel's "CSV UTF-8" starts with a BOM
        csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",").writerows([["id", "text", "label"], *rows])
    df = read_table(path)
    assert list(df.columns) == ["id", "text", "label"]
    assert df["text"].tolist() == [r[1] for r in rows]
    assert df["id"].tolist() == ["1", "2"]  # the text as written: no number parsing


# ---------------------------------------------------------------------------------------------
# 15: pickles are refused; only safetensors are loaded
# ---------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that loading the file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_load_as_used_refuses_a_pickle_that_runs_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save(Payload(marker), path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    torch.load(path, weights_only=False).close()  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_adapter_with_pickled_weights_is_refused(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    torch.save(Payload(tmp_path / "ran"), adapter / "adapter_model.bin")
    with pytest.raises(guards.UnsafeFileError, match=r"pickle files \(adapter_model.bin\)"):
        guards.assert_safetensors_only(adapter)
    shutil.copy(tiny_model_dir / "model.safetensors", adapter / "adapter_model.safetensors")
    with pytest.raises(guards.UnsafeFileError, match="adapter_model.bin"):  # a pickle beside safetensors too
        guards.assert_safetensors_only(adapter)
    (adapter / "adapter_model.bin").unlink()
    guards.assert_safetensors_only(adapter)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("evil", ["optimizer.pt", "rng_state.pth", "adapter_model.bin"])
def test_resume_from_a_checkpoint_holding_a_pickle_is_refused_before_the_model_loads(
    tmp_path, mlflow_store, tiny_model_dir, evil
):
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    shutil.copy(tiny_model_dir / "model.safetensors", checkpoint / "adapter_model.safetensors")
    torch.save({"state": {}, "param_groups": []}, checkpoint / "scheduler.pt")  # plain data: allowed
    torch.save(Payload(tmp_path / "ran"), checkpoint / evil)
    raw = compose_config([*FAST, "train.resume_from_checkpoint=latest"])
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(guards.UnsafeFileError, match=re.escape(evil)):
        train_run(raw)
    assert not (tmp_path / "ran").exists()
    run_ = _runs(mlflow_store)[0]
    assert run_.info.status == "FAILED" and run_.data.tags["error_type"] == "UnsafeFileError"
    assert "trainable_params" not in run_.data.metrics  # refused before the model loaded


# ---------------------------------------------------------------------------------------------
# 16: remote code needs model.trust_remote_code=true
# ---------------------------------------------------------------------------------------------

CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("x")
from transformers import LlamaConfig, LlamaForSequenceClassification

class CustomConfig(LlamaConfig):
    model_type = "{model_type}"

class CustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomConfig
"""


def _custom_model(tmp_path: Path, tiny_model_dir: Path, model_type: str) -> Path:
    model_dir = tmp_path / model_type
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForSequenceClassification": "custom.CustomForSequenceClassification",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "custom.py").write_text(CUSTOM_CODE.replace("{model_type}", model_type))
    return model_dir


def test_model_that_needs_remote_code_is_refused_unless_trusted(tmp_path, mlflow_store, tiny_model_dir):
    model_dir = _custom_model(tmp_path, tiny_model_dir, "custom_llama")
    raw = compose_config([*FAST, f"model.name_or_path={model_dir}"])
    raw["output_dir"] = str(tmp_path / "out")
    cfg = validate(raw)
    assert cfg.model.trust_remote_code is False
    with pytest.raises(guards.RemoteCodeError, match=r"set model.trust_remote_code=true only if you trust"):
        modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b"], 2)
    with pytest.raises(guards.RemoteCodeError, match="custom_llama"):
        train_run(raw)
    assert _runs(mlflow_store)[0].data.tags["error_type"] == "RemoteCodeError"
    assert not (model_dir / "CODE_RAN").exists()
    guards.check_remote_code(str(model_dir), None, trust_remote_code=True)  # the explicit opt-in passes


def test_auto_map_on_a_built_in_architecture_loads_the_built_in_class_and_runs_no_code(tmp_path, tiny_model_dir):
    model_dir = _custom_model(tmp_path, tiny_model_dir, "llama")  # as Phi-3's hub config does
    cfg = validate(compose_config([f"model.name_or_path={model_dir}"]))
    model = modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b"], 2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert not (model_dir / "CODE_RAN").exists()


def test_no_shipped_model_config_trusts_remote_code():
    import yaml

    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["trust_remote_code"] is False, path.name


# ---------------------------------------------------------------------------------------------
# 17: the documented MLflow UI command listens on loopback only
# ---------------------------------------------------------------------------------------------


def test_documented_mlflow_ui_and_server_commands_bind_to_loopback():
    readme = ROOT / "README.md"
    commands = [
        line.strip()
        for line in (readme.read_text() if readme.exists() else "").splitlines()
        if re.match(r"^\s*(\$\s*)?mlflow (ui|server)\b", line)
    ]
    if not commands:
        pytest.skip("README.md documents no `mlflow ui` or `mlflow server` command yet")
    for command in commands:
        assert re.search(r"--host[ =]127\.0\.0\.1\b", command), f"not bound to 127.0.0.1: {command}"
        assert "0.0.0.0" not in command


# ---------------------------------------------------------------------------------------------
# An unwritable or full disk: a clear error and a FAILED run, not a hang
# ---------------------------------------------------------------------------------------------


def _failed_run(raw: dict, uri: str) -> mlflow.entities.Run:
    with pytest.raises(OSError):
        train_run(raw)
    run_ = _runs(uri)[0]
    assert run_.info.status == "FAILED"
    return run_


def test_output_dir_under_a_regular_file_fails_the_run_with_the_path(tmp_path, mlflow_store):
    (tmp_path / "a-file").write_text("not a directory")
    raw = compose_config(FAST)
    raw["output_dir"] = str(tmp_path / "a-file" / "out")
    run_ = _failed_run(raw, mlflow_store)
    assert run_.data.tags["error_type"] in ("FileExistsError", "NotADirectoryError")
    assert "a-file" in run_.data.tags["error"]


def test_unwritable_artifact_location_fails_the_run_with_the_path(tmp_path, mlflow_store):
    (tmp_path / "a-file").write_text("not a directory")
    mlflow.MlflowClient(mlflow_store).create_experiment(
        "unwritable", artifact_location=(tmp_path / "a-file" / "artifacts").as_uri()
    )
    raw = compose_config([*FAST, "tracking.experiment=unwritable"])
    raw["output_dir"] = str(tmp_path / "out")
    run_ = _failed_run(raw, mlflow_store)
    assert "a-file" in run_.data.tags["error"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_full_disk_fails_the_run_with_no_space_left(tmp_path, mlflow_store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").symlink_to("/dev/full")  # every write there fails with ENOSPC
    raw = compose_config(FAST)
    raw["output_dir"] = str(out)
    run_ = _failed_run(raw, mlflow_store)
    assert "No space left on device" in run_.data.tags["error"]


# ---------------------------------------------------------------------------------------------
# Output directories: two runs started in the same second get one each
# ---------------------------------------------------------------------------------------------


def test_a_taken_output_directory_is_never_handed_out_again(tmp_path):
    from src.outputs import allocate_dir, unique_dir

    base = str(tmp_path / "2026-12-07" / "12-00-00-tiny-topics")
    assert allocate_dir(base) == base
    assert allocate_dir(base) == f"{base}-2"
    (tmp_path / "2026-12-07" / "12-00-00-tiny-topics-3").mkdir()  # taken by a run of another machine
    assert allocate_dir(base) == f"{base}-4"

    racing = str(tmp_path / "race" / "12-00-00")
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(allocate_dir(racing))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 16 and all(Path(p).is_dir() for p in got)

    once = str(tmp_path / "resolved-twice")
    assert unique_dir(once) == unique_dir(once) == once  # one process resolving its config again: the same dir


def test_the_default_run_and_sweep_directories_are_allocated_uniquely():
    from omegaconf import OmegaConf

    from tests.conftest import compose_hydra

    hydra = OmegaConf.to_container(compose_hydra().hydra, resolve=False)
    assert hydra["run"]["dir"].startswith("${unique_dir:outputs/${now:"), hydra["run"]
    assert hydra["sweep"]["dir"].startswith("${unique_dir:multirun/${now:"), hydra["sweep"]
