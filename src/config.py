"""Typed schema for the composed Hydra config, and the one validation pass over it.

The YAML files under ``conf/`` are plain; the dataclasses here are the schema. They are
registered in Hydra's ConfigStore (group ``schema``) so other tools can compose against
them, but validation runs through :func:`validate`, which walks the whole config and raises
a single :class:`ConfigError` listing *every* problem, instead of stopping at the first as
OmegaConf's structured merge would. Every default lives in the YAML files (``conf/config.yaml``
holds the base values of ``data`` and ``tracking``); the schema has none, so a key the YAML
forgets is reported as missing rather than silently filled in.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from src.tiny import PROJECT_ROOT

LORA_PRESETS = ("attn_qv", "attn", "all_linear", "mlp")
OBJECTIVE_DEFAULTS = {  # task -> (metric, direction)
    "classification": ("eval_f1_macro", "maximize"),
    "multilabel": ("eval_f1_micro", "maximize"),
    "sft": ("eval_loss", "minimize"),
}


def choice(*values: Any) -> Any:
    """A field whose value must be one of ``values`` (a type among them admits any value of it).

    OmegaConf cannot store ``Literal`` annotations, so the allowed values live in metadata.
    """
    return field(metadata={"choices": values})


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    name: str = field(metadata={"help": "Short id used in run names, e.g. openllama3b."})
    name_or_path: str = field(metadata={"help": "Hub id, local directory, or builtin:tiny-llama."})
    architecture: str = choice("decoder", "encoder")
    revision: Optional[str]
    dtype: str = choice("float32", "bfloat16", "float16")
    max_length: int
    trust_remote_code: bool


@dataclass
class QuantConfig:
    bits: int = choice(4, 8, 16)
    quant_type: str = choice("nf4", "fp4")
    double_quant: bool
    compute_dtype: str = choice("float32", "bfloat16", "float16")


@dataclass
class LoraConfig:
    preset: str = field(metadata={"help": f"One of {LORA_PRESETS}; resolved on the loaded model."})
    r: int
    alpha: int
    dropout: float
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
    eval_fraction: float
    split_seed: int
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
    max_length_factor: Optional[float] = field(
        metadata={"help": "Rows longer than this many times model.max_length tokens are faults; null: truncate all."}
    )
    subsample: Optional[int]
    eval_subsample: Optional[int]
    subsample_seed: int
    class_weights: Any = field(metadata={"choices": ("none", "balanced", list[float])})
    pos_weight: Any = field(metadata={"choices": ("none", "auto", list[float])})
    threshold: float
    num_sample_prompts: int


@dataclass
class TrainConfig:
    """Fields named as in the installed transformers' TrainingArguments, plus early stopping,
    the non-finite loss guard and the checkpoint to resume from (read by src/train.py, not passed on)."""

    num_train_epochs: float
    max_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_steps: float
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    optim: str
    weight_decay: float
    max_grad_norm: float
    logging_steps: int
    eval_strategy: str = choice("no", "steps", "epoch")
    eval_steps: Optional[int]
    save_strategy: str = choice("no", "steps", "epoch", "best")
    save_steps: Optional[int]
    save_total_limit: Optional[int]
    load_best_model_at_end: bool
    metric_for_best_model: Optional[str]
    early_stopping_patience: Optional[int]
    stop_on_nonfinite_loss: bool = field(metadata={"help": "Fail the run at the first NaN/inf training loss."})
    resume_from_checkpoint: Optional[str] = field(
        metadata={"help": "null, 'latest' (newest checkpoint-N in the output dir, if any) or a checkpoint path."}
    )
    activation_checkpointing: bool
    fast_path: bool = field(
        metadata={"help": "SFT: padding-free packed micro-batches sized to memory_budget_gb (src/packing.py)."}
    )
    memory_budget_gb: Optional[float] = field(
        metadata={"help": "Fast path: peak GPU memory to plan micro-batches for; null: 90% of the GPU."}
    )
    dequantize_weights: bool = field(
        metadata={
            "help": "Fast path: keep dequantized copies of a 4/8-bit base's weights where the budget has room "
            "(8-bit: the activations are then not rounded to int8 as LLM.int8 does); false: bitsandbytes' matmuls."
        }
    )
    seed: int
    bf16: bool
    fp16: bool
    tf32: Optional[bool]
    dataloader_num_workers: int
    nproc_per_node: int = field(
        metadata={"help": "Processes (GPUs) for one run under DDP; > 1 relaunches src.train under torchrun."}
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


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore and the ``project_root`` resolver."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    for name, tp in _HINTS[Config].items():
        if dataclasses.is_dataclass(tp):
            cs.store(group=f"schema/{name}", name="base", node=tp)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
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


def _check_structure(data: Any, cls: type, path: str, problems: list[str]) -> Any:
    """Check keys, types and choices against dataclass ``cls``.

    Returns an instance even when some fields fail (those are None and listed in its
    ``_invalid`` attribute), so the value checks can still run on the fields that passed.
    """
    if not isinstance(data, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = _HINTS[cls]
    for key in data:
        if key not in hints:
            problems.append(f"{path}{key}: unknown key (known: {', '.join(hints)})")
    kwargs: dict[str, Any] = {}
    invalid: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = data.get(f.name, "???")
        if value == "???":
            hint = "" if f.name not in data else f" (the preset leaves it to you: add {path}{f.name}=...)"
            problems.append(f"{path}{f.name}: missing{hint}")
        elif not _matches(value, tp):
            problems.append(f"{path}{f.name}: expected {_type_name(tp)}, got {value!r}")
        elif "choices" in f.metadata and not _in_choices(value, f.metadata["choices"]):
            problems.append(f"{path}{f.name}: expected one of {_describe(f.metadata['choices'])}, got {value!r}")
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

    if _ok(m, "max_length"):
        check(m.max_length < 8, f"model.max_length: must be >= 8, got {m.max_length}")
    if _ok(lora, "preset", "r", "alpha", "dropout", "target_modules"):
        check(
            lora.preset not in LORA_PRESETS,
            f"lora.preset: unknown preset {lora.preset!r} (known: {', '.join(LORA_PRESETS)})",
        )
        check(lora.r < 1, f"lora.r: must be >= 1, got {lora.r}")
        check(lora.alpha <= 0, f"lora.alpha: must be > 0, got {lora.alpha}")
        check(not 0.0 <= lora.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lora.dropout}")
        check(lora.target_modules == [], "lora.target_modules: empty list; leave it null to use the preset")
    if _ok(d, "path", "hub_id"):
        check(
            (d.path is None) == (d.hub_id is None),
            "data.path / data.hub_id: set exactly one (a local data file, or a hub dataset id)",
        )
    if _ok(d, "eval_fraction", "subsample", "eval_subsample", "threshold"):
        check(not 0.0 < d.eval_fraction < 1.0, f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")
        check(d.subsample is not None and d.subsample < 1, f"data.subsample: must be >= 1, got {d.subsample}")
        check(
            d.eval_subsample is not None and d.eval_subsample < 1,
            f"data.eval_subsample: must be >= 1, got {d.eval_subsample}",
        )
        check(not 0.0 < d.threshold < 1.0, f"data.threshold: must be in (0, 1), got {d.threshold}")
    if _ok(d, "max_length_factor"):
        check(
            d.max_length_factor is not None and d.max_length_factor < 1,
            f"data.max_length_factor: must be >= 1 or null, got {d.max_length_factor}",
        )
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
    if _ok(d, "task") and _ok(m, "architecture", "name"):
        check(
            d.task == "sft" and m.architecture == "encoder",
            f"data.task=sft needs a decoder model; model {m.name!r} is an encoder",
        )
    if _ok(
        t,
        "max_steps",
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "bf16",
        "fp16",
    ):
        check(
            t.max_steps <= 0 and t.num_train_epochs <= 0, "train: set train.max_steps > 0 or train.num_train_epochs > 0"
        )
        check(t.learning_rate <= 0, f"train.learning_rate: must be > 0, got {t.learning_rate}")
        check(
            t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1,
            "train: per_device_train_batch_size and gradient_accumulation_steps must be >= 1",
        )
        check(t.bf16 and t.fp16, "train: bf16 and fp16 cannot both be true")
    if _ok(t, "nproc_per_node"):
        check(t.nproc_per_node < 1, f"train.nproc_per_node: must be >= 1, got {t.nproc_per_node}")
    if _ok(t, "memory_budget_gb"):
        check(
            t.memory_budget_gb is not None and t.memory_budget_gb <= 0,
            f"train.memory_budget_gb: must be > 0 or null, got {t.memory_budget_gb}",
        )
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
    if _ok(q, "bits") and q.bits in (4, 8):
        reason = bitsandbytes_unavailable()
        check(reason is not None, f"quant.bits={q.bits}: bitsandbytes cannot run here ({reason}); use quant=none")


def bitsandbytes_unavailable() -> Optional[str]:
    """Why bitsandbytes cannot quantize on this machine, or None if it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken native library
        return f"{type(exc).__name__}: {exc}"
    return None


def validate(raw: Any) -> Config:
    """Validate a composed config (DictConfig or dict); raise one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    problems: list[str] = []
    hints = _HINTS[Config]
    for key in raw:
        if key not in hints:
            problems.append(f"{key}: unknown key (known: {', '.join(hints)})")
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
