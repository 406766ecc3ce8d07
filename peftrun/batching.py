"""Batch order for training: length-grouped batches, so dynamic padding pads little.

A plain shuffle puts a 60-token row beside 5-token rows, and the collator pads all of them to 60.
Grouping by length keeps the randomness of the shuffle at the scale of mega-batches: the shuffled rows
are cut into mega-batches of `mega` batches, each sorted by length, cut into batches, and the batches
are shuffled again. The order is a function of (seed, epoch) alone, so a resumed run sees the same one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Row indices whose consecutive runs of `batch_size` have similar lengths (full batches first, shuffled)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        full: list[list[int]] = []
        rest: list[int] = []
        for start in range(0, len(perm), size):
            group = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                (full.append(batch) if len(batch) == self.batch_size else rest.extend(batch))
        order = torch.randperm(len(full), generator=g).tolist()
        # the one short batch goes last, so the DataLoader cuts the stream where these batches end
        return [full[i] for i in order] + ([rest] if rest else [])

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
