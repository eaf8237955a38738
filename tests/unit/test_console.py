"""What a run prints: compact metric lines with numbers as numbers, a summary, a log file, and no known noise."""

from __future__ import annotations

import re

import pytest

from src import console, modeling


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


def test_say_goes_to_stderr_where_the_logging_set_up_hides_its_lines(capsys, caplog):
    """A handler that would drop an INFO line (a library's logging at WARNING) does not swallow the user's line."""
    import logging

    from src import console

    caplog.set_level(logging.WARNING, logger="src")
    console.say("a line nobody would see")
    assert capsys.readouterr().err == "a line nobody would see\n"


def test_a_user_error_is_filed_as_an_error_in_the_runs_log_and_bare_on_a_plain_stderr(capsys, caplog):
    import logging

    from src.errors import UserError, report

    assert report(UserError("no such run")) == 2
    assert capsys.readouterr().err == "error: no such run\n"  # no logging set up: the line as the command shows it
    caplog.set_level(logging.INFO, logger="src")
    report(UserError("no such run"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.ERROR, "error: no such run")]


def _child_env(**changes: str) -> dict[str, str]:
    """The environment of a new user's shell: none of the switches this process (``import src``) may have set."""
    import os

    unset = ("LORA_SWEEPS_VERBOSE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **changes}
