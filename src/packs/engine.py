"""The pack engine: K trials' LoRA adapters in one slot bank, one forward and backward over all their rows, and one
optimizer step for all of them.

A pack's trials share one frozen base. What differs is small: each trial's LoRA A and B (its rank, alpha, targets
and dropout), its rows, and its optimizer's settings. The engine keeps those apart without a loop over trials:

- **The slot bank** (:class:`SlotBank`). Every trial's adapter weights sit in one row of a ``[slots, P]`` fp32
  parameter: the same layout for every slot, each LoRA layer's A (``r_max x in``) and B (``out x r_max``) at fixed
  offsets, ``r_max`` the largest rank any slot gives that layer. A slot of smaller rank, or one that does not target
  the layer, has zeros there: their gradients are zero (a zero B gives A no gradient and a zero A gives B none), and
  so are AdamW's updates of them, so they stay zero.
- **A grouped LoRA matmul** (:func:`bank_lora_forward`). In a joint step every slot's row is padded to one length
  ``L``, so a layer's input is ``[slots, L, in]`` and on a GPU the adapters of all slots run as two batched matmuls
  (``torch.bmm``, then ``torch.baddbmm`` onto the base output: a grouped matmul whose groups the padding makes
  equal) and one rank-wide scale, whatever the number of trials: a few kernels a layer where a loop over K trials
  queues 4K. Elsewhere (:data:`GROUPED`) a loop. Outside a joint step (a trial's evaluation or its sample
  generations) one slot's adapter runs as peft's own ``B(A(dropout(x))) * scale``. A classifier's heads (peft's
  ``modules_to_save``) sit in the bank too, a whole head a slot (:func:`bank_head_forward`).
- **One loss for all.** Each slot's labels are shifted within its own row, and one cross-entropy over the joint
  row gives every token's loss; summed per slot and divided by the slot's own token count
  (``num_items_in_batch``), it is each trial's loss as its run alone computes it.
- **One optimizer step** (:class:`SlotAdamW`): AdamW over the bank's rows with each slot's own learning rate,
  betas, epsilon, weight decay and gradient clipping as ``[slots]`` tensors, on the slots whose accumulation window
  ends this step; no value is read back to the host.

A trial's math never meets another's: the batched matmuls, the per-slot clipping and the optimizer's update are
row by row, and attention never crosses from one example into another. One trial's NaN stays its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BankLayer:
    """Where one LoRA layer's weights sit in a bank row."""

    index: int  # the layer's column in the bank's per-layer tables (scales)
    piece: int  # its A's segment in the bank's layout (B's is the next): a joint step's split of the row
    a_offset: int
    b_offset: int
    rank: int  # r_max: the largest rank any slot gives this layer
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BankHead:
    """Where a classification head's own copy (a trial's ``modules_to_save``: the head's weight and bias) sits in a
    bank row: each slot holds a whole head."""

    piece: int  # its weight's segment in the bank's layout (the bias's, if any, is the next)
    weight_offset: int
    bias_offset: Optional[int]
    in_features: int
    out_features: int


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def head_wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's wrappers of a classifier's head (``ModulesToSaveWrapper``): a copy of the head per adapter."""
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


class SlotBank:
    """The trials' adapter weights as rows of one ``[slots, P]`` parameter (see the module's docstring).

    ``model`` is the peft model; a slot's weights are copied in from its peft adapter (:meth:`load`), which peft
    initialized as a run alone initializes its own, and back out to save it (:meth:`store`)."""

    def __init__(self, model: torch.nn.Module, slots: int, ranks: dict[torch.nn.Module, int], heads: Sequence = ()):
        self.model = model
        self.slots = slots
        self.layers: dict[torch.nn.Module, BankLayer] = {}
        self.segments: list[int] = []  # the row's layout: each layer's A and B, then each head's weight and bias
        offset = 0
        for index, (layer, rank) in enumerate(ranks.items()):
            base = layer.get_base_layer()
            fan_in, fan_out = base.in_features, base.out_features
            piece = len(self.segments)
            self.layers[layer] = BankLayer(index, piece, offset, offset + rank * fan_in, rank, fan_in, fan_out)
            self.segments += [rank * fan_in, fan_out * rank]
            offset += rank * (fan_in + fan_out)
        self.heads: dict[torch.nn.Module, BankHead] = {}
        for wrapper in heads:
            head = wrapper.original_module
            fan_in, fan_out = head.in_features, head.out_features
            bias = None if head.bias is None else offset + fan_in * fan_out
            self.heads[wrapper] = BankHead(len(self.segments), offset, bias, fan_in, fan_out)
            self.segments += [fan_in * fan_out] + ([] if head.bias is None else [fan_out])
            offset += fan_in * fan_out + (0 if head.bias is None else fan_out)
        device = next(model.parameters()).device
        self.weights = torch.nn.Parameter(torch.zeros(slots, offset, device=device))
        self.scales = torch.zeros(slots, len(self.layers), device=device)  # 0: the slot does not target the layer
        self.dropout = [0.0] * slots
        self.adapters: list[Optional[str]] = [None] * slots  # the peft adapter each slot holds
        self.targeted = [[False] * len(self.layers) for _ in range(slots)]
        self.ranks = [[0] * len(self.layers) for _ in range(slots)]  # each slot's own rank of each layer
        self.compute_dtype: Optional[torch.dtype] = None  # the adapters' matmuls (None: the weights', fp32)

    @classmethod
    def for_adapters(cls, model: torch.nn.Module, adapters: Sequence[str], slots: Optional[int] = None) -> SlotBank:
        """A bank of ``slots`` (None: one an adapter) laid out for any of ``adapters`` (their union of layers, each
        layer's largest rank). A trial's adapter is loaded into a free slot when it starts training (:meth:`load`)."""
        ranks: dict[torch.nn.Module, int] = {}
        for layer in lora_layers(model):
            rs = [layer.r[a] for a in adapters if a in layer.lora_A]
            if rs:
                ranks[layer] = max(rs)
        return cls(model, slots or len(adapters), ranks, head_wrappers(model))

    def _views(self, row: torch.Tensor, entry: BankLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's (A ``[r_max, in]``, B ``[out, r_max]``) of one layer: views, no copy."""
        a = row[entry.a_offset : entry.a_offset + entry.rank * entry.in_features].view(entry.rank, entry.in_features)
        b = row[entry.b_offset : entry.b_offset + entry.out_features * entry.rank]
        return a, b.view(entry.out_features, entry.rank)

    def head_views(self, row: torch.Tensor, entry: BankHead) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A row's (weight ``[out, in]``, bias ``[out]`` or None) of one classification head: views."""
        size = entry.in_features * entry.out_features
        weight = row[entry.weight_offset : entry.weight_offset + size].view(entry.out_features, entry.in_features)
        if entry.bias_offset is None:
            return weight, None
        return weight, row[entry.bias_offset : entry.bias_offset + entry.out_features]

    @torch.no_grad()
    def load(self, slot: int, adapter: str) -> None:
        """Put peft adapter ``adapter``'s weights, scales and dropout into ``slot`` (its other entries zeroed)."""
        row = self.weights[slot]
        row.zero_()
        self.scales[slot].zero_()
        self.targeted[slot] = [False] * len(self.layers)
        self.ranks[slot] = [0] * len(self.layers)
        for layer, entry in self.layers.items():
            if adapter not in layer.lora_A:
                continue
            a, b = self._views(row, entry)
            source_a, source_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a[: source_a.shape[0]].copy_(source_a)
            b[:, : source_b.shape[1]].copy_(source_b)
            self.scales[slot, entry.index] = float(layer.scaling[adapter])
            self.targeted[slot][entry.index] = True
            self.ranks[slot][entry.index] = source_a.shape[0]
            self.dropout[slot] = float(getattr(layer.lora_dropout[adapter], "p", 0.0))
        for wrapper, entry in self.heads.items():
            own = wrapper.modules_to_save[adapter]
            weight, bias = self.head_views(row, entry)
            weight.copy_(own.weight)
            if bias is not None:
                bias.copy_(own.bias)
        self.adapters[slot] = adapter

    @torch.no_grad()
    def store(self, slot: int) -> None:
        """Copy ``slot``'s weights back into its peft adapter (to save it as a run alone saves its own)."""
        adapter, row = self.adapters[slot], self.weights[slot]
        for layer, entry in self.layers.items():
            if adapter in layer.lora_A:
                a, b = self._views(row, entry)
                target_a, target_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                target_a.copy_(a[: target_a.shape[0]])
                target_b.copy_(b[:, : target_b.shape[1]])
        for wrapper, entry in self.heads.items():
            own = wrapper.modules_to_save[adapter]
            weight, bias = self.head_views(row, entry)
            own.weight.copy_(weight)
            if bias is not None:
                own.bias.copy_(bias)


class SlotAdamW:
    """AdamW over the bank's rows, each slot with its own settings, as ``torch.optim.AdamW`` steps one run's
    adapter: ``p -= lr * wd * p``, then the moments and the bias-corrected update. Gradient clipping first, per
    slot, as ``torch.nn.utils.clip_grad_norm_`` (``max_norm / (norm + 1e-6)``, at most 1; ``max_norm`` 0: none).

    Only the slots in ``stepping`` move; the others keep their weights, moments and accumulated gradients. The
    update runs in place, with two ``[slots, P]`` temporaries. Every value stays on the device."""

    def __init__(self, bank: SlotBank):
        self.bank = bank
        weights = bank.weights
        self.exp_avg = torch.zeros_like(weights)
        self.exp_avg_sq = torch.zeros_like(weights)
        self.steps = torch.zeros(bank.slots, 1, device=weights.device)

    def reset(self, slot: int) -> None:
        """A new trial in ``slot``: no moments, step 0, no gradient."""
        with torch.no_grad():
            self.exp_avg[slot].zero_()
            self.exp_avg_sq[slot].zero_()
            self.steps[slot].zero_()
            if self.bank.weights.grad is not None:
                self.bank.weights.grad[slot].zero_()

    @torch.no_grad()
    def step(self, stepping: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """One step of the slots where ``stepping`` ([slots, 1], bool) holds, with ``hyper`` ([slots, 6]: lr,
        beta1, beta2, eps, weight decay, max grad norm). Returns each slot's gradient norm before clipping."""
        weights = self.bank.weights
        if weights.grad is None:
            weights.grad = torch.zeros_like(weights)
        grad = weights.grad
        lr, beta1, beta2, eps, decay, max_norm = (h[:, None] for h in hyper.unbind(1))
        on = stepping.to(weights.dtype)  # 1.0 where the slot steps: every update below is weighted by it, in place
        norms = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        clipping = stepping & (max_norm > 0)
        grad.mul_(torch.where(clipping, (max_norm / (norms + 1e-6)).clamp(max=1.0), torch.ones_like(norms)))
        self.steps.add_(on)
        safe = self.steps.clamp(min=1.0)
        correction1, correction2 = 1.0 - beta1**safe, 1.0 - beta2**safe
        self.exp_avg.lerp_(grad, (1.0 - beta1) * on)
        self.exp_avg_sq.mul_(torch.where(stepping, beta2, torch.ones_like(beta2)))
        self.exp_avg_sq.addcmul_(grad, grad * ((1.0 - beta2) * on))
        # the rows not stepping get a denominator of at least 1 (an empty slot's settings are zeros: no 0 / 0)
        update = self.exp_avg_sq.sqrt().div_(correction2.sqrt()).add_(eps + (1.0 - on))
        torch.div(self.exp_avg, update, out=update)
        weights.mul_(1.0 - lr * decay * on)
        weights.sub_(update.mul_((lr / correction1) * on))
        grad.masked_fill_(stepping, 0.0)  # the stepped slots start their next window from zero
        return norms[:, 0]


# ---- the forward of a pack's LoRA layers -------------------------------------------------------------------------


@dataclass
class JointStep:
    """The forward running now: every slot in ``slots`` has a row of ``length`` tokens, in that order."""

    bank: SlotBank
    # The bank's rows of ``slots`` ([len(slots), P]) in the compute dtype, split once into the layout's segments
    # (SlotBank.segments): one backward node gathers every layer's gradient, where a slice per layer would each
    # write a whole [len(slots), P] gradient in the backward.
    pieces: tuple[torch.Tensor, ...]
    scales: torch.Tensor  # [len(slots), layers]
    slots: tuple[int, ...]
    length: int
    dropout: Optional[torch.Tensor]  # [len(slots), 1, 1] keep probabilities where the slots' rates differ
    rate: float  # the slots' one dropout rate where they agree
    active: list[bool]  # per layer: does any slot of the step target it
    grouped: bool = True  # two batched matmuls for all slots; False: a loop over the slots (GROUPED)
    examples: Optional[list[int]] = None  # a classifier's step: each slot's pooled examples, in order

    def lora(self, entry: BankLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's (A ``[slots, r_max, in]``, B ``[slots, out, r_max]``) of one layer: views, no copy."""
        count = len(self.slots)
        a = self.pieces[entry.piece].view(count, entry.rank, entry.in_features)
        return a, self.pieces[entry.piece + 1].view(count, entry.out_features, entry.rank)

    def head(self, entry: BankHead, i: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The ``i``-th slot's (weight ``[out, in]``, bias ``[out]`` or None) of one classification head."""
        weight = self.pieces[entry.piece][i].view(entry.out_features, entry.in_features)
        return weight, None if entry.bias_offset is None else self.pieces[entry.piece + 1][i]


# Where the slots' LoRA matmuls run batched (``torch.bmm``, one group a slot): on a GPU, where one kernel for K
# adapters saves K-1 launches a matmul. Elsewhere a loop over the slots runs peft's own kernels, so that on a CPU a
# pack's trial computes exactly what its run alone does (tests/unit/packs/test_engine.py checks the two agree).
GROUPED = {"cuda": True}


@dataclass
class OneSlot:
    """The forward running now is one trial's (an evaluation, a generation): its bank ``slot`` while it trains,
    else (``slot`` None) its peft ``adapter``, which holds its weights once it left the bank; both None: the base."""

    bank: SlotBank
    slot: Optional[int]
    adapter: Optional[str] = None


class _Active:
    step: Any = None


_ACTIVE = _Active()
# The forward running now, and its backward's (checkpointed layers recompute the forward in autograd's own thread on
# a GPU): process-wide, not per thread. Every other forward waits for the pack's lock.


@contextlib.contextmanager
def active(step: Any) -> Iterator[None]:
    previous, _ACTIVE.step = _ACTIVE.step, step
    try:
        yield
    finally:
        _ACTIVE.step = previous


def step_tensors(bank: SlotBank, slots: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What a joint step over ``slots`` reads from the host, on the device: the slots' indices, and each slot's
    dropout keep probability (``[slots, 1, 1]``) where their rates differ, else None. Host copies never wait; a CUDA
    graph makes them once, before its capture (:mod:`src.packs.graphs`)."""
    device = bank.weights.device
    index = torch.tensor(list(slots)).to(device, non_blocking=True)
    rates = [bank.dropout[s] for s in slots]
    if len(set(rates)) == 1:
        return index, None
    return index, torch.tensor([1.0 - r for r in rates]).to(device, non_blocking=True)[:, None, None]


def joint_step(
    bank: SlotBank,
    slots: Sequence[int],
    length: int,
    examples: Optional[list[int]] = None,
    tensors: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> JointStep:
    """The context of a joint forward over ``slots``' rows of ``length`` tokens each (a classifier's: with
    ``examples`` pooled from each, in order, for the slots' own heads); ``tensors``: :func:`step_tensors`'s, made
    earlier (None: made here)."""
    index, dropout = tensors or step_tensors(bank, slots)
    weights = bank.weights.index_select(0, index)
    dtype = bank.compute_dtype
    if torch.is_autocast_enabled(weights.device.type):
        dtype = torch.get_autocast_dtype(weights.device.type)
    if dtype is not None:  # one cast of all the step's weights, not one per layer
        weights = weights.to(dtype)
    rates = [bank.dropout[s] for s in slots]
    active_layers = [any(bank.targeted[s][i] for s in slots) for i in range(len(bank.layers))]
    grouped = GROUPED.get(weights.device.type, False)
    scales = bank.scales.index_select(0, index)
    pieces = weights.split(bank.segments, dim=1)
    return JointStep(bank, pieces, scales, tuple(slots), length, dropout, rates[0], active_layers, grouped, examples)


def bank_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward, its adapters read from the bank of the step running now (:data:`_ACTIVE`)."""
    result = self.base_layer(x, *args, **kwargs)
    step = _ACTIVE.step
    if step is None:
        return result
    entry = step.bank.layers.get(self)
    if entry is None:
        return result
    if isinstance(step, OneSlot):
        return _one_slot(self, step, entry, x, result)
    if not step.active[entry.index]:
        return result
    count, length = len(step.slots), step.length
    if x.shape[:-1].numel() != count * length:  # a layer after pooling (BERT's pooler): rows are examples
        return _by_example(self, step, entry, x, result)
    a, b = step.lora(entry)
    xs = x.reshape(count, length, entry.in_features).to(a.dtype)
    if self.training and step.dropout is not None:
        keep = step.dropout
        xs = xs * (torch.rand_like(xs) < keep).to(xs.dtype) / keep
    elif self.training and step.rate > 0:
        xs = F.dropout(xs, step.rate, training=True)
    if step.grouped:  # the add folded into the second matmul, as the fused LoRA linear does (src.engine.lora)
        hidden = torch.bmm(xs, a.transpose(1, 2)) * step.scales[:, entry.index, None, None].to(xs.dtype)
        base = result.reshape(count, length, entry.out_features)
        device = base.device.type
        if torch.is_autocast_enabled(device) and base.dtype != torch.get_autocast_dtype(device):
            # baddbmm would round an fp32 base output to the autocast dtype; the add keeps it
            return (base + torch.bmm(hidden, b.transpose(1, 2))).reshape(result.shape).to(result.dtype)
        if not torch.is_autocast_enabled(device):  # under autocast baddbmm casts its inputs itself
            base = base.to(hidden.dtype)
        return torch.baddbmm(base, hidden, b.transpose(1, 2)).reshape(result.shape).to(result.dtype)
    # a loop over the slots, each at its own rank: the kernels of peft's forward for a run alone
    ranks = [step.bank.ranks[slot][entry.index] for slot in step.slots]
    delta = torch.stack([_delta(xs[i], a[i], b[i], rank, step.scales[i, entry.index]) for i, rank in enumerate(ranks)])
    return (result + delta.reshape(result.shape)).to(result.dtype)


def _by_example(layer, step: JointStep, entry: BankLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """A joint step's LoRA layer over pooled examples (``x``'s first dimension, slot by slot in ``step.examples``):
    each slot's examples through its own adapter."""
    pieces, start = [], 0
    weights_a, weights_b = step.lora(entry)
    for i, (slot, count) in enumerate(zip(step.slots, step.examples)):
        part = x[start : start + count]
        start += count
        rank = step.bank.ranks[slot][entry.index]
        if rank == 0:
            pieces.append(torch.zeros_like(result[start - count : start]))
            continue
        a, b = weights_a[i], weights_b[i]
        part = part.to(a.dtype)
        if layer.training and step.bank.dropout[slot] > 0:
            part = F.dropout(part, step.bank.dropout[slot], training=True)
        pieces.append(_delta(part, a, b, rank, step.scales[i, entry.index]))
    return (result + torch.cat(pieces).to(result.dtype)).to(result.dtype)


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, scale) -> torch.Tensor:
    """One slot's LoRA term ``B(A(x)) * scale`` at its own rank (the bank's rows past it are zeros): the kernels
    of peft's forward for one adapter."""
    return F.linear(F.linear(x, a[:rank]), b[:, :rank]) * scale


def _one_slot(layer, step: OneSlot, entry: BankLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    bank, slot, adapter = step.bank, step.slot, step.adapter
    if slot is None:  # peft's own forward for one adapter: B(A(dropout(x))) * scaling
        if adapter is None or adapter not in layer.lora_A:
            return result
        a = layer.lora_A[adapter]
        x = x.to(a.weight.dtype)
        delta = layer.lora_B[adapter](a(layer.lora_dropout[adapter](x))) * layer.scaling[adapter]
        return (result + delta).to(result.dtype)
    if not bank.targeted[slot][entry.index]:
        return result
    a, b = bank._views(bank.weights[slot], entry)
    if bank.compute_dtype is not None:
        a, b = a.to(bank.compute_dtype), b.to(bank.compute_dtype)
    x = x.to(a.dtype)
    if layer.training and bank.dropout[slot] > 0:
        x = F.dropout(x, bank.dropout[slot], training=True)
    delta = _delta(x, a, b, bank.ranks[slot][entry.index], bank.scales[slot, entry.index])
    return (result + delta).to(result.dtype)


def bank_head_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A classification head's forward (peft's ``ModulesToSaveWrapper``), each trial's own copy read from the bank
    of the step running now: in a joint step, each slot's pooled examples (``x``'s rows, slot by slot) through its
    slot's head; for one trial, its slot's (or, once it left the bank, its peft copy); else the base's head."""
    step = _ACTIVE.step
    entry = None if step is None else step.bank.heads.get(self)
    if entry is None:
        return self.original_module(x, *args, **kwargs)
    bank = step.bank
    if isinstance(step, OneSlot):
        if step.slot is None:
            module = self.modules_to_save[step.adapter] if step.adapter is not None else self.original_module
            return module(x, *args, **kwargs)
        return _head(x, *bank.head_views(bank.weights[step.slot], entry))
    pieces, start = [], 0
    for i, count in enumerate(step.examples):
        pieces.append(_head(x[start : start + count], *step.head(entry, i)))
        start += count
    return torch.cat(pieces)


def _head(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A slot's classification head over ``x``, in ``x``'s dtype."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


# ---- the joint step ------------------------------------------------------------------------------------------------


@dataclass
class SlotRow:
    """One slot's micro-batch of a joint step, on the host except ``count`` (its window's label count)."""

    slot: int
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    bounds: tuple[int, ...]  # its examples' starts, and its end
    count: Any  # num_items_in_batch: the labels of the slot's accumulation window (a classifier: its loss total)
    last_token: Optional[torch.Tensor] = None  # a classifier's row: each example's last position, where it pools


@dataclass
class Submission:
    """One trial's micro-batch, handed to the pack's joint step by its trainer."""

    row: SlotRow
    stepping: bool  # its accumulation window ends with this micro-batch: its optimizer steps
    hyper: tuple[float, ...]  # lr, beta1, beta2, eps, weight decay, max grad norm (for SlotAdamW)
    autocast: Any  # the trainer's compute_loss_context_manager


def padded_length(rows: Sequence[SlotRow], multiple: int = 1) -> int:
    """One length for all the step's rows: the longest, plus one pad token, up to a multiple of ``multiple``."""
    longest = max(r.input_ids.shape[1] for r in rows) + 1
    return -(-longest // multiple) * multiple


def joint_inputs(rows: Sequence[SlotRow], length: int, pad_token_id: int) -> dict[str, Any]:
    """The rows laid end to end, each padded to ``length`` with one pad example (labels -100), with each slot's
    labels shifted within its own row, and every example's bounds."""
    ids, positions, shifted, bounds = [], [], [], [0]
    for i, row in enumerate(rows):
        tokens = row.input_ids.shape[1]
        pad = length - tokens
        ids.append(torch.cat([row.input_ids[0].cpu(), torch.full((pad,), pad_token_id, dtype=torch.long)]))
        positions.append(torch.cat([row.position_ids[0].cpu(), torch.arange(pad)]))
        labels = row.labels[0].cpu()
        shifted.append(torch.cat([labels[1:], torch.full((pad + 1,), -100, dtype=labels.dtype)]))
        start = i * length
        bounds += [start + b for b in row.bounds[1:]]
        if pad:
            bounds.append(start + length)
    return {
        "input_ids": torch.stack(ids).view(1, -1),
        "position_ids": torch.stack(positions).view(1, -1),
        "shift_labels": torch.stack(shifted),
        "bounds": tuple(bounds),
    }


def slot_losses(logits: torch.Tensor, shift_labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each slot's loss: its tokens' summed cross-entropy over its own label count (HF's ``ForCausalLMLoss`` with
    ``num_items_in_batch``). ``logits`` [1, slots x L, V], ``shift_labels`` [slots, L], ``counts`` [slots]."""
    slots, length = shift_labels.shape
    tokens = F.cross_entropy(
        logits.reshape(slots * length, -1).float(),
        shift_labels.reshape(-1).to(logits.device, non_blocking=True),
        ignore_index=-100,
        reduction="none",
    )
    return tokens.view(slots, length).sum(1) / counts


def joint_classification_inputs(rows: Sequence[SlotRow], length: int) -> dict[str, Any]:
    """A classifier's rows laid end to end, each padded to ``length`` with one pad example (token 0, never pooled):
    the ids and positions, every example's bounds, where each real example pools (its last token; its first, for
    BERT), their labels, and each slot's number of examples."""
    ids, positions, bounds, last, first, labels, examples = [], [], [0], [], [], [], []
    for i, row in enumerate(rows):
        tokens = row.input_ids.shape[1]
        pad = length - tokens
        start = i * length
        ids.append(torch.cat([row.input_ids[0].cpu(), torch.zeros(pad, dtype=torch.long)]))
        positions.append(torch.cat([row.position_ids[0].cpu(), torch.arange(pad)]))
        bounds += [start + b for b in row.bounds[1:]]
        if pad:
            bounds.append(start + length)
        last.append(row.last_token.cpu() + start)
        first += [start + b for b in row.bounds[:-1]]
        labels.append(row.labels.cpu())
        examples.append(len(row.bounds) - 1)
    return {
        "input_ids": torch.stack(ids).view(1, -1),
        "position_ids": torch.stack(positions).view(1, -1),
        "bounds": tuple(bounds),
        "last_token": torch.cat(last),
        "first_token": tuple(first),
        "labels": torch.cat(labels),
        "examples": examples,
    }


def slot_classification_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    examples: Sequence[int],
    weights: Optional[torch.Tensor],
    multilabel: bool,
    totals: torch.Tensor,
) -> torch.Tensor:
    """Each slot's loss: its examples' summed cross-entropy (class weights) or BCE (``pos_weight``) over its own
    total (:func:`src.classifier.loss_total` of its window), as :func:`src.classifier.classification_loss` gives a
    run alone. ``logits`` [examples, classes], slot by slot in ``examples``' counts."""
    logits = logits.float()
    labels = labels.to(logits.device, non_blocking=True)
    if weights is not None:
        weights = weights.to(logits.device)
    if multilabel:
        each = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights, reduction="none").sum(1)
    else:
        each = F.cross_entropy(logits, labels, weight=weights, reduction="none")
    owner = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(list(examples)))
    owner = owner.to(logits.device, non_blocking=True)
    summed = torch.zeros(len(examples), device=logits.device).index_add(0, owner, each)
    return summed / totals
