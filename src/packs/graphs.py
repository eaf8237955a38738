"""CUDA graphs for a pack's joint step: the forward and backward over every live trial's SFT row, replayed as one graph.

Eager, a joint step queues every kernel of the base's forward and backward from the host, plus each LoRA layer's
batched matmuls, scales and dropout: thousands of launches a step. :class:`JointGraphs` captures the step once per
shape (which slots train, their padded row length, and what each slot's adapter looks like: its dropout rate and
the layers it targets) and replays it afterwards, as :class:`src.engine.graphs.GraphedSteps` replays a run alone's
step. What a graph reads each replay sits in its own static tensors: the joint row's tokens, positions, shifted
labels and example offsets, and each slot's label count. The bank's weights and scales are read where they live,
so a trial that joins a slot reuses a graph of its shape with its own weights.

A replay adds the step's gradient into the bank's ``.grad`` (allocated once, before the first capture), so that
trials accumulating several micro-batches a window work as eagerly; the optimizer step (:class:`SlotAdamW`) stays
eager. The first row of each shape runs eagerly (a warm-up on a side stream, whose result is the step's), then the
shape is captured for the next. If a capture fails (an op that waits on the host, or no memory left for the
graph), the graphs are dropped and the rest of the pack's steps run eagerly; :attr:`JointGraphs.failed` says why.
A pack graphs its steps with ``train.pack_cuda_graphs`` (every trial's), where a run alone's would be
(:func:`src.engine.graphs.graphable`: a GPU, bf16, varlen attention, a 16- or 4-bit base or a cached 8-bit one) and
no layer is checkpointed; classification steps stay eager.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING
from typing import Any, Optional

import torch

from src.logger import say
from src.packs import engine

MAX_GRAPHS = 64  # shapes captured at most; a pack whose slots change shape more often runs the rest eagerly


class JointGraphs:
    """A pack's SFT joint steps as CUDA graph replays, one graph per shape (see the module's docstring).

    ``max_examples``: the most examples a trial's row holds (its micro-batch size); a step with a longer one runs
    eagerly."""

    def __init__(self, model: torch.nn.Module, bank: engine.SlotBank, pad_token_id: int, max_examples: int):
        self.model, self.bank = model, bank
        self.pad_token_id = pad_token_id
        self.max_examples = max_examples
        self.graphs: dict[Any, dict[str, Any]] = {}
        self.pool = None
        self.failed: Optional[str] = None  # why capture failed; the steps then run eagerly
        self.replays = 0

    def _key(self, slots: tuple[int, ...], length: int) -> Any:
        bank = self.bank
        return slots, length, tuple((bank.dropout[s], tuple(bank.targeted[s])) for s in slots)

    def _inputs(self, rows: Sequence[engine.SlotRow], length: int) -> dict[str, torch.Tensor]:
        """The joint row (:func:`engine.joint_inputs`) with its offsets padded by empty examples to a fixed count."""
        joint = engine.joint_inputs(rows, length, self.pad_token_id)
        bounds = list(joint["bounds"])
        entries = len(rows) * (self.max_examples + 1) + 1  # every row's examples and its pad example, and 0
        return {
            "input_ids": joint["input_ids"],
            "position_ids": joint["position_ids"],
            "shift_labels": joint["shift_labels"],
            "cu_seqlens": torch.tensor(bounds + [bounds[-1]] * (entries - len(bounds)), dtype=torch.int32),
        }

    def step(
        self, rows: Sequence[engine.SlotRow], length: int, counts: torch.Tensor, autocast
    ) -> Optional[torch.Tensor]:
        """The joint step's forward and backward over ``rows``; each slot's loss (its gradient is in the bank's
        ``.grad``). None where this step must run eagerly (the caller runs it)."""
        slots = tuple(r.slot for r in rows)
        if self.failed is not None or any(len(r.bounds) - 1 > self.max_examples for r in rows):
            return None
        key = self._key(slots, length)
        entry = self.graphs.get(key)
        host = self._inputs(rows, length)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            return self._warm_up_and_capture(key, slots, host, length, counts, autocast)
        static = entry["static"]
        for name, value in host.items():
            static[name].copy_(value, non_blocking=True)
        static["counts"].copy_(counts)
        entry["graph"].replay()
        self.replays += 1
        return entry["losses"].clone()  # the next replay overwrites the static losses

    def _forward_backward(self, static: dict[str, torch.Tensor], slots, length: int, tensors, autocast):
        bank = self.bank
        with engine.active(engine.joint_step(bank, slots, length, tensors=tensors)):
            with autocast():
                logits = self.model(
                    input_ids=static["input_ids"],
                    position_ids=static["position_ids"],
                    use_cache=False,
                    flat_cu_seqlens=static["cu_seqlens"],
                    flat_max_seqlen=length,
                ).logits
            losses = engine.slot_losses(logits, static["shift_labels"], static["counts"])
            (grad,) = torch.autograd.grad(losses.sum(), bank.weights)
        bank.weights.grad.add_(grad)
        return losses.detach()

    def _warm_up_and_capture(self, key, slots, host, length: int, counts, autocast) -> torch.Tensor:
        """This shape's first step, run eagerly on a side stream (lazy initialization stays off the graph); then
        its capture, which runs nothing. The eager step's losses."""
        bank = self.bank
        device = bank.weights.device
        if bank.weights.grad is None:
            bank.weights.grad = torch.zeros_like(bank.weights)  # the replays add into this very tensor
        static = {name: value.to(device, copy=True) for name, value in host.items()}
        static["counts"] = counts.detach().clone()
        tensors = engine.step_tensors(bank, slots)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self._forward_backward(static, slots, length, tensors, autocast)
        torch.cuda.current_stream().wait_stream(side)
        losses = losses.clone()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream()
        try:
            # A capture runs nothing: the gradient the warm-up added is the step's. Thread-local: the other trials'
            # threads go on using CUDA meanwhile (a trial that left evaluates, one that joins builds its Trainer).
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                captured = self._forward_backward(static, slots, length, tensors, autocast)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # an op that waits on the host; no room for the graph
            self._give_up(exc, stream)
            return losses
        self.graphs[key] = {"graph": graph, "static": static, "losses": captured, "tensors": tensors}
        return losses

    def _give_up(self, exc: BaseException, stream) -> None:
        """A failed capture: this thread back on its own stream (``torch.cuda.graph`` leaves it on the capture
        stream when the capture fails), the pool's memory released, and eager steps from here on."""
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        self.graphs.clear()
        self.pool = None
        torch.cuda.empty_cache()
        self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        say(f"note: CUDA graph capture of the pack's joint step failed, training eagerly ({self.failed})", WARNING)

    def summary(self) -> str:
        if self.failed is not None:
            return f"CUDA graphs failed ({self.failed})"
        return f"{len(self.graphs)} CUDA graph(s) captured, {self.replays} replay(s)"
