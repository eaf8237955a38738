"""CUDA graphs: each packed micro-batch's forward and backward replayed as one graph per padded row length; and
the flat trainers' token count kept off the GPU (:class:`HostTokenCount`), so that no step waits for the last."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import torch

from src.engine.attention import seq_bounds
from src.engine.weights import quantized_layers
from src.logger import say

GRAPH_BUCKET_TOKENS = 256  # flat rows are padded up to a multiple of this: one captured graph per length


def graphable(
    args, attention: str, gradient_accumulation_steps: int, bits: int, dequantized_layers: int, model
) -> bool:
    """Whether a packed step can replay as a CUDA graph: a GPU, bf16 (not fp16), varlen attention, one micro-batch
    an optimizer step, and a 16- or 4-bit base, or an 8-bit one whose every bitsandbytes layer is cached (its int8
    matmul finds its outliers on the host; an FP8 base, src.fp8, has none)."""
    return (
        torch.cuda.is_available()
        and args.bf16
        and not args.fp16
        and attention == "varlen"
        and gradient_accumulation_steps == 1
        and (bits in (4, 16) or dequantized_layers == len(quantized_layers(model, 8)))
    )


class HostTokenCount:
    """Mixed into a flat-batch Trainer: the tokens it has seen counted on the host, and summed over the ranks only
    when it logs.

    transformers' own count (``include_num_input_tokens_seen``) moves each micro-batch's count to the GPU, gathers
    it and reads it back: a host sync every step, after which the CPU can only queue the next step once this one has
    run (the GPU idled; benchmarks/results/BENCH_RESULTS.md, run 5). A flat row has no padding, so every token of
    ``input_ids`` counts, and ``inputs`` is still the host batch where the Trainer counts them. The SFT fast path,
    the flat classifier and a pack's trials all count this way."""

    _unlogged_tokens = 0  # this rank's tokens since the last log

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen != "no" and "input_ids" in inputs:
            self._unlogged_tokens += int(inputs["input_ids"].numel())

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        from src import distributed

        if self._unlogged_tokens or distributed.world_size() > 1:  # every rank logs at the same steps
            count = torch.tensor(self._unlogged_tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum())
            self._unlogged_tokens = 0
        super().log(logs, start_time)


def pad_row(inputs: dict[str, Any], length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat row's ``input_ids`` and ``position_ids`` on the host, padded to ``length`` with one more example
    (``pad_token_id`` at positions 0, 1, ...), which attends only to itself."""
    ids, positions = inputs["input_ids"].cpu(), inputs["position_ids"].cpu()
    pad = length - ids.shape[1]
    return (
        torch.cat([ids, torch.full((1, pad), pad_token_id, dtype=ids.dtype)], dim=1),
        torch.cat([positions, torch.arange(pad, dtype=positions.dtype)[None]], dim=1),
    )


class GraphedSteps:
    """Forward and backward of a packed micro-batch as one CUDA graph replay, per padded row length.

    A small step is bound by the CPU: eager PyTorch launches ~5,000 kernels (norms, rotary
    embeddings, every adapter's dropout/matmuls/scale/add, their backward) for ~20 TFLOP of work.
    A CUDA graph launches them all at once. Graphs need fixed shapes, so a flat row is padded up to
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
    (:func:`build_flat_sft_trainer`).

    Under DDP (``world_size`` > 1) the graph runs the model without its DDP wrapper, whose hooks
    would put NCCL calls into the capture; each rank captures its own lengths. As
    ``Trainer.compute_loss`` does under DDP, the loss is multiplied by the world size
    (``num_items_in_batch`` counts every rank's tokens); :meth:`FlatTrainer.training_step` then
    averages the gradients over the ranks. DDP keeps the parameters' gradient accumulators alive,
    bound to the stream it was built on, and a capture on any other stream fails; so under DDP the
    warm-up and capture run on ``stream``, the stream :meth:`FlatTrainer.train` trains on (and
    builds DDP on), as PyTorch's notes on graphs with DDP prescribe.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_examples: int,
        bucket: int = GRAPH_BUCKET_TOKENS,
        world_size: int = 1,
    ):
        # (model, inputs, num_items_in_batch) -> the step's loss, or None for the model's own: the trainer's fused
        # loss (train.fused_loss), set by build_flat_sft_trainer
        self.loss: Optional[Callable[..., Optional[torch.Tensor]]] = None
        self.pad_token_id = pad_token_id
        self.max_examples = max_examples
        self.bucket = bucket
        self.world_size = world_size
        self.graphs: dict[Any, dict[str, Any]] = {}
        self.pool = None
        self.stream: Optional[torch.cuda.Stream] = None  # where to capture; None: a new side stream
        self.failed: Optional[str] = None  # why capture failed; the steps then run eagerly

    def padded_length(self, tokens: int) -> int:
        return -(-(tokens + 1) // self.bucket) * self.bucket  # at least one pad token: the pad example is never empty

    def _inputs(self, inputs: dict[str, Any], length: int, num_items_in_batch=None) -> dict[str, torch.Tensor]:
        """The row padded to ``length``, its offsets and the loss's divisor: the graph's inputs, on the host."""
        ids, positions = pad_row(inputs, length, self.pad_token_id)
        labels = inputs["labels"].cpu()
        bounds = list(seq_bounds(inputs["position_ids"].cpu()))
        offsets = bounds + [length] * (self.max_examples + 2 - len(bounds))
        pad = length - labels.shape[1]
        return {
            "input_ids": ids,
            "position_ids": positions,
            "labels": torch.cat([labels, torch.full((1, pad), -100, dtype=labels.dtype)], dim=1),
            "flat_cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
            "num_items_in_batch": torch.as_tensor(num_items_in_batch),
        }

    def summary(self) -> dict[str, Any]:
        """What was captured (the graphs' keys) and why capture failed, if it did: for a bench's report."""
        return {"lengths": sorted(self.graphs), "failed": self.failed}

    def _key(self, inputs: dict[str, Any], length: int) -> Any:
        """Which captured graph replays the row: one per padded length."""
        return length

    def accepts(self, inputs: dict[str, Any]) -> bool:
        """A flat row (no padding mask) with at most ``max_examples`` examples."""
        if "attention_mask" in inputs or "position_ids" not in inputs:
            return False
        return int((inputs["position_ids"][0] == 0).sum()) <= self.max_examples

    def _forward_backward(self, model, static: dict[str, torch.Tensor], max_seqlen: int) -> torch.Tensor:
        inputs = {
            "input_ids": static["input_ids"],
            "position_ids": static["position_ids"],
            "labels": static["labels"],
            "flat_cu_seqlens": static["flat_cu_seqlens"],
            "flat_max_seqlen": max_seqlen,
        }
        loss = None if self.loss is None else self.loss(model, inputs, static["num_items_in_batch"])
        if loss is None:
            loss = model(**inputs, num_items_in_batch=static["num_items_in_batch"], use_cache=False).loss
        loss = loss if self.world_size == 1 else loss * self.world_size
        loss.backward()
        return loss.detach()

    def _capture(self, model, host: dict[str, torch.Tensor], length: int) -> dict[str, Any]:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        static = {k: v.detach().to(device, copy=True) for k, v in host.items()}  # the graph's own input tensors
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

    def step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> Optional[torch.Tensor]:
        """Forward and backward of one flat row; the gradients are on the parameters afterwards.

        None where the graph could not be captured (the caller then runs the step eagerly).
        """
        length = self.padded_length(inputs["input_ids"].shape[1])
        host = self._inputs(inputs, length, num_items_in_batch)
        key = self._key(inputs, length)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(model, host, length)
            except torch.OutOfMemoryError:  # the step does not fit: the run fails as an eager step's OOM would
                raise
            except RuntimeError as exc:  # e.g. an op that syncs with the host: train eagerly from here on
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            if self.failed is not None:
                say(f"note: CUDA graph capture failed, training eagerly ({self.failed})", logging.WARNING)
                for p in model.parameters():
                    p.grad = None
                return None
            self.graphs[key] = entry
        static = entry["static"]
        for key, value in host.items():
            static[key].copy_(value, non_blocking=True)
        entry["graph"].replay()
        for p, g in zip(entry["params"], entry["grads"]):
            p.grad = g
        return entry["loss"]
