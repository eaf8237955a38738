"""The schema of the composed Hydra config: one dataclass per section, a help string on every field.

Every field is a :func:`dataclasses.field` whose metadata holds ``help`` (``python -m src.train --help`` shows it)
and, where the value is constrained, ``choices`` (:func:`choice`) or a domain (:func:`src.config_rules.bounded`).
Defaults live in the YAML files under ``conf/``; the schema has none, so a key the YAML forgets is reported as
missing rather than silently filled in. The exceptions are keys added after runs were stored, whose schema default
lets an older run's config.yaml validate; tests/unit/test_config.py keeps each equal to the value the YAML composes to.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

from src.config_rules import bounded

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
# Computed by src/fit.py from the final evaluation: an objective, not a metric the Trainer picks a best model by.
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
# peft's init_lora_weights values lora.init takes: True (B = 0, A Kaiming), False (both random, for debugging),
# gaussian, orthogonal (an even rank), and the two that move the base weight by the adapter's start (PiSSA, OLoRA;
# pissa_niter_<n>: PiSSA by a fast SVD of n subspace iterations). peft's others need calibration data (eva, corda,
# lora_ga), quantize the base themselves (loftq) or freeze B (mica), which no run here prepares.
LORA_INITS = (True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_<n>", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")  # and pissa_niter_<n>: the base becomes W - scale * B0 A0
PISSA_NITER = re.compile(r"pissa_niter_\d+")
# A LoRA rank at or above a layer's width is no longer low-rank: it costs more than a full update and can express
# no more. 4096 is the width of the 7B/8B models this project targets and above the ranks the LoRA literature
# tries (<= 2048), so a larger value is a typo (r=80000), not an experiment.
MAX_LORA_RANK = 4096
# The settings that relax a safety rule, as dotted keys. Only the command that loads a model grants them: a run's
# stored config.yaml never does (src.runs.inference refuses one that sets them, naming the flag that grants it).
SAFETY_SETTINGS = ("model.trust_remote_code", "model.allow_pickle_weights")


def changes_base(init: Any) -> bool:
    """Whether peft's ``init_lora_weights=init`` moves the base weight (PiSSA, OLoRA), which no other adapter shares."""
    return isinstance(init, str) and (init in BASE_CHANGING_INITS or PISSA_NITER.fullmatch(init) is not None)


def unshareable_variant(lora: LoraConfig) -> Optional[str]:
    """Why this adapter's variant cannot train in a pack (:mod:`src.packs`, which holds plain LoRA A/B per slot on
    one shared, unchanged base), or None: rsLoRA packs (the slot bank reads peft's scale), and so do the inits that
    leave the base as it is."""
    if lora.use_dora:
        return "lora.use_dora=true: DoRA's magnitude vectors are not in the pack engine"
    if lora.loraplus_lr_ratio is not None:
        return (
            f"lora.loraplus_lr_ratio={lora.loraplus_lr_ratio}: LoRA+'s own learning rate for B is not in the pack "
            "engine's optimizer"
        )
    if changes_base(lora.init):
        return f"lora.init={lora.init}: it changes the base weights, which the pack shares"
    return None


def variant_name(lora: dict) -> str:
    """``-rslora-dora-loraplus16-init=pissa``: a raw ``lora`` section's variant where it is not plain LoRA, else ''."""
    ratio, init = lora.get("loraplus_lr_ratio"), lora.get("init", True)
    parts = [name for name in ("rslora", "dora") if lora.get(f"use_{name}") is True]
    parts += [f"loraplus{ratio:g}"] if isinstance(ratio, (int, float)) else []
    parts += [f"init={str(init).lower()}"] if init is not True else []
    return "".join(f"-{part}" for part in parts)


def setting(help: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A field described by ``help``. In the run config's schema, ``default`` only for a key that runs stored before
    it existed lack (the defaults live in conf/); the sweepers' settings have theirs here (``factory``: a mutable
    default's maker)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def choice(help: str, *values: Any, default: Any = dataclasses.MISSING) -> Any:
    """A field whose value must be one of ``values`` (a type among them admits any value of it).

    OmegaConf cannot store ``Literal`` annotations, so the allowed values live in metadata.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": values})


@dataclass
class ModelConfig:
    name: str = setting("Short id in run names and output directories, e.g. openllama3b.")
    name_or_path: str = setting("Hub id, local directory, or builtin:tiny-llama.")
    architecture: str = choice(
        "decoder: a causal LM (SFT, or a classifier pooled at the last token); encoder: a BERT-style classifier.",
        *("decoder", "encoder"),
    )
    revision: Optional[str] = setting("Hub branch, tag or commit of the model; null: the default branch.")
    dtype: str = choice("Dtype of the unquantized weights.", "float32", "bfloat16", "float16")
    max_length: int = bounded("Tokens per row; at most the model's max_position_embeddings.", ge=8)
    trust_remote_code: bool = setting("Run the checkpoint's own modeling code (a hub repo's .py files).")
    allow_pickle_weights: bool = setting(
        "Load a base model stored only as pickle (.bin/.pt); else safetensors only.", default=False
    )


@dataclass
class QuantConfig:
    bits: int = choice("Base weights: 4 (QLoRA), 8 (LLM.int8), both by bitsandbytes; 16: unquantized.", 4, 8, 16)
    quant_type: str = choice("4-bit data type: NormalFloat (QLoRA) or plain float.", "nf4", "fp4")
    double_quant: bool = setting("4-bit: quantize the quantization constants too (QLoRA's double quantization).")
    compute_dtype: str = choice("4-bit: dtype the dequantized weights multiply in.", "float32", "bfloat16", "float16")
    # Last: runs stored before it existed lack it.
    fp8: bool = setting(
        "8 bits as FP8 (e4m3, a scale per row; src/fp8.py) in place of bitsandbytes' LLM.int8: the frozen layers' "
        "matmuls run on FP8 tensor cores (compute capability 8.9+: Ada, Hopper). quant=fp8 sets it with bits 8.",
        default=False,
    )


@dataclass
class LoraConfig:
    preset: str = setting(f"One of {LORA_PRESETS}, resolved on the loaded model; or 'none': full fine-tuning.")
    r: Optional[int] = bounded(
        "LoRA rank; null with preset 'none'.", ge=1, le=MAX_LORA_RANK, why_high="a rank that wide is no longer low-rank"
    )
    alpha: Optional[int] = bounded("LoRA alpha (the update is scaled by alpha / r); null with 'none'.", gt=0)
    dropout: float = bounded("Dropout on the input of each LoRA update.", ge=0, lt=1)
    bias: str = choice(
        "Biases that train: none, every one, or those of the adapted layers.", "none", "all", "lora_only"
    )
    target_modules: Optional[list[str]] = setting(
        "Overrides the preset. Items may be module names (q_proj, lm_head) or preset names."
    )
    modules_to_save: Optional[list[str]] = setting(
        "Modules trained in full and saved with the adapter; a classification head is added without asking."
    )
    use_rslora: bool = setting(
        "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (peft's use_rslora).", default=False
    )
    use_dora: bool = setting(
        "DoRA: a trained magnitude per output feature of each adapted layer (peft's use_dora).", default=False
    )
    loraplus_lr_ratio: Optional[float] = bounded(
        "LoRA+: B's learning rate over A's (peft's create_loraplus_optimizer); null: one learning rate.",
        gt=0,
        default=None,
    )
    init: Union[bool, str] = setting(
        f"peft's init_lora_weights: one of {', '.join(map(str, LORA_INITS))}; pissa and olora change the base.",
        default=True,
    )


@dataclass
class DataConfig:
    name: str = setting("Short id of the dataset in run names and output directories.")
    task: str = choice(
        "sft: a causal LM learns responses; classification: one label a row; multilabel: a 0/1 column per label.",
        *("sft", "classification", "multilabel"),
    )
    path: Optional[str] = setting("Local CSV/TSV/JSON/JSONL/Parquet file; set this or hub_id.")
    eval_path: Optional[str] = setting("Local evaluation file beside data.path; null: one is split off train.")
    hub_id: Optional[str] = setting("Hub dataset id; set this or data.path.")
    hub_config: Optional[str] = setting("The hub dataset's configuration (subset) name.")
    revision: Optional[str] = setting("Hub branch, tag or commit of the dataset; null: the default branch.")
    train_split: str = setting("Hub split to train on.")
    eval_split: Optional[str] = setting("Hub split to evaluate on; null: one is split off train (stratified).")
    eval_fraction: float = bounded(
        "Share of train split off for evaluation when no eval split or file is given.", gt=0, lt=1
    )
    split_seed: int = bounded("Seed of the evaluation split made from train.", ge=0)  # numpy takes no negative seed
    id_column: Optional[str] = setting("Column of row ids in error reports; row numbers where it is absent.")
    text_columns: list[str] = setting("Columns the model reads; joined unless text_template is set.")
    text_template: Optional[str] = setting("A Python format string over text_columns; null: the columns joined.")
    label_column: Optional[str] = setting("classification: the column of each row's label.")
    label_columns: Optional[list[str]] = setting("multilabel: one 0/1 column per label.")
    labels: Optional[list[str]] = setting("Label set and order; null: the sorted labels of the train split.")
    prompt_template: str = choice("sft, format=columns: the prompt's layout.", "alpaca", "plain")
    instruction_column: str = setting("sft: the column of each row's instruction.")
    instruction_template: Optional[str] = setting(
        "sft: a format string over columns that builds the instruction; null: the column."
    )
    input_column: Optional[str] = setting("sft: the column of each row's optional input; null: none.")
    response_column: str = setting("sft: the column of the response the model learns.")
    response_only_loss: bool = setting("sft: loss on the response tokens only; false: on the prompt too.")
    max_length_factor: Optional[float] = bounded(
        "Rows longer than this many times model.max_length tokens are far too long; null: none are.", ge=1
    )
    # A broken file is an error whatever this says: over half of a split far too long means a wrong column.
    long_rows: str = choice("What far too long rows get (counted and logged either way).", "truncate", "skip", "error")
    subsample: Optional[int] = bounded("Keep this many training rows (seeded); null: all.", ge=1)
    eval_subsample: Optional[int] = bounded("Keep this many evaluation rows (seeded): faster sweeps; null: all.", ge=1)
    subsample_seed: int = bounded("Seed of both subsamples.", ge=0)
    class_weights: Any = choice(
        "classification: a loss weight per class: none, balanced (inverse frequency), or one per label in order.",
        *("none", "balanced", list[float]),
    )
    pos_weight: Any = choice(
        "multilabel: a positive weight per label: none, auto (neg/pos), one_minus_share (1 - share), or a list.",
        *("none", "auto", "one_minus_share", list[float]),
    )
    threshold: float = bounded("multilabel: the probability at or above which a label is predicted.", gt=0, lt=1)
    num_sample_prompts: int = bounded("sft: prompts generated before and after training, logged to MLflow.", ge=0)
    format: str = choice(
        "sft: 'columns' (instruction/input/response through prompt_template) or 'messages' "
        "(role/content turns through the model's chat template; loss on the last assistant turn).",
        *("columns", "messages"),
        default="columns",
    )
    messages_column: str = setting(
        "data.format=messages: the column of {role, content} turn lists.", default="messages"
    )


@dataclass
class TrainConfig:
    """Fields named as in the installed transformers' TrainingArguments, plus early stopping,
    the non-finite loss guard and the checkpoint to resume from (read by src/fit.py, not passed on)."""

    num_train_epochs: float = bounded("Epochs to train when max_steps <= 0.", ge=0)
    max_steps: int = bounded("> 0 overrides num_train_epochs; -1 or 0: train by epochs.", ge=-1)
    learning_rate: float = bounded("Peak learning rate.", gt=0)
    lr_scheduler_type: str = setting("A transformers SchedulerType, e.g. linear, cosine, constant_with_warmup.")
    warmup_steps: float = bounded(
        "Scheduler warmup in steps; a value in [0, 1) is a fraction of the total steps.", ge=0
    )
    per_device_train_batch_size: int = bounded("Rows per training batch on each device.", ge=1)
    per_device_eval_batch_size: int = bounded("Rows per evaluation batch on each device.", ge=1)
    gradient_accumulation_steps: int = bounded("Batches per optimizer step.", ge=1)
    optim: str = setting("A transformers optimizer name, e.g. adamw_torch, paged_adamw_8bit.")
    weight_decay: float = bounded("Decoupled weight decay.", ge=0)
    max_grad_norm: float = bounded(
        "Gradient norm to clip to; 0 turns clipping off (a negative norm would flip the gradient).", ge=0
    )
    logging_steps: int = bounded("Steps between logged training metrics.", ge=1)
    eval_strategy: str = choice("When to evaluate: never, every eval_steps, or each epoch.", "no", "steps", "epoch")
    eval_steps: Optional[int] = bounded("Steps between evaluations with eval_strategy=steps.", ge=1)
    save_strategy: str = choice(
        "When to save a checkpoint: never, every save_steps, each epoch, or at each new best.",
        *("no", "steps", "epoch", "best"),
    )
    save_steps: Optional[int] = bounded("Steps between checkpoints with save_strategy=steps.", ge=1)
    save_total_limit: Optional[int] = bounded("Checkpoints kept; null keeps every one.", ge=1)
    load_best_model_at_end: bool = setting(
        "Reload the best checkpoint after training; needs save_strategy equal to eval_strategy."
    )
    metric_for_best_model: Optional[str] = setting(
        "The metric (eval_ prefix optional) that picks the best checkpoint; null: the Trainer's (the loss)."
    )
    early_stopping_patience: Optional[int] = bounded(
        "Evaluations without improvement before training stops; null: no early stopping.", ge=1
    )
    stop_on_nonfinite_loss: bool = setting("Fail the run at the first NaN/inf training loss.")
    resume_from_checkpoint: Optional[str] = setting(
        "null, 'latest' (newest checkpoint-N in the output dir, if any) or a checkpoint path."
    )
    activation_checkpointing: bool = setting(
        "Recompute activations in the backward pass to save memory; the fast path picks the layers itself."
    )
    fast_path: bool = setting(
        "Flat rows without padding: SFT micro-batches sized to memory_budget_gb (src/engine/), and "
        "decoder classifiers, each example pooled at its last token (src/engine/classification.py)."
    )
    memory_budget_gb: Optional[float] = bounded(
        "Fast path: peak GPU memory to plan micro-batches for; null: 90% of the GPU.", gt=0
    )
    dequantize_weights: bool = setting(
        "Fast path: keep dequantized copies of a 4/8-bit base's weights where the budget has room "
        "(8-bit: the activations are then not rounded to int8 as LLM.int8 does); false: bitsandbytes' matmuls."
    )
    # numpy's legacy seeding, which transformers' set_seed calls, takes [0, 2**32).
    seed: int = bounded("Seed of initialization, data order and dropout.", ge=0, lt=2**32)
    bf16: bool = setting("Mixed precision in bfloat16 (a CUDA GPU).")
    fp16: bool = setting("Mixed precision in float16 (a CUDA GPU).")
    tf32: Optional[bool] = setting("TF32 matmuls on an Ampere or newer GPU; null: torch's default.")
    dataloader_num_workers: int = bounded("Processes loading batches; 0: the training process itself.", ge=0)
    nproc_per_node: int = bounded(
        "Processes (GPUs) for one DDP run; > 1 relaunches src.train on that many local ranks.", ge=1
    )
    # Last: runs stored before it existed lack it (a default must follow the fields without one).
    pack_cuda_graphs: bool = setting(
        "Trial packs: replay the SFT joint step as CUDA graphs (src/packs/graphs.py). Its GPU test passes; off by "
        "default until src.bench shows the graphed pack beating its trials run one after another.",
        default=False,
    )
    fused_loss: bool = setting(
        "Fast path, SFT: the loss chunk by chunk through the LM head and its LoRA (src/engine/loss.py), never the "
        "whole tokens x vocab logits; where the architecture's head is plain (llama, mistral, qwen2, qwen3).",
        default=False,
    )
    fused_lora: bool = setting(
        "Fast path: each plain LoRA linear's add-on folded into one matmul, addmm(base output, scale * A(x), B^T) "
        "(src/engine/lora.py): two fewer full-width kernels a layer forward, one backward. Off until src.bench "
        "measures it.",
        default=False,
    )


@dataclass
class TrackingConfig:
    experiment: str = setting("The MLflow experiment the run is logged to.")
    tracking_uri: Optional[str] = setting("MLflow store; null: $MLFLOW_TRACKING_URI, else sqlite in the project.")
    run_name: Optional[str] = setting(
        "MLflow run name; null: made from the config (openllama3b-4bit-all_linear-r8-a16)."
    )
    log_adapter: bool = setting("Log the saved adapter (or, with lora=none, the model) as an MLflow artifact.")
    system_metrics: Optional[bool] = setting(
        "MLflow's system metrics (GPU utilisation and memory, CPU, every 10 s); null: on when a CUDA GPU is here.",
        default=None,
    )


@dataclass
class EvalConfig:
    forgetting_path: Optional[str] = setting(
        "sft: a plain-text file; the base's and the adapted model's LM loss on it are logged (forgetting_loss_*).",
        default=None,
    )


@dataclass
class ObjectiveConfig:
    metric: Optional[str] = setting("The metric a sweep optimizes; null: the task's default, e.g. eval_f1_macro.")
    direction: Optional[str] = choice(
        "Whether a sweep maximizes or minimizes it; null: the task's.", "maximize", "minimize", None
    )


@dataclass
class Config:
    model: ModelConfig = setting("The base model (conf/model/).")
    quant: QuantConfig = setting("Quantization of the base model's weights (conf/quant/).")
    lora: LoraConfig = setting("The adapter, or full fine-tuning (conf/lora/).")
    data: DataConfig = setting("The dataset and its task (conf/data/; base values in conf/config.yaml).")
    train: TrainConfig = setting("The training recipe (conf/train/).")
    tracking: TrackingConfig = setting("Where and under which name the run is logged (MLflow).")
    objective: ObjectiveConfig = setting("What a sweep optimizes.")
    output_dir: str = setting("The run's directory: hydra.run.dir, or a sweep job's hydra.sweep.dir/subdir.")
    # Last: a config stored before the section existed lacks it (src.config_checks.check_structure).
    eval: EvalConfig = setting("What a run measures besides its objective (conf/eval/).", factory=EvalConfig)

    # Not a field (no annotation): the resolved dict :func:`src.config.validate` read, kept as it was written (an int
    # where a float field reads 1.0, no key a stored config lacks), which a run logs as params and saves as
    # config.yaml. Below the entry point the Config is the only carrier; this is how it carries the text.
    _resolved = None

    def resolved(self) -> dict[str, Any]:
        """The config as a plain dict: the one it was validated from, else (built or replaced by hand) its fields."""
        return copy.deepcopy(self._resolved) if self._resolved is not None else dataclasses.asdict(self)

    def with_train(self, **changes: Any) -> Config:
        """This config with ``train`` fields changed, in its resolved dict too."""
        changed = dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))
        resolved = self.resolved()
        changed._resolved = {**resolved, "train": {**resolved["train"], **changes}}
        return changed


SCHEMA = (
    *(Config, ModelConfig, QuantConfig, LoraConfig, DataConfig, TrainConfig, TrackingConfig, ObjectiveConfig),
    EvalConfig,
)
# The resolved annotations of every schema dataclass (``from __future__ import annotations`` leaves them strings).
HINTS = {cls: typing.get_type_hints(cls) for cls in SCHEMA}
