"""The train entry point (``python -m src.train``) in process: ``--help``, a mistyped key or option named before
Hydra reads it, and settings refused in one error line before a model loads."""

from __future__ import annotations

import mlflow

from tests.conftest import run_module
from tests.unit.test_config import _model_dir
from tests.unit.test_distributed import DDP


def test_help_lists_the_groups_a_user_composes_and_nothing_internal():
    proc = run_module(["src.train", "--help"])
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("Config groups")[1].split("Keys (")[0].splitlines()[1:]
    assert {line.split()[0] for line in groups if line.strip()} == {
        "data",
        "eval",
        "experiment",
        "lora",
        "model",
        "quant",
        "train",
    }


def test_help_lists_the_groups_and_every_key_with_its_help():
    proc = run_module(["src.train", "--help"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split() == ["quant", "4bit,", "8bit,", "fp8,", "none"] for line in lines)
    lora_r = next(line for line in lines if line.split()[:1] == ["lora.r"])
    assert "LoRA rank; null with preset 'none'" in lora_r and ">= 1" in lora_r
    from src.config import Config
    from src.overrides import schema_fields

    listed = {line.split()[0] for line in lines if line.startswith("  ") and line.split()}
    assert {key for key in schema_fields(Config) if key != "output_dir" and "." in key} <= listed


def test_cli_names_the_closest_key_and_option_before_hydra(tmp_path):
    """Hydra would answer lora.rank=16 with "To append to your config use +lora.rank=16", exit 1."""
    proc = run_module(
        [
            *("src.train", "lora.rank=16", "model=tinyy", "lora=al_linear"),
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ]
    )
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == ["error: invalid config:"]
    assert "  - lora.rank: unknown key; did you mean lora.r?" in proc.stderr
    assert "  - model=tinyy: no such model option; did you mean tiny? (options: bert_large," in proc.stderr
    assert "  - lora=al_linear: no such lora option; did you mean all_linear?" in proc.stderr
    assert "append" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()  # nothing ran, nothing recorded


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
    proc = run_module(
        [
            "src.train",
            *overrides,
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ]
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


def test_an_invalid_config_fails_once_before_relaunching(tmp_path, mlflow_store):
    proc = run_module(["src.train", *DDP, "lora.r=0", f"hydra.run.dir={tmp_path / 'out'}"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert proc.returncode == 2
    assert "lora.r: must be >= 1" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # nothing was relaunched
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error_type"] == "ConfigError"
