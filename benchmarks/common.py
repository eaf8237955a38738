"""What the bench's SFT and classification workloads share: the workload, the synthetic rows' tokenizer, the meter
and profiler of a side's steps, the memory readings and ``src.plan``'s estimate, and a side's result record.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from src import console

QUANT_GROUPS = {4: "4bit", 8: "8bit", 16: "none"}  # conf/quant/<group>.yaml by base bits
# The seed sides' checkpointing: reentrant, as peft's prepare_model_for_kbit_training(model) leaves it up to peft
# 0.21 (its default kwargs are empty, and torch's default is reentrant; peft 0.22 passes none, and transformers then
# picks non-reentrant: the independent recipe side, benchmarks/recipe.py, follows the installed peft). The seed sides
# used non-reentrant until 2026-12, whose hooks on every saved tensor add host work a step: a candidate for the 12% by
# which an independent run of the SFT recipe beat the bench's seed side on an H100 (issue 31). Not yet measured.
SEED_CHECKPOINTING = {"use_reentrant": True}


@dataclass(frozen=True)
class Workload:
    name: str
    model_group: str  # conf/model/<group>.yaml
    model_type: str  # llama | mistral | bert
    arch: dict
    bits: int
    lengths: tuple[int, int] = (64, 256)
    vocab_size: int = 32000
    task: str = "sft"  # or classification, multilabel: benchmarks.classification
    recipe: tuple[str, ...] = ()  # a classifier's project config: the overrides of its seed recipe
    fast: tuple[tuple[str, Any], ...] = ()  # train fields the fast side sets on a GPU
    seed_targets: tuple[str, ...] = ()  # the seed's LoRA targets; empty: every linear layer (seed 001's way)
    quant: str = ""  # the fast side's conf/quant group where the bits do not say it (fp8); the seed side's is the bits'

    @property
    def quant_group(self) -> str:
        return self.quant or QUANT_GROUPS[self.bits]


def bench_tokenizer():
    """A three-token tokenizer: the data are token ids already, the trainers only need the pad id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.pad_token = tokenizer.eos_token  # as modeling.load_tokenizer does for Llama
    return tokenizer


@dataclass
class Meter:
    """Tokens per optimizer step (from the collator, first in first out), timed from the end of the
    warm-up steps to the end of the last step.

    The Trainer collates every micro-batch of a step before the step ends (and may collate
    the next one early), so popping ``gradient_accumulation_steps`` counts per step is exact.
    The GPU is synchronized only at those two points: a sync at every step would stop the CPU from
    queuing the next step while the GPU runs this one, which a real run does not do.
    """

    warmup_steps: int
    device: str
    queue: deque = field(default_factory=deque)
    steps: int = 0
    tokens: int = 0
    timed_tokens: int = 0
    max_micro_batch_tokens: int = 0
    max_micro_batch_rows_x_len: int = 0
    t0: Optional[float] = None
    t_end: Optional[float] = None

    def wrap(self, collate):
        def collate_and_count(examples):
            batch = collate(examples)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            self.queue.append(real)
            self.max_micro_batch_tokens = max(self.max_micro_batch_tokens, real)
            self.max_micro_batch_rows_x_len = max(self.max_micro_batch_rows_x_len, int(batch["input_ids"].numel()))
            return batch

        return collate_and_count

    def _now(self) -> float:
        if self.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if meter.warmup_steps == 0:
                    meter.t0 = meter._now()

            def on_step_end(self, args, state, control, **kwargs):
                count = min(args.gradient_accumulation_steps, len(meter.queue))
                step_tokens = sum(meter.queue.popleft() for _ in range(count))
                meter.steps += 1
                meter.tokens += step_tokens
                if meter.steps == meter.warmup_steps:
                    meter.t0 = meter._now()
                elif meter.steps > meter.warmup_steps:
                    meter.timed_tokens += step_tokens
                    if state.global_step >= state.max_steps:
                        meter.t_end = meter._now()

            def on_train_end(self, args, state, control, **kwargs):
                if meter.t_end is None and meter.steps > meter.warmup_steps:
                    meter.t_end = meter._now()

        return _Callback()

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / max(self.t_end - self.t0, 1e-9)

    def gather(self) -> None:
        """Under DDP: the tokens of every rank, over the slowest rank's time (call on every rank)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if self.device != "cpu" else None
        counts = torch.tensor([self.tokens, self.timed_tokens], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        elapsed = torch.tensor([self.t_end - self.t0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        self.tokens, self.timed_tokens = int(counts[0]), int(counts[1])
        self.t0, self.t_end = 0.0, float(elapsed[0])


class StepProfiler:
    """``torch.profiler`` over up to ``steps`` optimizer steps of one side, from step ``start`` (after warm-up).

    Writes the operators by time (GPU time on CUDA) to ``path`` and returns the summary that goes into
    the JSON: the window's wall time per step, the GPU kernel time per step and their ratio (how busy
    the GPU was; None on CPU). A short run moves the window to its last steps. The profiled steps run
    slower than unprofiled ones; the side's tokens/s is not comparable.
    """

    def __init__(self, path: Path, start: int, device: str, steps: int = 8):
        self.path, self.start, self.steps, self.cuda = path, start, steps, device != "cpu"
        self.prof = None
        self.t0 = 0.0
        self.summary: dict[str, Any] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.start = max(0, min(outer.start, state.max_steps - outer.steps))

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == outer.start and outer.prof is None:
                    outer.begin()

            def on_step_end(self, args, state, control, **kwargs):
                done = state.global_step - outer.start
                last = done == outer.steps or state.global_step >= state.max_steps
                if outer.prof is not None and not outer.summary and last:
                    outer.end(done)

        return _Callback()

    def begin(self) -> None:
        """Start profiling (once the device's queued work is done)."""
        self._sync()
        acts = [torch.profiler.ProfilerActivity.CPU]
        acts += [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def end(self, steps: int) -> None:
        """Stop after ``steps`` steps (once their work is done); write the table and the summary."""
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.finish(wall, steps)

    def finish(self, wall: float, steps: int) -> None:
        kernel_us = sum(
            e.device_time
            for e in self.prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0
        )
        sort = "device_time_total" if self.cuda else "cpu_time_total"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.prof.key_averages().table(sort_by=sort, row_limit=60))
        self.summary = {
            "steps": steps,
            "wall_ms_per_step": 1000 * wall / steps,
            "gpu_kernel_ms_per_step": kernel_us / 1000 / steps if self.cuda else None,
            "gpu_busy": kernel_us / 1e6 / wall if self.cuda else None,
            "table": str(self.path),
        }
        console.say(f"profile: {self.summary}")


def reset_memory(device: str) -> float:
    if device == "cpu":  # nothing is measured: a full gc.collect would only cost time
        return 0.0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def peak_memory_gb(device: str) -> Optional[float]:
    return None if device == "cpu" else torch.cuda.max_memory_allocated() / 2**30


def timed_train(trainer, device: str) -> tuple[float, Optional[float]]:
    """Train; the wall seconds it took and the peak GPU memory (GiB; None on the CPU)."""
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, peak_memory_gb(device)


def plan_estimate_gb(cfg, rows: int, row_len: int, checkpointed: float, optim: str) -> Optional[float]:
    """src.plan's peak estimate for rows x row_len tokens, with a fraction of the layers checkpointed."""
    try:
        from src.memory import plan

        def peak(ckpt: bool) -> float:
            model = dataclasses.replace(cfg.model, max_length=max(1, row_len))
            train = dataclasses.replace(
                cfg.train, per_device_train_batch_size=rows, activation_checkpointing=ckpt, optim=optim
            )
            return plan(dataclasses.replace(cfg, model=model, train=train)).est_peak_gpu_mem_gb

        full = peak(False)
        return full if checkpointed == 0 else full - (full - peak(True)) * checkpointed
    except Exception as exc:  # the planner is optional here: report without it
        console.say(f"note: src.plan estimate unavailable ({type(exc).__name__}: {exc})")
        return None


def side_result(side, budget, meter: Meter, wall, peak, estimate, base, settings) -> dict[str, Any]:
    err = None if (estimate is None or not peak) else 100 * (estimate - peak) / peak
    return {
        "side": side,
        "budget_gb": budget,
        "tokens": meter.tokens,
        "timed_tokens": meter.timed_tokens,
        "steps": meter.steps,
        "tokens_per_s": meter.tokens_per_s,
        "wall_s": wall,
        "peak_gpu_mem_gb": peak,
        "mem_before_gb": base,
        "est_peak_gpu_mem_gb": estimate,
        "planner_error_pct": err,
        "max_micro_batch_tokens": meter.max_micro_batch_tokens,
        "max_micro_batch_rows_x_len": meter.max_micro_batch_rows_x_len,
        "settings": settings,
    }
