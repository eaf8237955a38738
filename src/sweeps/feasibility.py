"""A sweep job's memory check (``hydra.sweeper.feasibility``): before a job trains, src.plan's estimate against the
GPU's free memory. A config that cannot fit is skipped (:class:`JobSkipped`), or with ``mode=shrink`` trained
with a smaller micro-batch and more gradient accumulation; on the fast path, which sizes its own micro-batches,
its memory budget is lowered to what is free. A trial pack too big for the GPU is split (:func:`fit_pack`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from src import console
from src.config import Config
from src.memory import PlanError, plan, plans_own_micro_batches
from src.sweeps.configs import FeasibilityConf
from src.sweeps.outcomes import JobSkipped


def check_feasibility(cfg: Config, feasibility: FeasibilityConf) -> tuple[Config, Optional[str]]:
    """Return the config to run (with a smaller micro-batch, or the fast path's memory budget, if needed) and a
    note saying what changed.

    Skipped on CPU unless ``available_gpu_mem_gb`` is given; a model whose config.json src.plan cannot read
    is run as is (run reports its own errors).
    """
    if feasibility.mode == "off":
        return cfg, None
    available = feasibility.available_gpu_mem_gb
    if available is None:
        available = free_gpu_mem_gb()
    if available is None:
        return cfg, None
    if plans_own_micro_batches(cfg):
        return _fit_budget(cfg, available)
    return _fit_micro_batch(cfg, available, shrink=feasibility.mode == "shrink")


def _fit_budget(cfg: Config, available: float) -> tuple[Config, Optional[str]]:
    """The packed fast path (SFT, decoder classifiers, BERT) sizes its own micro-batches and checkpointing to
    train.memory_budget_gb (src/engine/budget.py); its default is 90% of the card, whatever other processes
    hold: give it what is free."""
    budget = cfg.train.memory_budget_gb
    if budget is not None and budget <= available:
        return cfg, None
    try:
        least = plan(_least(cfg)).est_peak_gpu_mem_gb
    except PlanError as exc:
        console.log.warning(f"warning: feasibility check skipped: {exc}")
        least = 0.0
    if least > available:  # not even one example with every layer checkpointed: the run could only fail
        raise JobSkipped(
            f"needs ~{least:.2f} GiB of GPU memory at micro-batch 1 with every layer checkpointed, "
            f"{available:.2f} GiB free"
        )
    note = f"train.memory_budget_gb {budget} -> {available:.2f} (GiB free): the fast path plans within it"
    console.say(f"feasibility: {note}")
    return cfg.with_train(memory_budget_gb=round(available, 2)), note


def _fit_micro_batch(cfg: Config, available: float, shrink: bool) -> tuple[Config, Optional[str]]:
    """The largest micro-batch that fits (:func:`fit_micro_batch`), from src.plan's estimate."""
    train = cfg.train

    def estimate(micro_batch: int) -> float:
        return plan(cfg.with_train(per_device_train_batch_size=micro_batch)).est_peak_gpu_mem_gb

    try:
        micro_batch, grad_accum = fit_micro_batch(
            train.per_device_train_batch_size, train.gradient_accumulation_steps, available, estimate, shrink
        )
    except PlanError as exc:
        console.log.warning(f"warning: feasibility check skipped: {exc}")
        return cfg, None
    if (micro_batch, grad_accum) == (train.per_device_train_batch_size, train.gradient_accumulation_steps):
        return cfg, None
    note = (
        f"micro-batch {train.per_device_train_batch_size} -> {micro_batch}, gradient accumulation "
        f"{train.gradient_accumulation_steps} -> {grad_accum} to fit {available:.2f} GiB free"
    )
    console.say(f"feasibility: {note}")
    return cfg.with_train(per_device_train_batch_size=micro_batch, gradient_accumulation_steps=grad_accum), note


def fit_micro_batch(
    micro_batch: int, grad_accum: int, available_gb: float, estimate_gb: Callable[[int], float], shrink: bool
) -> tuple[int, int]:
    """The largest micro-batch (halving from ``micro_batch``) whose estimate fits ``available_gb``.

    Gradient accumulation grows so the effective batch stays at least ``micro_batch * grad_accum``.
    Raises JobSkipped when it does not fit, or would only fit smaller and ``shrink`` is false.
    """
    need = estimate_gb(micro_batch)
    if need <= available_gb:
        return micro_batch, grad_accum
    if not shrink:
        raise JobSkipped(f"needs ~{need:.2f} GiB of GPU memory, {available_gb:.2f} GiB free")
    effective = micro_batch * grad_accum
    while micro_batch > 1:
        micro_batch //= 2
        if estimate_gb(micro_batch) <= available_gb:
            return micro_batch, -(-effective // micro_batch)
    raise JobSkipped(
        f"needs ~{need:.2f} GiB of GPU memory ({estimate_gb(1):.2f} GiB at micro-batch 1), {available_gb:.2f} GiB free"
    )


def free_gpu_mem_gb() -> Optional[float]:
    """Free memory of this process's GPU in GiB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


def fit_pack(cfgs: list[Config], feasibility: FeasibilityConf, slots: Optional[int] = None) -> list[list[int]]:
    """The pack's jobs (by index) as consecutive packs that each fit the GPU's free memory at their least (one example
    per micro-batch, every layer checkpointed: ``src.memory``'s pack estimate, the base once, ``slots`` trials at
    once); all as one where no GPU is measured, the check is off, or the plan cannot be made. A job that does not fit
    even alone is a pack of one (its run then reports the memory error)."""
    from src.memory import pack_estimate_gb

    available = feasibility.available_gpu_mem_gb if feasibility.mode != "off" else None
    if available is None and feasibility.mode != "off":
        available = free_gpu_mem_gb()
    if available is None or len(cfgs) < 2:
        return [list(range(len(cfgs)))]
    try:
        least = [plan(_least(c)) for c in cfgs]
    except PlanError as exc:
        console.log.warning(f"warning: feasibility check of the pack skipped: {exc}")
        return [list(range(len(cfgs)))]
    groups: list[list[int]] = [[]]
    for i, result in enumerate(least):
        trial = [least[j].est_mem_breakdown_gb for j in groups[-1]] + [result.est_mem_breakdown_gb]
        if groups[-1] and pack_estimate_gb(trial, slots) > available:
            groups.append([])
        groups[-1].append(i)
    return groups


def _least(cfg: Config) -> Config:
    """The config at its least memory: one example per micro-batch, every layer checkpointed."""
    return cfg.with_train(per_device_train_batch_size=1, activation_checkpointing=True)
