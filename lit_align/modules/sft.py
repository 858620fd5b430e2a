"""Supervised fine-tuning: the completion's negative log-likelihood (IotaCode Eq. 7), token-weighted."""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import ModuleDict
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.modules.base import AlignmentModule


class SFT(AlignmentModule):
    """Supervised fine-tuning on prompt/completion pairs; the prompt is context only, never a target.

    Logs ``loss`` and ``tokens`` per step, and ``loss``/``perplexity`` per validation epoch (perplexity over all
    validation completion tokens, the exponential of the token-weighted validation loss).

    Under data parallelism the training loss is the token mean over *every* process's completion tokens, as one
    process with the whole global batch would compute it: DDP averages gradients over processes, so each process
    scales its own token mean by ``world_size * its tokens / all tokens`` (``global_token_mean``, one all-reduce of
    two numbers per step).
    The logged step ``loss`` and ``tokens`` are the global figures too (of the micro-batch).

    Gradient accumulation is token-weighted as well: with ``accumulate_grad_batches`` > 1,
    :class:`~lit_align.data_modules.sft.SFTDataModule` tags each training batch with its accumulation window's
    completion tokens over every process (``window_tokens``), and
    the loss is scaled so that an optimizer step's gradient is that of the token mean over all its micro-batches, as
    one process with the whole window in one batch computes it. With another DataModule (no tag) accumulation
    averages the micro-batches' token means.
    """

    data_kind = "sft"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_nll = ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The objective; override this one method to try another token-level loss. It returns the mean over the
        batch's completion tokens (the DDP rescaling in ``shared_step`` relies on that)."""
        return losses.sft_loss(logits, labels)

    def shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        loss = self.compute_loss(logits, batch["labels"])
        n_tokens = (batch["labels"][:, 1:] != losses.IGNORE_INDEX).sum()
        if stage == "train":
            loss, logged, tokens = self.global_token_mean(loss, n_tokens, batch.get("window_tokens"))
            self.log_metrics(stage, {"loss": logged, "tokens": tokens}, batch_size=batch["input_ids"].size(0))
        else:
            metric = self.eval_nll[stage]  # token-weighted mean over the whole epoch, synced across processes
            metric.update(loss.detach(), n_tokens)
            self.log(f"{stage}/loss", metric, on_epoch=True, prog_bar=True)
        return loss

    def _log_perplexity(self, stage: str) -> None:
        if self.eval_nll[stage].update_count:
            self.log(f"{stage}/perplexity", math.exp(min(float(self.eval_nll[stage].compute()), 50.0)))

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")
