"""The memory plan of a run: exact parameter counts and an estimate of peak GPU memory, before it runs.

:func:`plan` builds the model from its ``config.json`` alone on PyTorch's meta device (no weights, no download,
about a second for 3B parameters), applies the configured LoRA with the training code's own ``apply_lora``, and
counts parameters exactly as a training run logs them. It never reads the data. It returns a :class:`MemoryPlan`;
``python -m src.plan`` prints it, and the fast path (:mod:`src.engine.budget`), trial packs and a sweep's
feasibility check size their work with it.

Memory model, in bytes; the estimate is their sum over 2**30 (GiB), comparable with the ``peak_gpu_mem_gb`` metric
(``torch.cuda.max_memory_allocated``). Every coefficient is a named constant below, fitted on measured peaks; the
measurements, and the estimate's error against them per workload, are in ``benchmarks/results/``.

The fast SFT path (``src/engine/``) asks :func:`plan` for one flat row of ``n x max_length`` tokens per
micro-batch and adds what the plan does not model: the cached dequantized 4/8-bit weights (2 bytes a weight,
:func:`src.engine.weights.cache_dequantized_weights`; a cached int8 layer does not keep bitsandbytes' input copy,
which the plan still counts) and, under the mask attention, the math kernel's ``heads x T x T`` matrices
(:func:`src.engine.attention.mask_attention_gb`).

- **Base weights.** 16-bit: every parameter at ``model.dtype``. 4- and 8-bit: bitsandbytes
  quantizes the ``nn.Linear`` layers except the output head (transformers'
  ``get_keys_to_not_convert``). NF4/FP4 stores half a byte per weight plus one fp32 absmax per
  64-weight block (+1/16 byte); double quantization stores that absmax in 8 bits with one fp32
  per 256 blocks (+1/64 + 1/4096 byte). LLM.int8 stores a byte per weight and an fp32 scale per
  output row. Embeddings, norms, biases and the head are not quantized, and peft's
  ``prepare_model_for_kbit_training`` upcasts them to fp32. A quantized matmul dequantizes one
  weight at a time: one 2-byte copy of the largest layer. FP8 (``quant=fp8``, :mod:`src.fp8`) converts the same
  layers: a byte a weight and an fp32 scale per output row, the rest at ``model.dtype`` (nothing upcast), and the
  backward's transposed copy of one layer at a time (a byte a weight of the largest). Not yet fitted on a GPU.
- **Trainable parameters** (LoRA A/B, saved heads) are fp32: weight 4 bytes, gradient 4, and the
  optimizer state: 8 for AdamW's two moments, 2 for 8-bit optimizers (``*8bit``), 4 for Lion, 0
  for plain SGD. Paged optimizers keep state in CUDA managed memory, which
  ``max_memory_allocated`` does not see; it is counted anyway (it sits on the GPU until memory
  runs short). Full fine-tuning (``lora=none``) trains the base weights in place: they are counted once,
  under the base weights, and each adds a gradient and AdamW's two moments at ``model.dtype`` (or 2 bytes
  of 8-bit state, 1 moment for Lion); no LoRA inputs are kept.
- **Activations**, for ``batch x model.max_length`` tokens (batches padded to the maximum: an
  upper bound). Two widths: the residual stream's (fp32 under a 4/8-bit base, whose norms and
  embeddings are upcast, except on the fast SFT path, which casts them back to bf16; else
  ``model.dtype``) and the matmul outputs' (2 bytes under bf16/fp16
  autocast, else the residual width). Without checkpointing each layer keeps, per token,
  ``ACT_RESIDUAL_PER_HIDDEN x hidden`` residual-width values (norm inputs, q/k/v, attention output;
  SDPA keeps no seq x seq matrix) and ``ACT_MATMUL_PER_INTERMEDIATE x intermediate`` matmul-width
  values (the MLP's gate, up, activation and product). Each LoRA layer adds, per input feature,
  a matmul-width copy of its input and a 1-byte dropout mask (none when dropout is 0). With
  activation checkpointing each layer keeps only ``CKPT_RESIDUAL_PER_HIDDEN x hidden`` values and
  one layer (with its LoRA inputs) is rebuilt at a time. bitsandbytes' int8 matmul keeps its input
  on the autograd context, out of checkpointing's reach: ``INT8_KEPT_BYTES_PER_INPUT`` bytes per
  token per input feature of every int8 layer at an fp32 residual, scaled by the residual width,
  with or without checkpointing.
- **Logits.** TRL's ``SFTTrainer`` (the plain SFT path, ``train.fast_path=false``) computes
  log-probabilities through a fused, tiled LM head and never holds ``batch x seq x vocab``
  logits: it adds nothing to the peak. The fast path's trainer (``src/engine/``) takes
  the model's own loss, which materializes them: ``tokens x vocab x LOGITS_BYTES`` times
  ``LOSS_LOGITS_FACTOR`` (bf16 logits, their fp32 copy and log-softmax) or, with checkpointing, where the peak
  falls in the backward pass, ``LOSS_LOGITS_FACTOR_CKPT``. A classifier's logits are ``tokens x num_labels``.
- **Overhead**: ``OVERHEAD_GB`` on top (cuBLAS workspaces, small buffers).

``est_peak_gpu_mem_gb`` is that sum. What a GPU must have free is more: the caching allocator
reserves up to ``ALLOCATOR_RESERVE_FACTOR`` times what it has allocated, and the CUDA context takes
``CUDA_CONTEXT_GB``; ``est_gpu_mem_needed_gb`` adds both, for feasibility checks against a card's memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from src.config import Config
from src.config_rules import read_model_config
from src.errors import UserError
from src.hub import model_source_problem
from src.tiny import resolve_builtin

GIB = 2**30

# Base weights: bytes per quantized weight (see the module docstring).
NF4_BYTES_PER_WEIGHT = 0.5
NF4_BLOCKSIZE = 64  # weights per absmax
NF4_DOUBLE_QUANT_BLOCKSIZE = 256  # absmax values per second-level fp32 scale
INT8_BYTES_PER_WEIGHT = 1.0
INT8_BYTES_PER_ROW = 4  # fp32 scale per output row
UNQUANTIZED_BYTES_K_BIT = 4  # prepare_model_for_kbit_training upcasts the rest to fp32
DEQUANT_BYTES_PER_WEIGHT = 2  # one dequantized copy of the largest quantized layer
# quant=fp8 (src/fp8.py): e4m3 weights with an fp32 scale per output row, the rest at model.dtype (nothing upcast);
# the backward's transposed copy of one layer's FP8 weight at a time.
FP8_BYTES_PER_WEIGHT = 1.0
FP8_BYTES_PER_ROW = 4
FP8_TRANSPOSED_BYTES_PER_WEIGHT = 1

# Trainable parameters: fp32 weight + fp32 gradient, plus the optimizer state.
TRAINABLE_WEIGHT_BYTES = 4
TRAINABLE_GRAD_BYTES = 4
EIGHT_BIT_STATE_BYTES = 2

# Activations, per token, fitted on measured peaks (benchmarks/results/).
ACT_RESIDUAL_PER_HIDDEN = 7.5  # values kept per layer, x hidden_size, at the residual width
ACT_MATMUL_PER_INTERMEDIATE = 4.0  # values kept per layer, x intermediate_size, at the matmul width
# An MLP without a gate (BERT's up projection and GELU) keeps two of those four: the up output and the activation's.
ACT_MATMUL_PER_INTERMEDIATE_UNGATED = 2.0
# BERT's residual-width values per layer, x hidden_size (bf16 autocast, fp32 LayerNorm outputs): fitted on BERT-large
# on the packed fast path (benchmarks/results/cls_run1/bert.json); the decoders' coefficient overestimates it.
ACT_RESIDUAL_PER_HIDDEN_ENCODER = 3.0
CKPT_RESIDUAL_PER_HIDDEN = 1.33  # values kept per checkpointed layer, x hidden_size, at the residual width
LORA_DROPOUT_MASK_BYTES = 1  # per LoRA input feature, when lora.dropout > 0
INT8_KEPT_BYTES_PER_INPUT = 3.6  # per input feature of every int8 layer, checkpointing or not (fp32 residual)

# Logits, when they are materialized (not under TRL's fused LM head).
LOGITS_BYTES = 4
LOSS_LOGITS_FACTOR = 2.25  # 9 bytes a logit
LOSS_LOGITS_FACTOR_CKPT = 1.25  # about 5 bytes a logit with activation checkpointing
# train.fused_loss (src/engine/loss.py): one chunk's logits at a time, in fp32, with their gradient in the compute
# dtype and the matmul's own output: about 10 bytes a logit of one chunk, whatever the step's tokens.
FUSED_LOSS_BYTES_PER_LOGIT = 10
FUSED_LOSS_CHUNK_LOGITS = 1 << 26  # logits a chunk holds at most (256 MiB in fp32): 2,048 tokens of a 32k vocabulary
FUSED_LOSS_CHUNK_MULTIPLE = 256

OVERHEAD_GB = 0.0  # the fitted intercept is about zero
ALLOCATOR_RESERVE_FACTOR = 1.16  # max_memory_reserved / max_memory_allocated, the worst measured
CUDA_CONTEXT_GB = 0.5

DEFAULT_NUM_LABELS = 2  # a classifier's head size when the labels are known only from the data
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(UserError, ValueError):
    """The model's config cannot be found or built; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a base model (before LoRA)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_params: int  # every parameter of the base model
    quantizable_params: int  # weights of the linear layers bitsandbytes would quantize
    quantizable_rows: int  # their output features, summed
    quantizable_inputs: int  # their input features, summed
    largest_quantizable: int  # weights in the largest such layer
    gated_mlp: bool = True  # the MLP has a gate (LLaMA's gate_proj, Phi-3's gate_up_proj); BERT's has none
    encoder: bool = False  # a bidirectional encoder (BERT): post-norm blocks, its own activation coefficients


@dataclass(frozen=True)
class LoraShape:
    """What LoRA adds to the activations, summed over every adapted layer of the model."""

    in_features: int
    dropout: bool


@dataclass(frozen=True)
class Widths:
    """Bytes per activation value: the residual stream's, and the matmul outputs'."""

    residual: int
    matmul: int


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak GPU memory of one training step by component, in GiB."""

    weights: float  # the base's, quantized or not, and one dequantized layer
    trainable_states: float  # trainable weights, their gradients and the optimizer state
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable_states + self.activations + self.logits + self.overhead

    @property
    def shared(self) -> float:
        """What the trials of a pack share (the base's weights, the overhead); the rest is each trial's own."""
        return self.weights + self.overhead

    def rounded(self, digits: int = 3) -> MemoryBreakdown:
        return MemoryBreakdown(**{k: round(v, digits) for k, v in dataclasses.asdict(self).items()})


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan` finds for one config: its parameter counts, and its estimated peak GPU memory."""

    model: str  # model.name
    architecture: str  # the built model's class
    task: str
    num_labels: Optional[int]  # a classifier's outputs; None for SFT
    quant_bits: int
    lora_preset: str
    lora_r: int
    lora_resolved_targets: str  # the adapted layers' leaf names, comma-separated
    trainable_params: int
    total_params: int
    base_params: int
    trainable_pct: float
    batch_size: int
    seq_len: int
    tokens_per_micro_batch: Optional[int]  # one flat row of that many tokens, where given
    optim: str
    activation_checkpointing: bool
    fused_lm_head: bool  # SFT through TRL's fused LM head (no materialized logits)
    fused_loss: bool  # SFT on the fast path through its chunked loss (train.fused_loss; src/engine/loss.py)
    est_peak_gpu_mem_gb: float
    est_gpu_mem_needed_gb: float  # with the allocator's reserve and the CUDA context
    est_mem_breakdown_gb: MemoryBreakdown
    model_shape: ModelShape
    warnings: tuple[str, ...]
    quant_fp8: bool = False  # the 8 bits are FP8 (quant=fp8; src/fp8.py), not LLM.int8

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain values, as ``python -m src.plan`` prints it (one JSON object)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PackPlan:
    """A pack's plan (:func:`plan_pack`): each trial's, and the pack's estimate with the base counted once."""

    trials: tuple[MemoryPlan, ...]
    pack_size: int
    est_peak_gpu_mem_gb: float
    est_gpu_mem_needed_gb: float
    est_solo_sum_gb: float  # the trials' estimates as separate runs at once

    def as_dict(self) -> dict[str, Any]:
        """The pack's own figures as plain values, as ``python -m src.plan --pack`` prints them (without the
        trials, which it prints one by one)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "trials"}


def optimizer_state_bytes(optim: str, state_dtype_bytes: int = TRAINABLE_WEIGHT_BYTES) -> int:
    """Optimizer state bytes per trainable parameter, from a TrainingArguments ``optim`` name; full-precision
    states are as wide as the parameter (fp32 for LoRA's weights, ``model.dtype`` under full fine-tuning)."""
    name = optim.lower()
    if "8bit" in name:
        return EIGHT_BIT_STATE_BYTES
    if "lion" in name:
        return state_dtype_bytes  # one moment
    if name == "sgd":
        return 0  # torch SGD without momentum, as TrainingArguments builds it
    return 2 * state_dtype_bytes  # AdamW's two moments


def weight_bytes(shape: ModelShape, bits: int, double_quant: bool, weight_dtype_bytes: int, fp8: bool = False) -> float:
    """The base's weights: at ``model.dtype``, or quantized with the rest upcast and one dequantized layer; FP8
    (``fp8``): quantized with the rest at ``model.dtype`` and one layer's transposed copy."""
    if bits == 16:
        return shape.num_params * weight_dtype_bytes
    if fp8:
        quantized = shape.quantizable_params * FP8_BYTES_PER_WEIGHT + shape.quantizable_rows * FP8_BYTES_PER_ROW
        unquantized = (shape.num_params - shape.quantizable_params) * weight_dtype_bytes
        return quantized + unquantized + shape.largest_quantizable * FP8_TRANSPOSED_BYTES_PER_WEIGHT
    if bits == 4:
        if double_quant:  # 8-bit absmax per block, plus an fp32 scale per 256 blocks
            absmax = 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_DOUBLE_QUANT_BLOCKSIZE)
        else:  # fp32 absmax per block
            absmax = 4 / NF4_BLOCKSIZE
        quantized = shape.quantizable_params * (NF4_BYTES_PER_WEIGHT + absmax)
    else:
        quantized = shape.quantizable_params * INT8_BYTES_PER_WEIGHT + shape.quantizable_rows * INT8_BYTES_PER_ROW
    unquantized = (shape.num_params - shape.quantizable_params) * UNQUANTIZED_BYTES_K_BIT
    return quantized + unquantized + shape.largest_quantizable * DEQUANT_BYTES_PER_WEIGHT


def trainable_state_bytes(trainable_params: int, optim: str, weight_dtype_bytes: int, full_fine_tuning: bool) -> int:
    """Trainable weights, gradients and optimizer state; under full fine-tuning the weights are the base's (counted
    there), their gradient and state at ``model.dtype``."""
    if full_fine_tuning:
        return trainable_params * (weight_dtype_bytes + optimizer_state_bytes(optim, weight_dtype_bytes))
    return trainable_params * (TRAINABLE_WEIGHT_BYTES + TRAINABLE_GRAD_BYTES + optimizer_state_bytes(optim))


def activation_bytes_per_token(
    shape: ModelShape, lora: LoraShape, widths: Widths, bits: int, activation_checkpointing: bool, fp8: bool = False
) -> float:
    """What the layers keep for the backward pass, per token (an FP8 layer keeps nothing: its weight is frozen)."""
    residual = ACT_RESIDUAL_PER_HIDDEN_ENCODER if shape.encoder else ACT_RESIDUAL_PER_HIDDEN
    matmul = ACT_MATMUL_PER_INTERMEDIATE if shape.gated_mlp else ACT_MATMUL_PER_INTERMEDIATE_UNGATED
    layer = residual * shape.hidden_size * widths.residual + matmul * shape.intermediate_size * widths.matmul
    lora_inputs = lora.in_features * (widths.matmul + (LORA_DROPOUT_MASK_BYTES if lora.dropout else 0))
    if activation_checkpointing:
        kept = shape.num_layers * CKPT_RESIDUAL_PER_HIDDEN * shape.hidden_size * widths.residual
        per_token = kept + layer + lora_inputs / max(shape.num_layers, 1)
    else:
        per_token = shape.num_layers * layer + lora_inputs
    if bits == 8 and not fp8:
        per_token += shape.quantizable_inputs * INT8_KEPT_BYTES_PER_INPUT * widths.residual / 4
    return per_token


def logit_bytes_per_token(
    shape: ModelShape, causal_lm: bool, fused_lm_head: bool, num_labels: int, activation_checkpointing: bool
) -> float:
    """The logits and the loss's copies of them, per token; none under TRL's fused LM head."""
    factor = LOSS_LOGITS_FACTOR_CKPT if activation_checkpointing else LOSS_LOGITS_FACTOR
    if causal_lm:
        return 0.0 if fused_lm_head else shape.vocab_size * LOGITS_BYTES * factor
    return num_labels * LOGITS_BYTES * factor


def chunk_tokens(vocab_size: int) -> int:
    """Tokens a chunk of ``train.fused_loss`` holds (src/engine/loss.py): :data:`FUSED_LOSS_CHUNK_LOGITS` logits, in
    multiples of :data:`FUSED_LOSS_CHUNK_MULTIPLE`."""
    multiple = FUSED_LOSS_CHUNK_MULTIPLE
    return max(multiple, FUSED_LOSS_CHUNK_LOGITS // vocab_size // multiple * multiple)


def fused_loss_gb(shape: ModelShape, tokens: int) -> float:
    """What ``train.fused_loss`` holds at once: one chunk's logits (:func:`chunk_tokens`)."""
    return min(tokens, chunk_tokens(shape.vocab_size)) * shape.vocab_size * FUSED_LOSS_BYTES_PER_LOGIT / GIB


def memory_breakdown_gb(
    shape: ModelShape,
    lora: LoraShape,
    trainable_params: int,
    *,
    batch_size: int,
    seq_len: int,
    bits: int,
    double_quant: bool,
    weight_dtype_bytes: int,
    widths: Widths,
    optim: str,
    activation_checkpointing: bool,
    causal_lm: bool,
    fused_lm_head: bool = True,
    num_labels: int = DEFAULT_NUM_LABELS,
    full_fine_tuning: bool = False,
    fused_loss: bool = False,
    fp8: bool = False,
) -> MemoryBreakdown:
    """Peak GPU memory of one training step, by component, in GiB (see the module docstring). ``fused_loss``: the
    fast path's chunked loss (``train.fused_loss``), where it takes the model; ``fp8``: an FP8 base (``quant=fp8``)."""
    tokens = batch_size * seq_len
    activations = activation_bytes_per_token(shape, lora, widths, bits, activation_checkpointing, fp8)
    if causal_lm and fused_loss:
        logits_gb = fused_loss_gb(shape, tokens)
    else:
        per_token = logit_bytes_per_token(shape, causal_lm, fused_lm_head, num_labels, activation_checkpointing)
        logits_gb = tokens * per_token / GIB
    return MemoryBreakdown(
        weights=weight_bytes(shape, bits, double_quant, weight_dtype_bytes, fp8) / GIB,
        trainable_states=trainable_state_bytes(trainable_params, optim, weight_dtype_bytes, full_fine_tuning) / GIB,
        activations=tokens * activations / GIB,
        logits=logits_gb,
        overhead=OVERHEAD_GB,
    )


def estimate_peak_memory_gb(*args: Any, **kwargs: Any) -> float:
    """The estimated peak GPU memory in GiB: the total of :func:`memory_breakdown_gb` (same arguments)."""
    return memory_breakdown_gb(*args, **kwargs).total


def gpu_mem_needed_gb(peak_gb: float) -> float:
    """Free GPU memory a run needs for an allocated peak: allocator reserve and the CUDA context."""
    return peak_gb * ALLOCATOR_RESERVE_FACTOR + CUDA_CONTEXT_GB


def load_model_config(name_or_path: str, revision: Optional[str], trust_remote_code: bool):
    """The transformers config, from a local directory or the local hub cache; never downloaded."""
    path = resolve_builtin(name_or_path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"model.name_or_path={name_or_path}: the directory {local} has no config.json")
    elif local.is_absolute() or path.startswith((".", "~")):
        raise PlanError(
            f"model.name_or_path={name_or_path}: no such directory; pass a directory holding the model's config.json"
        )
    missing = None if local.is_dir() else model_source_problem(path, revision, may_download=False)
    if missing:  # the rule the model loading shares (src.hub), less the download plan never makes
        raise PlanError(
            f"{missing}, and plan never downloads. Pass model.name_or_path=/path/to/dir holding the model's "
            f"config.json (on a machine with hub access: AutoConfig.from_pretrained('{name_or_path}')"
            ".save_pretrained('DIR'))"
        )
    try:
        return read_model_config(str(local) if local.is_dir() else path, revision, trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise PlanError(
            f"model.name_or_path={name_or_path}: its config.json cannot be read "
            f"[{type(exc).__name__}: {first[0] if first else ''}]"
        ) from exc


def num_labels_of(cfg: Config) -> Optional[int]:
    """Classifier outputs from the config (label columns, or data.labels); None where only the data knows."""
    if cfg.data.task == "multilabel" and cfg.data.label_columns:
        return len(cfg.data.label_columns)
    return len(cfg.data.labels) if cfg.data.labels else None


def with_label_set(cfg: Config) -> Config:
    """A classification config with ``data.labels`` read from its local data file, when the config does not
    give them: the command line plans the head it will train (a hub dataset stays unread: plan says what it
    assumed). Not in :func:`plan` itself, which sweeps call once per job."""
    from src.data import DataError, load_data

    if cfg.data.task != "classification" or cfg.data.labels or not cfg.data.path or not Path(cfg.data.path).is_file():
        return cfg
    try:
        labels = load_data(cfg.data).labels
    except DataError:
        return cfg  # the run reports the data's faults; plan counts with its assumption and says so
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=list(labels)))


def build_meta_model(model_config, cfg: Config):
    """The base model on the meta device: every parameter's shape, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from src.modeling import DTYPES

    kwargs = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": cfg.model.trust_remote_code}
    with torch.device("meta"):
        if cfg.data.task == "sft":
            return AutoModelForCausalLM.from_config(model_config, **kwargs)
        model_config.num_labels = num_labels_of(cfg) or DEFAULT_NUM_LABELS
        return AutoModelForSequenceClassification.from_config(model_config, **kwargs)


def _first_attr(config, names: tuple[str, ...], default: Optional[int] = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if default is None:
        raise PlanError(f"{type(config).__name__} has none of {names}; cannot size its activations")
    return default


def model_shape(model, model_config, task: str = "sft", encoder: bool = False) -> ModelShape:
    """Sizes of a base model (before LoRA), and the linear layers bitsandbytes would quantize (``encoder``: the
    config's ``model.architecture`` is ``encoder``)."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    from src.modeling import unquantized_heads

    text = model_config.get_text_config()
    hidden = _first_attr(text, ("hidden_size", "n_embd", "d_model"))
    # what the bnb quantizer keeps in full precision: the output head (a classifier's named, as training names it)
    skip = unquantized_heads(task) or get_keys_to_not_convert(model)
    quantizable = [m for name, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(name, skip)]
    return ModelShape(
        num_layers=_first_attr(text, ("num_hidden_layers", "n_layer", "num_layers")),
        hidden_size=hidden,
        intermediate_size=_first_attr(text, ("intermediate_size", "n_inner", "ffn_dim"), default=4 * hidden),
        vocab_size=_first_attr(text, ("vocab_size",)),
        num_params=sum(p.numel() for p in model.parameters()),
        quantizable_params=sum(m.weight.numel() for m in quantizable),
        quantizable_rows=sum(m.out_features for m in quantizable),
        quantizable_inputs=sum(m.in_features for m in quantizable),
        largest_quantizable=max((m.weight.numel() for m in quantizable), default=0),
        gated_mlp=any("gate" in name.rsplit(".", 1)[-1] for name, _ in model.named_modules()),
        encoder=encoder,
    )


def lora_shape(peft_model, dropout: float) -> LoraShape:
    """Input features summed over the layers that received LoRA adapters."""
    in_features = 0
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and len(lora_a):
            in_features += next(iter(lora_a.values())).in_features
    return LoraShape(in_features=in_features, dropout=dropout > 0)


def flat_decoder(cfg: Config) -> bool:
    """Whether ``src.train`` trains the config's decoder on flat rows (``src/engine/``): SFT or a decoder classifier
    with ``train.fast_path``. Its loss is the model's own (no fused LM head), and a 4/8-bit base's weights train in
    bf16 (``src.engine.weights.cast_frozen_to_bf16``)."""
    return cfg.train.fast_path and (cfg.data.task == "sft" or cfg.model.architecture == "decoder")


def activation_widths(cfg: Config) -> Widths:
    """The residual stream is fp32 under a 4/8-bit base (prepare_model_for_kbit_training upcasts
    norms and embeddings), else ``model.dtype``; matmuls give 2 bytes under bf16/fp16 autocast.

    A flat decoder (:func:`flat_decoder`) under bf16 training has a 2-byte residual stream. An encoder's stays fp32
    (autocast runs BERT's LayerNorm, which ends every residual add, in fp32)."""
    kbit = cfg.quant.bits in (4, 8) and not cfg.quant.fp8  # bitsandbytes' (an FP8 base upcasts nothing)
    residual = 4 if kbit else DTYPE_BYTES[cfg.model.dtype]
    if flat_decoder(cfg) and cfg.train.bf16 and kbit:
        residual = 2
    return Widths(residual=residual, matmul=2 if cfg.train.bf16 or cfg.train.fp16 else residual)


def plans_own_micro_batches(cfg: Config) -> bool:
    """Whether ``src.train`` trains the config on flat rows (``src/engine/``), which size their own micro-batches
    and checkpointing to ``train.memory_budget_gb``: flat decoders (:func:`flat_decoder`), and BERT's
    (``src.modeling.FLAT_ENCODER_TYPES``, read from the model's local config.json; a config plan cannot read
    counts as padded) on the fast path."""
    if flat_decoder(cfg):
        return True
    if not cfg.train.fast_path:
        return False
    from src.modeling import FLAT_ENCODER_TYPES

    try:
        model_config = load_model_config(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    except PlanError:
        return False
    return model_config.model_type in FLAT_ENCODER_TYPES


def _breakdown(cfg: Config, shape: ModelShape, model, trainable: int, tokens: Optional[int]) -> MemoryBreakdown:
    """The config's breakdown: ``per_device_train_batch_size`` rows of ``model.max_length``, or one flat row of
    ``tokens``."""
    from src.modeling import is_full_fine_tuning

    return memory_breakdown_gb(
        shape,
        lora_shape(model, cfg.lora.dropout),
        trainable,
        batch_size=cfg.train.per_device_train_batch_size if tokens is None else 1,
        seq_len=cfg.model.max_length if tokens is None else tokens,
        bits=cfg.quant.bits,
        double_quant=cfg.quant.double_quant,
        weight_dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
        widths=activation_widths(cfg),
        optim=cfg.train.optim,
        activation_checkpointing=cfg.train.activation_checkpointing,
        causal_lm=cfg.data.task == "sft",
        fused_lm_head=not flat_decoder(cfg),
        num_labels=num_labels_of(cfg) or DEFAULT_NUM_LABELS,
        full_fine_tuning=is_full_fine_tuning(cfg.lora),
        fused_loss=fused_loss_applies(cfg, model),
        fp8=cfg.quant.fp8,
    )


def fused_loss_applies(cfg: Config, model) -> bool:
    """Whether the run's SFT loss is the fast path's fused one: ``train.fused_loss``, the fast path, one process
    (not DDP), and a model whose head :func:`src.modeling.fused_head` takes (else the model's own loss, full
    logits). A pack's joint step takes its own loss: :func:`plan_pack` and the pack's planner turn it off."""
    from src.modeling import fused_head

    if not (cfg.data.task == "sft" and flat_decoder(cfg) and cfg.train.fused_loss):
        return False
    return cfg.train.nproc_per_node == 1 and fused_head(model) is not None


def _warnings(cfg: Config, model) -> tuple[str, ...]:
    """What the plan assumed, or knows will fail."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    warnings = []
    if cfg.data.task != "sft" and num_labels_of(cfg) is None:
        warnings.append(
            f"the label set comes from the data, which plan does not read: counted {DEFAULT_NUM_LABELS} labels "
            f"(the head has hidden_size x labels weights); set data.labels to count exactly"
        )
    if cfg.data.task == "sft" and isinstance(model.get_output_embeddings(), BaseTunerLayer):
        warnings.append(  # SFTTrainer.__init__ raises, also for subclasses that take the model's own loss
            "TRL's SFTTrainer refuses a LoRA adapter on the output head (its fused LM head reads the "
            "weight directly): training this config fails; drop lm_head from lora.target_modules"
        )
    return tuple(warnings)


def plan(cfg: Config, tokens_per_micro_batch: Optional[int] = None) -> MemoryPlan:
    """Exact parameter counts and the peak-memory estimate for a validated config (reads no data).

    ``tokens_per_micro_batch``: size the activations for one flat row of that many tokens (a fast path's
    micro-batch, from the data's lengths: :func:`src.engine.budget.largest_micro_batch_tokens`) instead of
    ``per_device_train_batch_size`` rows of ``model.max_length``."""
    from src.modeling import apply_lora, base_model, count_params, target_leaf_names

    model_config = load_model_config(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    base = build_meta_model(model_config, cfg)
    shape = model_shape(base, model_config, cfg.data.task, encoder=cfg.model.architecture == "encoder")
    # Counted with peft's default start: the starts lora.init takes set the same parameters, and PiSSA's and OLoRA's
    # decompositions of the base cannot run on the meta device.
    model = apply_lora(base, dataclasses.replace(cfg.lora, init=True), cfg.data.task)
    trainable, total = count_params(model)
    breakdown = _breakdown(cfg, shape, model, trainable, tokens_per_micro_batch)
    sft = cfg.data.task == "sft"
    return MemoryPlan(
        model=cfg.model.name,
        architecture=type(base_model(model)).__name__,
        task=cfg.data.task,
        num_labels=None if sft else num_labels_of(cfg) or DEFAULT_NUM_LABELS,
        quant_bits=cfg.quant.bits,
        quant_fp8=cfg.quant.fp8,
        lora_preset=cfg.lora.preset,
        lora_r=cfg.lora.r,
        lora_resolved_targets=",".join(target_leaf_names(model)),
        trainable_params=trainable,
        total_params=total,
        base_params=shape.num_params,
        trainable_pct=100.0 * trainable / total,
        batch_size=cfg.train.per_device_train_batch_size,
        seq_len=cfg.model.max_length,
        tokens_per_micro_batch=tokens_per_micro_batch,
        optim=cfg.train.optim,
        activation_checkpointing=cfg.train.activation_checkpointing,
        fused_lm_head=sft and not flat_decoder(cfg),
        fused_loss=fused_loss_applies(cfg, model),
        est_peak_gpu_mem_gb=round(breakdown.total, 3),
        est_gpu_mem_needed_gb=round(gpu_mem_needed_gb(breakdown.total), 3),
        est_mem_breakdown_gb=breakdown.rounded(),
        model_shape=shape,
        warnings=_warnings(cfg, model),
    )


def pack_estimate_gb(breakdowns: list[MemoryBreakdown], slots: Optional[int] = None) -> float:
    """A pack's peak-memory estimate (``hydra.sweeper.pack``, :mod:`src.packs.model`) from its trials' breakdowns:
    the base's weights and overhead once; a bank of ``slots`` (None: one a trial) adapter slots, each as large as the
    largest trial's adapter and its optimizer states (:class:`src.packs.engine.SlotBank`); and the activations and
    logits of the ``slots`` trials that need the most, training at once."""
    slots = min(slots or len(breakdowns), len(breakdowns))
    shared = max(b.shared for b in breakdowns)
    states = slots * max(b.trainable_states for b in breakdowns)
    working = sorted((b.activations + b.logits for b in breakdowns), reverse=True)[:slots]
    return shared + states + sum(working)


def plan_in_pack(cfg: Config) -> MemoryPlan:
    """A trial's plan as a pack trains it: its joint step's loss materializes each trial's logits
    (``src.packs.engine.slot_losses``), so ``train.fused_loss`` does not apply there."""
    return plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_loss=False)))


def plan_pack(cfgs: list[Config]) -> PackPlan:
    """Each trial's plan and the pack's: one base plus K adapters, their optimizer states and activations."""
    trials = tuple(plan_in_pack(cfg) for cfg in cfgs)
    peak = pack_estimate_gb([t.est_mem_breakdown_gb for t in trials])
    return PackPlan(
        trials=trials,
        pack_size=len(trials),
        est_peak_gpu_mem_gb=round(peak, 3),
        est_gpu_mem_needed_gb=round(gpu_mem_needed_gb(peak), 3),
        est_solo_sum_gb=round(sum(t.est_peak_gpu_mem_gb for t in trials), 3),
    )
