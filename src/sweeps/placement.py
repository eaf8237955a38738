"""Placement: parallel jobs get their own GPUs (``train.nproc_per_node`` each), through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from omegaconf import DictConfig, OmegaConf


def visible_gpus() -> list[str]:
    """GPU ids as CUDA_VISIBLE_DEVICES would name them (without creating a CUDA context)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def batch_size(requested: Optional[int], gpus: Sequence[str], gpus_per_job: int = 1) -> int:
    """Jobs to launch at once: as requested (default: as many as the GPUs hold, or 1 on CPU), never more
    than the GPUs hold at ``gpus_per_job`` each (``train.nproc_per_node``)."""
    if gpus and gpus_per_job > len(gpus):
        raise ValueError(f"a job needs {gpus_per_job} GPUs (train.nproc_per_node) but only {len(gpus)} are visible")
    fit = len(gpus) // gpus_per_job
    size = requested or max(1, fit)
    if size < 1:
        raise ValueError(f"the batch size must be >= 1, got {requested}")
    return min(size, fit) if gpus else size


def assign_gpus(
    num_jobs: int, gpus: Sequence[str], gpus_per_job: Optional[Sequence[int]] = None
) -> list[Optional[str]]:
    """Each job's CUDA_VISIBLE_DEVICES when launched together: disjoint GPUs, ``gpus_per_job[i]`` of them for
    job i (one each by default); None for all on CPU."""
    if not gpus:
        return [None] * num_jobs
    counts = list(gpus_per_job) if gpus_per_job is not None else [1] * num_jobs
    if sum(counts) > len(gpus):
        raise ValueError(
            f"{num_jobs} parallel jobs need {sum(counts)} GPUs but only {len(gpus)} are visible: jobs would share a GPU"
        )
    starts = [sum(counts[:i]) for i in range(num_jobs)]
    return [",".join(gpus[start : start + count]) for start, count in zip(starts, counts)]


def gpu_batches(gpus_per_job: Sequence[int], size: int, gpus: Sequence[str]) -> list[range]:
    """Consecutive jobs to launch together: at most ``size`` at once, and on GPUs only as many as the GPUs
    hold (job i takes ``gpus_per_job[i]``). A job that needs more GPUs than are visible is an error."""
    batches: list[range] = []
    start = 0
    while start < len(gpus_per_job):
        end, used = start, 0
        while end < len(gpus_per_job) and end - start < size:
            need = gpus_per_job[end]
            if gpus and need > len(gpus):
                raise ValueError(
                    f"job #{end} needs {need} GPUs (train.nproc_per_node) but only {len(gpus)} are visible"
                )
            if gpus and used + need > len(gpus):
                break
            end, used = end + 1, used + need
        batches.append(range(start, end))
        start = end
    return batches


def job_processes(config_loader, config: DictConfig, overrides: Sequence[str]) -> int:
    """``train.nproc_per_node`` of one job (its GPUs), composed as the launcher will compose it."""
    job = config_loader.load_sweep_config(config, list(overrides))
    value = OmegaConf.select(job, "train.nproc_per_node")  # an invalid value fails the job at its validation
    return value if isinstance(value, int) and value > 1 else 1
