"""Stored files are data: a run's config cannot turn on remote code, a study's storage cannot instantiate code."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import optuna
import pytest
import yaml

from src import guards
from src.runs import inference
from src.trial import PRUNER_ATTR, STORAGE_ENV, STUDY_ENV, TRIAL_ENV, build_pruner, current_trial, pruner_spec
from tests.conftest import compose_config

# What a LoRA adapter_config.json holds besides its task: read_adapter_config refuses one without them.
LORA_FIELDS = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}


def _remote_code_model(path):
    """A model directory whose config maps to its own Python code, which leaves a marker if it ever runs."""
    path.mkdir()
    marker = path / "RAN"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (path / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}})
    )
    return marker


def _stored_run(tmp_path, overrides):
    """A run's layout (adapter/ beside config.yaml) whose stored config is composed with ``overrides``."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **LORA_FIELDS}))
    raw = compose_config(["data=instructions", *overrides])
    (adapter.parent / "config.yaml").write_text(yaml.safe_dump(raw))
    return adapter


def test_a_run_config_cannot_turn_on_remote_code(tmp_path, capsys):
    from src.runs import export, predict

    model_dir = tmp_path / "model"
    marker = _remote_code_model(model_dir)
    adapter = _stored_run(tmp_path, [f"model.name_or_path={model_dir}", "model.trust_remote_code=true"])

    with pytest.raises(inference.InferenceError, match=r"sets model.trust_remote_code=true.*pass --trust-remote-code"):
        inference.read_source(adapter)
    for main in (predict.main, export.main):
        argv = ["--adapter", str(adapter)] + (["--out", str(tmp_path / "out")] if main is export.main else [])
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--trust-remote-code" in err[0], err
    assert not marker.exists()
    granted = inference.read_source(adapter, granted=["model.trust_remote_code"])  # the flag grants it
    assert granted.cfg.model.trust_remote_code is True and granted.cfg.model.allow_pickle_weights is False
    with pytest.raises(guards.RemoteCodeError, match="needs code from its checkpoint"):  # and without it:
        guards.check_remote_code(
            str(model_dir),
            None,
            inference.read_source(
                _stored_run(tmp_path / "b", [f"model.name_or_path={model_dir}"])
            ).cfg.model.trust_remote_code,
        )


def _pickled_base(tmp_path, tiny_model_dir):
    """A copy of the tiny model whose weights exist only as a pickle (pytorch_model.bin)."""
    import torch
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)  # transformers 5 saves safetensors only: write the pickle by hand
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors"))
    return pickled


def test_a_run_config_cannot_allow_pickled_weights(tmp_path, tiny_model_dir, capsys):
    from src.config import SAFETY_SETTINGS
    from src.runs import predict

    pickled = _pickled_base(tmp_path, tiny_model_dir)
    stored = ["model=tiny", f"model.name_or_path={pickled}", "model.allow_pickle_weights=true"]
    adapter = _stored_run(tmp_path, stored)
    assert predict.main(["--adapter", str(adapter), "--input", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.allow_pickle_weights=true" in err[0] and "--allow-pickle-weights" in err[0], err
    # The same refusal whatever else the command grants, and with both settings stored both flags are named.
    with pytest.raises(inference.InferenceError, match="--allow-pickle-weights"):
        inference.read_source(adapter, granted=["model.trust_remote_code"])
    both = _stored_run(tmp_path / "both", [*stored, "model.trust_remote_code=true"])
    with pytest.raises(inference.InferenceError, match="pass --trust-remote-code --allow-pickle-weights"):
        inference.read_source(both)
    # Granted on the command line, it loads; a stored false stays false; a default (no config.yaml) too.
    source = inference.read_source(adapter, granted=["model.allow_pickle_weights"])
    assert source.cfg.model.allow_pickle_weights is True
    guards.check_weight_format(source.cfg.model.name_or_path, source.cfg.model.allow_pickle_weights)
    safe = inference.read_source(_stored_run(tmp_path / "safe", stored[:2]))
    assert all(not getattr(safe.cfg.model, key.split(".")[1]) for key in SAFETY_SETTINGS)
    with pytest.raises(guards.PickleWeightsError):
        guards.check_weight_format(safe.cfg.model.name_or_path, safe.cfg.model.allow_pickle_weights)


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

    from src import modeling
    from src.config import QuantConfig
    from tests.conftest import tiny_model_config

    pickled = _pickled_base(tmp_path, tiny_model_dir)
    model_cfg = dataclasses.replace(tiny_model_config(tiny_model_dir), name_or_path=str(pickled))
    quant = QuantConfig(bits=16, quant_type="nf4", double_quant=False, compute_dtype="float32")
    with pytest.raises(guards.PickleWeightsError, match="only pickled weights .*pytorch_model.bin"):
        modeling.load_model(model_cfg, quant, "sft", None, pad_token_id=2)
    allowed = dataclasses.replace(model_cfg, allow_pickle_weights=True)
    assert modeling.load_model(allowed, quant, "sft", None, pad_token_id=2).num_parameters() > 0


# Names are names: an experiment's name is no path, and text in an MLflow search is quoted (src/names.py).
PATH_LIKE_NAMES = ["/abs/dir", "../../x", "a/b", "a\\b", "..", "x..y", "", "  ", "a\x00b", "a\nb", "tab\tname"]
SEARCHABLE = ["O'Brien", 'say "hi"', "back\\slash", "a\\'b", 'a\\"b', "pct%_x", "x = 'y' or 1", "café ''", "a and b"]


def test_a_path_like_experiment_name_is_refused_and_writes_nothing_outside_the_store(tmp_path, monkeypatch):
    import mlflow

    from src import tracking
    from src.config import ConfigError, validate

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    composed = compose_config([f"tracking.tracking_uri={uri}"])
    recorded = ["/abs/dir", "../../x", str(tmp_path / "outside")]
    for name in dict.fromkeys([*PATH_LIKE_NAMES, *recorded]):
        raw = copy.deepcopy(composed)
        raw["tracking"]["experiment"] = name
        with pytest.raises(ConfigError, match="tracking.experiment: .*(path|empty|control)"):
            validate(raw)
        with pytest.raises(ConfigError, match="a name is not a path|empty|control"):  # whoever asks the store
            tracking.ensure_experiment(name, uri)
        if name in recorded:
            with pytest.raises(ConfigError):  # a run of it ends FAILED in the default experiment, not under the name
                tracking.validated(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"] and not Path("/abs/dir").exists()
    client = mlflow.MlflowClient(uri)
    assert {e.name for e in client.search_experiments()} <= {"Default", tracking.base_experiment()}
    assert all(p.resolve().is_relative_to(store) for p in store.rglob("*"))
    failed = client.search_runs([client.get_experiment_by_name(tracking.base_experiment()).experiment_id])
    assert len(failed) == len(recorded) and {r.info.status for r in failed} == {"FAILED"}
    from src.sweeps.configs import SweepRefused, vet
    from tests.conftest import compose_hydra

    for name in ("../../x", "/abs/dir"):  # a sweep stops before it records anything
        with pytest.raises(SweepRefused, match="tracking.experiment: .* a name is not a path"):
            vet(compose_hydra(overrides=(f"tracking.experiment={name}",)))
    for section in ("model", "data"):  # their short names name output directories
        for name in ("../../x", "/abs/dir", "a\\b"):
            raw = copy.deepcopy(composed)
            raw[section]["name"] = name
            with pytest.raises(ConfigError, match=rf"{section}.name: .* a name is not a path"):
                validate(raw)
    for name in ("lora-sweeps", "O'Brien's runs", "topics v2", "a.b"):  # names stay free otherwise
        raw = copy.deepcopy(composed)
        raw["tracking"]["experiment"] = name
        validate(raw)


def test_filter_values_find_exactly_their_text_in_a_real_store(tmp_path):
    import mlflow

    from src.names import filter_value, text_problem

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x")
    ids = {}
    for text in [*SEARCHABLE, "plain"]:
        assert text_problem(text) is None, text
        ids[text] = client.create_run(experiment, tags={"k": text}).info.run_id
    for text, run_id in ids.items():
        where = f"tags.k = {filter_value(text)} and attributes.status = 'RUNNING'"
        assert [r.info.run_id for r in client.search_runs([experiment], where)] == [run_id], text
    for text in ("both ' and \"", "ends\\", "nul\x00"):
        assert text_problem(text)
    for text in ("both ' and \"", "ends\\"):
        with pytest.raises(ValueError):
            filter_value(text)


def test_an_apostrophe_in_a_sweep_dir_or_study_name_keeps_runs_true(tmp_path):
    """A trial whose process died ends FAILED (not RUNNING), a finished run is found FINISHED, and a study's
    finished trials are found, with quotes in the output directory and the study name."""
    import mlflow
    from omegaconf import OmegaConf

    from src import tracking
    from src.config import ConfigError, validate
    from src.sweeps.job import close_lost_run
    from src.sweeps.study import OptunaSweeper

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_name = "Bob's \\ study"
    for n, sweep_dir in enumerate(["multirun/O'Brien's sweep", 'multirun/the "best" one']):
        raw = compose_config([f"tracking.tracking_uri={uri}"])
        raw["output_dir"] = str(tmp_path / sweep_dir / f"{n}-tiny")
        cfg = validate(raw)
        with tracking.tracked_run(cfg, {"optuna_study": study_name, "optuna_trial": str(n)}):  # finishes
            mlflow.log_metric("objective", 0.5 + n)
        finished = tracking.runs_of_output_dir(cfg)
        assert [r.info.status for r in finished] == ["FINISHED"]
        client = mlflow.MlflowClient(uri)
        lost = client.create_run(finished[0].info.experiment_id, tags={"output_dir": raw["output_dir"]})  # kill -9
        assert close_lost_run(cfg, "the trial process died") == lost.info.run_id
        assert client.get_run(lost.info.run_id).info.status == "FAILED"
        assert client.get_run(finished[0].info.run_id).info.status == "FINISHED"
    sweeper = OptunaSweeper(sampler=None, pruner=None, n_trials=2, n_jobs=1)
    sweeper.config = OmegaConf.create({"tracking": {"tracking_uri": uri, "experiment": raw["tracking"]["experiment"]}})
    assert sweeper.finished_trials(study_name) == {0: [0.5], 1: [1.5]}
    raw["output_dir"] = "multirun/both ' and \""
    with pytest.raises(ConfigError, match="output_dir .*both ' and"):
        validate(raw)


# A config names code to build only at the sweeper's sampler and pruner (src.sweeps.configs.VETTED_TARGETS).
OPEN = "{_target_:builtins.open,file:VICTIM,mode:w}"


@pytest.mark.parametrize(
    "override, path",
    [
        (f"hydra.sweeper.sampler.seed={OPEN}", "hydra.sweeper.sampler.seed._target_"),
        (f"+hydra.sweeper.sampler.x=[1,{{a:{OPEN}}}]", "hydra.sweeper.sampler.x[1].a._target_"),
        (f"+hydra.sweeper.pruner.n={OPEN}", "hydra.sweeper.pruner.n._target_"),
        (f"hydra.sweeper.direction={OPEN}", "hydra.sweeper.direction._target_"),
        (f"+hydra.callbacks.evil={OPEN}", "hydra.callbacks.evil._target_"),
        (f"+model.extra={OPEN}", "model.extra._target_"),
    ],
)
def test_a_target_anywhere_but_the_sampler_and_pruner_is_refused(override, path):
    from src.sweeps.configs import TargetsRefused, refuse_targets
    from tests.conftest import compose_hydra

    config = compose_hydra(overrides=("hydra/sweeper=lora_optuna", override))
    with pytest.raises(TargetsRefused, match=rf"_target_\) at {re.escape(path)}\."):
        refuse_targets(config)


def test_shipped_sweeps_name_only_vetted_targets():
    from src.sweeps.configs import refuse_targets
    from tests.conftest import ROOT, compose_hydra

    for overrides in [(), ("hydra/sweeper=lora_optuna", "hydra/sweeper/pruner=hyperband"), ("hydra/launcher=local",)]:
        refuse_targets(compose_hydra(overrides=overrides))
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        refuse_targets(compose_hydra(ROOT / "sweeps", path.stem))


def test_a_sampler_is_an_optuna_class_built_from_plain_values(tmp_path):
    import optuna

    from src.sweeps.study import SweepFailed, build_sampler

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    opened = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    sampler = build_sampler({"_target_": "optuna.samplers.TPESampler", "seed": 3, "constant_liar": True})
    assert isinstance(sampler, optuna.samplers.TPESampler)
    for target in ("builtins.open", "optuna.samplers._tpe.sampler.TPESampler", "os.system", "TPESampler", ""):
        with pytest.raises(SweepFailed, match="is not one of optuna.samplers"):
            build_sampler({**opened, "_target_": target})
    for kwargs in ({"seed": opened}, {"seed": [opened]}, {"search_space": {"a": [opened]}}, {"_partial_": True}):
        with pytest.raises(SweepFailed, match="plain values, never code"):
            build_sampler({"_target_": "optuna.samplers.RandomSampler", **kwargs})
    assert victim.read_text() == "precious"


# Stored text is read literally: never resolved as an OmegaConf interpolation.
STORED_TEXT = ["${oc.env:HOME}/m", "${now:%Y-%m-%d}", "a\\${oc.env:HOME}", "a\\\\${x}", "C:\\dir ${y", "$HOME {z}"]


def test_a_stored_base_model_name_is_read_literally(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for n, base in enumerate(STORED_TEXT):
        adapter = tmp_path / str(n) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(
            json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": base, **LORA_FIELDS})
        )
        source = inference.read_source(adapter)
        assert source.cfg.model.name_or_path == base
        assert source.cfg.model.name == Path(base.replace("\\", "/")).name


def test_a_ddp_job_config_is_read_back_literally(tmp_path, monkeypatch):
    """The config file a DDP job's ranks compose holds the job's resolved values, which Hydra resolves again."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from src.config import validate
    from src.sweeps.job import write_ddp_config

    monkeypatch.setenv("HOME", str(tmp_path))
    raw = compose_config(["data=topics"])
    raw["data"]["labels"] = list(STORED_TEXT)
    raw["tracking"]["run_name"] = STORED_TEXT[1]
    raw["output_dir"] = str(tmp_path / "out ${now:%H}")
    path = write_ddp_config(validate(raw), tmp_path / "job")
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
        composed = compose(config_name=path.stem)
    assert OmegaConf.to_container(composed, resolve=True) == raw


def test_resolved_text_handed_to_a_job_on_its_command_line_is_read_literally(tmp_path, monkeypatch):
    """An output directory, a study name or a pack's configs go to a job as quoted overrides
    (hydra.run.dir=..., hydra.job.env_set.X=...); Hydra resolves them again, and each must read as it was."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from src.sweeps.outcomes import env_overrides, quote

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = OverridesParser.create()
    texts = [*STORED_TEXT, "O'Brien's \\", "${now:%H}'s \\'${", json.dumps({"labels": ["${oc.env:HOME}"]})]
    for text in texts:
        for override in (f"hydra.run.dir={quote(text)}", *env_overrides({"LORA_X": text})):
            value = parser.parse_overrides([override])[0].value()
            assert OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"] == text, override
