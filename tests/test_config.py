"""Every shipped config composes and validates; bad configs get one error listing every problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from src.config import ConfigError, objective, validate
from tests.conftest import CONF_DIR, ROOT, compose_config

# Presets that leave required values to the user get them here, as a user would on the command line.
REQUIRED_EXTRAS = {
    ("data", "file"): ["data.path=x.csv", "data.task=classification", "data.label_column=label"],
    ("data", "research_topics"): ["data.path=train.csv"],
    ("data", "red_dot"): ["model=openllama3b"],
    ("data", "finance_alpaca"): ["model=openllama3b"],
    ("data", "instructions"): [],
    ("experiment", "seed000_mistral7b_multilabel"): ["data.path=train.csv"],
}


def _group_options() -> list[tuple[str, str]]:
    options = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR)
        if len(rel.parts) > 1:
            options.append((rel.parts[0], rel.stem))
    return options


def test_every_group_has_options():
    groups = {g for g, _ in _group_options()}
    assert groups == {"model", "quant", "lora", "data", "train", "experiment"}


@pytest.mark.parametrize(("group", "option"), _group_options(), ids=lambda x: str(x))
def test_every_conf_yaml_composes_and_validates(group, option):
    raw = compose_config([f"{group}={option}", *REQUIRED_EXTRAS.get((group, option), [])])
    cfg = validate(raw)
    if group == "experiment":  # a global diff, each seed's own model (tests/test_seeds.py checks the rest)
        assert cfg.model.name != "tiny" and "experiment" not in raw
    else:
        assert getattr(cfg, group) is not None


def test_every_conf_yaml_starts_with_its_command():
    """The first line is the command; an experiment's first line must be Hydra's package header (Hydra reads it
    only there), so its command is the second."""
    for path in CONF_DIR.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        if path.parent.name == "experiment":
            assert lines[0] == "# @package _global_", f"{path}: an experiment is a global diff"
            lines = lines[1:]
        assert lines[0].startswith("# python -m src.train"), f"{path} does not start with its command"
        if path.parent.name == "experiment":
            assert f"experiment={path.stem}" in lines[0], f"{path}: its command runs another experiment"


def test_seed_model_hub_ids_are_exact():
    expected = {
        "openllama3b": "openlm-research/open_llama_3b_v2",
        "mistral7b": "mistralai/Mistral-7B-v0.1",
        "phi3mini": "microsoft/Phi-3-mini-4k-instruct",
        "bert_large": "bert-large-uncased",
    }
    for name, hub_id in expected.items():
        assert compose_config([f"model={name}"])["model"]["name_or_path"] == hub_id


def test_quant_presets_match_the_seeds_qlora():
    q4 = validate(compose_config(["quant=4bit"])).quant
    assert (q4.bits, q4.quant_type, q4.double_quant, q4.compute_dtype) == (4, "nf4", True, "bfloat16")
    assert validate(compose_config(["quant=8bit"])).quant.bits == 8
    assert validate(compose_config(["quant=none"])).quant.bits == 16


def test_all_problems_are_reported_at_once():
    raw = compose_config(
        [
            "lora.r=0",
            "+lora.rank=3",
            "train.bf16=true",
            "train.fp16=true",
            "data.task=regression",
            "model.max_length=abc",
            "train.eval_strategy=steps",
        ]
    )
    with pytest.raises(ConfigError) as info:
        validate(raw)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "lora.rank: unknown key" in text
    assert "lora.r: must be >= 1, got 0" in text
    assert "train: bf16 and fp16 cannot both be true" in text
    assert "data.task: expected one of 'sft' | 'classification' | 'multilabel', got 'regression'" in text
    assert "model.max_length: expected int, got 'abc'" in text
    assert "train.eval_steps: required when train.eval_strategy=steps" in text
    assert len(problems) == 6


def test_incompatible_combination_is_rejected():
    raw = compose_config(["model=bert_large", "data=instructions"])
    with pytest.raises(ConfigError, match="needs a decoder model"):
        validate(raw)


def test_missing_required_value_names_the_key():
    raw = compose_config(["data=file"])
    with pytest.raises(ConfigError) as info:
        validate(raw)
    text = str(info.value)
    assert "data.task: missing" in text
    assert "data.path / data.hub_id: set exactly one" in text


def test_unknown_lora_preset_value():
    with pytest.raises(ConfigError, match=r"lora.preset: unknown preset 'qkvo'"):
        validate(compose_config(["lora.preset=qkvo"]))


def test_quant_without_bitsandbytes_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError, as on a machine without it
    with pytest.raises(ConfigError, match=r"quant.bits=4: bitsandbytes cannot run here"):
        validate(compose_config(["quant=4bit"]))
    validate(compose_config(["quant=none"]))  # 16-bit LoRA does not need it


def test_objective_defaults_follow_the_task():
    assert objective(validate(compose_config([]))) == ("eval_f1_macro", "maximize")
    assert objective(validate(compose_config(["data=topics_multilabel"]))) == ("eval_f1_micro", "maximize")
    assert objective(validate(compose_config(["data=instructions"]))) == ("eval_loss", "minimize")
    assert objective(validate(compose_config(["objective.metric=eval_accuracy"])))[0] == "eval_accuracy"


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


def test_cli_unknown_preset_lists_the_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "lora=qkvo", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Could not find 'lora/qkvo'" in proc.stderr
    assert "all_linear" in proc.stderr  # Hydra lists the available presets
