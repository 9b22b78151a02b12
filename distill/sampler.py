"""The epoch sampler: which samples each rank sees in one epoch, as a function of (seed, epoch) alone.

Exact resume rests on it: the data order never depends on anything a checkpoint would have to
store beyond the epoch and the batch within it.
"""
from __future__ import annotations

from typing import Iterator

import torch

def steps_per_epoch(size: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch, the same on every rank: full global batches only."""
    return size // (batch_size * world)


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's indices for one epoch: a (seed, epoch) permutation, sharded, optionally skipping ahead.

    The permutation is cut to whole global batches before sharding, so every rank yields exactly
    ``steps_per_epoch * batch_size`` indices: with uneven shards (15 images, 2 ranks, batch 4 gave
    2 and 1 steps) one rank would leave the epoch early and the others would hang in all-reduce.

    ``length``: samples per epoch (default ``size``); with fewer labelled images than that (a label
    budget), the labelled ones repeat in fresh permutations. ``mix``: further sources concatenated
    after the ``size`` labelled images, as (their size, share): that share of the epoch's slots
    (seeded) is drawn from each instead, so the epoch's length and the compute budget stay the same.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0,
                 batch_size: int = 1, mix: tuple[tuple[int, float], ...] = (), length: int | None = None):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        length = size if length is None else length
        total = steps_per_epoch(length, batch_size, world) * batch_size * world
        budget = length > size  # fewer labelled images than slots: they fill what the sources leave
        order = torch.full((total,), -1, dtype=torch.long) if budget else torch.randperm(size, generator=g)[:total]
        slots = torch.randperm(total, generator=g)
        offset, used = size, 0
        for n, share in mix:
            k = int(round(share * total))
            if n > 0 and k > 0:
                order[slots[used:used + k]] = offset + self._cycled(n, k, g)
                used += k
            offset += n
        if budget:  # in fresh permutations: every labelled image is seen equally often (+-1)
            rest = (order < 0).nonzero().flatten()
            order[rest] = self._cycled(size, len(rest), g)
        self.indices = order.tolist()[rank::world][skip:]

    @staticmethod
    def _cycled(n: int, k: int, g: torch.Generator) -> torch.Tensor:
        """``k`` indices below ``n``: whole permutations of range(n) one after another, cut to ``k``."""
        return torch.cat([torch.randperm(n, generator=g) for _ in range(-(-k // n))])[:k]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
