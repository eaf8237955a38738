"""What a command prints, seen from outside: metric lines, the one config-error line, and quiet children."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


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
