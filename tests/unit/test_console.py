"""What a run prints: compact metric lines with numbers as numbers, a summary, a log file, and no known noise."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from src import console, modeling
from tests.conftest import ROOT


def test_metric_lines_are_compact_and_numeric():
    line = console.metric_line(
        {"loss": 0.41234, "grad_norm": 1.5, "learning_rate": 0.00019, "epoch": 0.5, "train_tokens_per_second": 1178.3},
        20,
        40,
    )
    assert line == "step 20/40  epoch 0.50  loss 0.4123  grad_norm 1.5  lr 1.90e-04  tokens/s 1178"
    evaluation = console.metric_line(
        {"eval_loss": 0.9976, "eval_f1_macro": 0.2513, "eval_f1_class_food": 0.0, "eval_runtime": 1.2}, 20, 40
    )
    assert evaluation == "eval  step 20/40  loss 0.9976  f1_macro 0.2513"  # per-class scores stay in MLflow
    assert console.metric_line({"total_flos": 1e12, "epoch": 1.0}, 5, 5) is None
    assert [console.number(v) for v in (12, 3.0, float("nan"), 1e-7, 123456.7)] == [
        "12",
        "3",
        "nan",
        "1.00e-07",
        "1.23e+05",
    ]


def test_a_new_head_is_expected_and_anything_else_is_reported():
    loading = {"missing_keys": ["score.weight"], "unexpected_keys": ["lm_head.weight"], "mismatched_keys": []}
    assert modeling.unexpected_loading(loading) == []
    loading = {
        "missing_keys": ["classifier.bias", "model.layers.0.mlp.up_proj.weight"],
        "unexpected_keys": ["cls.predictions.bias", "model.extra.weight"],
        "mismatched_keys": [("model.embed_tokens.weight", (10, 4), (12, 4))],
    }
    assert modeling.unexpected_loading(loading) == [
        "missing model.layers.0.mlp.up_proj.weight",
        "unused model.extra.weight",
        "mismatched model.embed_tokens.weight",
    ]


def test_a_run_prints_metric_lines_and_a_summary_and_logs_to_its_file(tmp_path, mlflow_store):
    out = tmp_path / "out"
    uri = mlflow_store
    cmd = [sys.executable, "-m", "src.train", "train.max_steps=4", "train.logging_steps=2"]
    cmd += ["data.subsample=64", "data.eval_subsample=24"]
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={out}", f"tracking.tracking_uri={uri}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "step 2/4  epoch" in err and "eval  step 4/4" in err
    assert "'eval_f1_macro'" not in err and "{'loss'" not in err  # no dicts of quoted numbers
    summary = next(line for line in err.splitlines() if " finished: eval_f1_macro " in line)
    assert summary.startswith("run ") and "(tiny-topics-16bit-attn_qv-r8-a16)" in summary
    assert f"adapter   {out.resolve() / 'adapter'}" in err
    assert f"mlflow ui --backend-store-uri {uri}" in err
    for noise in ("LOAD REPORT", "is_gradient_checkpointing", "pin_memory", "Token indices sequence length", "Map:"):
        assert noise not in err, noise
    import mlflow

    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])  # the runs table's Description column says what it was
    assert run.data.tags["mlflow.note.content"].startswith("eval_f1_macro = ")
    assert (
        "LoRA r=8, alpha=16 on attn_qv; 16-bit tiny base; 7,552 trainable params; topics"
        in (run.data.tags["mlflow.note.content"])
    )
    log = (out / "train.log").read_text()
    assert "step 2/4" in log and " finished: eval_f1_macro " in log


def test_a_config_error_is_the_one_message_and_still_ends_failed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "src.train", "lora.r=0", "train.learning_rate=-1", f"tracking.tracking_uri={uri}"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr
    assert not [line for line in STORE_SETUP_LINES if line in err], err  # the new store is made quietly
    assert err.count("lora.r: must be >= 1, got 0") == 1, err
    assert "train.learning_rate: must be > 0, got -1.0" in err and "Traceback" not in err, err
    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "ConfigError"


def test_help_lists_the_groups_a_user_composes_and_nothing_internal():
    proc = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("Config groups")[1].split("Keys (")[0].splitlines()[1:]
    assert {line.split()[0] for line in groups if line.strip()} == {
        "data",
        "experiment",
        "lora",
        "model",
        "quant",
        "train",
    }


# The child records every connection or name lookup it tries, refusing it, and then reports what it saw. It imports
# the 4-bit path as the commands do: src first, then peft, which imports bitsandbytes.
NO_NETWORK_CHILD = """
import json, socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(repr(args[:2]))
    raise OSError("network refused by the test")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
import src  # noqa
from src.config import QuantConfig
from src import modeling
import peft  # noqa: imports bitsandbytes, as transformers' Trainer does
modeling.to_bnb_config(QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16"))
from bitsandbytes.functional import has_avx512bf16
from huggingface_hub import constants
print(json.dumps({"tried": tried, "fetches": bool(has_avx512bf16()), "offline_after": constants.HF_HUB_OFFLINE,
                  "bnb": "bitsandbytes" in sys.modules}))
"""


def _bitsandbytes_import(env_changes: dict[str, str]) -> tuple[dict, str]:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "LORA_SWEEPS_VERBOSE")}
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_CHILD], cwd=ROOT, capture_output=True, text=True, env={**env, **env_changes}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_bitsandbytes_imports_offline_and_quietly_by_default():
    """bitsandbytes asks the hub for a CPU kernel at import (on CPUs with AVX512-BF16), and says
    "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot have it. The project, not the
    caller's environment, keeps that import offline and quiet; the hub stays online for models afterwards."""
    seen, err = _bitsandbytes_import({})
    assert seen["bnb"] and seen["tried"] == [], seen
    assert "gemm_4bit_forward" not in err and "kernels-community" not in err, err
    assert seen["offline_after"] is False  # models still download
    if not seen["fetches"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks the hub for nothing here")


def test_an_explicit_hf_hub_offline_0_lets_bitsandbytes_ask_the_hub():
    seen, _ = _bitsandbytes_import({"HF_HUB_OFFLINE": "0"})
    if not seen["fetches"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks the hub for nothing here")
    assert seen["tried"], seen  # the user's own setting wins: the kernel was asked for (and the test refused it)


def test_say_goes_to_stderr_where_no_logging_is_set_up(monkeypatch, capsys, caplog):
    import logging

    from src import console

    monkeypatch.setattr(console.log, "hasHandlers", lambda: False)
    console.say("one line")
    assert capsys.readouterr().err == "one line\n"
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="src")
    console.say("through the logger")
    assert "through the logger" in caplog.text and "through the logger" not in capsys.readouterr().err


def _child_env(**changes: str) -> dict[str, str]:
    """The environment of a new user's shell: none of the switches this process (``import src``) may have set."""
    import os

    unset = ("LORA_SWEEPS_VERBOSE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **changes}


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_activation_checkpointing_raises_no_deprecation(tiny_model_dir, quant):
    """The 4-bit path once reached transformers' deprecated ``gradient_checkpointing_enable`` through peft."""
    child = f"""
import src  # noqa
from src.config import compose, validate
from src import modeling
cfg = validate(compose(["model.name_or_path={tiny_model_dir}", "quant={quant}"]))
model = modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b"], 0, activation_checkpointing=True)
print("checkpointing", model.is_activation_checkpointing)
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, env=_child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpointing True" in proc.stdout
    assert "is deprecated" not in proc.stderr, proc.stderr


# A new SQLite store, opened as every command opens it. "floor": MLflow 3.9's own logging setup (a dictConfig that
# gives alembic an INFO handler and resets the levels of every logger below mlflow's and alembic's).
NEW_STORE_CHILD = """
import logging.config, sys
import src  # noqa
import mlflow  # noqa
if sys.argv[2] == "floor":
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    loggers = {name: {"handlers": ["h"], "level": "INFO", "propagate": False} for name in ("mlflow", "alembic")}
    logging.config.dictConfig(
        {"version": 1, "disable_existing_loggers": False, "handlers": {"h": handler}, "loggers": loggers}
    )
from src.tracking import ensure_experiment
ensure_experiment("lora-sweeps", sys.argv[1])
"""
STORE_SETUP_LINES = ("Creating initial MLflow database tables", "Updating database tables", "Context impl", "DDL")


@pytest.mark.parametrize("logging_setup", ["installed", "floor"])
@pytest.mark.parametrize("verbose", [False, True])
def test_a_new_store_is_created_without_narration(tmp_path, logging_setup, verbose):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _child_env(**({"LORA_SWEEPS_VERBOSE": "1"} if verbose else {}))
    proc = subprocess.run(
        [sys.executable, "-c", NEW_STORE_CHILD, uri, logging_setup], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()
    shown = [line for line in STORE_SETUP_LINES if line in proc.stderr]
    if verbose:  # LORA_SWEEPS_VERBOSE=1 shows what MLflow says
        assert "Creating initial MLflow database tables" in shown, proc.stderr
        assert logging_setup == "installed" or "Context impl" in shown, proc.stderr
    else:
        assert shown == [], proc.stderr


@pytest.mark.parametrize(
    ("env", "bars"),
    [({}, False), ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"}, True), ({"LORA_SWEEPS_VERBOSE": "1"}, True)],
)
def test_compare_samples_downloads_without_progress_bars(mlflow_store, env, bars):
    """A user's own MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins, and LORA_SWEEPS_VERBOSE=1 shows the bars."""
    import mlflow

    with mlflow.start_run(run_name="sft") as run:
        mlflow.log_params({"data.task": "sft", "model.name": "tiny"})
        mlflow.log_metric("objective", 1.0)
        table = {"prompt": ["### Instruction:\nName it.\n"], "reference": ["x"], "before": [""], "after": ["x"]}
        mlflow.log_table(table, artifact_file="samples.json")
    cmd = [sys.executable, "-m", "src.compare", "--runs", run.info.run_id, "--samples", "--tracking-uri", mlflow_store]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_child_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before and after fine-tuning" in proc.stdout
    assert ("Downloading artifacts" in proc.stderr) is bars, proc.stderr


class _State:
    """The two TrainerState fields TokenRateCallback reads."""

    def __init__(self):
        self.num_input_tokens_seen = 0
        self.global_step = 0


def _train_with_fake_clock(accumulation: int, steps: int, tokens_per_micro_batch: int, micro_batch_s: float):
    """A Trainer's calls to TokenRateCallback for ``steps`` optimizer steps of ``accumulation`` micro-batches each,
    logged every step and evaluated (2 s) after every second; returns the logs as the callbacks after it see them."""
    from src.training import TokenRateCallback

    now = [100.0]
    callback, state, logs = TokenRateCallback(clock=lambda: now[0]), _State(), []
    callback.on_train_begin(None, state, None)
    for step in range(1, steps + 1):
        for _ in range(accumulation):  # the Trainer counts every micro-batch's tokens
            now[0] += micro_batch_s
            state.num_input_tokens_seen += tokens_per_micro_batch
        state.global_step = step
        # HF's own rate: the session's tokens over the time since training began, evaluations included
        logs.append({"loss": 1.0, "train_tokens_per_second": 1e9, "train_runtime": 1.0})
        callback.on_log(None, state, None, logs=logs[-1])
        if step % 2 == 0:
            now[0] += 2.0
            logs.append({"eval_loss": 1.0, "eval_runtime": 2.0})
            callback.on_log(None, state, None, logs=logs[-1])
    logs.append({"train_loss": 1.0, "train_runtime": now[0] - 100.0})
    callback.on_log(None, state, None, logs=logs[-1])
    return logs


@pytest.mark.parametrize("accumulation", [1, 4])
def test_tokens_per_second_counts_every_micro_batch_over_the_time_they_took(accumulation):
    logs = _train_with_fake_clock(accumulation, steps=4, tokens_per_micro_batch=500, micro_batch_s=0.25)
    train = [entry["train_tokens_per_second"] for entry in logs if "loss" in entry]
    assert train == pytest.approx([2000.0] * 4)  # 500 tokens in 0.25 s, whatever the accumulation
    assert logs[-1]["train_tokens_per_second"] == pytest.approx(2000.0)  # the run's: its evaluations left out
    assert all("train_tokens_per_second" not in entry for entry in logs if "eval_loss" in entry)


def test_tokens_per_second_is_each_lines_window():
    from src.training import TokenRate

    now = [0.0]
    rate = TokenRate(clock=lambda: now[0])
    rate.start(tokens_seen=1000)  # a resumed run: the tokens before it are not this session's
    now[0] = 2.0
    assert rate.window(1000 + 400) == pytest.approx(200.0)
    now[0] = 3.0
    rate.exclude(0.5)
    assert rate.window(1000 + 400 + 300) == pytest.approx(600.0)  # 300 tokens in the 0.5 s not evaluating
    assert rate.window(1700) is None  # no step since the last line: no rate, not 0 or a division by zero
    assert rate.overall(1700) == pytest.approx(700 / 2.5)


def _metric_lines(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "src" and r.getMessage().startswith("step ")]


def test_the_console_shows_the_tokens_per_second_mlflow_logs_at_any_accumulation(tmp_path, mlflow_store, caplog):
    """Each step line's tokens/s is the MLflow curve's value at that step, the end-of-training line's is the run's
    ``train_tokens_per_s``, with or without gradient accumulation; the final evaluation's time is not training
    time. (That the rate does not grow with accumulation is checked on a fake clock above: on a shared CPU two
    runs' rates differ by more than any factor a test could hold them to.)"""
    import mlflow

    from tests.conftest import compose_config, train_run

    common = ["data.subsample=48", "data.eval_subsample=128", "train.per_device_train_batch_size=4"]
    common += ["train.max_steps=3", "train.logging_steps=1", "train.eval_strategy=steps", "train.eval_steps=3"]
    for accumulation in (1, 4):
        raw = compose_config([*common, f"train.gradient_accumulation_steps={accumulation}"])
        raw["output_dir"] = str(tmp_path / f"ga{accumulation}")
        caplog.clear()
        with caplog.at_level("INFO", logger="src"):
            train_run(raw)
        run_id = mlflow.last_active_run().info.run_id
        history = sorted(mlflow.MlflowClient().get_metric_history(run_id, "train_tokens_per_s"), key=lambda m: m.step)
        lines = _metric_lines(caplog.records)
        shown = [re.search(r"tokens/s (\S+)", line) for line in lines]
        shown = [float(m.group(1)) if m else None for m in shown]
        final = mlflow.get_run(run_id).data.metrics["train_tokens_per_s"]
        steps = [rate for line, rate in zip(lines, shown) if "mean loss" not in line]
        assert len(steps) == 3 and min(steps) / 1.5 <= final <= max(steps) * 1.5, (accumulation, lines, final)
        assert "mean loss" in lines[-1] and shown[-1] == float(console.number(final)), lines
        assert [console.number(v) for v in shown] == [console.number(m.value) for m in history], (lines, history)
