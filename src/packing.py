"""The fast SFT path: padding-free packed rows, varlen flash attention, CUDA graphs, a memory budget.

``train.fast_path=true`` (the default) trains SFT with :class:`PackedTrainer`;
``train.fast_path=false`` goes back to TRL's plain ``SFTTrainer`` on padded batches.

What the fast path changes, and why learning does not change:

- **Padding-free packing.** The examples of a micro-batch are concatenated into one row, with
  ``position_ids`` that restart at 0 for each example and no ``attention_mask`` (TRL's
  ``DataCollatorForLanguageModeling(padding_free=True)``). transformers reads the restarts in
  ``position_ids`` and builds a block-causal mask for sdpa and eager attention
  (``masking_utils.find_packed_sequence_indices``; only without a KV cache, so the trainer passes
  ``use_cache=False``), so an example never attends to another one,
  and the label of each example's first token is -100, so no token is predicted across a
  boundary. No FLOP is spent on padding. ``tests/test_packing.py`` checks the per-token loss
  and the LoRA gradients against the padded batch of the same examples.
- **The optimizer step is the config's.** Each step still takes
  ``per_device_train_batch_size x gradient_accumulation_steps`` examples, in the same order;
  only how they are split into forward/backward passes changes, and the loss is normalized by
  the step's token count either way (HF's ``num_items_in_batch``).
- **Attention.** On CUDA in bf16/fp16: flash attention over the whole packed row in one call per
  layer, with the examples' offsets (``torch.nn.attention.varlen``, :func:`packed_varlen_attention`;
  head sizes that are not a multiple of 8 are zero-padded). Elsewhere transformers' block-causal
  mask, which rules out sdpa's flash kernel (and for head sizes that are not a multiple of 8, its
  memory-efficient kernel: the math kernel then keeps ``heads x T x T`` matrices per layer), where
  those fit the budget; else causal attention per example (:func:`packed_sdpa_attention`).
- **bf16 weights under a 4/8-bit base** (:func:`cast_frozen_to_bf16`): fewer dtype casts per step.
- **Cached dequantized 4/8-bit weights** (:func:`cache_dequantized_weights`), as many layers as the
  budget leaves room for: the same matmul without dequantizing every weight in every pass (8-bit:
  without LLM.int8's rounding of the activations, see there).
- **CUDA graphs** (:class:`GraphedSteps`): each step's forward and backward replayed as one graph
  per padded row length, so a small step is no longer bound by launching ~5,000 kernels.
- **Micro-batches sized to a memory budget.** ``train.memory_budget_gb`` (null: 90% of the
  GPU's memory; no budget on CPU), less ``PLAN_MARGIN`` for the plan's error, and ``src.plan``'s
  estimate choose the largest micro-batch that fits, and activation checkpointing only for as
  many decoder layers as memory needs (:func:`plan_micro_batches`). ``train.activation_checkpointing``
  applies to the plain path.
- **An HF ``Trainer``, not TRL's ``SFTTrainer``**, whose fused LM head reads ``lm_head.weight``
  directly and so refuses LoRA on ``lm_head`` (the seeds' all-linear-plus-head recipe). The loss is
  the model's own, through the LoRA-wrapped head. :func:`tokenize_sft` prepares the rows as TRL
  does (EOS appended, completion-only labels, truncation to ``model.max_length``); the tests check
  the token ids and labels against TRL's. Like ``SFTTrainer``, it trains the adapters of a
  quantized model in bf16 (with the base's other weights, above).
- **Token-balanced ranks under DDP** (:class:`TokenBalancedSampler`): each optimizer step takes the
  same examples as the default shuffle, dealt to the ranks so that their token counts match; the
  averaged gradient is the same for any split of a step's examples (the loss is normalized by all
  ranks' tokens), and no rank waits for one with longer rows at the all-reduce.
- **Fused AdamW** (``adamw_torch_fused``, one kernel for all LoRA tensors) replaces the other
  AdamW variants on CUDA: LoRA's trainable parameters are too few for 8-bit or paged state
  to save memory that matters, and the fp32 state is the more exact of the two.

Evaluation uses the plain padded collator, so ``eval_loss`` is computed as on the plain path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import Trainer
from trl.data_utils import common_prefix_length
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from src import distributed

# Optimizers with AdamW's update rule; on CUDA the fast path runs them as one fused kernel.
ADAMW_VARIANTS = {
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw",
}
FUSED_ADAMW = "adamw_torch_fused"
DEFAULT_BUDGET_FRACTION = 0.9  # of the GPU's memory, when train.memory_budget_gb is null
# The fast path plans for this fraction of the budget: src.plan's estimate fell up to 12% short of the measured
# peak on the fast path (tests/device/BENCH_RESULTS.md, Run 4), so a plan that fills the budget could overrun it.
PLAN_MARGIN = 0.88


class MemoryBudgetError(ValueError):
    """Not even one example per micro-batch, with every layer checkpointed, fits the budget."""


@dataclass(frozen=True)
class MicroBatchPlan:
    """How one optimizer step's examples are run: micro-batches and checkpointed layers."""

    examples_per_step: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    checkpointed_layers: int
    num_layers: int
    budget_gb: Optional[float]
    est_peak_gpu_mem_gb: Optional[float]
    attention: str = "mask"  # or "per-example", "varlen": chosen by build_packed_sft_trainer
    dequantized_layers: int = 0  # 4/8-bit linear layers run on a cached dequantized weight
    dequantized_gb: float = 0.0  # what those cached weights hold
    compiled: bool = False
    cuda_graphs: bool = False

    def describe(self) -> str:
        budget = "no memory budget" if self.budget_gb is None else f"planned to {self.budget_gb:.1f} GiB of the budget"
        est = "" if self.est_peak_gpu_mem_gb is None else f", est. peak {self.est_peak_gpu_mem_gb:.1f} GiB"
        return (
            f"fast path: {self.examples_per_step} examples/step as {self.gradient_accumulation_steps} packed "
            f"micro-batch(es) of {self.micro_batch_size}, activation checkpointing on "
            f"{self.checkpointed_layers}/{self.num_layers} layers, attention by {self.attention}, "
            f"{self.dequantized_layers} 4-bit layers on cached dequantized weights"
            f"{', compiled layers' if self.compiled else ''}{', CUDA graphs' if self.cuda_graphs else ''}"
            f" ({budget}{est})"
        )


def plan_micro_batches(
    examples_per_step: int,
    num_layers: int,
    budget_gb: Optional[float],
    estimate: Callable[[int, bool], float],
) -> MicroBatchPlan:
    """The largest micro-batch that fits the budget, checkpointing as few layers as it needs.

    Args:
        examples_per_step: examples in one optimizer step (batch size x accumulation steps).
        num_layers: decoder layers that can be checkpointed one by one.
        budget_gb: peak GPU memory allowed, in GiB; None plans one micro-batch, no checkpointing.
        estimate: ``estimate(micro_batch_size, checkpoint_all_layers)`` -> peak GiB. With k of L
            layers checkpointed the activations are interpolated: ``full - (full - ckpt) * k / L``.

    Micro-batch sizes are divisors of ``examples_per_step``, so every step has the same examples.
    """
    if budget_gb is None:
        return MicroBatchPlan(examples_per_step, examples_per_step, 1, 0, num_layers, None, None)
    for size in sorted((d for d in range(1, examples_per_step + 1) if examples_per_step % d == 0), reverse=True):
        full = estimate(size, False)
        steps = examples_per_step // size
        if full <= budget_gb:
            return MicroBatchPlan(examples_per_step, size, steps, 0, num_layers, budget_gb, full)
        ckpt = estimate(size, True)
        if ckpt > budget_gb:
            continue
        per_layer = (full - ckpt) / num_layers
        layers = min(num_layers, math.ceil(round((full - budget_gb) / per_layer, 6)))
        return MicroBatchPlan(examples_per_step, size, steps, layers, num_layers, budget_gb, full - per_layer * layers)
    raise MemoryBudgetError(
        f"train.memory_budget_gb={budget_gb}: one example of model.max_length tokens with every layer "
        f"checkpointed needs about {estimate(1, True):.1f} GiB; raise the budget or lower model.max_length"
    )


def default_budget_gb() -> Optional[float]:
    """90% of the current GPU's memory in GiB, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return DEFAULT_BUDGET_FRACTION * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def fast_optimizer(optim: str) -> str:
    """The optimizer the fast path runs: fused AdamW for any AdamW variant on CUDA, else ``optim``."""
    return FUSED_ADAMW if optim in ADAMW_VARIANTS and torch.cuda.is_available() else optim


def plan_estimator(cfg) -> tuple[Callable[[int, bool], float], int]:
    """``src.plan``'s peak-memory estimate as ``estimate(micro_batch_size, checkpoint_all)``, and the layer count.

    A micro-batch of n examples is estimated as n rows of ``model.max_length`` tokens: packed
    rows hold at most that many tokens, so the estimate is an upper bound.
    """
    from src.plan import plan

    cache: dict[tuple[int, bool], dict[str, Any]] = {}

    def run(size: int, ckpt: bool) -> dict[str, Any]:
        if (size, ckpt) not in cache:
            train = dataclasses.replace(
                cfg.train,
                per_device_train_batch_size=size,
                activation_checkpointing=ckpt,
                optim=fast_optimizer(cfg.train.optim),
            )
            cache[size, ckpt] = plan(dataclasses.replace(cfg, train=train))
        return cache[size, ckpt]

    num_layers = run(1, False)["model_shape"]["num_layers"]
    return (lambda size, ckpt: run(size, ckpt)["est_peak_gpu_mem_gb"]), num_layers


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: torch.nn.Module, count: int) -> None:
    """Checkpoint the activations of the first ``count`` decoder layers only; 0 turns it off."""
    layers = decoder_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if count > 0:
        # Sets the checkpoint function on every layer (and input grads for the frozen embeddings).
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count


PACKED_ATTENTION = "sdpa_packed"
# sdpa's math kernel (a boolean mask and a head size that is not a multiple of 8) keeps about this
# many bytes per head x query x key per layer for the backward: measured on W3B 4-bit, an H100, packed
# rows of up to 1,652 tokens, 26 layers x 32 heads: 19.74 GiB peak with the mask, 10.69 per example.
MATH_ATTENTION_BYTES = 4.3


def packed_sdpa_attention(module, query, key, value, attention_mask, packed_seq_bounds=None, **kwargs):
    """sdpa, run causally on each example of a packed row when ``packed_seq_bounds`` is given.

    transformers' own packed-row path builds a block-causal boolean mask, which rules out sdpa's
    flash kernel and, for head sizes that are not a multiple of 8 (OpenLLaMA-3B's 100), its
    memory-efficient kernel too: the math kernel then keeps a ``heads x T x T`` fp32 matrix per
    layer. One causal call per example runs the flash kernel with no mask. Without bounds (padded
    batches, generation) this is transformers' sdpa, mask and all.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_seq_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = packed_seq_bounds
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a  # empty examples pad the offsets of a CUDA graph's row
    ]
    return torch.cat(outputs, dim=1), None


def use_packed_attention(model) -> bool:
    """Switch an sdpa model to :func:`packed_sdpa_attention` (masks as for sdpa); False if it is not sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return True


def mask_attention_gb(model, tokens: int, checkpointed_layers: int) -> float:
    """Extra peak memory of transformers' block-mask attention over a packed row of ``tokens``, in GiB.

    Zero where sdpa's memory-efficient kernel takes the mask (head size a multiple of 8); else the
    math kernel's attention matrices of every layer not checkpointed, plus one being recomputed.
    """
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 8 == 0:
        return 0.0
    layers = config.num_hidden_layers - checkpointed_layers + (1 if checkpointed_layers else 0)
    return layers * heads * tokens**2 * MATH_ATTENTION_BYTES / 2**30


def seq_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Start of every example in a packed row (where positions restart at 0), and the row's end."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return (*starts, position_ids.shape[1])


def cast_frozen_to_bf16(model) -> None:
    """bf16 for the float32 weights ``prepare_model_for_kbit_training`` made (norms, embeddings, head) and
    the adapters, as TRL's SFTTrainer does for the adapters of a quantized model.

    With an fp32 residual stream, every 4-bit matmul casts its input to bf16 and its output back, and
    autocast casts every adapter weight on every call: thousands of small kernels a step, which
    bound a small step by the CPU rather than the GPU.
    """
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- varlen attention

VARLEN_ATTENTION = "sdpa_varlen"
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the flash kernel's


def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` (flash, one call per packed row) or None where absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen_attn() is not None


def packed_varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    packed_cu_seqlens=None,
    packed_max_seqlen=None,
    packed_seq_bounds=None,
    **kwargs,
):
    """Causal flash attention over every example of a packed row in one call (``varlen_attn``).

    Needs ``packed_cu_seqlens`` (int32 offsets of the examples, on the device) and
    ``packed_max_seqlen``, which :class:`PackedTrainer` passes with every packed row. Head sizes
    that are not a multiple of 8 (OpenLLaMA-3B's 100) are zero-padded to one: zero query/key
    columns add nothing to the scores, zero value columns are cut from the output, and the softmax
    scale stays ``module.scaling``. Without the offsets (padded batches, generation), off CUDA or
    in fp32 (the flash kernel takes bf16/fp16 only), this is :func:`packed_sdpa_attention`.
    """
    if packed_cu_seqlens is None or not varlen_available(query.device) or query.dtype not in HALF_DTYPES:
        bounds = packed_seq_bounds if packed_cu_seqlens is None else tuple(packed_cu_seqlens.tolist())
        return packed_sdpa_attention(module, query, key, value, attention_mask, packed_seq_bounds=bounds, **kwargs)
    return _varlen_call(module, query, key, value, packed_cu_seqlens, packed_max_seqlen)


@torch.compiler.disable  # a compiled decoder layer calls the kernel as it is, shapes and all
def _varlen_call(module, query, key, value, cu_seqlens, max_seqlen):
    import inspect

    varlen_attn = _varlen_attn()
    head_dim = query.shape[-1]
    pad = -head_dim % 8
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {"scale": module.scaling}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:  # torch 2.10/2.11
        extra["is_causal"] = True
    out = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **extra
    )
    if pad:
        out = out[..., :head_dim]
    return out.unsqueeze(0), None  # [1, T, H, D], as transformers' attention functions return it


def use_varlen_attention(model) -> bool:
    """Switch an sdpa model to :func:`packed_varlen_attention`; False if it is not sdpa.

    Padded batches (evaluation, generation) still get sdpa's masks; rows without padding get none
    (packed rows carry ``packed_cu_seqlens``, a single row is causal).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", PACKED_ATTENTION, VARLEN_ATTENTION):
        return False

    def varlen_mask(*args, **kwargs):
        # Rows without a padding mask need none: packed rows carry their offsets, single rows are causal.
        # (transformers would build a block mask for packed rows, with host syncs a CUDA graph cannot hold.)
        if kwargs.get("attention_mask") is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, packed_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    base.set_attn_implementation(VARLEN_ATTENTION)
    return True


# ---------------------------------------------------------------------------------------------- dequantized weights


def _quantized_layers(model, bits: Optional[int] = None) -> list[torch.nn.Module]:
    """bitsandbytes' 4-bit and 8-bit linear layers of ``model`` (``bits``: only those)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = {4: (bnb.nn.Linear4bit,), 8: (bnb.nn.Linear8bitLt,), None: (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)}
    return [m for m in model.modules() if isinstance(m, kinds[bits])]


def _cache_dtype(module, int8_dtype: torch.dtype) -> torch.dtype:
    return getattr(module, "compute_dtype", None) or (int8_dtype if _is_int8(module) else torch.bfloat16)


def _is_int8(module) -> bool:
    return hasattr(module.weight, "SCB")


def dequantized_weights_gb(model, int8_dtype: torch.dtype = torch.bfloat16) -> float:
    """GiB that :func:`cache_dequantized_weights` would hold for every quantized layer of ``model``."""
    total = 0
    for module in _quantized_layers(model):
        total += module.in_features * module.out_features * torch.finfo(_cache_dtype(module, int8_dtype)).bits // 8
    return total / 2**30


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The layer's matmul on its cached dequantized weight (:func:`cache_dequantized_weights`)."""
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _dequantize(module, dtype: torch.dtype) -> Optional[torch.Tensor]:
    import bitsandbytes.functional as bnbf

    if _is_int8(module):
        # The int8 rows and their scales: on the weight until the layer's first forward moves them to its state.
        rows = module.weight.CB if module.weight.CB is not None else module.state.CB
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        if rows is None or scales is None:  # not quantized (yet): nothing to cache
            return None
        return bnbf.int8_vectorwise_dequant(rows, scales).to(dtype)
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first no-grad forward into a
        # layout that dequantize_4bit does not read: unpack a copy (the layer keeps its own).
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    weight = bnbf.dequantize_4bit(data, state).to(dtype)
    return weight.view(module.out_features, module.in_features)


def cache_dequantized_weights(
    model, budget_gb: Optional[float] = None, int8_dtype: torch.dtype = torch.bfloat16
) -> tuple[int, float]:
    """Keep a dequantized copy of 4-bit and 8-bit base weights, layer by layer while ``budget_gb`` allows.

    Returns the number of layers cached and the GiB they hold.

    bitsandbytes dequantizes every 4-bit weight to the compute dtype in every forward and every
    backward (and in every recompute of a checkpointed layer): for W3B, 3.2e9 weights, ~1,100
    kernel launches and ~8 ms of memory traffic a step. With memory to spare the dequantized
    weight is kept instead (a non-persistent buffer, so checkpoints and adapters are unchanged)
    and the layer runs ``F.linear`` on it: the values are bitsandbytes' own
    (``dequantize_4bit``), so the forward and the input gradients are those of the 4-bit base.

    8-bit (LLM.int8) layers get the weight bitsandbytes' own backward multiplies by
    (``int8_vectorwise_dequant``: the int8 rows times their scales), in ``int8_dtype``. Their
    forward differs from bitsandbytes' CUDA forward in one way: LLM.int8 also quantizes the
    activations row-wise to int8 (keeping outlier columns above its threshold in fp16) and finds
    those columns on the host, a GPU sync in every layer that rules out CUDA graphs. The cached
    forward multiplies the unquantized activations, as bitsandbytes' CPU path does; so the weights
    are the 8-bit base's, the activations are not rounded to 8 bits. ``tests/test_gpu.py`` measures
    the difference. The quantized weights stay (saving and merging still see them).
    """
    cached, used = 0, 0.0
    for module in _quantized_layers(model):
        dtype = _cache_dtype(module, int8_dtype)
        size = module.in_features * module.out_features * torch.finfo(dtype).bits / 8 / 2**30
        if budget_gb is not None and used + size > budget_gb:
            break
        weight = _dequantize(module, dtype)
        if weight is None:
            continue
        module.register_buffer("dequantized_weight", weight, persistent=False)
        module.forward = types.MethodType(_dequantized_forward, module)
        cached, used = cached + 1, used + size
    return cached, used


def tokenize_sft(dataset, tokenizer, max_length: int, completion_only_loss: bool):
    """``input_ids`` and ``labels`` for prompt/completion rows, as TRL 1.16's SFTTrainer prepares them.

    EOS is appended to the completion; with ``completion_only_loss`` the prompt's labels are -100
    (the prompt ends where the tokenized prompt stops being a prefix of prompt + completion);
    rows are cut to ``max_length`` tokens, and rows left without a label are dropped. Rows that
    already hold ``input_ids`` get ``labels = input_ids`` where they have none.
    """
    eos = tokenizer.eos_token

    def encode(example):
        if "input_ids" in example:
            ids, labels = example["input_ids"], example.get("labels") or example["input_ids"]
        else:
            completion = example["completion"]
            completion = completion if completion.endswith(eos) else completion + eos
            ids = tokenizer(text=example["prompt"] + completion)["input_ids"]
            prompt_len = common_prefix_length(tokenizer(text=example["prompt"])["input_ids"], ids)
            labels = [-100] * prompt_len + ids[prompt_len:] if completion_only_loss else list(ids)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    tokenized = dataset.map(encode, remove_columns=dataset.column_names)
    kept = tokenized.filter(lambda example: any(label != -100 for label in example["labels"]))
    if len(dataset) and not len(kept):  # else torch's sampler fails later with "num_samples=0"
        from src.data import DataError

        raise DataError(
            [
                f"no row keeps a response token within model.max_length={max_length}: every prompt fills it "
                f"({len(dataset)} row(s)); raise model.max_length, or shorten the prompts"
            ]
        )
    return kept


# ---------------------------------------------------------------------------------------------- DDP sampling


class TokenBalancedSampler(torch.utils.data.Sampler):
    """The default shuffled order, with each micro-batch slot's examples dealt so every rank gets as many tokens.

    Under DDP each optimizer step runs ``world_size`` micro-batches of ``batch_size`` examples at once,
    one per rank (accelerate's ``BatchSamplerShard`` deals consecutive batches of this order round-robin),
    and waits at the gradient all-reduce for the slowest. A packed row's time is proportional to its
    tokens, and 8 random examples differ by ~12% in tokens between two ranks. This sampler takes the
    permutation the default sampler would (``torch.randperm`` seeded with ``seed + epoch``, as
    accelerate's ``SeedableRandomSampler``), so every step holds the same examples, and within each
    group of ``world_size x batch_size`` assigns the longest remaining example to the rank with the
    fewest tokens that still has room. The gradient does not change: the loss is normalized by the
    token count of all ranks. A last incomplete group keeps the default order.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        self.lengths, self.batch_size, self.world_size, self.seed = list(lengths), batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        group = self.batch_size * self.world_size
        full = len(order) - len(order) % group
        for start in range(0, full, group):
            yield from self.balance(order[start : start + group])
        yield from order[full:]

    def balance(self, indices: list[int]) -> list[int]:
        """``indices`` dealt into ``world_size`` batches of equal size and near-equal tokens, concatenated."""
        batches: list[list[int]] = [[] for _ in range(self.world_size)]
        tokens = [0] * self.world_size
        for index in sorted(indices, key=lambda i: -self.lengths[i]):
            rank = min((r for r in range(self.world_size) if len(batches[r]) < self.batch_size), key=tokens.__getitem__)
            batches[rank].append(index)
            tokens[rank] += self.lengths[index]
        return [index for batch in batches for index in batch]


# ---------------------------------------------------------------------------------------------- CUDA graphs

GRAPH_BUCKET_TOKENS = 256  # packed rows are padded up to a multiple of this: one captured graph per length


class GraphedSteps:
    """Forward and backward of a packed micro-batch as one CUDA graph replay, per padded row length.

    A small step is bound by the CPU: eager PyTorch launches ~5,000 kernels (norms, rotary
    embeddings, every adapter's dropout/matmuls/scale/add, their backward) for ~20 TFLOP of work.
    A CUDA graph launches them all at once. Graphs need fixed shapes, so a packed row is padded up to
    a multiple of ``bucket`` tokens with one more example of pad tokens whose labels are -100 (it
    attends only to itself and adds nothing to the loss, whose divisor ``num_items_in_batch`` is the
    real examples' label count), and the offsets are padded with empty examples up to
    ``max_examples + 2`` entries. Each length is captured once (after one eager warm-up step on a
    side stream), into one memory pool shared by all lengths; later rows of that length replay it
    on fresh inputs. Dropout draws fresh randomness on every replay (PyTorch's graph-safe RNG).
    If a capture fails (an op that waits on the host), training goes on eagerly and ``failed`` says why.

    The gradients of a replay are written into the tensors captured as ``.grad``; they are put back
    on the parameters after every replay, so the Trainer's clipping, optimizer step and
    ``zero_grad`` work as usual. Only for one micro-batch per optimizer step (nothing accumulates
    across replays) and varlen attention: the fast path turns graphs on only then
    (:func:`build_packed_sft_trainer`).

    Under DDP (``world_size`` > 1) the graph runs the model without its DDP wrapper, whose hooks
    would put NCCL calls into the capture; each rank captures its own lengths. As
    ``Trainer.compute_loss`` does under DDP, the loss is multiplied by the world size
    (``num_items_in_batch`` counts every rank's tokens); :meth:`PackedTrainer.training_step` then
    averages the gradients over the ranks. DDP keeps the parameters' gradient accumulators alive,
    bound to the stream it was built on, and a capture on any other stream fails; so under DDP the
    warm-up and capture run on ``stream``, the stream :meth:`PackedTrainer.train` trains on (and
    builds DDP on), as PyTorch's notes on graphs with DDP prescribe.
    """

    def __init__(self, pad_token_id: int, max_examples: int, bucket: int = GRAPH_BUCKET_TOKENS, world_size: int = 1):
        self.pad_token_id = pad_token_id
        self.max_examples = max_examples
        self.bucket = bucket
        self.world_size = world_size
        self.graphs: dict[int, dict[str, Any]] = {}
        self.pool = None
        self.stream: Optional[torch.cuda.Stream] = None  # where to capture; None: a new side stream
        self.failed: Optional[str] = None  # why capture failed; the steps then run eagerly

    def padded_length(self, tokens: int) -> int:
        return -(-(tokens + 1) // self.bucket) * self.bucket  # at least one pad token: the pad example is never empty

    def _inputs(self, inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """The row padded to ``length`` and its offsets, on the host."""
        ids, positions, labels = inputs["input_ids"], inputs["position_ids"], inputs["labels"]
        tokens = ids.shape[1]
        pad = length - tokens
        bounds = list(seq_bounds(positions.cpu()))
        offsets = bounds + [length] * (self.max_examples + 2 - len(bounds))
        return {
            "input_ids": torch.cat([ids.cpu(), torch.full((1, pad), self.pad_token_id, dtype=ids.dtype)], dim=1),
            "position_ids": torch.cat([positions.cpu(), torch.arange(pad, dtype=positions.dtype)[None]], dim=1),
            "labels": torch.cat([labels.cpu(), torch.full((1, pad), -100, dtype=labels.dtype)], dim=1),
            "packed_cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
        }

    def accepts(self, inputs: dict[str, Any]) -> bool:
        """A packed row (no padding mask) with at most ``max_examples`` examples."""
        if "attention_mask" in inputs or "position_ids" not in inputs:
            return False
        return int((inputs["position_ids"][0] == 0).sum()) <= self.max_examples

    def _forward_backward(self, model, static: dict[str, torch.Tensor], max_seqlen: int) -> torch.Tensor:
        outputs = model(
            input_ids=static["input_ids"],
            position_ids=static["position_ids"],
            labels=static["labels"],
            packed_cu_seqlens=static["packed_cu_seqlens"],
            packed_max_seqlen=max_seqlen,
            num_items_in_batch=static["num_items_in_batch"],
            use_cache=False,
        )
        loss = outputs.loss if self.world_size == 1 else outputs.loss * self.world_size
        loss.backward()
        return loss.detach()

    def _capture(self, model, host: dict[str, torch.Tensor], num_items: torch.Tensor, length: int) -> dict[str, Any]:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        static = {k: v.to(device) for k, v in host.items()}
        static["num_items_in_batch"] = num_items.detach().to(device=device).clone()
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]  # normally None: the Trainer zeroes gradients after each step
        side = self.stream or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialization (cuBLAS, flash workspaces) off the graph
            for p in params:
                p.grad = None
            self._forward_backward(model, static, length)
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None  # the captured backward assigns fresh gradient tensors from the graph's pool
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = self._forward_backward(model, static, length)
        grads = [p.grad for p in params]
        for p, g in zip(params, saved):
            p.grad = g
        return {"graph": graph, "static": static, "loss": loss, "params": params, "grads": grads}

    def step(self, model, inputs: dict[str, torch.Tensor], num_items_in_batch) -> Optional[torch.Tensor]:
        """Forward and backward of one packed row; the gradients are on the parameters afterwards.

        None where the graph could not be captured (the caller then runs the step eagerly).
        """
        length = self.padded_length(inputs["input_ids"].shape[1])
        host = self._inputs(inputs, length)
        num_items = torch.as_tensor(num_items_in_batch)
        entry = self.graphs.get(length)
        if entry is None:
            try:
                entry = self._capture(model, host, num_items, length)
            except RuntimeError as exc:  # e.g. an op that syncs with the host: train eagerly from here on
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            if self.failed is not None:
                print(f"note: CUDA graph capture failed, training eagerly ({self.failed})", file=sys.stderr)
                for p in model.parameters():
                    p.grad = None
                return None
            self.graphs[length] = entry
        static = entry["static"]
        for key, value in host.items():
            static[key].copy_(value, non_blocking=True)
        static["num_items_in_batch"].copy_(num_items, non_blocking=True)
        entry["graph"].replay()
        for p, g in zip(entry["params"], entry["grads"]):
            p.grad = g
        return entry["loss"]


class PackedTrainer(Trainer):
    """HF Trainer on padding-free packed batches of tokenized SFT rows.

    Overrides the documented hooks ``compute_loss`` (no KV cache, which would hide the packing;
    the examples' bounds for per-example or varlen attention) and ``evaluate`` (padded batches,
    as the plain path evaluates).
    """

    def __init__(
        self, *args, eval_data_collator, attention: str = "mask", graphs: Optional[GraphedSteps] = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.attention = attention
        self.graphs = graphs
        self._unlogged_tokens = 0  # this rank's tokens since the last log (see _track_num_input_tokens)

    def _track_num_input_tokens(self, inputs):
        """Count the step's tokens on the host; the ranks' counts are summed when the Trainer logs.

        transformers' own count moves each step's count to the GPU, gathers it and reads it back: a
        host sync every step, after which the CPU can only queue the next step once this one has run
        (measured: the GPU idled ~35% of each fast-path step). A packed row has no padding, so every
        token of ``input_ids`` counts, and ``inputs`` is still the host batch here.
        """
        if self.args.include_num_input_tokens_seen != "no" and "input_ids" in inputs:
            self._unlogged_tokens += int(inputs["input_ids"].numel())

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self._unlogged_tokens or distributed.world_size() > 1:  # every rank logs at the same steps
            count = torch.tensor(self._unlogged_tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum())
            self._unlogged_tokens = 0
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        """Under DDP, :class:`TokenBalancedSampler` in place of the default shuffle; else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (
            distributed.world_size() > 1
            and self.args.train_sampling_strategy == "random"
            and dataset is not None
            and "input_ids" in getattr(dataset, "column_names", ())
        ):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return TokenBalancedSampler(lengths, self.args.per_device_train_batch_size, distributed.world_size(), seed)
        return super()._get_train_sampler(train_dataset)

    def train(self, *args, **kwargs):
        """As the Trainer's; under DDP with CUDA graphs, on a side stream that DDP is built on and
        the graphs are captured on (:class:`GraphedSteps`)."""
        if self.graphs is None or distributed.world_size() == 1 or not torch.cuda.is_available():
            return super().train(*args, **kwargs)
        stream = self.graphs.stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = super().train(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A CUDA graph replay where :class:`GraphedSteps` takes the row, else the Trainer's eager step.

        Under DDP with graphs on, every step runs on the unwrapped model (a replay, or eagerly where
        a capture failed or a row does not fit), so DDP's hooks never fire, and its gradients are then
        averaged over the ranks in one all-reduce (:func:`src.distributed.average_gradients`): each
        rank makes exactly one such call per step, whichever way its step ran.
        """
        graphs = self.graphs
        if graphs is None or num_items_in_batch is None:
            return super().training_step(model, inputs, num_items_in_batch)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        module = model.module if ddp else model
        loss = None
        if graphs.failed is None and graphs.accepts(inputs):
            model.train()
            with self.compute_loss_context_manager():
                loss = graphs.step(module, inputs, num_items_in_batch)
        if loss is None:
            loss = super().training_step(module, inputs, num_items_in_batch)
        if ddp:
            params = [p for p in module.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:  # unused on this rank's row: DDP reduces a zero gradient for it too
                    p.grad = torch.zeros_like(p)
            distributed.average_gradients([p.grad for p in params])
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "position_ids" in inputs and "attention_mask" not in inputs and self.attention != "mask":
            bounds = seq_bounds(inputs["position_ids"])  # a packed row: bounds once per micro-batch
            if self.attention == "varlen":
                cu = torch.tensor(bounds, dtype=torch.int32, device=inputs["input_ids"].device)
                lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
                inputs = {**inputs, "packed_cu_seqlens": cu, "packed_max_seqlen": max(lengths)}
            else:
                inputs = {**inputs, "packed_seq_bounds": bounds}
        # use_cache=False: with a cache transformers ignores the packed position_ids and masks causally only.
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: under DDP num_items_in_batch counts every rank's tokens and DDP averages
            # the gradients over the ranks, so each rank's loss is scaled back up by their number.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = train_collator


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer, with dynamic shapes (packed rows vary in length); the count.

    The layers share their code, so one compiled graph serves them all. Inductor fuses the norms,
    rotary embeddings, SwiGLU, residual adds, dtype casts and the adapters' scale-and-add, which
    eager mode runs as hundreds of small kernels per layer. Varlen attention runs uncompiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def build_packed_sft_trainer(
    cfg,
    model,
    tokenizer,
    args,
    train_dataset,
    eval_dataset=None,
    callbacks: Optional[list] = None,
    attention: str = "auto",
    bf16_weights: bool = True,
    dequantize: Optional[bool] = None,
    compile_layers: bool = False,
    cuda_graphs: Optional[bool] = None,
) -> tuple[PackedTrainer, MicroBatchPlan]:
    """The fast-path trainer for an SFT run, and the micro-batch plan it follows.

    Args:
        cfg: the validated :class:`src.config.Config`.
        args: the plain path's ``SFTConfig``; its batch, checkpointing and optimizer fields are replanned.
        train_dataset / eval_dataset: prompt/completion rows, or already tokenized ``input_ids``.
        attention: ``varlen`` (:func:`packed_varlen_attention`: flash over the whole packed row,
            CUDA only), ``mask`` (transformers' block-causal mask), ``per-example``
            (:func:`packed_sdpa_attention`), or ``auto``: varlen where it runs (CUDA, bf16/fp16); else the mask
            when the plan plus :func:`mask_attention_gb` fits the budget, else per example.
        bf16_weights: under bf16 training of a 4/8-bit base, cast its fp32 weights and the adapters to
            bf16 (:func:`cast_frozen_to_bf16`).
        dequantize: keep dequantized copies of a 4/8-bit base's weights (:func:`cache_dequantized_weights`);
            None: as ``train.dequantize_weights`` says, as many layers as the memory budget leaves room for
            (none without a budget).
        compile_layers: ``torch.compile`` the decoder layers (:func:`compile_decoder_layers`).
        cuda_graphs: replay each step's forward and backward as a CUDA graph (:class:`GraphedSteps`);
            None: wherever it applies (CUDA, bf16, varlen attention, one micro-batch per step, a 16- or
            4-bit base or an 8-bit one whose every layer is cached; also under DDP); a step whose capture
            fails runs eagerly, and so do the rest.
    """
    budget = cfg.train.memory_budget_gb if cfg.train.memory_budget_gb is not None else default_budget_gb()
    if budget is not None:
        budget *= PLAN_MARGIN  # the plan may fall short of the measured peak by this much
    examples_per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    num_layers = len(decoder_layers(model))
    if budget is None:
        micro = plan_micro_batches(examples_per_step, num_layers, None, lambda size, ckpt: 0.0)
    else:
        estimate, _ = plan_estimator(cfg)
        micro = plan_micro_batches(examples_per_step, num_layers, budget, estimate)
    set_checkpointed_layers(model, micro.checkpointed_layers)
    tokens = micro.micro_batch_size * cfg.model.max_length
    if attention == "auto":
        half = args.bf16 or args.fp16 or next(model.parameters()).dtype in HALF_DTYPES
        if half and varlen_available(next(model.parameters()).device):
            attention = "varlen"
        else:
            extra = mask_attention_gb(model, tokens, micro.checkpointed_layers)
            fits = budget is None or (micro.est_peak_gpu_mem_gb or 0.0) + extra <= budget
            attention = "mask" if fits else "per-example"
    if attention == "varlen" and not use_varlen_attention(model):
        attention = "mask"
    if attention == "per-example":
        use_packed_attention(model)
    estimated = micro.est_peak_gpu_mem_gb
    if attention == "mask" and estimated is not None:
        estimated += mask_attention_gb(model, tokens, micro.checkpointed_layers)
    if bf16_weights and args.bf16 and cfg.quant.bits in (4, 8):
        cast_frozen_to_bf16(model)
    dequantized, cache_gb = 0, 0.0
    if dequantize is None and not cfg.train.dequantize_weights:
        dequantize = False
    if dequantize is not False and cfg.quant.bits in (4, 8):
        room = None if dequantize else (0.0 if budget is None else max(0.0, budget - (estimated or 0.0)))
        int8_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        dequantized, cache_gb = cache_dequantized_weights(model, room, int8_dtype)
        if estimated is not None:
            estimated += cache_gb
    if compile_layers:
        compile_decoder_layers(model)
    graphable = (
        torch.cuda.is_available()
        and args.bf16
        and not args.fp16
        and attention == "varlen"
        and micro.gradient_accumulation_steps == 1
        # bitsandbytes' int8 matmul finds its outliers on the host: 8-bit only with every layer cached
        and (cfg.quant.bits in (4, 16) or dequantized == len(_quantized_layers(model, 8)) > 0)
    )
    if cuda_graphs is None:
        cuda_graphs = graphable
    world = distributed.world_size()
    graphs = GraphedSteps(tokenizer.pad_token_id, micro.micro_batch_size, world_size=world) if cuda_graphs else None
    micro = dataclasses.replace(
        micro,
        attention=attention,
        dequantized_layers=dequantized,
        dequantized_gb=cache_gb,
        compiled=compile_layers,
        cuda_graphs=bool(cuda_graphs),
        est_peak_gpu_mem_gb=estimated,
    )
    args = dataclasses.replace(
        args,
        per_device_train_batch_size=micro.micro_batch_size,
        gradient_accumulation_steps=micro.gradient_accumulation_steps,
        activation_checkpointing=False,  # set per layer above; the Trainer would turn on every layer
        optim=fast_optimizer(args.optim),
        include_num_input_tokens_seen="all",  # a packed row has no padding (and EOS may be the pad id)
        ddp_broadcast_buffers=False,  # under DDP: the cached dequantized weights are buffers, equal on every rank
    )
    distributed.one_gpu_per_process(args)  # dataclasses.replace set the devices up anew
    completion_only = args.completion_only_loss is not False  # TRL's None: on for prompt/completion rows
    prepare = dict(tokenizer=tokenizer, max_length=cfg.model.max_length, completion_only_loss=completion_only)
    pad_id = tokenizer.pad_token_id
    trainer = PackedTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_sft(train_dataset, **prepare),
        eval_dataset=None if eval_dataset is None else tokenize_sft(eval_dataset, **prepare),
        processing_class=tokenizer,
        callbacks=callbacks,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True),
        eval_data_collator=DataCollatorForLanguageModeling(pad_token_id=pad_id),
        attention=attention,
        graphs=graphs,
    )
    print(micro.describe(), file=sys.stderr)
    return trainer, micro
