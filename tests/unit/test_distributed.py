"""DDP settings and GPU placement in process: nproc validation, pinned GPUs, the token-balanced sampler."""

from __future__ import annotations

import pytest
import torch

from src.config import ConfigError, validate
from src.sweeps.placement import assign_gpus, batch_size, gpu_batches, visible_gpus
from tests.conftest import compose_config

# 16 training rows, 4 per rank per step, one epoch: 2 optimizer steps under DDP on 2 ranks (4 without DDP).
DDP = [
    "train.nproc_per_node=2",
    "train.max_steps=-1",
    "train.num_train_epochs=1",
    "train.per_device_train_batch_size=4",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "data.subsample=16",
    "data.eval_subsample=8",
]


def test_nproc_per_node_is_validated():
    with pytest.raises(ConfigError, match=r"train.nproc_per_node: must be >= 1, got 0"):
        validate(compose_config(["train.nproc_per_node=0"]))
    with pytest.raises(ConfigError, match=r"train.nproc_per_node: expected int"):
        validate(compose_config(["train.nproc_per_node=two"]))
    assert validate(compose_config([])).train.nproc_per_node == 1


def test_ddp_jobs_get_their_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    gpus = visible_gpus()
    # One GPU per job, as before.
    assert batch_size(None, gpus) == 4 and assign_gpus(2, gpus) == ["3", "5"]
    # Two GPUs per job: half as many jobs at once, each on two GPUs of its own.
    assert batch_size(None, gpus, 2) == 2 and batch_size(8, gpus, 2) == 2 and batch_size(1, gpus, 2) == 1
    assert assign_gpus(2, gpus, [2, 2]) == ["3,5", "6,7"]
    assert assign_gpus(3, gpus, [1, 2, 1]) == ["3", "5,6", "7"]
    with pytest.raises(ValueError, match="need 6 GPUs but only 4"):
        assign_gpus(3, gpus, [2, 2, 2])
    # A grid with mixed sizes: consecutive jobs are batched while their GPUs fit.
    assert gpu_batches([1, 2, 2, 1, 4], 4, gpus) == [range(0, 2), range(2, 4), range(4, 5)]
    assert gpu_batches([2, 2, 2], 1, gpus) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="job #1 needs 8 GPUs"):
        gpu_batches([1, 8], 4, gpus)
    with pytest.raises(ValueError, match="needs 8 GPUs"):
        batch_size(None, gpus, 8)
    # CPU: nothing to pin; jobs run one at a time unless asked otherwise.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == [] and batch_size(None, [], 2) == 1
    assert assign_gpus(2, [], [2, 2]) == [None, None] and gpu_batches([2, 2], 2, []) == [range(0, 2)]


def test_one_process_trains_on_one_gpu_without_data_parallel(tmp_path):
    from transformers import TrainingArguments

    from src.distributed import one_gpu_per_process

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none")
    args._n_gpu = 2  # what a process that sees two GPUs outside torchrun gets: the Trainer would use DataParallel
    assert args.train_batch_size == 16
    assert one_gpu_per_process(args) is args
    assert args.n_gpu == 1 and args.train_batch_size == 8


def test_runs_record_the_gpus_they_were_pinned_to(monkeypatch):
    from src import tracking

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as the sweeper pins a parallel job
    assert tracking.process_tags()["cuda_visible_devices"] == "1"
    assert "gpus" not in tracking.device_tags()  # no CUDA in use here: the tag would start it, so it waits
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "cuda_visible_devices" not in tracking.device_tags()


def test_token_balanced_sampler_keeps_each_steps_examples_and_evens_the_ranks():
    """Under DDP the packed trainer deals each step's examples so the ranks get as many tokens (src.engine.sampler)."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from src.engine.sampler import TokenBalancedSampler

    rng = random.Random(0)
    lengths = [rng.randint(64, 256) for _ in range(100)]  # 6 full steps of 2 ranks x 8, and 4 left over
    sampler = TokenBalancedSampler(lengths, batch_size=8, world_size=2, seed=42)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        default = torch.randperm(100, generator=torch.Generator().manual_seed(42 + epoch)).tolist()  # accelerate's
        ranks = [list(BatchSamplerShard(BatchSampler(sampler, 8, False), 2, r)) for r in (0, 1)]  # as accelerate deals
        assert sorted(sampler) == list(range(100))  # every example once
        gaps, default_gaps = [], []
        for step in range(6):
            first, second = ranks[0][step], ranks[1][step]
            assert len(first) == len(second) == 8
            assert sorted(first + second) == sorted(default[16 * step : 16 * (step + 1)])  # the same examples
            gaps.append(abs(sum(lengths[i] for i in first) - sum(lengths[i] for i in second)))
            half, full = default[16 * step : 16 * step + 8], default[16 * step + 8 : 16 * (step + 1)]
            default_gaps.append(abs(sum(lengths[i] for i in half) - sum(lengths[i] for i in full)))
        assert max(gaps) <= max(lengths)  # greedy dealing: the ranks differ by less than one example
        assert sum(gaps) < sum(default_gaps) / 4, (gaps, default_gaps)
        assert list(sampler)[96:] == default[96:]  # the last, incomplete group keeps the default order


def test_packed_trainer_samples_token_balanced_only_under_ddp(monkeypatch):
    import types

    from datasets import Dataset

    from src.engine.sampler import TokenBalancedSampler
    from src.engine.trainer import FlatTrainer

    trainer = FlatTrainer.__new__(FlatTrainer)
    trainer.train_dataset = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 5, 7, 9)]})
    trainer.args = types.SimpleNamespace(
        train_sampling_strategy="random", data_seed=None, seed=7, per_device_train_batch_size=2
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, TokenBalancedSampler) and sampler.lengths == [3, 5, 7, 9] and sampler.seed == 7
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not isinstance(trainer._get_train_sampler(), TokenBalancedSampler)
