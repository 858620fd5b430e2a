"""Supervised fine-tuning: the completion's negative log-likelihood (IotaCode Eq. 7), token-weighted."""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import ModuleDict
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.modules.base import AlignmentModule
from lit_align.modules.chunked_logps import check_chunk_size


class SFT(AlignmentModule):
    """Supervised fine-tuning on prompt/completion pairs; the prompt is context only, never a target.

    Logs ``loss`` and ``tokens`` per step, and ``loss``/``perplexity`` per validation epoch (perplexity over all
    validation completion tokens, the exponential of the token-weighted validation loss).

    Under data parallelism the training loss is the token mean over *every* process's completion tokens, as one
    process with the whole global batch would compute it: DDP averages gradients over processes, so each process
    scales its own token mean by ``world_size * its tokens / all tokens`` (``global_token_mean``, one all-reduce of
    two numbers per step).
    The logged step ``loss`` and ``tokens`` are the global figures too (of the micro-batch).

    Gradient accumulation is token-weighted as well: with ``accumulate_grad_batches`` > 1, the DataModule
    (:class:`~lit_align.data_modules.sft.SFTDataModule`) tags each training batch with its accumulation window's
    completion tokens over every process (``window_tokens``), and the loss is scaled so that an optimizer step's
    gradient is that of the token mean over all its micro-batches, as one process with the whole window in one batch
    computes it. With another DataModule (no tag) accumulation averages the micro-batches' token means.

    Args:
        logits_chunk_size: run the LM head and the loss over this many completion tokens at a time, on the backbone's
            last hidden states, so no (tokens x vocabulary) logits are held in the forward or the backward pass
            (lit_align/modules/chunked_logps.py; about 0.4 MiB less per token for a 32k vocabulary, for one more
            LM-head matmul per token); prompt and padding tokens skip the head. Checked once against the model's own
            logits. null: every position's logits at once. Not with an overridden ``compute_loss``, which takes the
            logits.
    """

    data_kind = "sft"

    def __init__(self, *args, logits_chunk_size: int | None = None, **kwargs) -> None:
        check_chunk_size(logits_chunk_size, self, SFT)
        super().__init__(*args, **kwargs)
        self.eval_nll = ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The objective; override this one method to try another token-level loss. It returns the mean over the
        batch's completion tokens (the DDP rescaling in ``shared_step`` relies on that)."""
        return losses.sft_loss(logits, labels)

    def shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        if self.hparams.get("logits_chunk_size"):
            inputs = self.forward_inputs(self.model, batch["input_ids"], batch.get("attention_mask"),
                                         batch.get("position_ids"))
            loss = losses.token_mean_nll(*self.target_logps(self.model, 0, batch["labels"][:, 1:], **inputs))
        else:
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
            # the metric's compute() is already over every process: the same value everywhere, so the mean that
            # sync_dist takes changes nothing (and Lightning stops warning about an unsynchronised epoch value)
            self.log(f"{stage}/perplexity", math.exp(min(float(self.eval_nll[stage].compute()), 50.0)), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")
