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
eager.

Memory. Every graph draws on one private pool, which keeps what it takes: it holds about one joint step's
activations, the largest shape's. So that the pool is all the step needs:
- The pack pads its rows to multiples of :data:`src.engine.graphs.GRAPH_BUCKET_TOKENS` while graphs run
  (:attr:`JointGraphs.bucket`), as a run alone does: a row of 4 examples up to 512 tokens makes 8 lengths, where the
  eager step's 64-token multiples made 32. An H100 pack of 4 W3B trials captured 47 shapes that way and ran out of
  memory with 43 GiB in the pool.
- Only the first shape runs eagerly, as a warm-up on a side stream (lazy initialization stays off the graph); its
  result is the step's, and its cached memory goes back to the driver before the capture. Each later shape is
  captured first and replayed at once, so its step runs in the pool. A warm-up per shape put a second joint step's
  activations in the ordinary pool, beside the graphs' pool.

If a capture fails (an op that waits on the host, or no memory left for the graph), the graphs are dropped and the
rest of the pack's steps run eagerly; :attr:`JointGraphs.failed` says why. :meth:`JointGraphs.release` drops them
too, for the pack's fallback after an out-of-memory error (:meth:`src.packs.model.Pack._run_step`).
A pack graphs its steps with ``train.pack_cuda_graphs`` (every trial's), where a run alone's would be
(:func:`src.engine.graphs.graphable`: a GPU, bf16, varlen attention, a 16- or 4-bit base or a cached 8-bit one) and
no layer is checkpointed; classification steps stay eager.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING
from typing import Any, Optional

import torch

from src.engine.graphs import GRAPH_BUCKET_TOKENS
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
        self.warmed = False  # the first shape ran eagerly: later shapes are captured, then replayed
        self.bucket = GRAPH_BUCKET_TOKENS  # the pack pads its rows to a multiple of this while graphs run

    @property
    def running(self) -> bool:
        return self.failed is None

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
            if self.bank.weights.grad is None:
                self.bank.weights.grad = torch.zeros_like(self.bank.weights)  # the replays add into this very tensor
            if not self.warmed:
                return self._warm_up_and_capture(key, slots, host, length, counts, autocast)
            entry = self._capture(key, slots, host, length, counts, autocast)
            if entry is None:  # the capture failed: this step runs eagerly, as every later one
                return None
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
        """The first shape's step, run eagerly on a side stream (lazy initialization stays off the graph); then its
        capture, which runs nothing. The eager step's losses."""
        bank = self.bank
        static = self._static(host, counts)
        tensors = engine.step_tensors(bank, slots)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self._forward_backward(static, slots, length, tensors, autocast)
        torch.cuda.current_stream().wait_stream(side)
        losses = losses.clone()
        self.warmed = True
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's activations back to the driver, for the graphs' pool to take
        self._capture(key, slots, host, length, counts, autocast, static=static, tensors=tensors)
        return losses  # the gradient the warm-up added is the step's

    def _static(self, host: dict[str, torch.Tensor], counts: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.bank.weights.device
        static = {name: value.to(device, copy=True) for name, value in host.items()}
        static["counts"] = counts.detach().clone()
        return static

    def _capture(self, key, slots, host, length: int, counts, autocast, static=None, tensors=None):
        """Capture one shape's step into the shared pool (it runs nothing); its entry, or None where the capture
        failed (the graphs are then dropped)."""
        bank = self.bank
        static = self._static(host, counts) if static is None else static
        tensors = engine.step_tensors(bank, slots) if tensors is None else tensors
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream()
        try:
            # Thread-local: the other trials' threads go on using CUDA meanwhile (a trial that left evaluates, one
            # that joins builds its Trainer).
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                captured = self._forward_backward(static, slots, length, tensors, autocast)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # an op that waits on the host; no room for the graph
            torch.cuda.set_stream(stream)  # torch.cuda.graph leaves the thread on the capture stream when it fails
            self.release(exc)
            return None
        entry = self.graphs[key] = {"graph": graph, "static": static, "losses": captured, "tensors": tensors}
        return entry

    def release(self, exc: BaseException) -> None:
        """Drop the graphs and release their pool's memory; the pack's steps run eagerly from here on, and
        :attr:`failed` says why."""
        torch.cuda.synchronize()
        self.graphs.clear()
        self.pool = None
        torch.cuda.empty_cache()
        self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        say(f"note: CUDA graphs of the pack's joint step dropped, training eagerly ({self.failed})", WARNING)

    def summary(self) -> str:
        if self.failed is not None:
            return f"CUDA graphs failed ({self.failed})"
        return f"{len(self.graphs)} CUDA graph(s) captured, {self.replays} replay(s)"
