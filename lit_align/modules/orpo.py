"""Odds Ratio Preference Optimization (IotaCode Eq. 4-6): the chosen completion's NLL plus an odds-ratio penalty.

No reference model: one forward pass over the chosen and rejected rows gives both the supervised term (chosen
completion tokens only) and the mean per-token log-probs the odds ratio is computed from, in float32 with
log1p/expm1 (:func:`lit_align.losses.odds_ratio_loss`), so it stays finite where ``p / (1 - p)`` overflows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align import losses
from lit_align.modules.preference import PreferenceModule, preference_metrics


class ORPO(PreferenceModule):
    """ORPO: L = L_SFT(chosen) + lambda * L_OR, with L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x)).

    Logs ``loss``, ``nll`` (token-weighted NLL of the chosen completions), ``or_loss`` (the odds-ratio term, before
    lambda), ``log_odds_ratio``, and ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` where a completion's reward is its mean per-token log-prob (the quantity the odds are
    computed from), so accuracy is the share of pairs whose chosen completion is the more likely one per token.
    The loss is :meth:`compute_loss`; override it alone to make a variant. Under data parallelism the NLL term is the
    token mean over every process's chosen tokens (each process's term is rescaled by its share of the tokens), and
    the logged step ``loss`` and ``nll`` are the global figures. With gradient accumulation the term is the token mean
    over every chosen token of the optimizer step (the batches carry their window's count, ``window_tokens``).

    Args:
        orpo_lambda: weight lambda of the odds-ratio term in Eq. 4 (the paper's "ORPO beta 0.1"); must be >= 0.
        share_prompt: compute each prompt once for its chosen and rejected completions (reused keys/values).
        packed_pairs: where a pass cannot reuse keys/values (the policy under gradient checkpointing or
            torch_compile), share the prompt by packing each pair into one row instead (with share_prompt).
        disable_dropout: turn dropout off in the policy.
        logits_chunk_size: run the LM head this many completion tokens at a time, so no (tokens x vocabulary)
            logits are held (:class:`~lit_align.modules.preference.PreferenceModule`); null: all at once.
    """

    def __init__(self, *args, orpo_lambda: float = 0.1, share_prompt: bool = True, packed_pairs: bool = True,
                 disable_dropout: bool = True, logits_chunk_size: int | None = None, **kwargs) -> None:
        if not orpo_lambda >= 0:
            raise ValueError(f"ORPO orpo_lambda must be >= 0 (the weight of the odds-ratio term), got {orpo_lambda}")
        super().__init__(*args, share_prompt=share_prompt, packed_pairs=packed_pairs,
                         disable_dropout=disable_dropout, logits_chunk_size=logits_chunk_size, **kwargs)

    def compute_loss(self, chosen_nll: Tensor, chosen_mean_logps: Tensor, rejected_mean_logps: Tensor,
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The objective: ``(loss, odds_ratio_losses, log_odds_ratio)``; override this one method for a variant.

        ``chosen_nll`` is the token-weighted NLL of the chosen completions (a scalar); the mean log-probs are (B,).
        """
        or_losses, log_odds_ratio = losses.odds_ratio_loss(chosen_mean_logps, rejected_mean_logps)
        return chosen_nll + self.hparams.orpo_lambda * or_losses.mean(), or_losses, log_odds_ratio

    def shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        out = self.concatenated_logps(batch)
        b = out["chosen_logps"].size(0)
        chosen_nll, logged_nll = self.chosen_nll(out, stage, batch.get("window_tokens"))
        loss, or_losses, log_odds_ratio = self.compute_loss(chosen_nll, out["chosen_mean_logps"],
                                                            out["rejected_mean_logps"])
        logged_loss = loss
        if stage == "train":  # the micro-batch's loss over every process (the NLL term above is rescaled for the step)
            with torch.no_grad():
                logged_loss = self.global_mean(self.compute_loss(logged_nll, out["chosen_mean_logps"],
                                                                 out["rejected_mean_logps"])[0])
        metrics = {"loss": logged_loss, "nll": logged_nll, "or_loss": or_losses, "log_odds_ratio": log_odds_ratio,
                   **preference_metrics(out["chosen_mean_logps"], out["rejected_mean_logps"]),
                   "logps/chosen": out["chosen_logps"], "logps/rejected": out["rejected_logps"]}
        self.log_metrics(stage, metrics, batch_size=b)
        return loss


__all__ = ["ORPO"]
