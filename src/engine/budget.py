"""The fast path's memory budget: micro-batches and checkpointed layers sized to ``train.memory_budget_gb``.

:func:`resolve_budget` turns ``train.memory_budget_gb`` (null: 90% of the GPU's memory; no budget on CPU) into the
GiB a plan fills, less :data:`PLAN_MARGIN` for the plan's error; :func:`src.memory.plan`'s estimate then chooses the
largest micro-batch that fits, and activation checkpointing only for as many decoder layers as memory needs
(:func:`plan_micro_batches`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from src.errors import UserError
from src.memory import MemoryPlan, plan
from src.modeling import base_model

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

# The fast path plans for this fraction of the budget: the plan's estimate can fall short of the measured peak on the
# fast path (by up to 12%: benchmarks/results/), so a plan that fills the budget could overrun it.
PLAN_MARGIN = 0.88


class MemoryBudgetError(UserError, ValueError):
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
    attention: str = "mask"  # or "per-example", "varlen": chosen by build_flat_sft_trainer
    dequantized_layers: int = 0  # 4/8-bit linear layers run on a cached dequantized weight
    dequantized_gb: float = 0.0  # what those cached weights hold
    compiled: bool = False
    cuda_graphs: bool = False
    fused_loss: bool = False  # the SFT loss through src.engine.loss (train.fused_loss)
    fused_lora: int = 0  # LoRA linears on the fused forward of src.engine.lora (train.fused_lora)

    def describe(self) -> str:
        budget = "no memory budget" if self.budget_gb is None else f"planned to {self.budget_gb:.1f} GiB of the budget"
        est = "" if self.est_peak_gpu_mem_gb is None else f", est. peak {self.est_peak_gpu_mem_gb:.1f} GiB"
        return (
            f"fast path: {self.examples_per_step} examples/step as {self.gradient_accumulation_steps} packed "
            f"micro-batch(es) of {self.micro_batch_size}, activation checkpointing on "
            f"{self.checkpointed_layers}/{self.num_layers} layers, attention by {self.attention}, "
            f"{self.dequantized_layers} 4-bit layers on cached dequantized weights"
            f"{', compiled layers' if self.compiled else ''}{', CUDA graphs' if self.cuda_graphs else ''}"
            f"{', fused loss' if self.fused_loss else ''}"
            f"{f', {self.fused_lora} fused LoRA layers' if self.fused_lora else ''}"
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


def resolve_budget(memory_budget_gb: Optional[float]) -> Optional[float]:
    """The GiB a fast path's plan may fill: ``train.memory_budget_gb`` (null: :data:`DEFAULT_BUDGET_FRACTION` of this
    process's GPU) less :data:`PLAN_MARGIN`; None without a budget (a CPU). The one place either is applied."""
    budget = memory_budget_gb if memory_budget_gb is not None else default_budget_gb()
    return None if budget is None else budget * PLAN_MARGIN


def plan_step(cfg, model, tokens: Optional[Callable[[int], int]] = None) -> tuple[Optional[float], MicroBatchPlan]:
    """A fast path's step under the run's memory budget (:func:`resolve_budget`): the budget it planned within, or
    None where there is none (a CPU), and the micro-batch plan for it.

    ``tokens(micro_batch_size)``: the most tokens a packed micro-batch of that many examples holds
    (:func:`largest_micro_batch_tokens` of the training data); None: ``model.max_length`` an example."""
    budget = resolve_budget(cfg.train.memory_budget_gb)
    return budget, plan_step_within(budget, cfg, model, tokens)


def plan_step_within(
    budget_gb: Optional[float], cfg, model, tokens: Optional[Callable[[int], int]] = None
) -> MicroBatchPlan:
    """The micro-batch plan of a step within ``budget_gb``, already resolved (:func:`resolve_budget`; a trial pack
    gives each trial its share); None plans one micro-batch, no checkpointing."""
    examples_per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    num_layers = len(decoder_layers(model))
    if budget_gb is None:
        return plan_micro_batches(examples_per_step, num_layers, None, lambda size, ckpt: 0.0)
    estimate, _ = plan_estimator(cfg, tokens)
    return plan_micro_batches(examples_per_step, num_layers, budget_gb, estimate)


def default_budget_gb() -> Optional[float]:
    """90% of the current GPU's memory in GiB, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return DEFAULT_BUDGET_FRACTION * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def fast_optimizer(optim: str) -> str:
    """The optimizer the fast path runs: fused AdamW for any AdamW variant on CUDA, else ``optim``."""
    return FUSED_ADAMW if optim in ADAMW_VARIANTS and torch.cuda.is_available() else optim


# The plan sizes a micro-batch for the largest one found in this many times as many shuffled epochs as the run trains
# (at most SAMPLED_TOKENS_LIMIT example lengths drawn in all, per micro-batch size).
OVERSAMPLE_EPOCHS = 100
SAMPLED_TOKENS_LIMIT = 20_000_000


def largest_micro_batch_tokens(lengths: Sequence[int], epochs: float = 1.0, seed: int = 0) -> Callable[[int], int]:
    """``tokens(n)``: the tokens a packed micro-batch of ``n`` of these examples is planned to hold.

    No micro-batch of ``n`` holds more than the ``n`` longest examples together; but the Trainer draws its micro-batches
    at random, and with many examples to one a random draw comes nowhere near that bound (seed 001's 64 spoken
    commands a step hold ~960 tokens; its 64 longest, 1,536). So the plan takes the largest micro-batch of ``n`` in
    :data:`OVERSAMPLE_EPOCHS` times as many shuffled epochs as the run trains (``epochs``; seeded, not the run's own
    order), capped by the ``n`` longest: an empirical high quantile, which the run's own micro-batches pass rarely and
    then by a few tokens, well inside the budget's :data:`PLAN_MARGIN`.
    """
    import numpy as np

    sizes = np.asarray(lengths, dtype=np.int64)
    prefix = [0, *itertools.accumulate(sorted(sizes.tolist(), reverse=True))]
    found: dict[int, int] = {}

    def tokens(n: int) -> int:
        n = max(1, min(n, len(sizes)))
        if n not in found:
            full = len(sizes) // n * n
            shuffles = max(1, min(math.ceil(OVERSAMPLE_EPOCHS * max(epochs, 1.0)), SAMPLED_TOKENS_LIMIT // len(sizes)))
            rng = np.random.default_rng(seed)
            largest = max(
                int(sizes[rng.permutation(len(sizes))[:full]].reshape(-1, n).sum(1).max()) for _ in range(shuffles)
            )
            found[n] = min(largest, prefix[n])
        return found[n]

    return tokens


def plan_estimator(cfg, tokens: Optional[Callable[[int], int]] = None) -> tuple[Callable[[int, bool], float], int]:
    """:func:`src.memory.plan`'s peak-memory estimate as ``estimate(micro_batch_size, checkpoint_all)``, and the
    layer count.

    A micro-batch of n examples is estimated as one flat row of ``tokens(n)`` tokens, or, without ``tokens``,
    as n rows of ``model.max_length`` tokens: flat rows hold at most that many, so both are upper bounds. Short
    texts make the second a loose one (SST-2 packs about 66 tokens an example, not 512).
    """
    cache: dict[tuple[int, bool], MemoryPlan] = {}

    def run(size: int, ckpt: bool) -> MemoryPlan:
        if (size, ckpt) not in cache:
            train = dataclasses.replace(
                cfg.train,
                per_device_train_batch_size=size,
                activation_checkpointing=ckpt,
                optim=fast_optimizer(cfg.train.optim),
            )
            packed = None if tokens is None else max(1, tokens(size))
            cache[size, ckpt] = plan(dataclasses.replace(cfg, train=train), tokens_per_micro_batch=packed)
        return cache[size, ckpt]

    num_layers = run(1, False).model_shape.num_layers
    return (lambda size, ckpt: run(size, ckpt).est_peak_gpu_mem_gb), num_layers


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: torch.nn.Module, count: int) -> None:
    """Checkpoint the activations of the first ``count`` decoder layers only; 0 turns it off."""
    layers = decoder_layers(model)
    base = base_model(model)
    if count > 0:
        # Sets the checkpoint function on every layer (and input grads for the frozen embeddings).
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
