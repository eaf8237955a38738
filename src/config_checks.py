"""The checks :func:`src.config.validate` runs over a composed config, every problem collected, none raised.

First the structure (:func:`check_structure`): keys, types, choices and numeric domains against the schema
(:mod:`src.config_schema`). It builds each section from the fields that passed and keeps, beside it, the names of
those that failed, so that the rules after it (:data:`RULES`, one function per section or cross-section concern)
read only values of the right type and do not report a refused field twice.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from src.config_rules import (
    domain_problem,
    max_length_problems,
    optimizer_problems,
    scheduler_problems,
    template_field_problem,
)
from src.config_schema import (
    DERIVED_METRICS,
    FULL_FINE_TUNING,
    HINTS,
    LORA_INITS,
    LORA_PRESETS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    PER_LABEL_METRIC,
    PISSA_NITER,
    TASK_METRICS,
    Config,
    DataConfig,
)
from src.labels import canonical_label, lookalike_key, metric_suffixes
from src.names import name_problem, text_problem
from src.overrides import closest

MISSING_VALUE = "???"  # OmegaConf's mark of a value the config leaves to the user


@dataclass(frozen=True)
class Checked:
    """The sections after the structure check, each built from the fields that passed it (a failed field is None),
    and beside them the names of each section's fields that failed."""

    sections: Mapping[str, Any]
    failed: Mapping[str, frozenset[str]]

    def section(self, name: str, *fields: str) -> Any:
        """Section ``name`` if it passed the structure check and so did each of ``fields``, else None."""
        section = self.sections.get(name)
        if section is None or self.failed.get(name, frozenset()) & set(fields):
            return None
        return section

    def passed(self, name: str, field: str) -> bool:
        return self.section(name, field) is not None


def check_structure(raw: Mapping[str, Any]) -> tuple[Checked, list[str]]:
    """The config's sections checked against :class:`src.config_schema.Config`, and the problems found."""
    hints = HINTS[Config]
    problems = [_unknown_key("", key, hints) for key in raw if key not in hints]
    sections: dict[str, Any] = {}
    failed: dict[str, frozenset[str]] = {}
    optional = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
    for name, tp in hints.items():
        if name not in raw and name not in optional:
            problems.append(f"{name}: missing")
        elif dataclasses.is_dataclass(tp):  # an optional section absent (a stored config older than it): its defaults
            sections[name], failed[name], found = check_section(raw.get(name, {}), tp, f"{name}.")
            problems += found
        elif not _matches(raw[name], tp):
            problems.append(f"{name}: expected {_annotation_text(tp)}, got {raw[name]!r}")
        else:
            sections[name] = raw[name]
    return Checked(sections, failed), problems


def check_section(data: Any, cls: type, path: str) -> tuple[Any, frozenset[str], list[str]]:
    """Check keys, types, choices and numeric domains (:func:`src.config_rules.bounded`) against dataclass ``cls``.

    Returns the section (None if ``data`` is no mapping; a failed field is None in it), the names of the fields
    that failed, and the problems.
    """
    if not isinstance(data, dict):
        return None, frozenset(), [f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}"]
    hints = HINTS[cls]
    problems = [_unknown_key(path, key, hints) for key in data if key not in hints]
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        # A field with a schema default may be absent: a config stored before the field existed.
        value = data.get(f.name, MISSING_VALUE if f.default is dataclasses.MISSING else f.default)
        problem = _field_problem(f"{path}{f.name}", value, tp, f.metadata, given=f.name in data)
        if problem:
            problems.append(problem)
            failed.add(f.name)
        values[f.name] = None if problem else float(value) if tp is float else value
    return cls(**values), frozenset(failed), problems


def _field_problem(key: str, value: Any, tp: Any, metadata: Mapping[str, Any], given: bool) -> Optional[str]:
    if isinstance(value, str) and value == MISSING_VALUE:
        return f"{key}: missing" + (f" (the preset leaves it to you: add {key}=...)" if given else "")
    if not _matches(value, tp):
        return f"{key}: expected {_annotation_text(tp)}, got {value!r}"
    if "choices" in metadata and not _in_choices(value, metadata["choices"]):
        return f"{key}: expected one of {_describe(metadata['choices'])}, got {value!r}"
    return domain_problem(key, float(value) if tp is float else value, metadata)


def _annotation_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_annotation_text(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_annotation_text(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Any:
        return True
    return isinstance(value, tp)


def _in_choices(value: Any, choices: tuple) -> bool:
    for c in choices:
        if isinstance(c, type) or typing.get_origin(c) is not None:
            if _matches(value, c):
                return True
        elif value == c and type(value) is type(c):
            return True
    return False


def _describe(choices: tuple) -> str:
    return " | ".join(_annotation_text(c) if isinstance(c, type) or typing.get_origin(c) else repr(c) for c in choices)


def _unknown_key(path: str, key: str, known: Sequence[str]) -> str:
    names = closest(key, known)
    hint = f"did you mean {' or '.join(path + name for name in names)}?" if names else f"known: {', '.join(known)}"
    return f"{path}{key}: unknown key; {hint}" if names else f"{path}{key}: unknown key ({hint})"


def model_length_problems(checked: Checked) -> list[str]:
    """``model.max_length`` beyond the positions of the model, where its config.json can be read here."""
    model = checked.section("model", "name_or_path", "revision", "max_length")
    return [] if model is None else max_length_problems(model.name_or_path, model.revision, model.max_length)


def adapter_problems(checked: Checked) -> list[str]:
    """The adapter against its preset: LoRA needs a rank and an alpha; full fine-tuning (lora=none) takes none.

    A field refused by its own check (a rank of 0) is left to that one message.
    """
    lora = checked.section("lora", "preset")
    if lora is None:
        return []
    if lora.preset == FULL_FINE_TUNING:
        return _full_fine_tuning_problems(checked)
    problems = []
    if lora.preset not in LORA_PRESETS:
        problems.append(f"lora.preset: unknown preset {lora.preset!r} (known: {', '.join(LORA_PRESETS)}, or none)")
    for key, what in (("r", "a rank >= 1"), ("alpha", "> 0")):
        if checked.passed("lora", key) and getattr(lora, key) is None:
            problems.append(f"lora.{key}: required ({what}); only lora=none (full fine-tuning) has none")
    if checked.passed("lora", "target_modules") and lora.target_modules == []:
        problems.append("lora.target_modules: empty list; leave it null to use the preset")
    return problems


def _full_fine_tuning_problems(checked: Checked) -> list[str]:
    lora = checked.section("lora")
    problems = []
    for key in ("r", "alpha", "target_modules", "modules_to_save"):
        if checked.passed("lora", key) and getattr(lora, key) is not None:
            problems.append(
                f"lora.{key}: must be null with lora=none (full fine-tuning trains every weight, no adapter), "
                f"got {getattr(lora, key)!r}"
            )
    if checked.passed("lora", "bias") and lora.bias != "none":
        problems.append(f"lora.bias: must be 'none' with lora=none (biases train anyway), got {lora.bias!r}")
    for key, plain in (("use_rslora", "false"), ("use_dora", "false"), ("loraplus_lr_ratio", "null"), ("init", "true")):
        value = getattr(lora, key)
        if checked.passed("lora", key) and (value is not True if plain == "true" else value not in (False, None)):
            problems.append(f"lora.{key}: must be {plain} with lora=none (there is no adapter), got {value!r}")
    return problems


def loraplus_problems(checked: Checked) -> list[str]:
    """LoRA+ gives peft's parameter groups to the optimizer ``train.optim`` names: LOMO takes the model instead."""
    lora, train = checked.section("lora", "loraplus_lr_ratio"), checked.section("train", "optim")
    if lora is None or train is None or lora.loraplus_lr_ratio is None or train.optim not in ("lomo", "adalomo"):
        return []
    return [
        f"lora.loraplus_lr_ratio with train.optim={train.optim}: LOMO updates the model in its backward pass and takes "
        "no parameter groups; use an AdamW (adamw_torch, paged_adamw_8bit)"
    ]


# peft's init_lora_weights values lora.init refuses, and why (src.config_schema.LORA_INITS says what it takes).
UNSUPPORTED_INITS = {
    "eva": "needs peft's EVA pass over training batches",
    "corda": "needs peft's CorDA preprocessing on calibration data",
    "lora_ga": "needs peft's LoRA-GA gradient preprocessing",
    "loftq": "quantizes the base itself (a LoftQConfig)",
    "mica": "freezes B, which the pack engine and src.plan do not model",
}


def lora_init_problems(checked: Checked) -> list[str]:
    """``lora.init``: a value of peft's ``init_lora_weights`` a run can prepare, on a base it can apply to."""
    lora = checked.section("lora", "init", "preset")
    if lora is None or lora.preset == FULL_FINE_TUNING:
        return []
    init = lora.init
    allowed = ", ".join(str(value).lower() if isinstance(value, bool) else value for value in LORA_INITS)
    if isinstance(init, str) and init not in LORA_INITS and not PISSA_NITER.fullmatch(init):
        why = f" ({UNSUPPORTED_INITS[init]})" if init in UNSUPPORTED_INITS else ""
        return [f"lora.init: {init!r} is not supported{why}; allowed: {allowed}"]
    if init == "orthogonal" and checked.passed("lora", "r") and lora.r is not None and lora.r % 2:
        return [f"lora.init=orthogonal: needs an even lora.r (peft pairs A's and B's rows), got {lora.r}"]
    quant = checked.section("quant", "bits")
    if isinstance(init, str) and init.startswith("pissa") and quant is not None and quant.bits != 16:
        return [
            f"lora.init={init} with quant.bits={quant.bits}: peft's PiSSA takes the SVD of a 16/32-bit base "
            "(quant=none)"
        ]
    return []


def fp8_adapter_problems(checked: Checked) -> list[str]:
    """What an FP8 base (``quant=fp8``, :mod:`src.fp8`) cannot carry: adapters that read or rewrite the base weight
    itself (DoRA's weight norm, OLoRA's QR of it), which peft would compute on the bare e4m3 values."""
    lora, quant = checked.section("lora", "use_dora", "init", "preset"), checked.section("quant", "fp8")
    if lora is None or quant is None or not quant.fp8 or lora.preset == FULL_FINE_TUNING:
        return []
    problems = []
    if lora.use_dora:
        problems.append(
            "lora.use_dora=true with quant=fp8: DoRA takes the base weight's norm, which an FP8 weight without its "
            "row scales does not give; use quant=4bit or quant=none"
        )
    if lora.init == "olora":
        problems.append("lora.init=olora with quant=fp8: OLoRA decomposes the base weight itself; use quant=none")
    return problems


def quantized_full_fine_tuning_problems(checked: Checked) -> list[str]:
    """Full fine-tuning of a 4- or 8-bit base: bitsandbytes stores its weights frozen."""
    lora, quant = checked.section("lora", "preset"), checked.section("quant", "bits")
    if lora is None or quant is None or lora.preset != FULL_FINE_TUNING or quant.bits == 16:
        return []
    return [
        f"lora=none (full fine-tuning) with quant.bits={quant.bits}: a {quant.bits}-bit base's weights cannot be "
        f"trained (bitsandbytes and FP8 store them frozen); use quant=none, or a LoRA preset such as lora=all_linear"
    ]


def data_source_problems(checked: Checked) -> list[str]:
    """Exactly one source (a file or a hub id), and templates that name columns only."""
    problems = []
    data = checked.section("data", "path", "hub_id")
    if data is not None and (data.path is None) == (data.hub_id is None):
        problems.append("data.path / data.hub_id: set exactly one (a local data file, or a hub dataset id)")
    for key in ("text_template", "instruction_template"):
        data = checked.section("data", key)
        if data is not None and getattr(data, key) is not None:
            problems.extend(template_problems(f"data.{key}", getattr(data, key)))
    return problems


def data_column_problems(checked: Checked) -> list[str]:
    """The columns the model reads, no column named twice, and a label set without repeats."""
    data = checked.section("data", "task", "text_columns", "label_columns", "labels")
    if data is None:
        return []
    problems = []
    if data.task != "sft" and not data.text_columns:
        problems.append(f"data.text_columns: required for task {data.task!r} (the columns the model reads)")
    for key in ("text_columns", "label_columns"):
        columns = getattr(data, key) or []
        for column in sorted({c for c in columns if columns.count(c) > 1}):
            problems.append(f"data.{key}: duplicate column {column!r} in {columns}")
    return problems + _label_set_problems(data.labels or [])


def data_label_problems(checked: Checked) -> list[str]:
    """The label columns the task needs, and loss weights only for the task they weigh, each usable."""
    data = checked.section("data", "task", "label_column", "label_columns", "class_weights", "pos_weight")
    if data is None:
        return []
    problems = []
    if data.task == "classification" and not data.label_column:
        problems.append("data.label_column: required for task 'classification'")
    if data.task == "multilabel" and not data.label_columns:
        problems.append("data.label_columns: required for task 'multilabel' (one 0/1 column per label)")
    if data.task != "classification" and data.class_weights != "none":
        problems.append(f"data.class_weights: only for task 'classification', not {data.task!r}")
    if data.task != "multilabel" and data.pos_weight != "none":
        problems.append(f"data.pos_weight: only for task 'multilabel', not {data.task!r}")
    for key, weights in (("data.class_weights", data.class_weights), ("data.pos_weight", data.pos_weight)):
        if not isinstance(weights, list):
            continue
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            problems.append(f"{key}: each weight must be finite and >= 0, got {weights}")
        if key == "data.class_weights" and weights and not any(weights):
            problems.append(f"{key}: all weights are 0, so the loss is 0/0")
    return problems


def task_problems(checked: Checked) -> list[str]:
    """The task against the data's format and the model: chat turns and SFT need a causal LM's task and model."""
    problems = []
    data = checked.section("data", "task", "format")
    if data is not None and data.format == "messages" and data.task != "sft":
        problems.append(
            f"data.format=messages: only for task 'sft' (conversations to train a reply on), not {data.task!r}"
        )
    data, model = checked.section("data", "task"), checked.section("model", "architecture", "name")
    if data is not None and model is not None and data.task == "sft" and model.architecture == "encoder":
        problems.append(f"data.task=sft needs a decoder model; model {model.name!r} is an encoder")
    return problems


def train_length_problems(checked: Checked) -> list[str]:
    """A run that trains: by steps, else by epochs."""
    train = checked.section("train", "max_steps", "num_train_epochs")
    if train is None or train.max_steps > 0 or train.num_train_epochs > 0:
        return []
    return [f"train.num_train_epochs: must be > 0 when train.max_steps <= 0 (set either), got {train.num_train_epochs}"]


def train_optimizer_problems(checked: Checked) -> list[str]:
    """An optimizer and a scheduler transformers knows, and a scheduler the schema can configure."""
    problems = []
    train = checked.section("train", "optim")
    if train is not None and train.optim not in OPTIMIZERS:
        problems.append(f"train.optim: unknown optimizer {train.optim!r} (known: {', '.join(OPTIMIZERS)})")
    train = checked.section("train", "lr_scheduler_type", "eval_strategy")
    if train is None:
        return problems
    scheduler = train.lr_scheduler_type
    if scheduler not in LR_SCHEDULERS:
        problems.append(f"train.lr_scheduler_type: unknown scheduler {scheduler!r} (known: {', '.join(LR_SCHEDULERS)})")
    problems.extend(scheduler_problems(scheduler))
    if scheduler in ("reduce_lr_on_plateau", "greedy") and train.eval_strategy == "no":
        problems.append(f"train.lr_scheduler_type={scheduler}: needs evaluation (train.eval_strategy != 'no')")
    return problems


def train_precision_problems(checked: Checked) -> list[str]:
    train = checked.section("train", "bf16", "fp16")
    return ["train: bf16 and fp16 cannot both be true"] if train is not None and train.bf16 and train.fp16 else []


def train_evaluation_problems(checked: Checked) -> list[str]:
    """What evaluation steps, early stopping and the best model at the end need from the strategies."""
    fields = ("eval_strategy", "eval_steps", "early_stopping_patience", "load_best_model_at_end", "save_strategy")
    train = checked.section("train", *fields)
    if train is None:
        return []
    problems = []
    if train.eval_strategy == "steps" and not train.eval_steps:
        problems.append("train.eval_steps: required when train.eval_strategy=steps")
    if train.early_stopping_patience is not None and train.eval_strategy == "no":
        problems.append("train.early_stopping_patience: needs evaluation (train.eval_strategy != 'no')")
    if train.load_best_model_at_end and train.save_strategy != train.eval_strategy:
        problems.append("train.load_best_model_at_end: needs train.save_strategy equal to train.eval_strategy")
    return problems


def objective_problems(checked: Checked) -> list[str]:
    """``objective.metric`` and ``train.metric_for_best_model`` name metrics the task's evaluation logs."""
    data = checked.section("data", "task", "labels", "label_columns")
    if data is None:
        return []
    objective, train = checked.section("objective", "metric"), checked.section("train", "metric_for_best_model")
    metric = objective.metric if objective is not None else None
    best = train.metric_for_best_model if train is not None else None
    return metric_problems(data, metric, best, _config_labels(data))


def quant_backend_problems(checked: Checked) -> list[str]:
    """A 4- or 8-bit base needs bitsandbytes to run on this machine; an FP8 one (``quant.fp8``) 8 bits and a torch
    and GPU with FP8 matmuls (:func:`src.fp8.fp8_unavailable`)."""
    quant = checked.section("quant", "bits", "fp8")
    if quant is None:
        return []
    if quant.fp8:
        from src.fp8 import fp8_unavailable

        if quant.bits != 8:
            return [f"quant.fp8=true with quant.bits={quant.bits}: FP8 weights are 8 bits (use quant=fp8)"]
        reason = fp8_unavailable()
        return [] if reason is None else [f"quant=fp8: {reason}"]
    if quant.bits not in (4, 8) or (reason := bitsandbytes_unavailable()) is None:
        return []
    return [f"quant.bits={quant.bits}: bitsandbytes cannot run here ({reason}); use quant=none"]


def name_rule_problems(checked: Checked) -> list[str]:
    """Names are names (:mod:`src.names`): an experiment's name (a directory of the store) and the model's and
    data's short names (in output directory names) are no paths, and the output directory (a tag that sweeps
    search for) can be quoted in an MLflow search."""
    problems = []
    for section, key in (("tracking", "experiment"), ("model", "name"), ("data", "name")):
        value = getattr(checked.section(section, key), key, None)
        if isinstance(value, str) and name_problem(value):
            problems.append(f"{section}.{key}: {value!r} {name_problem(value)}")
    output_dir = checked.sections.get("output_dir")
    if isinstance(output_dir, str) and text_problem(output_dir):
        problems.append(f"output_dir (hydra.run.dir or hydra.sweep.dir): {output_dir!r} {text_problem(output_dir)}")
    return problems


def machine_problems(checked: Checked) -> list[str]:
    """Checks that only a run that trains here needs: src.plan and src.predict validate GPU configs on CPU, and
    predict a run whose optimizer's package this machine lacks."""
    train = checked.section("train", "optim")
    problems = optimizer_problems(train.optim) if train is not None and train.optim in OPTIMIZERS else []
    train = checked.section("train", "bf16", "fp16", "tf32")
    flags = [name for name in ("bf16", "fp16", "tf32") if getattr(train, name)] if train is not None else []
    if not flags:
        return problems
    import torch

    # device_count asks NVML; torch.cuda.is_available() would start CUDA, and no trial forked afterwards could use it.
    if torch.cuda.device_count() == 0:
        fixes = " ".join(f"train.{name}={'null' if name == 'tf32' else 'false'}" for name in flags)
        problems.append(
            f"{', '.join(f'train.{name}=true' for name in flags)}: no CUDA GPU here: use train=default, or {fixes}"
        )
    return problems


def forgetting_task_problems(checked: Checked) -> list[str]:
    """The forgetting text is scored by the model's LM head, which only an SFT run uses."""
    evaluation, data = checked.section("eval", "forgetting_path"), checked.section("data", "task")
    if evaluation is None or data is None or evaluation.forgetting_path is None or data.task == "sft":
        return []
    return [
        f"eval.forgetting_path: measures a causal LM's loss on text, but data.task={data.task} trains a classifier "
        "whose base's LM head is not in use; set it for sft runs only (or eval.forgetting_path=null)"
    ]


def forgetting_text_problems(checked: Checked) -> list[str]:
    """The forgetting text is read before training starts: a run that trains here needs it here, as UTF-8 text."""
    evaluation = checked.section("eval", "forgetting_path")
    if evaluation is None or evaluation.forgetting_path is None:
        return []
    path = Path(evaluation.forgetting_path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or type(exc).__name__
        return [f"eval.forgetting_path: {str(path)!r} cannot be read: {reason}"]
    return [] if text.strip() else [f"eval.forgetting_path: {str(path)!r} holds no text"]


# Every rule of a valid config, in the order its problems are listed.
RULES: tuple[Callable[[Checked], list[str]], ...] = (
    model_length_problems,
    adapter_problems,
    lora_init_problems,
    loraplus_problems,
    quantized_full_fine_tuning_problems,
    fp8_adapter_problems,
    data_source_problems,
    data_column_problems,
    data_label_problems,
    task_problems,
    train_length_problems,
    train_optimizer_problems,
    train_precision_problems,
    train_evaluation_problems,
    objective_problems,
    quant_backend_problems,
    name_rule_problems,
    forgetting_task_problems,
)


def rule_problems(checked: Checked, for_training: bool = False) -> list[str]:
    """Every rule's problems; ``for_training`` adds the checks of this machine and its files."""
    rules = (*RULES, machine_problems, forgetting_text_problems) if for_training else RULES
    return [problem for rule in rules for problem in rule(checked)]


def _config_labels(data: DataConfig) -> Optional[list[str]]:
    """The labels the config names (their canonical spelling), or None when they are inferred from the data."""
    if data.task == "classification":
        return [canonical_label(label) for label in data.labels] if data.labels else None
    return list(data.label_columns) if data.task == "multilabel" and data.label_columns is not None else None


def per_label_metrics(task: str, labels: Sequence[str]) -> dict[str, str]:
    """Each label's F1 metric name, e.g. ``{"R&D": "eval_f1_class_R_D_58ae9caf"}``: the one mapping that
    training, its checks and ``metric_names.json`` use (:func:`src.labels.metric_suffixes`)."""
    prefix = PER_LABEL_METRIC[task]
    return {label: prefix + suffix for label, suffix in metric_suffixes(labels).items()}


def metric_problems(
    data: DataConfig, objective_metric: Optional[str], best: Optional[str], labels: Optional[Sequence[str]]
) -> list[str]:
    """Why ``objective.metric`` or ``train.metric_for_best_model`` names a metric the run never logs.

    ``labels``: the run's classes or label columns; None while they are inferred from the data, when any
    per-class name passes here and :func:`src.fit.run` checks it again once the data has loaded (before the
    model does).
    """
    problems = []
    if objective_metric is not None and not logs_metric(data.task, objective_metric, labels, derived=True):
        logged = _logged_names(data.task, labels, derived=True)
        problems.append(f"objective.metric: task {data.task!r} does not log {objective_metric!r}; it logs {logged}")
    full = best if best is None or best.startswith("eval_") else f"eval_{best}"  # as the Trainer names it
    if full is not None and not logs_metric(data.task, full, labels):
        logged = _logged_names(data.task, labels)
        problems.append(f"train.metric_for_best_model: task {data.task!r} does not log {full!r}; it logs {logged}")
    return problems


def logs_metric(task: str, metric: str, labels: Optional[Sequence[str]], derived: bool = False) -> bool:
    """Whether the task's evaluation logs ``metric``; ``derived`` counts those src/fit.py computes from it.
    With ``labels`` None (not known yet), any per-label name is taken."""
    if metric in TASK_METRICS[task] or (derived and metric in DERIVED_METRICS.get(task, ())):
        return True
    prefix = PER_LABEL_METRIC.get(task)
    if prefix is None or not metric.startswith(prefix) or metric == prefix:
        return False
    return labels is None or metric in per_label_metrics(task, labels).values()


def _logged_names(task: str, labels: Optional[Sequence[str]], derived: bool = False) -> str:
    names = [*TASK_METRICS[task], *(DERIVED_METRICS.get(task, ()) if derived else ())]
    if task in PER_LABEL_METRIC and labels:
        named = per_label_metrics(task, labels).items()
        names += [n if n == PER_LABEL_METRIC[task] + label else f"{n} ({label})" for label, n in named]
    elif task in PER_LABEL_METRIC:
        names.append(f"{PER_LABEL_METRIC[task]}<label>")
    return ", ".join(names)


def template_problems(key: str, template: str) -> list[str]:
    """Why ``template`` cannot be formatted with the row's columns as keywords (``str.format(**row)``): each field
    must be a plain ``{column}``."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"{key}: not a valid format string ({exc}): {template!r}; write a literal brace as '{{{{' or '}}}}'"]
    problems = []
    for _, name, spec, conversion in fields:
        if name is not None and (problem := template_field_problem(key, template, name, conversion, spec)):
            problems.append(problem)
    return problems


def _label_set_problems(labels: list[str]) -> list[str]:
    """Empty or repeated names in ``data.labels``, repeats compared as canonical labels ('1' and '1.0'), and
    names that only look alike (:func:`src.labels.lookalike_key`)."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    alike: dict[str, str] = {}
    for position, label in enumerate(labels):
        key = canonical_label(label)
        if not key:
            problems.append(f"data.labels: empty label at position {position} of {labels}")
        elif key in seen and seen[key] == label:
            problems.append(f"data.labels: duplicate label {label!r} in {labels}")
        elif key in seen:
            problems.append(f"data.labels: {seen[key]!r} and {label!r} are the same label (both read as {key!r})")
        elif lookalike_key(key) in alike:
            first = alike[lookalike_key(key)]
            problems.append(
                f"data.labels: {first!r} and {label!r} look alike (both {lookalike_key(key)!r} in Unicode NFKC form); "
                "keep one spelling"
            )
        else:
            seen[key] = label
            alike[lookalike_key(key)] = label
    return problems


def bitsandbytes_unavailable() -> Optional[str]:
    """Why bitsandbytes cannot quantize on this machine, or None if it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken native library
        return f"{type(exc).__name__}: {exc}"
    return None
