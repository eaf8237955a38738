"""The guards (src.guards): a non-finite loss stops its run, pickled weights and remote code are refused."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from src import fit, guards, modeling
from src.config import validate
from src.data import load_data
from tests.conftest import ROOT, compose_config, train_run
from tests.unit.test_tracking import FAST, _runs


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
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, str(tmp_path / "ckpt"))
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
