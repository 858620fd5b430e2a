"""Length-grouped, seeded, resumable batch sampling."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so padding stays small, in a shuffled order that depends only on (seed, epoch).

    Indices are shuffled, cut into windows of ``batch_size * group_window`` examples, sorted by length inside each window,
    cut into batches, and the batches shuffled. With ``group_by_length=False`` batches are plain shuffled slices.
    ``num_replicas``/``rank`` shard the batches between data-parallel processes (each rank gets every
    ``num_replicas``-th batch; the batch count is rounded down so all ranks step together).

    Resuming mid-epoch: ``skip_batches(n)`` makes the next iteration start after the first ``n`` batches of the
    epoch's order; Lightning restores the epoch through ``set_epoch``, so a resumed run sees the same batches as an
    uninterrupted one.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 group_by_length: bool = True, group_window: int = 50, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            window = self.batch_size * self.group_window
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=lambda j: self.lengths[j], reverse=True)]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        usable = len(batches) // self.num_replicas * self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[self.rank:usable:self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        skip, self._skip = self._skip, 0
        yield from batches[skip:]

    def __len__(self) -> int:
        n = len(self.lengths)
        full = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return full // self.num_replicas if self.num_replicas > 1 else full
