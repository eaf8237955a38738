"""Config rules (src.config_rules): nonsense settings, values a library would fail on, and GPU precision without CUDA
are config errors, all in one error."""

from __future__ import annotations

import pytest

from src.config import ConfigError, validate
from tests.conftest import compose_config


def _problems(overrides: list[str], **kwargs) -> str:
    """The ConfigError's problems as one text, or "" when the config validates."""
    try:
        validate(compose_config(overrides), **kwargs)
    except ConfigError as exc:
        return "\n".join(exc.problems)
    return ""


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.text_columns=[]"], "data.text_columns: required for task 'classification'"),
        (["data=topics_multilabel", "data.text_columns=[]"], "data.text_columns: required for task 'multilabel'"),
        (["data.text_columns=[text,text]"], "data.text_columns: duplicate column 'text'"),
        (["data.labels=[food,sports,food,tech]"], "data.labels: duplicate label 'food'"),
        (["data.labels=['1','1.0','2']"], "data.labels: '1' and '1.0' are the same label"),
        (["data.labels=[food,'',tech]"], "data.labels: empty label at position 1"),
        (["data.class_weights=[1.0,-2.0,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[1.0,nan,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[1.0,inf,1.0]"], "data.class_weights: each weight must be finite and >= 0"),
        (["data.class_weights=[0.0,0.0,0.0]"], "data.class_weights: all weights are 0"),
        (["data=topics_multilabel", "data.pos_weight=[1.0,-1.0,1.0,1.0]"], "data.pos_weight: each weight must be"),
        (
            ["data=topics_multilabel", "data.label_columns=[sports,food,sports]"],
            "data.label_columns: duplicate column 'sports'",
        ),
    ],
    ids=lambda x: x[-1] if isinstance(x, list) else None,
)
def test_nonsense_data_settings_are_config_errors(overrides, expected):
    assert expected in _problems(overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learning_rate=nan"], "train.learning_rate: must be finite, got nan"),
        (["train.learning_rate=inf"], "train.learning_rate: must be finite, got inf"),
        (["train.learning_rate=0"], "train.learning_rate: must be > 0, got 0.0"),
        (["train.num_train_epochs=0", "train.max_steps=-1"], "train.num_train_epochs: must be > 0 when train.max_st"),
        (["train.num_train_epochs=nan"], "train.num_train_epochs: must be finite, got nan"),
        (["train.num_train_epochs=inf", "train.max_steps=-1"], "train.num_train_epochs: must be finite, got inf"),
        (["train.logging_steps=0"], "train.logging_steps: must be >= 1, got 0"),
        (["train.optim=adamw_torchh"], "train.optim: unknown optimizer 'adamw_torchh'"),
        (["train.lr_scheduler_type=cosine_warm"], "train.lr_scheduler_type: unknown scheduler 'cosine_warm'"),
        (["train.per_device_eval_batch_size=0"], "train.per_device_eval_batch_size: must be >= 1, got 0"),
        (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size: must be >= 1, got 0"),
        (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps: must be >= 1, got 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0, got -1.0"),
        (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
        (["train.max_grad_norm=nan"], "train.max_grad_norm: must be finite, got nan"),
        (["train.dataloader_num_workers=-1"], "train.dataloader_num_workers: must be >= 0, got -1"),
        (["train.eval_strategy=steps", "train.eval_steps=-5"], "train.eval_steps: must be >= 1, got -5"),
        (["train.seed=-1"], "train.seed: must be in [0, 4294967296), got -1"),
        (["lora.r=0"], "lora.r: must be >= 1, got 0"),
        (["lora.r=100000"], "lora.r: must be <= 4096 (a rank that wide is no longer low-rank), got 100000"),
        (["lora.alpha=0"], "lora.alpha: must be > 0, got 0"),
        (["lora.dropout=1.0"], "lora.dropout: must be in [0, 1), got 1.0"),
        (["lora.dropout=nan"], "lora.dropout: must be finite, got nan"),
        (
            ["data=instructions", "objective.metric=eval_f1_macro"],
            "objective.metric: task 'sft' does not log 'eval_f1_macro'",
        ),
        (["objective.metric=eval_f1_marco"], "objective.metric: task 'classification' does not log 'eval_f1_marco'"),
        (["objective.metric=eval_f1_class_"], "does not log 'eval_f1_class_'"),
        (["data.labels=[food,sports,tech]", "objective.metric=eval_f1_class_music"], "does not log 'eval_f1_class_m"),
        (["data=topics_multilabel", "objective.metric=eval_f1_label_art"], "does not log 'eval_f1_label_art'"),
        (["train.metric_for_best_model=f1_marco"], "train.metric_for_best_model: task 'classification' does not log"),
        (["data.text_template='{title'"], "data.text_template: not a valid format string"),
        (["data.text_template='{} and {}'"], "data.text_template: positional field '{}'"),
        (["data.text_template='{0}'"], "data.text_template: positional field '{0}'"),
        (["data.text_template='{text.upper}'"], "data.text_template: field '{text.upper}'"),
        (["data=red_dot", "model=openllama3b", "data.instruction_template='Describe {product'"], "data.instruction_t"),
        (["data.split_seed=-1"], "data.split_seed: must be >= 0, got -1"),
        (["data.split_seed=1.5"], "data.split_seed: expected int, got 1.5"),
        (["data.split_seed=abc"], "data.split_seed: expected int, got 'abc'"),
        (["data.subsample_seed=-3"], "data.subsample_seed: must be >= 0, got -3"),
    ],
    ids=lambda x: x[-1] if isinstance(x, list) else None,
)
def test_values_that_failed_inside_a_library_are_config_errors(overrides, expected):
    assert expected in _problems(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective.metric=eval_f1_class_food"],  # per-class F1 of a label the data has (labels inferred)
        ["data.labels=[food,sports,tech]", "objective.metric=eval_f1_class_tech"],
        ["objective.metric=eval_mcc"],
        ["data=topics_multilabel", "objective.metric=eval_f1_label_music"],
        ["data=topics_multilabel", "objective.metric=eval_subset_accuracy"],
        ["data=instructions", "objective.metric=eval_perplexity"],
        ["data=instructions", "objective.metric=eval_loss"],
        ["train.metric_for_best_model=f1_macro"],  # the Trainer adds the eval_ prefix
        ["train.metric_for_best_model=loss"],
        ["train.num_train_epochs=0", "train.max_steps=5"],  # max_steps wins; epochs are unused
        ["lora.r=4096"],
        ["data.text_template='Text: {text} ({{literal braces}})'"],
        ["train.optim=paged_adamw_8bit"],
    ],
    ids=lambda x: " ".join(x),
)
def test_sensible_values_still_validate(overrides):
    assert _problems(overrides) == ""


def test_the_new_checks_are_collected_into_one_error():
    problems = _problems(["train.learning_rate=nan", "train.optim=sgdd", "lora.r=0", "data.split_seed=-1"])
    assert len(problems.splitlines()) == 4, problems


def test_optimizer_and_scheduler_names_are_the_installed_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from src.config import LR_SCHEDULERS, OPTIMIZERS

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_objective_naming_a_class_is_checked_against_the_named_labels():
    problems = _problems(["data.labels=['R&D','R+D']", "objective.metric=eval_f1_class_R_D"])
    assert "objective.metric: task 'classification' does not log 'eval_f1_class_R_D'" in problems
    assert "eval_f1_class_R_D_" in problems  # the valid names are listed
    from src.config import per_label_metrics

    valid = per_label_metrics("classification", ["R&D", "R+D"])["R+D"]
    assert _problems(["data.labels=['R&D','R+D']", f"objective.metric={valid}"]) == ""


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train=gpu"], "train.bf16=true, train.tf32=true: no CUDA GPU here: use train=default, or "),
        (["train.bf16=true"], "train.bf16=true: no CUDA GPU here: use train=default, or train.bf16=false"),
        (["train.fp16=true"], "train.fp16=true: no CUDA GPU here: use train=default, or train.fp16=false"),
        (["train.tf32=true"], "train.tf32=true: no CUDA GPU here: use train=default, or train.tf32=null"),
    ],
)
def test_gpu_precision_without_cuda_fails_validation_for_training(monkeypatch, overrides, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert expected in _problems(overrides, for_training=True)
    assert _problems(overrides) == ""  # src.plan, src.bench and src.predict validate GPU configs on CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _problems(overrides, for_training=True) == ""


def test_plan_validates_a_gpu_config_on_a_machine_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = validate(compose_config(["model=openllama3b", "train=gpu"]))
    assert cfg.train.bf16 and cfg.train.tf32
