"""Margin-based resampling (the adversarial report's IADPO): train more often on the pairs the policy finds hard.

Every ``every_n_epochs`` epochs (or ``every_n_steps`` optimizer steps) the callback scores every training pair with
the current policy: its margin is the chosen implicit reward minus the rejected one (``module.example_margins``). The
margins become sampling probabilities ``p = softmax(-margin / temperature)``, so a low-margin (hard) pair gets more
weight, and each following epoch draws its batches from them, with replacement.

Batch level (the default, as in the report): the training set is cut into groups of one batch each, a group is scored
by the mean margin of its pairs, and whole groups are drawn. Every group mixes topics (families: the task id's second
field, e.g. ``suite/loops/...`` -> loops; the whole source id otherwise), so resampling cannot collapse an epoch onto
a single hard family. ``grouping="margin"`` (the default) re-forms the groups at every rescoring by difficulty *within*
each family: each pair gets its rank quantile among its family's margins and groups are cut from the pairs ordered by
that quantile, so one group holds the hardest pairs of every family together, and hard groups are drawn more often.
``grouping="family"`` cuts fixed groups once by dealing each family's pairs round-robin; ``grouping="sampler"`` uses
the DataModule's length-grouped batches (less padding, topics mixed only by chance). A fixed group is a random mix of
easy and hard pairs: the draw repeats the groups that happen to hold more hard pairs, easy ones included, and sees the
hard pairs of the other groups less (slower than uniform sampling in BENCHMARKS.md, while "margin" and "example" were
faster). ``level="example"`` draws pairs one at a time and cuts the draw into batches instead.

The epoch keeps its number of batches, so ``max_steps`` and the learning-rate schedule do not change. Draws are seeded
by (seed, epoch): a resumed run (the probabilities are saved in the checkpoint) draws the same batches. The margin
distribution goes to TensorBoard as a histogram (other loggers get the summary scalars only), with the effective sample
size ``1 / sum(p^2)`` (the number of equally weighted examples the distribution is worth).

Under data parallelism every process scores the whole training set (the same weights and data give the same margins),
so every process draws the same schedule and takes its own share of each batch.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

Level = Literal["batch", "example"]
Grouping = Literal["family", "sampler", "margin"]


# ---------------------------------------------------------------------------------------------------- pure math
def resampling_probabilities(margins: Tensor, temperature: float) -> Tensor:
    """``softmax(-margins / temperature)``: the lower the margin, the higher the probability (float64, sums to 1)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(-margins.double() / temperature, dim=0)


def effective_sample_size(probs: Tensor) -> float:
    """``1 / sum(p^2)``: n for the uniform distribution over n items, 1 when all the mass is on one item."""
    return float(1.0 / probs.double().pow(2).sum())


def group_means(values: Tensor, groups: list[list[int]]) -> Tensor:
    """Mean of ``values`` over each group of indices, (len(groups),)."""
    return torch.stack([values[torch.as_tensor(g, dtype=torch.long)].mean() for g in groups])


def family_of(source_id: str) -> str:
    """The topic of a pair: the family of a task-suite id (``suite/<family>/<template>/<param>``), else the id itself."""
    parts = source_id.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "suite" else source_id


def family_groups(source_ids: list[str], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Indices cut into groups of ``batch_size`` that mix families: each family shuffled, then dealt round-robin."""
    by_family: dict[str, list[int]] = {}
    for i, sid in enumerate(source_ids):
        by_family.setdefault(family_of(sid), []).append(i)
    gen = torch.Generator().manual_seed(seed)
    queues = [[members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
              for _, members in sorted(by_family.items())]
    order: list[int] = []
    depth = max((len(q) for q in queues), default=0)
    for d in range(depth):
        order += [q[d] for q in queues if d < len(q)]
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def margin_groups(source_ids: list[str], margins: Tensor, batch_size: int) -> list[list[int]]:
    """Groups of ``batch_size`` of similar difficulty that mix families: every pair is keyed by its rank quantile among
    its family's margins (lowest first), pairs are ordered by that key (families interleaved at equal keys) and cut."""
    by_family: dict[str, list[int]] = {}
    for i, sid in enumerate(source_ids):
        by_family.setdefault(family_of(sid), []).append(i)
    keyed: list[tuple[float, int, int]] = []
    for f, (_, members) in enumerate(sorted(by_family.items())):
        ranked = sorted(members, key=lambda i: (float(margins[i]), i))
        keyed += [((r + 0.5) / len(ranked), f, i) for r, i in enumerate(ranked)]
    order = [i for _, _, i in sorted(keyed)]
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def draw_schedule(probs: Tensor, groups: list[list[int]] | None, num_batches: int, batch_size: int,
                  generator: torch.Generator) -> list[list[int]]:
    """``num_batches`` batches drawn with replacement: whole groups (``groups`` given, ``probs`` per group) or single
    examples (``groups`` None, ``probs`` per example) cut into batches of ``batch_size``."""
    if groups is not None:
        picks = torch.multinomial(probs.float(), num_batches, replacement=True, generator=generator).tolist()
        return [list(groups[i]) for i in picks]
    picks = torch.multinomial(probs.float(), num_batches * batch_size, replacement=True, generator=generator).tolist()
    return [picks[s:s + batch_size] for s in range(0, len(picks), batch_size)]


# ---------------------------------------------------------------------------------------------------- callback
class MarginResampling(L.Callback):
    """Resample the training batches from ``softmax(-margin / temperature)`` of the current policy's reward margins.

    Needs a module with ``example_margins(batch)`` (DPO and its subclasses) and a DataModule with ``train_items``,
    ``collate`` and ``set_train_schedule`` (:class:`~lit_align.data_modules.preference.PreferenceDataModule`).

    Args:
        temperature: softmax temperature over negative margins, > 0; small values focus on the hardest pairs,
            large ones approach uniform sampling.
        level: "batch" draws whole fixed batches scored by their mean margin (topic mix kept); "example" draws pairs.
        grouping: how the batches are formed for level "batch": "margin" re-forms them at every rescoring from each
            family's pairs of similar margin rank (families mixed, difficulty grouped); "family" mixes task families
            in fixed batches; "sampler" uses the DataModule's length-grouped batches (fixed).
        every_n_epochs: rescore at the end of every n-th training epoch.
        every_n_steps: rescore every n optimizer steps instead (the new draw applies to the rest of the epoch).
        score_batch_size: pairs per forward pass when scoring (default: the DataModule's eval_batch_size).
        seed: seed of the draws (each epoch draws with seed and epoch number).
    """

    def __init__(self, temperature: float = 1.0, level: Level = "batch", grouping: Grouping = "margin",
                 every_n_epochs: int = 1, every_n_steps: int | None = None, score_batch_size: int | None = None,
                 seed: int = 0) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"MarginResampling temperature must be a finite number > 0 (softmax(-margin / temperature)),"
                             f" got temperature={temperature!r}")
        if level not in ("batch", "example"):
            raise ValueError(f"MarginResampling level must be 'batch' or 'example', got {level!r}")
        if grouping not in ("family", "sampler", "margin"):
            raise ValueError(f"MarginResampling grouping must be 'family', 'sampler' or 'margin', got {grouping!r}")
        if every_n_epochs < 1:
            raise ValueError(f"MarginResampling every_n_epochs must be >= 1, got {every_n_epochs}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"MarginResampling every_n_steps must be >= 1 or null, got {every_n_steps}")
        if score_batch_size is not None and score_batch_size < 1:
            raise ValueError(f"MarginResampling score_batch_size must be >= 1 or null, got {score_batch_size}")
        self.temperature = float(temperature)
        self.level = level
        self.grouping = grouping
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.score_batch_size = score_batch_size
        self.seed = seed
        self.groups: list[list[int]] | None = None
        self.probs: Tensor | None = None
        self.margins: Tensor | None = None
        self.history: list[dict[str, float]] = []

    # -- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, pl_module: L.LightningModule, datamodule) -> Tensor:
        """Every training pair's margin with the current policy, (N,), in the order of ``datamodule.train_items``."""
        if not hasattr(pl_module, "example_margins"):
            raise TypeError(f"MarginResampling needs a module with example_margins(batch) (DPO and its subclasses); "
                            f"{type(pl_module).__name__} has none")
        items = datamodule.train_items
        size = self.score_batch_size or datamodule.eval_batch_size
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)  # little padding per chunk
        margins = torch.empty(len(items), dtype=torch.float64)
        for s in range(0, len(order), size):
            chunk = order[s:s + size]
            out = pl_module.example_margins(datamodule.collate([items[i] for i in chunk]))
            margins[torch.as_tensor(chunk)] = out.detach().double().cpu()
        return margins

    def _groups(self, trainer: L.Trainer, datamodule) -> list[list[int]]:
        size = datamodule.batch_size * max(trainer.world_size, 1)  # one global batch per group
        items = datamodule.train_items
        if self.grouping == "family":
            return family_groups([it.source_id for it in items], size, seed=self.seed)
        from lit_align.data_modules.sampler import LengthGroupedBatchSampler

        sampler = LengthGroupedBatchSampler([datamodule.length(x) for x in items], size, shuffle=True,
                                            seed=datamodule.seed, group_by_length=datamodule.group_by_length)
        return list(sampler)

    def update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the training set, recompute the probabilities, log them, and redraw the current epoch's schedule."""
        datamodule = _datamodule(trainer)
        margins = self.score(pl_module, datamodule)
        if self.level == "batch" and self.grouping == "margin":
            size = datamodule.batch_size * max(trainer.world_size, 1)
            self.groups = margin_groups([it.source_id for it in datamodule.train_items], margins, size)
            self.probs = resampling_probabilities(group_means(margins, self.groups), self.temperature)
        elif self.level == "batch":
            if self.groups is None or sum(len(g) for g in self.groups) != len(margins):
                self.groups = self._groups(trainer, datamodule)
            self.probs = resampling_probabilities(group_means(margins, self.groups), self.temperature)
        else:
            self.groups = None
            self.probs = resampling_probabilities(margins, self.temperature)
        self.margins = margins
        self._log(trainer, margins)
        self.apply(trainer, trainer.current_epoch + (0 if self.every_n_steps else 1))

    def apply(self, trainer: L.Trainer, epoch: int) -> None:
        """Give the DataModule the schedule of ``epoch`` drawn from the current probabilities (no-op before any)."""
        if self.probs is None:
            return
        datamodule = _datamodule(trainer)
        num_batches = _epoch_batches(datamodule)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        size = datamodule.batch_size * max(trainer.world_size, 1)
        datamodule.set_train_schedule(draw_schedule(self.probs, self.groups, num_batches, size, generator))

    def _log(self, trainer: L.Trainer, margins: Tensor) -> None:
        ess = effective_sample_size(self.probs)
        stats = {"resampling/ess": ess, "resampling/ess_fraction": ess / len(self.probs),
                 "resampling/margin_mean": float(margins.mean()), "resampling/margin_min": float(margins.min()),
                 "resampling/margin_max": float(margins.max()), "resampling/p_max": float(self.probs.max())}
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **stats})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):  # TensorBoard's SummaryWriter
                experiment.add_histogram("resampling/margins", margins.float(), global_step=trainer.global_step)
                experiment.add_histogram("resampling/probabilities", self.probs.float(), global_step=trainer.global_step)

    # -- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            datamodule = _datamodule(trainer)
            if not hasattr(datamodule, "set_train_schedule"):
                raise TypeError(f"MarginResampling needs a DataModule with set_train_schedule (PreferenceDataModule); "
                                f"{type(datamodule).__name__} has none")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(trainer, trainer.current_epoch)  # a fresh draw per epoch; on resume, the restored probabilities

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.update(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.update(trainer, pl_module)

    _last_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "probs": self.probs, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = state_dict.get("groups")
        self.probs = state_dict.get("probs")
        self.history = list(state_dict.get("history", []))


def _datamodule(trainer: L.Trainer):
    datamodule = trainer.datamodule
    if datamodule is None:
        raise TypeError("MarginResampling needs the Trainer to be given a DataModule (trainer.fit(model, datamodule=...))")
    return datamodule


def _epoch_batches(datamodule) -> int:
    """Global batches per epoch of the DataModule's own sampler (the resampled epoch has as many)."""
    n = len(datamodule.train_items)
    return max(1, -(-n // datamodule.batch_size))


__all__ = ["MarginResampling", "draw_schedule", "effective_sample_size", "family_groups", "family_of", "group_means",
           "margin_groups", "resampling_probabilities"]
