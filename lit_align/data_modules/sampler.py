"""Length-grouped, seeded, resumable batch sampling."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so padding stays small, in a shuffled order that depends only on (seed, epoch).

    Indices are shuffled, cut into windows of ``batch_size * group_window`` examples, sorted by length inside each window,
    cut into batches, and the batches shuffled. With ``group_by_length=False`` batches are plain shuffled slices.

    Data-parallel sharding (``num_replicas``/``rank``): the order is cut into *global* batches of
    ``batch_size * num_replicas`` examples (grouped by length at that size) and rank ``r`` takes the ``r``-th slice of
    ``batch_size`` examples of every global batch. So N processes with ``batch_size=B`` see, step for step, exactly the
    examples one process with ``batch_size=N*B`` sees, and DDP's averaged gradient is that of the doubled batch up to
    the loss reduction (a mean of per-rank losses; token means are rescaled for it, see docs/scaling.md). A last,
    incomplete global batch is dropped when shuffling (training), so every step's global batch is full and all ranks
    step together; without shuffling (evaluation) it is split as evenly as possible between the ranks, so no example
    is lost (dropped only when it has fewer examples than ranks). Lightning must not re-wrap this sampler with its own distributed sampler:
    train with ``trainer.use_distributed_sampler=false`` (passing a sampler as ``lengths`` is refused with that advice).

    Resuming mid-epoch: ``skip_batches(n)`` makes the next iteration start after the first ``n`` batches of the
    epoch's order; Lightning restores the epoch through ``set_epoch``, so a resumed run sees the same batches as an
    uninterrupted one.

    Token-weighted gradient accumulation (``target_tokens``: per example, the number of tokens its loss averages
    over, or a function giving them, called when first needed): with ``accumulation()[0]`` > 1 micro-batches per step,
    every batch is a :class:`TaggedBatch` whose ``window_tokens`` is the target-token count of its whole
    accumulation window, i.e. of the ``accumulation()[0]`` consecutive global batches of the epoch it belongs to (every
    rank's share; windows start at the epoch's first batch, as Lightning's do, and the last one ends with the epoch,
    cut to ``accumulation()[1]`` batches when given, as ``limit_train_batches`` cuts it). A token-mean loss divided
    by it weighs every token of an optimizer step the same, however the step's tokens fall into micro-batches and
    processes. ``accumulation`` is read at each epoch's start (Lightning's GradientAccumulationScheduler may change it).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 group_by_length: bool = True, group_window: int = 50, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0, min_batches: int = 0,
                 target_tokens: Sequence[int] | Callable[[], Sequence[int]] | None = None,
                 accumulation: Callable[[], tuple[int, int | None]] | None = None) -> None:
        if isinstance(lengths, Sampler):
            raise TypeError(
                "LengthGroupedBatchSampler got a sampler instead of example lengths: Lightning tried to inject its "
                "distributed sampler. This batch sampler already shards batches across processes; run data-parallel "
                "training with `--trainer.use_distributed_sampler false` (Trainer(use_distributed_sampler=False))")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.min_batches = min_batches
        """Yield empty batches after the real ones up to this many: evaluation shards of different sizes then give
        every process as many steps (needed where every forward pass is collective: FSDP, DeepSpeed ZeRO-3)."""
        self._target_tokens = target_tokens
        if target_tokens is not None and not callable(target_tokens):
            self._target_tokens = self._checked(target_tokens)
        self.accumulation = accumulation
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (every rank's examples), in training order."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        size = self.batch_size * self.num_replicas  # one global batch: what all ranks together train on per step
        if self.group_by_length:
            window = size * self.group_window
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=lambda j: self.lengths[j], reverse=True)]
        batches = [order[s:s + size] for s in range(0, len(order), size)]
        if batches and len(batches[-1]) < size and (self.drop_last or self._drops_remainder(len(batches[-1]))):
            batches.pop()
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def windows(self) -> tuple[int, int | None] | None:
        """(micro-batches per optimizer step, batches the epoch trains on or None for all) when training batches are
        tagged with their window's target tokens, else None (no ``target_tokens``, or one micro-batch per step)."""
        every, limit = self.accumulation() if self.accumulation is not None else (1, None)
        if self._target_tokens is None or int(every) <= 1:
            return None
        return int(every), None if limit is None else int(limit)

    def _all_batches(self) -> list[list[int]]:
        batches = self.global_batches()
        windows = self.windows()
        if windows is None:  # one micro-batch per step: nothing to tag
            return [self._rank_slice(b) for b in batches]
        sums: dict[int, int] = {}
        return [self.tagged(batches, i, *windows, cache=sums) for i in range(len(batches))]

    def _checked(self, targets: Sequence[int]) -> list[int]:
        if len(targets) != len(self.lengths):
            raise ValueError(f"target_tokens has {len(targets)} entries for {len(self.lengths)} examples")
        return list(targets)

    def _counted_targets(self) -> list[int]:
        """The per-example target tokens (counted once, when first needed, if given as a function)."""
        if callable(self._target_tokens):
            self._target_tokens = self._checked(self._target_tokens())
        return self._target_tokens

    def tagged(self, batches: Sequence[list[int]], i: int, every: int, limit: int | None,
               cache: dict[int, int] | None = None) -> TaggedBatch:
        """This rank's slice of global batch ``batches[i]``, tagged with the target tokens of its accumulation window
        (every rank's): the ``every`` batches from the window's start, cut at ``limit`` batches (the epoch's
        trained ones) when given. ``cache`` keeps window sums between calls over the same ``batches``."""
        start = i - i % every
        cache = {} if cache is None else cache
        if start not in cache:
            targets = self._counted_targets()
            trained = len(batches) if limit is None else min(len(batches), limit)
            end = min(start + every, trained if start < trained else len(batches))
            cache[start] = sum(targets[j] for b in batches[start:end] for j in b)
        return TaggedBatch(self._rank_slice(batches[i]), cache[start])

    def _drops_remainder(self, remainder: int) -> bool:
        return self.num_replicas > 1 and (self.shuffle or remainder < self.num_replicas)

    def _rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's share of one global batch: ``batch_size`` examples, or an even share of a short last batch."""
        if len(batch) == self.batch_size * self.num_replicas:
            lo = self.rank * self.batch_size
            return batch[lo:lo + self.batch_size]
        base, extra = divmod(len(batch), self.num_replicas)
        lo = self.rank * base + min(self.rank, extra)
        return batch[lo:lo + base + (self.rank < extra)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        skip, self._skip = self._skip, 0
        yield from batches[skip:]
        for _ in range(max(self.min_batches - len(batches), 0)):
            yield []

    def __len__(self) -> int:
        full, remainder = divmod(len(self.lengths), self.batch_size * self.num_replicas)
        keeps_remainder = remainder > 0 and not self.drop_last and not self._drops_remainder(remainder)
        return max(full + keeps_remainder, self.min_batches)


class TaggedBatch(list):
    """A list (a batch's indices, then its examples) carrying ``window_tokens``: the target tokens of its accumulation
    window over every process (see :class:`LengthGroupedBatchSampler`). ``ListDataset`` and the DataModules' collate
    pass the tag on, so it reaches the module as ``batch["window_tokens"]``."""

    def __init__(self, items, window_tokens: int) -> None:
        super().__init__(items)
        self.window_tokens = int(window_tokens)
