"""RAFT (Dong et al., 2023, "Reward rAnked FineTuning"): sample N per prompt, keep the best, fine-tune on them, repeat.

Per training batch: ``samples_per_prompt`` completions per prompt are scored; the top ``keep_fraction`` of them (per
prompt, or over the whole batch) are kept, optionally only those that pass every test or reach ``min_reward``; the
policy is then trained on the kept (prompt, completion) pairs with the SFT loss (the completion's token-averaged
negative log-likelihood, end-of-sequence token included when the completion ended on it), for ``sft_epochs`` passes
of ``num_minibatches`` optimizer steps. Ties in reward are broken at random; duplicate completions of a prompt count
once when ``deduplicate``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align import losses
from lit_align.modules.chunked_logps import check_chunk_size
from lit_align.modules.online import OnlineModule, Rollouts, response_targets


class RAFT(OnlineModule):
    """Reward-ranked fine-tuning on execution or reward-model rewards.

    Logs ``reward_mean``/``reward_std``, ``status/*``, ``response_length`` (all samples), ``kept`` (samples kept over
    all processes), ``kept_fraction``, ``kept_reward_mean`` and ``loss`` (SFT loss on the kept samples). The loss is
    :meth:`compute_loss`. Under DDP each process selects among its own samples; processes that keep nothing still
    step with the others (with a zero gradient), and a batch where no process keeps anything makes no update.

    Args:
        samples_per_prompt: N, completions sampled per prompt.
        keep_fraction: share of the samples kept, the top ones by reward (ceil(keep_fraction * N) per prompt when
            rank_within="prompt").
        rank_within: rank each prompt's samples separately ("prompt") or all samples of the batch together ("batch").
        only_passing: keep only samples that pass every test (needs reward="execution").
        min_reward: keep only samples with at least this reward (null: no threshold).
        deduplicate: a completion text repeated for the same prompt is kept at most once.
        sft_epochs: passes over the kept samples per training batch.
        num_minibatches: optimizer steps per pass.
    """

    def __init__(
        self,
        *args: Any,
        samples_per_prompt: int = 8,
        keep_fraction: float = 0.25,
        rank_within: Literal["prompt", "batch"] = "prompt",
        only_passing: bool = False,
        min_reward: float | None = None,
        deduplicate: bool = True,
        sft_epochs: int = 1,
        num_minibatches: int = 1,
        **kwargs: Any,
    ) -> None:
        check_chunk_size(kwargs.get("logits_chunk_size"), self, RAFT)
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if rank_within not in ("prompt", "batch"):
            raise ValueError(f"rank_within must be 'prompt' or 'batch', got {rank_within!r}")
        if only_passing and self.hparams.reward != "execution":
            raise ValueError("only_passing=True needs reward='execution' (passing is decided by running the tests)")
        for name, value in (("sft_epochs", sft_epochs), ("num_minibatches", num_minibatches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.sft_epochs * self.hparams.num_minibatches

    def select(self, rollouts: Rollouts) -> Tensor:
        """Indices of the rollouts to fine-tune on (sorted)."""
        hp = self.hparams
        rewards = rollouts.rewards.float().cpu()
        n = len(rollouts)
        eligible = torch.ones(n, dtype=torch.bool)
        if hp.only_passing:
            eligible &= torch.tensor([r is not None and r.passed for r in rollouts.results], dtype=torch.bool)
        if hp.min_reward is not None:
            eligible &= rewards >= hp.min_reward
        eligible &= ~torch.isnan(rewards)
        if hp.deduplicate:
            seen: set[tuple[str, str]] = set()
            for i, (item, text) in enumerate(zip(rollouts.items, rollouts.texts)):
                key = (item.prompt, text)
                if key in seen:
                    eligible[i] = False
                seen.add(key)
        groups = [torch.arange(n)] if hp.rank_within == "batch" else list(torch.arange(n).split(rollouts.group_size))
        kept: list[Tensor] = []
        for group in groups:
            quota = math.ceil(hp.keep_fraction * len(group))
            candidates = group[eligible[group]]
            shuffled = candidates[torch.randperm(len(candidates))]  # random order among equal rewards
            order = torch.sort(rewards[shuffled], descending=True, stable=True).indices
            kept.append(shuffled[order[:quota]])
        return torch.cat(kept).sort().values.to(self.device)

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The SFT loss on the kept completions (token-weighted NLL); override for a variant.

        ``logits`` (N, t + 1, V) cover the last prompt column and the response columns
        (:meth:`~lit_align.modules.online.OnlineModule.response_window`), ``labels`` (N, t + 1) are aligned with them:
        ignored in the prompt column and on padding, the response tokens elsewhere; as for a causal LM, the logits at
        column k predict the label at column k + 1."""
        return losses.sft_loss(logits, labels)

    def update(self, rollouts: Rollouts) -> dict[str, float | Tensor]:
        hp = self.hparams
        kept = self.select(rollouts)
        total_kept = int(self.global_sum(float(len(kept))))
        figures: dict[str, float | Tensor] = {
            "kept_fraction": total_kept / float(self.global_sum(float(len(rollouts)))),
            "kept_reward_mean": (self.global_sum(rollouts.rewards[kept].sum()) / max(total_kept, 1)),
        }
        if total_kept == 0:
            return figures
        mask = rollouts.response_mask

        def loss_fn(index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            rows = rollouts.rows(kept[index])
            targets = response_targets(rows)
            if self.uses_chunked_logps(self.model, rows["input_ids"]):  # logits_chunk_size: the same loss, in chunks
                out, _ = self.response_window(rows, targets=targets)
                return losses.token_mean_nll(out[..., 0], targets != losses.IGNORE_INDEX), {}
            logits, _ = self.response_window(rows)
            # aligned with the logits: the last prompt column (ignored), then the response tokens
            labels = F.pad(targets, (1, 0), value=losses.IGNORE_INDEX)
            return self.compute_loss(logits, labels), {}

        figures.update(self.run_updates(len(kept), loss_fn, hp.sft_epochs, hp.num_minibatches,
                                        weight_fn=lambda index: mask[kept[index]].sum().float()))
        figures = {k: v for k, v in figures.items()}
        figures["kept"] = float(total_kept)
        return figures
