"""Config errors through the real command: one message, no traceback, before the model loads; and ``--help``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.unit.test_config import _model_dir


@pytest.mark.slow  # its command and checks run in the default tier in tests/test_console.py (a config error)
def test_cli_reports_config_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "lora.r=0",
            "train.learning_rate=-1",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "lora.r: must be >= 1, got 0" in proc.stderr
    assert "train.learning_rate: must be > 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr

def test_cli_names_the_closest_key_and_option_before_hydra(tmp_path):
    """Hydra would answer lora.rank=16 with "To append to your config use +lora.rank=16", exit 1."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "src.train", "lora.rank=16", "model=tinyy", "lora=al_linear"),
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == ["error: invalid config:"]
    assert "  - lora.rank: unknown key; did you mean lora.r?" in proc.stderr
    assert "  - model=tinyy: no such model option; did you mean tiny? (options: bert_large," in proc.stderr
    assert "  - lora=al_linear: no such lora option; did you mean all_linear?" in proc.stderr
    assert "append" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()  # nothing ran, nothing recorded

def test_help_lists_the_groups_and_every_key_with_its_help():
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split() == ["quant", "4bit,", "8bit,", "none"] for line in lines)
    lora_r = next(line for line in lines if line.split()[:1] == ["lora.r"])
    assert "LoRA rank; null with preset 'none'" in lora_r and ">= 1" in lora_r
    from src.config import Config
    from src.overrides import schema_fields

    listed = {line.split()[0] for line in lines if line.startswith("  ") and line.split()}
    assert {key for key in schema_fields(Config) if key != "output_dir" and "." in key} <= listed

def test_cli_refuses_unusable_settings_in_one_line_before_the_model_loads(tmp_path):
    """A model directory with a config.json and no weights: had validation let anything through, loading it would
    fail with another error."""
    model = _model_dir(tmp_path / "model", model_type="llama", max_position_embeddings=64)
    overrides = [
        f"model.name_or_path={model}",
        "model.max_length=100",
        "train.optim=adamw_torch_4bit",
        "train.lr_scheduler_type=cosine_with_min_lr",
        "data.text_template='{text:>1500000000}'",
        "train.per_device_eval_batch_size=0",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides, f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
        + [f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for text in (
        "model.max_length: 100 is more than the 64 positions",
        "train.optim=adamw_torch_4bit: needs the torchao package",
        "train.lr_scheduler_type=cosine_with_min_lr: needs lr_scheduler_kwargs min_lr",
        "data.text_template: field '{text:>1500000000}'",
        "train.per_device_eval_batch_size: must be >= 1, got 0",
    ):
        assert text in err, (text, err)
    assert "safetensors" not in err and "weights" not in err.lower(), err
