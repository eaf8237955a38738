"""Every shipped config composes and validates; bad configs get one error listing every problem."""

from __future__ import annotations

import sys
from pathlib import Path

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
    ("eval", "forgetting"): ["data=instructions"],  # an LM loss: sft runs only
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
    assert groups == {"model", "quant", "lora", "data", "train", "eval", "experiment"}


@pytest.mark.parametrize(("group", "option"), _group_options(), ids=lambda x: str(x))
def test_every_conf_yaml_composes_and_validates(group, option):
    raw = compose_config([f"{group}={option}", *REQUIRED_EXTRAS.get((group, option), [])])
    cfg = validate(raw)
    if group == "experiment":  # a global diff, each seed's own model (tests/unit/test_seeds.py checks the rest)
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
    assert "lora.rank: unknown key; did you mean lora.r?" in text
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


def _preflight(argv: list[str], capsys) -> tuple[int, str]:
    from src.train import preflight

    try:
        preflight(argv)
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["lora.rnak=8"], "lora.rnak: unknown key; did you mean lora.r?"),
        (["train.epochs=3"], "train.epochs: unknown key; did you mean train.num_train_epochs?"),
        (["lora.learning_rate=1e-4"], "lora.learning_rate: unknown key; did you mean train.learning_rate?"),
        (["lroa.r=8"], "lroa.r: unknown key; did you mean lora.r?"),
        (["modle=tiny"], "modle: unknown key or group; did you mean model?"),
        (["lora.r.x=1"], "lora.r.x: unknown key (lora.r takes a value, not keys)"),
        (["train.lrate=1"], "train.lrate: unknown key (train keys: num_train_epochs, max_steps, learning_rate,"),
        (["--multirun", "lora.r=4,8", "lora=attn_qv,al_linear"], "lora=al_linear: no such lora option"),
        (["-m", "model=choice(tiny,bert_larg)"], "model=bert_larg: no such model option; did you mean bert_large?"),
        (["quant=4bits"], "quant=4bits: no such quant option; did you mean 4bit"),
        (["experiment=seed001"], "experiment=seed001: no such experiment option"),
        (["-cd", "sweeps", "-cn", "seed_table", "data=topic"], "data=topic: no such data option; did you mean topics"),
        (["-cd", "sweeps", "-cn", "rank_alpha", "train.max_step=5"], "did you mean train.max_steps?"),
    ],
)
def test_a_mistyped_key_or_option_is_named_with_the_closest(argv, expected, capsys):
    code, err = _preflight(argv, capsys)
    assert code == 2
    assert err.startswith("error: invalid config:\n") and err.count("error") == 1
    assert expected in err


def _readme_train_commands() -> list[list[str]]:
    import re
    import shlex

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    found = []
    for line in text.splitlines():
        match = re.search(r"python -m src\.train((?: [^`|\\]*)?)(?:`|$)", line)
        if match and "<" not in match.group(1):  # placeholders such as <a red_dot-shaped file>
            found.append(shlex.split(match.group(1), comments=True))
    return found


def test_valid_overrides_pass_the_check(capsys):
    """Every src.train command of the README and docs/, and overrides that only Hydra reads, pass untouched."""
    commands = _readme_train_commands()
    assert len(commands) >= 15
    commands += [
        ["lora.r=range(4,17,4)", "+lora.extra=1", "++train.seed=3", "~experiment", "hydra/launcher=local"],
        ["experiment=null", "lora=glob(*)", "data.labels.0=a", "output_dir=x", "data.labels=[a,b]"],
        ["model@model=tiny", "hydra.run.dir=x", "hydra.sweeper.n_trials=2", "train.learning_rate=interval(0.1,1)"],
    ]
    for argv in commands:
        assert _preflight(argv, capsys) == (0, ""), argv


def test_every_field_of_every_section_has_help_that_help_shows():
    import dataclasses

    from src.config_schema import SCHEMA, Config
    from src.overrides import help_text, schema_fields

    fields = [(f"{cls.__name__}.{f.name}", f) for cls in SCHEMA for f in dataclasses.fields(cls)]
    assert len(fields) >= 97, len(fields)  # the walk finds every section's fields
    without = [name for name, f in fields if not str(f.metadata.get("help", "")).strip()]
    assert not without, without
    lines = {line.split()[0]: line for line in help_text("src.train", Config, None).splitlines() if line[:2] == "  "}
    for key, f in schema_fields(Config).items():
        if key in lines:
            assert f.metadata["help"].rstrip(".") in lines[key], key
    assert {key for key in schema_fields(Config) if "." in key} <= set(lines)


def test_a_schema_default_is_the_value_the_yaml_composes_to():
    """Defaults live in conf/. The few the schema also has (for runs stored before their key existed) must be the
    value the shipped YAML gives, so the two cannot silently disagree."""
    import dataclasses

    from src.config_schema import HINTS, Config

    raw = compose_config([])
    defaults = {
        (section, f.name): f.default
        for section, cls in HINTS[Config].items()
        if dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    assert defaults, "the schema has no default: drop this test"
    for (section, key), default in defaults.items():
        assert key in raw[section], f"{section}.{key}: a schema default the YAML does not write"
        assert raw[section][key] == default, f"{section}.{key}: schema {default!r}, YAML {raw[section][key]!r}"


def test_lora_presets_say_only_their_own_values():
    """conf/config.yaml holds the base values of every LoRA preset; a preset file sets its targets."""
    base = {"r": 8, "alpha": 16, "dropout": 0.05, "bias": "none", "target_modules": None, "modules_to_save": None}
    base |= {"use_rslora": False, "use_dora": False, "loraplus_lr_ratio": None, "init": True}  # plain LoRA
    for path in sorted((CONF_DIR / "lora").glob("*.yaml")):
        lora = validate(compose_config([f"lora={path.stem}"])).lora
        assert lora.preset == path.stem
        if path.stem != "none":
            assert {key: getattr(lora, key) for key in base} == base, path.stem
            assert not any(line.startswith(tuple(base)) for line in path.read_text().splitlines()), path
    full = validate(compose_config(["lora=none"])).lora
    assert (full.r, full.alpha, full.bias) == (None, None, "none")


ALLOWED_INITS = "allowed: true, false, gaussian, orthogonal, pissa, pissa_niter_<n>, olora"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.init=kaiming"], f"lora.init: 'kaiming' is not supported; {ALLOWED_INITS}"),
        (["lora.init=eva"], "lora.init: 'eva' is not supported (needs peft's EVA pass over training batches); "),
        (["lora.init=loftq"], "lora.init: 'loftq' is not supported (quantizes the base itself"),
        (["lora.init=pissa_niter_x"], f"lora.init: 'pissa_niter_x' is not supported; {ALLOWED_INITS}"),
        (["lora.init=1"], "lora.init: expected bool | str, got 1"),
        (["lora.init=orthogonal", "lora.r=5"], "lora.init=orthogonal: needs an even lora.r"),
        (["lora.init=pissa", "quant=4bit"], "lora.init=pissa with quant.bits=4: peft's PiSSA takes the SVD"),
        (["lora=none", "lora.use_dora=true"], "lora.use_dora: must be false with lora=none"),
        (["lora=none", "lora.loraplus_lr_ratio=4"], "lora.loraplus_lr_ratio: must be null with lora=none"),
        (["lora=none", "lora.init=gaussian"], "lora.init: must be true with lora=none"),
        (["lora.loraplus_lr_ratio=4", "train.optim=lomo"], "lora.loraplus_lr_ratio with train.optim=lomo: LOMO"),
    ],
)
def test_a_lora_variant_outside_what_peft_and_the_run_can_do_is_refused(overrides, expected):
    assert any(problem.startswith(expected) for problem in _problems(overrides)), _problems(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["lora.use_rslora=true", "lora.use_dora=true", "lora.loraplus_lr_ratio=16"],
        ["lora.init=false"],
        ["lora.init=gaussian"],
        ["lora.init=orthogonal"],
        ["lora.init=pissa"],
        ["lora.init=pissa_niter_4"],
        ["lora.init=olora", "quant=4bit"],
    ],
)
def test_the_variants_peft_and_the_run_can_do_pass(overrides):
    assert _problems(overrides) == []


def test_the_structure_check_keeps_the_failed_fields_beside_the_section():
    from src.config_checks import check_section
    from src.config_schema import LoraConfig

    lora = compose_config(["lora.r=0", "lora.bias=some"])["lora"]
    section, failed, problems = check_section(lora, LoraConfig, "lora.")
    assert failed == {"r", "bias"} and len(problems) == 2
    assert (section.r, section.bias, section.alpha) == (None, None, 16)
    assert set(vars(section)) == {f for f in lora}  # nothing added to the dataclass


def test_multilabel_without_label_columns_is_a_config_error():
    with pytest.raises(ConfigError, match="data.label_columns: required for task 'multilabel'"):
        validate(compose_config(["data=topics_multilabel", "data.label_columns=null"]))


def test_plan_names_the_closest_key_and_option(capsys):
    from src import plan

    assert plan.main(["lora.rank=16", "quant=4bits"]) == 2
    err = capsys.readouterr().err
    assert "lora.rank: unknown key; did you mean lora.r?" in err and "did you mean 4bit" in err
    assert plan.main(["--pack", "lora=al_linear", "--pack", "lora=attn"]) == 2
    assert "lora=al_linear: no such lora option; did you mean all_linear?" in capsys.readouterr().err


def _problems(overrides: list[str], for_training: bool = False) -> list[str]:
    try:
        validate(compose_config(overrides), for_training=for_training)
    except ConfigError as exc:
        return exc.problems
    return []


def _numeric_fields() -> list[tuple[str, object]]:
    """(key, field) of every int or float field of the schema, nullable ones too."""
    import dataclasses
    import typing

    from src.config_schema import HINTS, Config

    found = []
    for section, cls in HINTS[Config].items():
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            args = set(typing.get_args(HINTS[cls][f.name])) or {HINTS[cls][f.name]}
            if args & {int, float} and f.name != "bits":  # quant.bits is a choice of 4, 8, 16
                found.append((f"{section}.{f.name}", f))
    return found


def test_every_numeric_field_declares_its_domain():
    fields = _numeric_fields()
    assert len(fields) >= 30, [key for key, _ in fields]  # the walk finds the schema's numbers
    undeclared = [key for key, f in fields if not {"ge", "gt", "le", "lt"} & set(f.metadata)]
    assert not undeclared, undeclared


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_float_field_takes_nan_or_infinity(value):
    floats = [key for key, f in _numeric_fields() if "float" in str(f.type)]
    assert {"train.learning_rate", "data.max_length_factor", "train.memory_budget_gb", "lora.dropout"} <= set(floats)
    problems = _problems([f"{key}={value}" for key in floats])
    for key in floats:
        assert f"{key}: must be finite, got {float(value)}" in problems, (key, problems)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.num_sample_prompts=-1", "data.num_sample_prompts: must be >= 0, got -1"),
        ("data.subsample=0", "data.subsample: must be >= 1, got 0"),
        ("data.eval_fraction=1", "data.eval_fraction: must be in (0, 1), got 1.0"),
        ("data.threshold=0", "data.threshold: must be in (0, 1), got 0.0"),
        ("data.max_length_factor=0.5", "data.max_length_factor: must be >= 1, got 0.5"),
        ("train.save_total_limit=-1", "train.save_total_limit: must be >= 1, got -1"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience: must be >= 1, got 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0"),
        ("train.max_steps=-5", "train.max_steps: must be >= -1, got -5"),
        ("train.memory_budget_gb=0", "train.memory_budget_gb: must be > 0, got 0"),
        ("train.seed=4294967296", "train.seed: must be in [0, 4294967296), got 4294967296"),
        ("model.max_length=4", "model.max_length: must be >= 8, got 4"),
        ("lora.alpha=-3", "lora.alpha: must be > 0, got -3"),
        ("lora.loraplus_lr_ratio=0", "lora.loraplus_lr_ratio: must be > 0, got 0"),
    ],
)
def test_values_outside_their_domain_are_refused(override, expected):
    assert expected in _problems([override])


def test_a_value_outside_its_domain_is_named_once_among_every_problem():
    problems = _problems(["lora.r=0", "lora.preset=qkvo", "lora.target_modules=[]", "train.learning_rate=nan"])
    assert problems.count("lora.r: must be >= 1, got 0") == 1
    assert any("lora.preset: unknown preset 'qkvo'" in p for p in problems)  # the other lora rules still run
    assert "lora.target_modules: empty list; leave it null to use the preset" in problems
    assert "train.learning_rate: must be finite, got nan" in problems and len(problems) == 4, problems


@pytest.mark.parametrize(
    "template",
    ["{text:>1500000000}", "{text!r}", "{text!s:^10}", "{text:{text}}", "{text:.3}", "Title: {text:x<99999999}!"],
)
def test_a_template_field_takes_no_format_spec_or_conversion(template):
    problems = _problems([f"data.text_template='{template}'"])
    assert len(problems) == 1 and "has a conversion or format spec; write only {text}" in problems[0], problems
    sft = _problems(["data=instructions", f"data.instruction_template='{template.replace('text', 'instruction')}'"])
    assert len(sft) == 1 and sft[0].startswith("data.instruction_template: field '{instruction"), sft


def _model_dir(path, **config) -> str:
    import json

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_max_length_beyond_the_models_positions_is_refused_naming_both(tmp_path):
    problems = _problems(["model.max_length=100000"])  # the tiny model: 512 positions
    assert problems == [
        "model.max_length: 100000 is more than the 512 positions of model 'builtin:tiny-llama' "
        "(max_position_embeddings in its config.json); use model.max_length=512 or less"
    ]
    assert _problems(["model.max_length=512"]) == []
    llama = _model_dir(tmp_path / "llama", model_type="llama", max_position_embeddings=64)
    assert "more than the 64 positions" in _problems([f"model.name_or_path={llama}", "model.max_length=65"])[0]
    assert _problems([f"model.name_or_path={llama}", "model.max_length=64"]) == []
    gpt2 = _model_dir(tmp_path / "gpt2", model_type="gpt2", n_positions=32)  # transformers maps n_positions
    assert "more than the 32 positions" in _problems([f"model.name_or_path={gpt2}", "model.max_length=33"])[0]


def test_max_length_is_checked_against_the_hub_cache_and_skipped_where_unreadable(tmp_path, monkeypatch):
    import json

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 128}))
    (tmp_path / "hub" / "models--org--small" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--small" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert (
        "more than the 128 positions of model 'org/small'"
        in _problems(["model=bert_large", "model.name_or_path=org/small", "model.max_length=129"])[0]
    )
    assert _problems(["model=bert_large", "model.name_or_path=org/not-cached", "model.max_length=100000"]) == []
    custom = _model_dir(tmp_path / "custom", model_type="not_in_transformers", max_position_embeddings=8)
    assert _problems([f"model.name_or_path={custom}", "model.max_length=9"]) == []  # its code is never run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert _problems([f"model.name_or_path={broken}", "model.max_length=9"]) == []


@pytest.mark.parametrize(
    ("optim", "module", "package"),
    [
        ("paged_adamw_8bit", "bitsandbytes", "bitsandbytes"),
        ("lion_32bit", "bitsandbytes", "bitsandbytes"),
        ("adamw_torch_4bit", "torchao", "torchao"),
        ("schedule_free_adamw", "schedulefree", "schedulefree"),
        ("adalomo", "lomo_optim", "lomo-optim"),
        ("grokadamw", "grokadamw", "grokadamw"),
        ("stable_adamw", "optimi", "torch-optimi"),
        ("adamw_anyprecision", "torchdistx", "torchdistx"),
        ("adamw_torch_xla", "torch_xla", "torch_xla"),
    ],
)
def test_an_optimizer_whose_package_is_missing_is_refused_with_the_install_hint(monkeypatch, optim, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec now answers "not installed", as on a bare machine
    problems = _problems([f"train.optim={optim}"], for_training=True)
    assert problems == [
        f"train.optim={optim}: needs the {module} package, which is not installed: pip install {package}"
    ]
    assert _problems([f"train.optim={optim}"]) == []  # src.predict and src.plan build no optimizer


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor_layerwise", "apollo_adamw"])
def test_a_low_rank_optimizer_is_refused_naming_the_key_the_schema_lacks(optim):
    (problem,) = _problems([f"train.optim={optim}"], for_training=True)
    assert problem.startswith(f"train.optim={optim}: needs optim_target_modules")


def test_the_optimizer_packages_match_transformers():
    """Every optimizer transformers builds from another package is mapped to it; the rest need nothing."""
    from transformers import trainer_optimizer as hf

    from src.config import OPTIMIZERS
    from src.config_rules import NEEDS_TARGET_MODULES, OPTIMIZER_PACKAGES

    expected = {
        **dict.fromkeys(hf._BITSANDBYTES_OPTIMIZERS, "bitsandbytes"),
        **dict.fromkeys(hf._TORCHAO_OPTIMIZERS, "torchao"),
        **dict.fromkeys(hf._SCHEDULE_FREE_OPTIMIZERS, "schedulefree"),
    }
    assert {str(k.value): v for k, v in expected.items()} == {
        k: m for k, (m, _) in OPTIMIZER_PACKAGES.items() if m in expected.values()
    }
    assert set(NEEDS_TARGET_MODULES) == {o.value for o in (*hf._GALORE_OPTIMIZERS, *hf._APOLLO_OPTIMIZERS)}
    assert set(OPTIMIZER_PACKAGES) | set(NEEDS_TARGET_MODULES) <= set(OPTIMIZERS)


def test_a_scheduler_is_refused_exactly_when_transformers_needs_arguments_the_schema_lacks():
    import torch
    from transformers import get_scheduler

    from src.config import LR_SCHEDULERS
    from src.config_rules import scheduler_problems

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in LR_SCHEDULERS:
        try:
            get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
            fails = False
        except (TypeError, ValueError):
            fails = True
        assert fails == bool(scheduler_problems(name)), name
    (problem,) = _problems(["train.lr_scheduler_type=warmup_stable_decay"])
    assert problem.startswith("train.lr_scheduler_type=warmup_stable_decay: needs lr_scheduler_kwargs num_decay_steps")
    assert "min_lr or min_lr_rate" in _problems(["train.lr_scheduler_type=cosine_with_min_lr"])[0]


def test_the_forgetting_text_is_read_before_training_and_only_an_sft_run_takes_one(tmp_path):
    def problems(path, data="instructions", for_training=True) -> str:
        raw = compose_config([f"data={data}", f"eval.forgetting_path={path}"])
        with pytest.raises(ConfigError) as caught:
            validate(raw, for_training=for_training)
        return str(caught.value)

    missing = tmp_path / "missing.txt"
    assert f"eval.forgetting_path: '{missing}' cannot be read: No such file or directory" in problems(missing)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    assert "cannot be read: not UTF-8 text" in problems(tmp_path / "binary.txt")
    (tmp_path / "blank.txt").write_text(" \n")
    assert "holds no text" in problems(tmp_path / "blank.txt")
    # A stored config that names another machine's file still validates (src.predict reads it without training).
    assert validate(compose_config(["data=instructions", f"eval.forgetting_path={missing}"])).eval.forgetting_path
    shipped = compose_config(["data=instructions", "eval=forgetting"])
    assert Path(validate(shipped, for_training=True).eval.forgetting_path).name == "gettysburg_address.txt"
    assert "data.task=classification trains a classifier" in problems(shipped["eval"]["forgetting_path"], "topics")


def test_a_config_stored_before_the_eval_section_and_system_metrics_validates():
    raw = compose_config([])
    del raw["eval"], raw["tracking"]["system_metrics"]
    cfg = validate(raw)
    assert cfg.eval.forgetting_path is None and cfg.tracking.system_metrics is None
