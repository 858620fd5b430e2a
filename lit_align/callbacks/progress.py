"""The command line's progress bar: Lightning's rich bar, with the training total right when ``max_steps`` bounds a run."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``, except for runs bounded by ``max_steps`` (``max_epochs`` unbounded, -1):

    - the epoch's total is the training batches left to run, not the optimizer steps left: each step takes
      ``accumulate_grad_batches`` batches, and an online objective's batch takes several steps
      (``optimizer_steps_per_batch``); Lightning counts one batch per step, so a run accumulating 2 showed "6/3";
    - the epoch reads "Epoch 0", not Lightning's "Epoch 0/-2";
    - a resumed run's total counts the batches its epoch had already run: Lightning's counter goes on from them
      (a run stopped after 5 of 8 steps and resumed read "8/3" at its end).

    And for every run, the logger's version reads "v_num: 3", not "v_num: 3.000" (the rich bar formats every number as
    a float).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_start: int | None = None  # batches the epoch had run when this process's first batch of it began

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = None
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._epoch_start is None:  # the counter's start is known only now (at the epoch's start it is stale)
            self._epoch_start = batch_idx
            if batch_idx and self.progress is not None and self.train_progress_bar_id is not None:
                self.progress.update(self.train_progress_bar_id, total=self.total_train_batches)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        if isinstance(metrics.get("v_num"), int):
            metrics["v_num"] = str(metrics["v_num"])
        return metrics

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if not (trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0):
            return trainer.num_training_batches
        remaining = max(trainer.max_steps - trainer.global_step, 0)
        module = trainer.lightning_module
        steps_per_batch = getattr(module, "optimizer_steps_per_batch", None)
        if not module.automatic_optimization and callable(steps_per_batch):
            batches = math.ceil(remaining / max(int(steps_per_batch()), 1))
        else:
            batches = remaining * trainer.accumulate_grad_batches
        return min(trainer.num_training_batches, (self._epoch_start or 0) + batches)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as wide as the validation bar's, no flicker


__all__ = ["ProgressBar"]
