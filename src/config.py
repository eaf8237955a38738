"""Typed schema for the composed Hydra config, and the one validation pass over it.

The YAML files under ``conf/`` are plain; the dataclasses here are the schema (not registered as Hydra config
groups, which would list them in ``--help`` as options to compose). Validation runs through :func:`validate`,
which walks the whole config and raises a single :class:`ConfigError` listing *every* problem, instead of
stopping at the first as OmegaConf's structured merge would. Every default lives in the YAML files
(``conf/config.yaml`` holds the base values of ``data`` and ``tracking``); the schema has none, so a key the
YAML forgets is reported as missing rather than silently filled in. The one exception is a key added after
runs were stored (``model.allow_pickle_weights``): its schema default lets an older run's config.yaml validate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import OmegaConf

from src import outputs
from src.config_rules import (
    bounded,
    domain_problem,
    max_length_problems,
    optimizer_problems,
    scheduler_problems,
    template_field_problem,
)
from src.errors import ProblemsError
from src.labels import canonical_label, lookalike_key, metric_suffixes
from src.names import name_problem, text_problem
from src.overrides import closest, group_options
from src.overrides import problems as override_problems
from src.tiny import PROJECT_ROOT

# all_linear: every linear layer of the numbered blocks; all_but_head: every linear layer but the output head, the
# ones outside the blocks too (BERT's pooler), as QLoRA's find_all_linear_names picks them (seed 001).
LORA_PRESETS = ("attn_qv", "attn", "all_linear", "mlp", "all_but_head")
# lora.preset=none (conf/lora/none.yaml): no adapter, every weight of the model trains (full fine-tuning), the
# baseline row beside a sweep's LoRA rows (seed 004).
FULL_FINE_TUNING = "none"
OBJECTIVE_DEFAULTS = {  # task -> (metric, direction)
    "classification": ("eval_f1_macro", "maximize"),
    "multilabel": ("eval_f1_micro", "maximize"),
    "sft": ("eval_loss", "minimize"),
}
# The metrics each task's evaluation returns (src/training.py computes them; tests/unit/test_training.py keeps the
# two in step), besides one F1 per class or label under PER_LABEL_METRIC. objective.metric and
# train.metric_for_best_model are checked against them, so a typo fails before the model loads, not after training.
TASK_METRICS = {
    "classification": (
        "eval_loss",
        "eval_accuracy",
        "eval_balanced_accuracy",
        "eval_mcc",
        "eval_f1_micro",
        "eval_f1_macro",
        "eval_f1_weighted",
    ),
    "multilabel": (
        "eval_loss",
        "eval_f1_micro",
        "eval_f1_macro",
        "eval_f1_weighted",
        "eval_f1_samples",
        "eval_subset_accuracy",
    ),
    "sft": ("eval_loss",),
}
PER_LABEL_METRIC = {"classification": "eval_f1_class_", "multilabel": "eval_f1_label_"}
# Computed by src/train.py from the final evaluation: an objective, not a metric the Trainer picks a best model by.
DERIVED_METRICS = {"sft": ("eval_perplexity",)}
# transformers' OptimizerNames and SchedulerType values, listed here because importing transformers.training_args
# imports peft and bitsandbytes (seconds, and bitsandbytes starts CUDA); a test checks them against the installed ones.
OPTIMIZERS = (
    *("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor"),
    *("adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad"),
    *("adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit"),
    *("paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"),
    *("paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
    *("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise"),
    *("galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw"),
    *("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise"),
    "stable_adamw",
)
LR_SCHEDULERS = (
    *("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    *("inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr"),
    *("warmup_stable_decay", "greedy"),
)
# A LoRA rank at or above a layer's width is no longer low-rank: it costs more than a full update and can express
# no more. 4096 is the width of the 7B/8B models this project targets and above the ranks the LoRA literature
# tries (<= 2048), so a larger value is a typo (r=80000), not an experiment.
MAX_LORA_RANK = 4096


def choice(*values: Any) -> Any:
    """A field whose value must be one of ``values`` (a type among them admits any value of it).

    OmegaConf cannot store ``Literal`` annotations, so the allowed values live in metadata.
    """
    return field(metadata={"choices": values})


class ConfigError(ProblemsError):
    """The composed config is invalid; the message lists every problem found."""

    title = "invalid config"


# The settings that relax a safety rule, as dotted keys. Only the command that loads a model grants them: a run's
# stored config.yaml never does (src.runs.inference refuses one that sets them, naming the flag that grants it).
SAFETY_SETTINGS = ("model.trust_remote_code", "model.allow_pickle_weights")
def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose value differs between two flat configs (a checkpoint's fingerprint, a study's definition)
    and this run's, as ``key: old vs new``."""
    unset = "(unset)"
    keys = sorted(k for k in stored.keys() | current.keys() if stored.get(k, unset) != current.get(k, unset))
    return [f"{k}: {json.dumps(stored.get(k, unset))} vs {json.dumps(current.get(k, unset))}" for k in keys]


@dataclass
class ModelConfig:
    name: str = field(metadata={"help": "Short id used in run names, e.g. openllama3b."})
    name_or_path: str = field(metadata={"help": "Hub id, local directory, or builtin:tiny-llama."})
    architecture: str = choice("decoder", "encoder")
    revision: Optional[str]
    dtype: str = choice("float32", "bfloat16", "float16")
    max_length: int = bounded("Tokens per row; at most the model's max_position_embeddings.", ge=8)
    trust_remote_code: bool
    # The default stands for configs stored before the key existed; conf/model/*.yaml sets it.
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Load a base model stored only as pickle (.bin/.pt); else safetensors only."}
    )


@dataclass
class QuantConfig:
    bits: int = choice(4, 8, 16)
    quant_type: str = choice("nf4", "fp4")
    double_quant: bool
    compute_dtype: str = choice("float32", "bfloat16", "float16")


@dataclass
class LoraConfig:
    preset: str = field(
        metadata={"help": f"One of {LORA_PRESETS}, resolved on the loaded model; or 'none': full fine-tuning."}
    )
    r: Optional[int] = bounded(
        "LoRA rank; null with preset 'none'.", ge=1, le=MAX_LORA_RANK, why_high="a rank that wide is no longer low-rank"
    )
    alpha: Optional[int] = bounded("LoRA alpha (the update is scaled by alpha / r); null with 'none'.", gt=0)
    dropout: float = bounded(ge=0, lt=1)
    bias: str = choice("none", "all", "lora_only")
    target_modules: Optional[list[str]] = field(
        metadata={"help": "Overrides the preset. Items may be module names (q_proj, lm_head) or preset names."}
    )
    modules_to_save: Optional[list[str]]


@dataclass
class DataConfig:
    name: str
    task: str = choice("sft", "classification", "multilabel")
    path: Optional[str] = field(metadata={"help": "Local CSV/TSV/JSON/JSONL/Parquet file."})
    eval_path: Optional[str]
    hub_id: Optional[str]
    hub_config: Optional[str]
    revision: Optional[str]
    train_split: str
    eval_split: Optional[str] = field(metadata={"help": "Hub split to evaluate on; else one is made."})
    eval_fraction: float = bounded(gt=0, lt=1)
    split_seed: int = bounded(ge=0)  # numpy's generators take no negative seed
    id_column: Optional[str]
    text_columns: list[str]
    text_template: Optional[str] = field(metadata={"help": "Python format string over text_columns."})
    label_column: Optional[str]
    label_columns: Optional[list[str]]
    labels: Optional[list[str]] = field(metadata={"help": "Label set and order; else inferred."})
    prompt_template: str = choice("alpaca", "plain")
    instruction_column: str
    instruction_template: Optional[str] = field(metadata={"help": "Format string over columns; else the column."})
    input_column: Optional[str]
    response_column: str
    response_only_loss: bool
    max_length_factor: Optional[float] = bounded(
        "Rows longer than this many times model.max_length tokens are far too long; null: none are.", ge=1
    )
    long_rows: str = choice("truncate", "skip", "error")  # what far too long rows get (a broken file is an error)
    subsample: Optional[int] = bounded(ge=1)
    eval_subsample: Optional[int] = bounded(ge=1)
    subsample_seed: int = bounded(ge=0)
    class_weights: Any = field(metadata={"choices": ("none", "balanced", list[float])})
    pos_weight: Any = field(metadata={"choices": ("none", "auto", "one_minus_share", list[float])})
    threshold: float = bounded(gt=0, lt=1)
    num_sample_prompts: int = bounded(ge=0)
    # Defaults for configs stored before these keys existed; conf/config.yaml sets both.
    format: str = field(
        default="columns",
        metadata={
            "choices": ("columns", "messages"),
            "help": "sft: 'columns' (instruction/input/response through prompt_template) or 'messages' "
            "(role/content turns through the model's chat template; loss on the last assistant turn).",
        },
    )
    messages_column: str = field(
        default="messages", metadata={"help": "data.format=messages: the column of {role, content} turn lists."}
    )


@dataclass
class TrainConfig:
    """Fields named as in the installed transformers' TrainingArguments, plus early stopping,
    the non-finite loss guard and the checkpoint to resume from (read by src/train.py, not passed on)."""

    num_train_epochs: float = bounded(ge=0)
    max_steps: int = bounded("> 0 overrides num_train_epochs; -1 or 0: train by epochs.", ge=-1)
    learning_rate: float = bounded(gt=0)
    lr_scheduler_type: str
    warmup_steps: float = bounded("A value in [0, 1) is a fraction of the total steps.", ge=0)
    per_device_train_batch_size: int = bounded(ge=1)
    per_device_eval_batch_size: int = bounded(ge=1)
    gradient_accumulation_steps: int = bounded(ge=1)
    optim: str
    weight_decay: float = bounded(ge=0)
    max_grad_norm: float = bounded("0 turns clipping off; a negative norm would flip the gradient.", ge=0)
    logging_steps: int = bounded(ge=1)
    eval_strategy: str = choice("no", "steps", "epoch")
    eval_steps: Optional[int] = bounded(ge=1)
    save_strategy: str = choice("no", "steps", "epoch", "best")
    save_steps: Optional[int] = bounded(ge=1)
    save_total_limit: Optional[int] = bounded("Checkpoints kept; null keeps every one.", ge=1)
    load_best_model_at_end: bool
    metric_for_best_model: Optional[str]
    early_stopping_patience: Optional[int] = bounded(ge=1)
    stop_on_nonfinite_loss: bool = field(metadata={"help": "Fail the run at the first NaN/inf training loss."})
    resume_from_checkpoint: Optional[str] = field(
        metadata={"help": "null, 'latest' (newest checkpoint-N in the output dir, if any) or a checkpoint path."}
    )
    activation_checkpointing: bool
    fast_path: bool = field(
        metadata={
            "help": "Packed rows without padding: SFT micro-batches sized to memory_budget_gb (src/engine/), and "
            "decoder classifiers, each example pooled at its last token (src/engine/classification.py)."
        }
    )
    memory_budget_gb: Optional[float] = bounded(
        "Fast path: peak GPU memory to plan micro-batches for; null: 90% of the GPU.", gt=0
    )
    dequantize_weights: bool = field(
        metadata={
            "help": "Fast path: keep dequantized copies of a 4/8-bit base's weights where the budget has room "
            "(8-bit: the activations are then not rounded to int8 as LLM.int8 does); false: bitsandbytes' matmuls."
        }
    )
    seed: int = bounded(ge=0, lt=2**32)  # numpy's legacy seeding, which transformers' set_seed calls
    bf16: bool
    fp16: bool
    tf32: Optional[bool]
    dataloader_num_workers: int = bounded(ge=0)
    nproc_per_node: int = bounded(
        "Processes (GPUs) for one DDP run; > 1 relaunches src.train on that many local ranks.", ge=1
    )


@dataclass
class TrackingConfig:
    experiment: str
    tracking_uri: Optional[str] = field(metadata={"help": "Else $MLFLOW_TRACKING_URI, else sqlite."})
    run_name: Optional[str]
    log_adapter: bool


@dataclass
class ObjectiveConfig:
    metric: Optional[str] = field(metadata={"help": "Else the task's default, e.g. eval_f1_macro."})
    direction: Optional[str] = choice("maximize", "minimize", None)


@dataclass
class Config:
    model: ModelConfig
    quant: QuantConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    tracking: TrackingConfig
    objective: ObjectiveConfig
    output_dir: str


_HINTS = {
    cls: typing.get_type_hints(cls)
    for cls in (Config, ModelConfig, QuantConfig, LoraConfig, DataConfig, TrainConfig, TrackingConfig, ObjectiveConfig)
}


CONF_DIR = PROJECT_ROOT / "conf"


def check_overrides(overrides: Sequence[str], config_dir: Path = CONF_DIR, config_name: str = "config") -> None:
    """Raise :class:`ConfigError` naming every unknown key and group option with the closest names: before Hydra,
    whose answer to a mistyped key is to add it with +."""
    problems = override_problems(list(overrides), Config, group_options(config_dir, config_name))
    if problems:
        raise ConfigError(problems)


def compose(
    overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "config", output_dir: str = "unused"
) -> dict:
    """Compose the Hydra config as ``src.train`` would, outside a Hydra run, as a plain resolved dict.

    A sweep config (``hydra.mode: MULTIRUN``) composes to its base config: the sweeper's search space lives
    under ``hydra``, which is dropped here. ``output_dir`` stands in for ``${hydra:runtime.output_dir}``,
    which has no value outside a run. An unknown key or group option raises :class:`ConfigError`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_overrides(overrides, config_dir, config_name)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        composed = hydra_compose(config_name=config_name, overrides=list(overrides))
    raw = OmegaConf.to_container(composed, resolve=False)
    raw.pop("hydra", None)
    raw["output_dir"] = output_dir
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def literal(tree: Any) -> Any:
    """A resolved config (plain dicts and lists) with every string escaped for OmegaConf, so that a config made
    from it and resolved again reads each string as it is: ``${oc.env:HOME}`` in a resolved value is text."""
    if isinstance(tree, dict):
        return {key: literal(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [literal(value) for value in tree]
    if isinstance(tree, str):  # OmegaConf reads \${ as a literal ${, and \\${ as a backslash before one
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", tree)
    return tree


def resolve(cfg: Any) -> tuple[dict, dict[str, str]]:
    """The composed config as a plain dict with every interpolation resolved, and the problems of those that
    cannot be (``{key: problem}``: an unset ``${oc.env:...}``, a reference to a missing key), each value kept as
    written. OmegaConf would stop at the first, with a traceback."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True), {}
    except OmegaConfBaseException:
        pass
    problems: dict[str, str] = {}

    def walk(written: Any, prefix: str) -> Any:
        if isinstance(written, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in written.items()}
        key = prefix[:-1]
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as exc:
            problems[key] = _unresolved(written, str(exc).strip().splitlines()[0])
            return written

    return walk(OmegaConf.to_container(cfg, resolve=False), ""), problems


def refuse_unresolved(unresolved: dict[str, str]) -> None:
    """Raise the ConfigError of :func:`resolve`'s problems, if it found any."""
    if unresolved:
        raise ConfigError(f"{key}: {problem}" for key, problem in unresolved.items())


def _unresolved(written: Any, reason: str) -> str:
    env = re.search(r"\$\{oc\.env:([^,}]+)", str(written)) or re.search(r"Environment variable '([^']+)'", reason)
    if env:
        name = env.group(1).strip()
        return f"{written}: environment variable {name} is not set; set it, or give a default: ${{oc.env:{name},...}}"
    return f"{written} cannot be resolved: {reason}"


def register_configs() -> None:
    """Register the resolvers the YAML files use (``project_root``, ``file_stem``, ``unique_dir``)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("unique_dir"):  # cached: a sweep's jobs share the sweep's directory
        OmegaConf.register_new_resolver("unique_dir", outputs.unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("file_stem"):  # data=file names its runs after the file: reviews.csv -> reviews
        OmegaConf.register_new_resolver("file_stem", lambda path, default: Path(path).stem if path else default)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
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
    return " | ".join(_type_name(c) if isinstance(c, type) or typing.get_origin(c) else repr(c) for c in choices)


def _unknown_key(path: str, key: str, known: Sequence[str]) -> str:
    names = closest(key, known)
    hint = f"did you mean {' or '.join(path + name for name in names)}?" if names else f"known: {', '.join(known)}"
    return f"{path}{key}: unknown key; {hint}" if names else f"{path}{key}: unknown key ({hint})"


def _check_structure(data: Any, cls: type, path: str, problems: list[str]) -> Any:
    """Check keys, types, choices and numeric domains (:func:`src.config_rules.bounded`) against dataclass ``cls``.

    Returns an instance even when some fields fail (those are None and listed in its
    ``_invalid`` attribute), so the value checks can still run on the fields that passed.
    """
    if not isinstance(data, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = _HINTS[cls]
    for key in data:
        if key not in hints:
            problems.append(_unknown_key(path, key, hints))
    kwargs: dict[str, Any] = {}
    invalid: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        # A field with a schema default may be absent: a config stored before the field existed.
        value = data.get(f.name, f.default if f.default is not dataclasses.MISSING else "???")
        if value == "???":
            hint = "" if f.name not in data else f" (the preset leaves it to you: add {path}{f.name}=...)"
            problems.append(f"{path}{f.name}: missing{hint}")
        elif not _matches(value, tp):
            problems.append(f"{path}{f.name}: expected {_type_name(tp)}, got {value!r}")
        elif "choices" in f.metadata and not _in_choices(value, f.metadata["choices"]):
            problems.append(f"{path}{f.name}: expected one of {_describe(f.metadata['choices'])}, got {value!r}")
        elif problem := domain_problem(f"{path}{f.name}", float(value) if tp is float else value, f.metadata):
            problems.append(problem)
        else:
            kwargs[f.name] = float(value) if tp is float else value
            continue
        kwargs[f.name] = None
        invalid.add(f.name)
    instance = cls(**kwargs)
    instance._invalid = invalid
    return instance


def _ok(section: Any, *names: str) -> bool:
    """True if the section exists and each named field passed its structure check."""
    return section is not None and not set(names) & section._invalid


def _check_values(sections: dict[str, Any], problems: list[str]) -> None:
    """Value and combination checks, each run only if the fields it reads passed their type checks."""
    m, q, lora, d, t = (sections.get(k) for k in ("model", "quant", "lora", "data", "train"))

    def check(condition: bool, problem: str) -> None:
        if condition:
            problems.append(problem)

    if _ok(m, "name_or_path", "revision", "max_length"):
        problems.extend(max_length_problems(m.name_or_path, m.revision, m.max_length))
    problems.extend(_lora_problems(lora))
    if _ok(lora, "preset") and _ok(q, "bits"):
        check(
            lora.preset == FULL_FINE_TUNING and q.bits != 16,
            f"lora=none (full fine-tuning) with quant.bits={q.bits}: a {q.bits}-bit base's weights cannot be "
            f"trained (bitsandbytes stores them frozen); use quant=none, or a LoRA preset such as lora=all_linear",
        )
    if _ok(d, "path", "hub_id"):
        check(
            (d.path is None) == (d.hub_id is None),
            "data.path / data.hub_id: set exactly one (a local data file, or a hub dataset id)",
        )
    for key in ("text_template", "instruction_template"):
        if _ok(d, key) and getattr(d, key) is not None:
            problems.extend(template_problems(f"data.{key}", getattr(d, key)))
    if _ok(d, "task", "text_columns", "label_columns", "labels"):
        check(
            d.task != "sft" and not d.text_columns,
            f"data.text_columns: required for task {d.task!r} (the columns the model reads)",
        )
        for key in ("text_columns", "label_columns"):
            columns = getattr(d, key) or []
            for column in sorted({c for c in columns if columns.count(c) > 1}):
                problems.append(f"data.{key}: duplicate column {column!r} in {columns}")
        problems.extend(_label_set_problems(d.labels or []))
    if _ok(d, "task", "label_column", "label_columns", "class_weights", "pos_weight"):
        check(
            d.task == "classification" and not d.label_column, "data.label_column: required for task 'classification'"
        )
        check(
            d.task == "multilabel" and not d.label_columns,
            "data.label_columns: required for task 'multilabel' (one 0/1 column per label)",
        )
        check(
            d.task != "classification" and d.class_weights != "none",
            f"data.class_weights: only for task 'classification', not {d.task!r}",
        )
        check(
            d.task != "multilabel" and d.pos_weight != "none",
            f"data.pos_weight: only for task 'multilabel', not {d.task!r}",
        )
        for key, weights in (("data.class_weights", d.class_weights), ("data.pos_weight", d.pos_weight)):
            if isinstance(weights, list):
                check(
                    not all(math.isfinite(w) and w >= 0 for w in weights),
                    f"{key}: each weight must be finite and >= 0, got {weights}",
                )
                check(
                    key == "data.class_weights" and bool(weights) and not any(weights),
                    f"{key}: all weights are 0, so the loss is 0/0",
                )
    if _ok(d, "task", "format"):
        check(
            d.format == "messages" and d.task != "sft",
            f"data.format=messages: only for task 'sft' (conversations to train a reply on), not {d.task!r}",
        )
    if _ok(d, "task") and _ok(m, "architecture", "name"):
        check(
            d.task == "sft" and m.architecture == "encoder",
            f"data.task=sft needs a decoder model; model {m.name!r} is an encoder",
        )
    if _ok(t, "max_steps", "num_train_epochs"):
        check(
            t.max_steps <= 0 and t.num_train_epochs <= 0,
            f"train.num_train_epochs: must be > 0 when train.max_steps <= 0 (set either), got {t.num_train_epochs}",
        )
    if _ok(t, "optim"):
        check(
            t.optim not in OPTIMIZERS,
            f"train.optim: unknown optimizer {t.optim!r} (known: {', '.join(OPTIMIZERS)})",
        )
    if _ok(t, "lr_scheduler_type", "eval_strategy"):
        check(
            t.lr_scheduler_type not in LR_SCHEDULERS,
            f"train.lr_scheduler_type: unknown scheduler {t.lr_scheduler_type!r} (known: {', '.join(LR_SCHEDULERS)})",
        )
        problems.extend(scheduler_problems(t.lr_scheduler_type))
        check(
            t.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") and t.eval_strategy == "no",
            f"train.lr_scheduler_type={t.lr_scheduler_type}: needs evaluation (train.eval_strategy != 'no')",
        )
    if _ok(t, "bf16", "fp16"):
        check(t.bf16 and t.fp16, "train: bf16 and fp16 cannot both be true")
    if _ok(t, "eval_strategy", "eval_steps", "early_stopping_patience", "load_best_model_at_end", "save_strategy"):
        check(
            t.eval_strategy == "steps" and not t.eval_steps, "train.eval_steps: required when train.eval_strategy=steps"
        )
        check(
            t.early_stopping_patience is not None and t.eval_strategy == "no",
            "train.early_stopping_patience: needs evaluation (train.eval_strategy != 'no')",
        )
        check(
            t.load_best_model_at_end and t.save_strategy != t.eval_strategy,
            "train.load_best_model_at_end: needs train.save_strategy equal to train.eval_strategy",
        )
    objective_section = sections.get("objective")
    if _ok(d, "task", "labels", "label_columns"):
        metric = objective_section.metric if _ok(objective_section, "metric") else None
        best = t.metric_for_best_model if _ok(t, "metric_for_best_model") else None
        problems.extend(metric_problems(d, metric, best, _config_labels(d)))
    if _ok(q, "bits") and q.bits in (4, 8):
        reason = bitsandbytes_unavailable()
        check(reason is not None, f"quant.bits={q.bits}: bitsandbytes cannot run here ({reason}); use quant=none")


def _lora_problems(lora: Optional[LoraConfig]) -> list[str]:
    """The adapter against its preset: LoRA needs a rank and an alpha; full fine-tuning (lora=none) takes none.

    A field refused by its own check (a rank of 0) is left to that one message.
    """
    if not _ok(lora, "preset"):
        return []
    problems = []
    if lora.preset == FULL_FINE_TUNING:
        for key in ("r", "alpha", "target_modules", "modules_to_save"):
            if _ok(lora, key) and getattr(lora, key) is not None:
                problems.append(
                    f"lora.{key}: must be null with lora=none (full fine-tuning trains every weight, no adapter), "
                    f"got {getattr(lora, key)!r}"
                )
        if _ok(lora, "bias") and lora.bias != "none":
            problems.append(f"lora.bias: must be 'none' with lora=none (biases train anyway), got {lora.bias!r}")
        return problems
    if lora.preset not in LORA_PRESETS:
        problems.append(f"lora.preset: unknown preset {lora.preset!r} (known: {', '.join(LORA_PRESETS)}, or none)")
    for key, what in (("r", "a rank >= 1"), ("alpha", "> 0")):
        if _ok(lora, key) and getattr(lora, key) is None:
            problems.append(f"lora.{key}: required ({what}); only lora=none (full fine-tuning) has none")
    if _ok(lora, "target_modules") and lora.target_modules == []:
        problems.append("lora.target_modules: empty list; leave it null to use the preset")
    return problems


def _config_labels(d: DataConfig) -> Optional[list[str]]:
    """The labels the config names (their canonical spelling), or None when they are inferred from the data."""
    if d.task == "classification":
        return [canonical_label(label) for label in d.labels] if d.labels else None
    return list(d.label_columns) if d.task == "multilabel" else None


def per_label_metrics(task: str, labels: Sequence[str]) -> dict[str, str]:
    """Each label's F1 metric name, e.g. ``{"R&D": "eval_f1_class_R_D_58ae9caf"}``: the one mapping that
    training, its checks and ``metric_names.json`` use (:func:`src.labels.metric_suffixes`)."""
    prefix = PER_LABEL_METRIC[task]
    return {label: prefix + suffix for label, suffix in metric_suffixes(labels).items()}


def metric_problems(
    d: DataConfig, objective_metric: Optional[str], best: Optional[str], labels: Optional[Sequence[str]]
) -> list[str]:
    """Why ``objective.metric`` or ``train.metric_for_best_model`` names a metric the run never logs.

    ``labels``: the run's classes or label columns; None while they are inferred from the data, when any
    per-class name passes here and :func:`src.train.run` checks it again once the data has loaded (before the
    model does).
    """
    problems = []
    if objective_metric is not None and not logs_metric(d.task, objective_metric, labels, derived=True):
        logged = _logged_names(d.task, labels, derived=True)
        problems.append(f"objective.metric: task {d.task!r} does not log {objective_metric!r}; it logs {logged}")
    full = best if best is None or best.startswith("eval_") else f"eval_{best}"  # as the Trainer names it
    if full is not None and not logs_metric(d.task, full, labels):
        logged = _logged_names(d.task, labels)
        problems.append(f"train.metric_for_best_model: task {d.task!r} does not log {full!r}; it logs {logged}")
    return problems


def logs_metric(task: str, metric: str, labels: Optional[Sequence[str]], derived: bool = False) -> bool:
    """Whether the task's evaluation logs ``metric``; ``derived`` counts those src/train.py computes from it.
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


def _check_machine(t: Optional[TrainConfig], problems: list[str]) -> None:
    """Checks that only a run that trains here needs: src.plan and src.predict validate GPU configs on CPU, and
    predict a run whose optimizer's package this machine lacks."""
    if _ok(t, "optim") and t.optim in OPTIMIZERS:
        problems.extend(optimizer_problems(t.optim))
    if not _ok(t, "bf16", "fp16", "tf32"):
        return
    flags = [name for name in ("bf16", "fp16", "tf32") if getattr(t, name)]
    if not flags:
        return
    import torch

    # device_count asks NVML; torch.cuda.is_available() would start CUDA, and no trial forked afterwards could use it.
    if torch.cuda.device_count() == 0:
        fixes = " ".join(f"train.{name}={'null' if name == 'tf32' else 'false'}" for name in flags)
        problems.append(
            f"{', '.join(f'train.{name}=true' for name in flags)}: no CUDA GPU here: use train=default, or {fixes}"
        )


def _check_names(sections: dict[str, Any], problems: list[str]) -> None:
    """Names are names (:mod:`src.names`): an experiment's name (a directory of the store) and the model's and
    data's short names (in output directory names) are no paths, and the output directory (a tag that sweeps
    search for) can be quoted in an MLflow search."""
    for section, key in (("tracking", "experiment"), ("model", "name"), ("data", "name")):
        value = getattr(sections.get(section), key) if _ok(sections.get(section), key) else None
        if isinstance(value, str) and name_problem(value):
            problems.append(f"{section}.{key}: {value!r} {name_problem(value)}")
    output_dir = sections.get("output_dir")
    if isinstance(output_dir, str) and text_problem(output_dir):
        problems.append(f"output_dir (hydra.run.dir or hydra.sweep.dir): {output_dir!r} {text_problem(output_dir)}")


def bitsandbytes_unavailable() -> Optional[str]:
    """Why bitsandbytes cannot quantize on this machine, or None if it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken native library
        return f"{type(exc).__name__}: {exc}"
    return None


def validate(raw: Any, *, for_training: bool = False) -> Config:
    """Validate a composed config (DictConfig or dict); raise one ConfigError listing every problem.

    ``for_training``: also check that this machine can train it (a CUDA GPU for bf16, fp16 or tf32).
    """
    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    problems: list[str] = []
    hints = _HINTS[Config]
    for key in raw:
        if key not in hints:
            problems.append(_unknown_key("", key, hints))
    sections: dict[str, Any] = {}
    for name, tp in hints.items():
        if name not in raw:
            problems.append(f"{name}: missing")
        elif dataclasses.is_dataclass(tp):
            sections[name] = _check_structure(raw[name], tp, f"{name}.", problems)
        elif not _matches(raw[name], tp):
            problems.append(f"{name}: expected {_type_name(tp)}, got {raw[name]!r}")
        else:
            sections[name] = raw[name]
    _check_values(sections, problems)
    _check_names(sections, problems)
    if for_training:
        _check_machine(sections.get("train"), problems)
    if problems:
        raise ConfigError(problems)
    for section in sections.values():
        if dataclasses.is_dataclass(section):
            del section._invalid
    return Config(**sections)


def objective(cfg: Config) -> tuple[str, str]:
    """The metric a sweep optimizes and its direction, from the config or the task's default."""
    metric, direction = OBJECTIVE_DEFAULTS[cfg.data.task]
    return cfg.objective.metric or metric, cfg.objective.direction or direction


register_configs()
