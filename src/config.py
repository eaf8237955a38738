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
import decimal
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import OmegaConf

from src.errors import ProblemsError
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
# The metrics each task's evaluation returns (src/training.py computes them; tests/test_hardening.py keeps the
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
# A label that reads as a plain decimal number; no leading zeros, so a code such as "01" stays text.
_DECIMAL_LABEL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")


def choice(*values: Any) -> Any:
    """A field whose value must be one of ``values`` (a type among them admits any value of it).

    OmegaConf cannot store ``Literal`` annotations, so the allowed values live in metadata.
    """
    return field(metadata={"choices": values})


def canonical_label(text: str) -> str:
    """The class a label's text names: stripped, and a plain decimal number written as the number.

    A label is its value, however the file spells it: CSV readers give the int 1, JSON may give 1, 1.0
    or "1", and a spreadsheet export "1.0". All of them are the class "1" (and "2.50" is "2.5"), so one
    label never becomes several classes. Text that is not a plain number ("01", "1e3", "nan") is kept.
    """
    text = text.strip()
    if not _DECIMAL_LABEL.fullmatch(text):
        return text
    value = decimal.Decimal(text)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def safe_metric_name(name: str) -> str:
    """A label name as it appears in a metric name (MLflow allows only these characters)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


class ConfigError(ProblemsError):
    """The composed config is invalid; the message lists every problem found."""

    title = "invalid config"


@dataclass
class ModelConfig:
    name: str = field(metadata={"help": "Short id used in run names, e.g. openllama3b."})
    name_or_path: str = field(metadata={"help": "Hub id, local directory, or builtin:tiny-llama."})
    architecture: str = choice("decoder", "encoder")
    revision: Optional[str]
    dtype: str = choice("float32", "bfloat16", "float16")
    max_length: int
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
    r: Optional[int] = field(metadata={"help": "LoRA rank; null with preset 'none'."})
    alpha: Optional[int] = field(metadata={"help": "LoRA alpha (the update is scaled by alpha / r); null with 'none'."})
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
        metadata={"help": "Rows longer than this many times model.max_length tokens are far too long; null: none are."}
    )
    long_rows: str = choice("truncate", "skip", "error")  # what far too long rows get (a broken file is an error)
    subsample: Optional[int]
    eval_subsample: Optional[int]
    subsample_seed: int
    class_weights: Any = field(metadata={"choices": ("none", "balanced", list[float])})
    pos_weight: Any = field(metadata={"choices": ("none", "auto", "one_minus_share", list[float])})
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
        metadata={
            "help": "Packed rows without padding: SFT micro-batches sized to memory_budget_gb (src/fast/), and "
            "decoder classifiers, each example pooled at its last token (src/fast/classification.py)."
        }
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
        metadata={"help": "Processes (GPUs) for one DDP run; > 1 relaunches src.train on that many local ranks."}
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


def compose(
    overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "config", output_dir: str = "unused"
) -> dict:
    """Compose the Hydra config as ``src.train`` would, outside a Hydra run, as a plain resolved dict.

    A sweep config (``hydra.mode: MULTIRUN``) composes to its base config: the sweeper's search space lives
    under ``hydra``, which is dropped here. ``output_dir`` stands in for ``${hydra:runtime.output_dir}``,
    which has no value outside a run.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        composed = hydra_compose(config_name=config_name, overrides=list(overrides))
    raw = OmegaConf.to_container(composed, resolve=False)
    raw.pop("hydra", None)
    raw["output_dir"] = output_dir
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


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
    """Register the resolvers the YAML files use (``project_root``, ``file_stem``)."""
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
        # A field with a schema default may be absent: a config stored before the field existed.
        value = data.get(f.name, f.default if f.default is not dataclasses.MISSING else "???")
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
    if _ok(lora, "preset", "r", "alpha", "dropout", "target_modules", "modules_to_save"):
        if lora.preset == FULL_FINE_TUNING:
            for key in ("r", "alpha", "target_modules", "modules_to_save"):
                check(
                    getattr(lora, key) is not None,
                    f"lora.{key}: must be null with lora=none (full fine-tuning trains every weight, no adapter), "
                    f"got {getattr(lora, key)!r}",
                )
            check(
                lora.bias != "none",
                f"lora.bias: must be 'none' with lora=none (biases train anyway), got {lora.bias!r}",
            )
        else:
            check(
                lora.preset not in LORA_PRESETS,
                f"lora.preset: unknown preset {lora.preset!r} (known: {', '.join(LORA_PRESETS)}, or none)",
            )
            check(lora.r is None, "lora.r: required (a rank >= 1); only lora=none (full fine-tuning) has none")
            check(lora.alpha is None, "lora.alpha: required (> 0); only lora=none (full fine-tuning) has none")
            check(lora.r is not None and lora.r < 1, f"lora.r: must be >= 1, got {lora.r}")
            check(
                lora.r is not None and lora.r > MAX_LORA_RANK,
                f"lora.r: must be <= {MAX_LORA_RANK} (a rank that wide is no longer low-rank), got {lora.r}",
            )
            check(lora.alpha is not None and lora.alpha <= 0, f"lora.alpha: must be > 0, got {lora.alpha}")
        check(not 0.0 <= lora.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lora.dropout}")
        check(lora.target_modules == [], "lora.target_modules: empty list; leave it null to use the preset")
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
    if _ok(d, "eval_fraction", "subsample", "eval_subsample", "threshold"):
        check(not 0.0 < d.eval_fraction < 1.0, f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")
        check(d.subsample is not None and d.subsample < 1, f"data.subsample: must be >= 1, got {d.subsample}")
        check(
            d.eval_subsample is not None and d.eval_subsample < 1,
            f"data.eval_subsample: must be >= 1, got {d.eval_subsample}",
        )
        check(not 0.0 < d.threshold < 1.0, f"data.threshold: must be in (0, 1), got {d.threshold}")
    if _ok(d, "split_seed", "subsample_seed"):  # numpy's generators take no negative seed
        check(d.split_seed < 0, f"data.split_seed: must be >= 0, got {d.split_seed}")
        check(d.subsample_seed < 0, f"data.subsample_seed: must be >= 0, got {d.subsample_seed}")
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
    if _ok(d, "task") and _ok(m, "architecture", "name"):
        check(
            d.task == "sft" and m.architecture == "encoder",
            f"data.task=sft needs a decoder model; model {m.name!r} is an encoder",
        )
    if _ok(t, "max_steps", "num_train_epochs"):
        check(
            not math.isfinite(t.num_train_epochs), f"train.num_train_epochs: must be finite, got {t.num_train_epochs}"
        )
        check(
            t.max_steps <= 0 and t.num_train_epochs <= 0,
            f"train.num_train_epochs: must be > 0 when train.max_steps <= 0 (set either), got {t.num_train_epochs}",
        )
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if _ok(t, key):
            check(getattr(t, key) < 1, f"train.{key}: must be >= 1, got {getattr(t, key)}")
    for key, low in (("logging_steps", 1), ("dataloader_num_workers", 0), ("eval_steps", 1), ("save_steps", 1)):
        value = getattr(t, key) if _ok(t, key) else None
        check(value is not None and value < low, f"train.{key}: must be >= {low}, got {value}")
    if _ok(t, "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm"):
        check(not math.isfinite(t.learning_rate), f"train.learning_rate: must be finite, got {t.learning_rate}")
        check(t.learning_rate <= 0, f"train.learning_rate: must be > 0, got {t.learning_rate}")
        for key in ("warmup_steps", "weight_decay"):
            value = getattr(t, key)
            check(not (math.isfinite(value) and value >= 0), f"train.{key}: must be finite and >= 0, got {value}")
        check(not math.isfinite(t.max_grad_norm), f"train.max_grad_norm: must be finite, got {t.max_grad_norm}")
    if _ok(t, "seed"):  # numpy's legacy seeding, which transformers' set_seed calls, takes [0, 2**32)
        check(not 0 <= t.seed < 2**32, f"train.seed: must be in [0, 2**32), got {t.seed}")
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
        check(
            t.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") and t.eval_strategy == "no",
            f"train.lr_scheduler_type={t.lr_scheduler_type}: needs evaluation (train.eval_strategy != 'no')",
        )
    if _ok(t, "bf16", "fp16"):
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
    objective_section = sections.get("objective")
    if _ok(d, "task", "labels", "label_columns") and _ok(objective_section, "metric"):
        metric = objective_section.metric
        check(
            metric is not None and not logs_metric(d, metric, derived=True),
            f"objective.metric: task {d.task!r} does not log {metric!r}; it logs {_logged_names(d, derived=True)}",
        )
    if _ok(d, "task", "labels", "label_columns") and _ok(t, "metric_for_best_model"):
        best = t.metric_for_best_model
        full = best if best is None or best.startswith("eval_") else f"eval_{best}"  # as the Trainer names it
        check(
            full is not None and not logs_metric(d, full),
            f"train.metric_for_best_model: task {d.task!r} does not log {full!r}; it logs {_logged_names(d)}",
        )
    if _ok(q, "bits") and q.bits in (4, 8):
        reason = bitsandbytes_unavailable()
        check(reason is not None, f"quant.bits={q.bits}: bitsandbytes cannot run here ({reason}); use quant=none")


def logs_metric(d: DataConfig, metric: str, derived: bool = False) -> bool:
    """Whether the task's evaluation logs ``metric``; ``derived`` counts those src/train.py computes from it.

    Per-label names come from ``data.labels`` or ``data.label_columns``; with labels inferred from the
    data (known only once it loads), any ``eval_f1_class_<name>`` is taken.
    """
    if metric in TASK_METRICS[d.task] or (derived and metric in DERIVED_METRICS.get(d.task, ())):
        return True
    prefix = PER_LABEL_METRIC.get(d.task)
    if prefix is None or not metric.startswith(prefix) or metric == prefix:
        return False
    labels = d.labels if d.task == "classification" else d.label_columns
    return not labels or metric in {prefix + safe_metric_name(label) for label in labels}


def _logged_names(d: DataConfig, derived: bool = False) -> str:
    names = [*TASK_METRICS[d.task], *(DERIVED_METRICS.get(d.task, ()) if derived else ())]
    prefix = PER_LABEL_METRIC.get(d.task)
    labels = d.labels if d.task == "classification" else d.label_columns
    if prefix and labels:
        names += [prefix + safe_metric_name(label) for label in labels]
    elif prefix:
        names.append(f"{prefix}<label>")
    return ", ".join(names)


def template_problems(key: str, template: str) -> list[str]:
    """Why ``template`` cannot be formatted with the row's columns as keywords (``str.format(**row)``)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"{key}: not a valid format string ({exc}): {template!r}; write a literal brace as '{{{{' or '}}}}'"]
    problems = []
    for _, name, _, conversion in fields:
        if name is None:
            continue
        shown = "{" + name + ("!" + conversion if conversion else "") + "}"
        if name == "" or name.isdigit():
            problems.append(f"{key}: positional field {shown!r} in {template!r}; name a column, e.g. {{text}}")
        elif "." in name or "[" in name:
            problems.append(f"{key}: field {shown!r} in {template!r} reads an attribute or an index; name a column")
        if conversion not in (None, "r", "s", "a"):
            problems.append(f"{key}: field {shown!r} in {template!r} has an unknown conversion (use !r, !s or !a)")
    return problems


def _label_set_problems(labels: list[str]) -> list[str]:
    """Empty or repeated names in ``data.labels``, repeats compared as canonical labels ('1' and '1.0')."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for position, label in enumerate(labels):
        key = canonical_label(label)
        if not key:
            problems.append(f"data.labels: empty label at position {position} of {labels}")
        elif key not in seen:
            seen[key] = label
        elif seen[key] == label:
            problems.append(f"data.labels: duplicate label {label!r} in {labels}")
        else:
            problems.append(f"data.labels: {seen[key]!r} and {label!r} are the same label (both read as {key!r})")
    return problems


def _check_machine(t: Optional[TrainConfig], problems: list[str]) -> None:
    """Checks that only a run that trains here needs: src.plan and src.predict validate GPU configs on CPU."""
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
