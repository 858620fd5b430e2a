"""GRPO (Shao et al., 2024, DeepSeekMath): K samples per prompt, group-relative advantages, clipped objective, no critic.

Per training batch: K = ``samples_per_prompt`` completions per prompt are scored; each completion's advantage is its
reward standardised within its group, A_i = (r_i - mean(r)) / (std(r) + eps), shared by all its tokens; the policy
minimises PPO's clipped surrogate plus, optionally, beta * KL(pi || pi_ref) estimated per token with k3
(exp(ref - logp) - (ref - logp) - 1, unbiased and non-negative).

Loss normalisation (``loss_aggregation``) is an explicit choice, both documented in
:func:`lit_align.losses.aggregate_token_losses`:

- ``"sequence"`` (default, the GRPO paper's Eq. 3): each completion weighs the same; a token of a short completion
  weighs more than one of a long completion. With a negative advantage this favours longer wrong answers.
- ``"token"`` (DAPO): each token weighs the same over the minibatch; long completions weigh more in total.

With one update per rollout batch (``num_iterations=1`` and ``num_minibatches=1``) the rollout-time log-probs equal the
current ones, so they are not recomputed: the ratio is exactly 1 and its gradient is the policy gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lit_align import losses
from lit_align.modules.online import OnlineModule, Rollouts
from lit_align.modules.ppo import KLEstimatorName


class GRPO(OnlineModule):
    """Group Relative Policy Optimization on execution or reward-model rewards.

    Logs ``reward_mean``/``reward_std``, ``status/*``, ``response_length``, ``zero_std_groups`` (share of groups whose
    rewards are all equal: no signal), ``kl`` (k3 estimate per token, when beta > 0), ``clip_fraction``,
    ``approx_kl``, ``entropy``, ``policy_loss`` and ``loss``. The loss is :meth:`compute_loss`.

    Args:
        samples_per_prompt: K, completions per prompt forming one group (at least 2).
        beta: weight of the KL penalty to the reference (0: no reference model is used at all).
        kl_estimator: per-token KL estimator of the penalty (GRPO's is "k3").
        clip_eps: lower ratio clip range epsilon.
        clip_eps_high: upper ratio clip range (null: clip_eps; DAPO's clip-higher uses a larger one).
        loss_aggregation: "sequence" (each completion weighs the same) or "token" (each token does).
        normalize_std: divide by the group's standard deviation (false: only subtract the group mean, as Dr. GRPO).
        num_iterations: passes over each rollout batch (GRPO's mu).
        num_minibatches: optimizer steps per pass.
    """

    def __init__(
        self,
        *args: Any,
        samples_per_prompt: int = 8,
        beta: float = 0.04,
        kl_estimator: KLEstimatorName = "k3",
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        loss_aggregation: Literal["sequence", "token"] = "sequence",
        normalize_std: bool = True,
        num_iterations: int = 1,
        num_minibatches: int = 1,
        **kwargs: Any,
    ) -> None:
        if isinstance(samples_per_prompt, int) and not isinstance(samples_per_prompt, bool) and samples_per_prompt < 2:
            raise ValueError(f"GRPO needs samples_per_prompt >= 2 (K completions per prompt form a group whose mean is "
                             f"the baseline), got {samples_per_prompt}")
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)
        for name, value in (("num_iterations", num_iterations), ("num_minibatches", num_minibatches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if loss_aggregation not in ("sequence", "token"):
            raise ValueError(f"loss_aggregation must be 'sequence' or 'token', got {loss_aggregation!r}")
        if kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {losses.KL_ESTIMATORS}, got {kl_estimator!r}")

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.hparams.beta > 0

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.num_iterations * self.hparams.num_minibatches

    @property
    def single_update(self) -> bool:
        return self.hparams.num_iterations == 1 and self.hparams.num_minibatches == 1

    def compute_loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate with group advantages + beta * KL to the reference, aggregated per loss_aggregation.

        ``out``: this pass's ``logps`` and ``logits`` (N, t; with ``logits_chunk_size``, ``entropy`` instead); ``batch``: ``old_logps`` (None for a single update:
        the current log-probs, detached), ``ref_logps`` (None when beta = 0), ``advantages`` (N, t) and ``mask``.
        """
        hp = self.hparams
        mask = batch["mask"]
        old = batch["old_logps"] if batch.get("old_logps") is not None else out["logps"].detach()
        policy_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
            out["logps"], old, batch["advantages"], mask, clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high,
            aggregation=hp.loss_aggregation)
        loss = policy_loss
        figures = {"policy_loss": policy_loss.detach(), "clip_fraction": clip_fraction, "approx_kl": approx_kl}
        if hp.beta > 0:
            kl = losses.aggregate_token_losses(losses.kl_penalty(out["logps"], batch["ref_logps"], hp.kl_estimator),
                                               mask, hp.loss_aggregation)
            loss = loss + hp.beta * kl
            figures["kl"] = kl.detach()
        with torch.no_grad():
            figures["entropy"] = losses.masked_mean(self.token_entropy(out), mask)
        return loss, figures

    def update(self, rollouts: Rollouts) -> dict[str, float | Tensor]:
        hp = self.hparams
        # a single update needs no old log-probs (they are the current ones): only the reference pass, when beta > 0
        stats = self.rollout_statistics(rollouts, with_reference=hp.beta > 0, with_policy=not self.single_update) \
            if (hp.beta > 0 or not self.single_update) else {}
        old_logps = None if self.single_update else stats["old_logps"]
        mask = rollouts.response_mask
        sequence_advantages = losses.group_advantages(rollouts.rewards, rollouts.group_size, hp.normalize_std)
        advantages = sequence_advantages[:, None].expand_as(mask)

        def loss_fn(index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            rows = rollouts.rows(index)
            t = rows["response_ids"].size(1)
            out = self.rollout_forward(rows)
            batch = {"old_logps": None if old_logps is None else old_logps[index, :t],
                     "ref_logps": stats["ref_logps"][index, :t] if hp.beta > 0 else None,
                     "advantages": advantages[index, :t], "mask": rows["response_mask"]}
            return self.compute_loss(out, batch)

        if hp.loss_aggregation == "token":
            weight_fn = lambda index: mask[index].sum().float()  # noqa: E731
        else:
            weight_fn = None  # rows
        figures: dict[str, float | Tensor] = self.run_updates(
            len(rollouts), loss_fn, hp.num_iterations, hp.num_minibatches, weight_fn=weight_fn)
        groups = rollouts.rewards.view(-1, rollouts.group_size)
        figures["zero_std_groups"] = (groups.max(-1).values == groups.min(-1).values).float().mean()
        return figures
