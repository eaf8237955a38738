"""Token-balanced ranks under DDP: each optimizer step's examples, dealt so that every rank gets as many tokens."""

from __future__ import annotations

import torch


class TokenBalancedSampler(torch.utils.data.Sampler):
    """The default shuffled order, with each micro-batch slot's examples dealt so every rank gets as many tokens.

    Under DDP each optimizer step runs ``world_size`` micro-batches of ``batch_size`` examples at once,
    one per rank (accelerate's ``BatchSamplerShard`` deals consecutive batches of this order round-robin),
    and waits at the gradient all-reduce for the slowest. A flat row's time is proportional to its
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
