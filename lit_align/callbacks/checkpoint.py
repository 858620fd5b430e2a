"""The command line's checkpointing: Lightning's ``ModelCheckpoint``, which also says how to resume a run that stopped.

Every ``--checkpoint.*`` option is ``ModelCheckpoint``'s own. When a fit stops part way (Ctrl-C, an error, a
process that went away), the run's last lines name the checkpoint to resume from and its step, or say that none was
written yet and which option writes them more often. A resumed fit writes its checkpoints into its own version
directory, and says so once, in place of Lightning's warning that the checkpoint's directory "has changed".
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; a fit that stops part way ends with the ``--ckpt_path`` that resumes it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saved_step: int | None = None  # global step of the newest checkpoint this run wrote
        self.resumed_from_dir: str | None = None  # where the checkpoint this run resumed from keeps its siblings

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key, so that checkpoints written with either class resume with the other."""
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, without its warning when the checkpoint came from another directory: every resumed lit_align
        run does (a new version directory), and :meth:`on_train_start` says what that means instead."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            super().load_state_dict(state_dict)
        earlier = state_dict.get("dirpath")
        self.resumed_from_dir = earlier if earlier and earlier != self.dirpath else None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.resumed_from_dir is not None and self.dirpath is not None:
            ranked = "; save_top_k ranks this run's checkpoints only" if self.monitor and self.save_top_k > 0 else ""
            rank_zero_info(f"lit_align: this run writes its checkpoints to {self.dirpath}; those of the run it resumes "
                           f"stay in {self.resumed_from_dir}{ranked}")

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # only this callback's saves: not a user's trainer.save_checkpoint
        self.saved_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)  # save_on_exception, when it is set
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # refused or failed before training: nothing to resume
        stopped = f"lit_align: the run stopped at step {trainer.global_step}"
        path = self.last_model_path or self.best_model_path
        if path and self.saved_step is not None:
            rank_zero_info(f"{stopped}; its newest checkpoint is {path} (step {self.saved_step}): the same command "
                           f"with --ckpt_path {path} resumes from there")
        else:
            rank_zero_info(f"{stopped} before writing a checkpoint (--checkpoint.every_n_train_steps N writes one "
                           "every N steps)")
