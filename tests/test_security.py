"""Stored files are data: a run's config cannot turn on remote code, a study's storage cannot instantiate code."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from src import guards
from src.runs import inference
from src.sweeps.trial import PRUNER_ATTR, STORAGE_ENV, STUDY_ENV, TRIAL_ENV, build_pruner, current_trial, pruner_spec
from tests.conftest import compose_config


def _remote_code_model(path):
    """A model directory whose config maps to its own Python code, which leaves a marker if it ever runs."""
    path.mkdir()
    marker = path / "RAN"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (path / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}})
    )
    return marker


def test_a_run_config_cannot_turn_on_remote_code(tmp_path):
    model_dir = tmp_path / "model"
    marker = _remote_code_model(model_dir)
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    raw = compose_config(["data=instructions", f"model.name_or_path={model_dir}", "model.trust_remote_code=true"])
    (adapter.parent / "config.yaml").write_text(yaml.safe_dump(raw))

    source = inference.read_source(adapter)
    assert source.cfg.model.trust_remote_code is False  # the stored true is not taken
    with pytest.raises(guards.RemoteCodeError, match="needs code from its checkpoint"):
        guards.check_remote_code(source.cfg.model.name_or_path, None, source.cfg.model.trust_remote_code)
    assert not marker.exists()
    assert inference.read_source(adapter, trust_remote_code=True).cfg.model.trust_remote_code is True  # the flag


def test_a_stored_pruner_is_data_never_code(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr(PRUNER_ATTR, {"_target_": "builtins.open", "file": str(victim), "mode": "w"})
    study.ask()
    monkeypatch.setenv(STORAGE_ENV, storage)
    monkeypatch.setenv(STUDY_ENV, "s")
    monkeypatch.setenv(TRIAL_ENV, "0")
    trial = current_trial()  # what every trial process does with the stored attribute
    assert isinstance(trial.study.pruner, optuna.pruners.NopPruner)
    assert victim.read_text() == "precious"
    for tampered in ({"name": "MedianPruner", "kwargs": {"n_startup_trials": {"_target_": "os.system"}}}, "x", None):
        assert isinstance(build_pruner(tampered), optuna.pruners.NopPruner)


def test_pruners_round_trip_as_plain_data_and_others_are_refused():
    spec = pruner_spec({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 0})
    assert spec == {"name": "MedianPruner", "kwargs": {"n_startup_trials": 1, "n_warmup_steps": 0}}
    assert json.loads(json.dumps(spec)) == spec
    pruner = build_pruner(spec)
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_startup_trials == 1
    assert isinstance(build_pruner({"_target_": "optuna.pruners.HyperbandPruner"}), optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="not one of optuna.pruners"):
        pruner_spec({"_target_": "builtins.open", "file": "x"})
    with pytest.raises(ValueError, match="must be numbers"):
        pruner_spec({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": {"_target_": "os.system"}})


def test_a_base_model_stored_only_as_pickle_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from src import modeling
    from src.config import QuantConfig
    from tests.conftest import tiny_model_config

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)  # transformers 5 saves safetensors only: write the pickle by hand
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors"))
    model_cfg = dataclasses.replace(tiny_model_config(tiny_model_dir), name_or_path=str(pickled))
    quant = QuantConfig(bits=16, quant_type="nf4", double_quant=False, compute_dtype="float32")
    with pytest.raises(guards.PickleWeightsError, match="only pickled weights .*pytorch_model.bin"):
        modeling.load_model(model_cfg, quant, "sft", None, pad_token_id=2)
    allowed = dataclasses.replace(model_cfg, allow_pickle_weights=True)
    assert modeling.load_model(allowed, quant, "sft", None, pad_token_id=2).num_parameters() > 0
