"""PPO (IotaCode Eq. 1; Schulman et al., 2017): actor-critic with a value head, KL-shaped rewards, GAE, clipped losses.

Per training batch (one rollout round):

- the score r(x, y) (unit-test reward or reward model) goes to the last response token; every token also pays
  -beta * KL_t, a per-token estimate of KL(pi || pi_ref) to the reference (the LoRA-disabled policy, or a frozen copy
  of the starting model when every weight is trained),
- GAE over the response gives advantages (whitened over the batch) and value targets,
- ``ppo_epochs`` passes over ``num_minibatches`` shuffled minibatches each minimise
  clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy, one optimizer step per minibatch.

beta is fixed, or adapted towards ``kl_target`` (Ziegler et al., 2019) with ``adaptive_kl``. The value head is a
linear layer on the policy's last hidden state (zero-initialised: it starts predicting 0); it is trained, so it is
saved in checkpoints. By default it reads the hidden state *detached*: the value loss trains the head only and never
reaches the policy's weights (on small models a shared trunk lets the critic's regression pull the language model
away from the reference much faster than the policy gradient improves it). ``shared_critic=True`` lets the value loss
train the trunk too (the "policy with a value head" layout), and ``value_lr`` gives the head its own learning rate.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_align import losses
from lit_align.modules.online import OnlineModule, Rollouts

KLEstimatorName = Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


class PPO(OnlineModule):
    """Proximal Policy Optimization with a value head, on execution or reward-model rewards.

    Logs (per training batch, over all processes) ``reward_mean``/``reward_std``, ``status/*`` fractions,
    ``response_length``, ``kl`` (mean per-sequence KL estimate to the reference at rollout time), ``kl_coef``,
    ``entropy``, ``clip_fraction``, ``approx_kl`` (old vs new policy), ``policy_loss``, ``value_loss``,
    ``value_clip_fraction``, ``explained_variance`` and ``loss``. The loss is :meth:`compute_loss`.

    Args:
        ppo_epochs: passes over each rollout batch.
        num_minibatches: optimizer steps per pass (the rollouts are split into this many shuffled minibatches).
        clip_eps: policy ratio clip range epsilon.
        clip_range_value: value clip range (null: unclipped squared error).
        vf_coef: weight of the value loss.
        entropy_coef: weight of an entropy bonus (0: none).
        gamma: discount over response tokens.
        lam: GAE lambda.
        kl_coef: beta, the per-token KL penalty coefficient (the starting value when adaptive).
        kl_estimator: per-token KL estimator in the reward ("k1" is the usual log-ratio).
        adaptive_kl: adapt beta towards kl_target.
        kl_target: target per-sequence KL for the adaptive controller.
        kl_horizon: the adaptive controller's horizon, in rollouts.
        whiten_advantages: normalise advantages to zero mean, unit variance over the rollout batch.
        reward_clip: clip the score to [-reward_clip, reward_clip] before adding the KL penalty (null: no clip).
        shared_critic: let the value loss train the policy's weights too (false: the head reads detached features).
        value_lr: learning rate of the value head (null: the policy's; same warm-up and decay schedule).
    """

    needs_reference = True

    def __init__(
        self,
        *args: Any,
        ppo_epochs: int = 4,
        num_minibatches: int = 4,
        clip_eps: float = 0.2,
        clip_range_value: float | None = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimatorName = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        whiten_advantages: bool = True,
        reward_clip: float | None = None,
        shared_critic: bool = False,
        value_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name, value in (("ppo_epochs", ppo_epochs), ("num_minibatches", num_minibatches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {losses.KL_ESTIMATORS}, got {kl_estimator!r}")
        if adaptive_kl and (kl_target <= 0 or kl_horizon <= 0):
            raise ValueError(f"adaptive_kl needs kl_target > 0 and kl_horizon > 0, got {kl_target}, {kl_horizon}")
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        if value_lr is not None and value_lr <= 0:
            raise ValueError(f"value_lr must be > 0 or null, got {value_lr}")
        self.kl_coef = float(kl_coef)
        self.value_head: nn.Linear | None = None

    def configure_extra_models(self) -> None:
        super().configure_extra_models()
        hidden = self.model.config.hidden_size
        head = nn.Linear(hidden, 1, device=self.model.get_input_embeddings().weight.device, dtype=torch.float32)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.value_head = head

    def value_head_outputs(self, hidden: Tensor) -> Tensor:
        if not self.hparams.shared_critic:
            hidden = hidden.detach()
        return self.value_head(hidden.float()).squeeze(-1)

    def configure_optimizers(self):
        """The base AdamW + schedule, with the value head in its own parameter group when ``value_lr`` is set."""
        config = super().configure_optimizers()
        if self.hparams.value_lr is None:
            return config
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        head = {id(p) for p in self.value_head.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in head]} for g in optimizer.param_groups]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g.pop("initial_lr", None)
            g["lr"] = self.optimizer_config.lr  # the old scheduler already scaled it by its first multiplier
        groups.append({"params": list(self.value_head.parameters()), "weight_decay": 0.0, "lr": self.hparams.value_lr})
        optimizer = torch.optim.AdamW(groups, lr=self.optimizer_config.lr, betas=tuple(self.optimizer_config.betas),
                                      eps=self.optimizer_config.eps, fused=optimizer.defaults.get("fused"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_minibatches

    # ------------------------------------------------------------------ the objective
    def compute_loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy, token-averaged.

        ``out``: this pass's ``logps``, ``values``, ``logits`` (N, t; with ``logits_chunk_size``, ``entropy`` instead); ``batch``: the rollout-time ``old_logps``,
        ``old_values``, ``advantages``, ``returns`` and ``mask`` of the same rows. Override to try a variant.
        """
        hp = self.hparams
        mask = batch["mask"]
        policy_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
            out["logps"], batch["old_logps"], batch["advantages"], mask, clip_eps=hp.clip_eps)
        value_loss, value_clip_fraction = losses.ppo_value_loss(
            out["values"], batch["old_values"], batch["returns"], mask, clip_range=hp.clip_range_value)
        with torch.set_grad_enabled(hp.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = losses.masked_mean(self.token_entropy(out), mask)
        loss = policy_loss + hp.vf_coef * value_loss - hp.entropy_coef * entropy
        figures = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "clip_fraction": clip_fraction,
                   "value_clip_fraction": value_clip_fraction, "approx_kl": approx_kl, "entropy": entropy.detach()}
        return loss, figures

    def advantages(self, rollouts: Rollouts, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """KL-shaped token rewards, then GAE advantages (whitened) and returns; also the KL figures."""
        hp = self.hparams
        mask = rollouts.response_mask
        kl_tokens = losses.kl_penalty(stats["old_logps"], stats["ref_logps"], hp.kl_estimator) * mask
        score = rollouts.rewards.float()
        if hp.reward_clip is not None:
            score = score.clamp(-hp.reward_clip, hp.reward_clip)
        token_rewards = -self.kl_coef * kl_tokens
        last = mask.sum(-1) - 1
        token_rewards[torch.arange(len(rollouts), device=mask.device), last] += score
        advantages, returns = losses.gae(token_rewards, stats["old_values"], mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        sequence_kl = ((stats["old_logps"] - stats["ref_logps"]) * mask).sum(-1)  # k1 estimate of KL per sequence
        return {"advantages": advantages, "returns": returns, "sequence_kl": sequence_kl,
                "non_score_reward": token_rewards.sum(-1) - score}

    def update(self, rollouts: Rollouts) -> dict[str, float | Tensor]:
        hp = self.hparams
        stats = self.rollout_statistics(rollouts, with_values=True, with_reference=True)
        shaped = self.advantages(rollouts, stats)
        mask = rollouts.response_mask

        def loss_fn(index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            rows = rollouts.rows(index)
            t = rows["response_ids"].size(1)
            out = self.rollout_forward(rows, with_values=True)
            batch = {"old_logps": stats["old_logps"][index, :t], "old_values": stats["old_values"][index, :t],
                     "advantages": shaped["advantages"][index, :t], "returns": shaped["returns"][index, :t],
                     "mask": rows["response_mask"]}
            return self.compute_loss(out, batch)

        figures: dict[str, float | Tensor] = self.run_updates(
            len(rollouts), loss_fn, hp.ppo_epochs, hp.num_minibatches,
            weight_fn=lambda index: mask[index].sum().float())
        kl = self.global_mean(shaped["sequence_kl"].mean())
        figures.update({
            "kl": kl,
            "kl_coef": self.kl_coef,
            "non_score_reward": shaped["non_score_reward"].mean(),
            "explained_variance": losses.explained_variance(stats["old_values"], shaped["returns"], mask),
            "value_mean": losses.masked_mean(stats["old_values"], mask),
        })
        if hp.adaptive_kl:
            n = int(self.global_sum(float(len(rollouts))))
            self.kl_coef = losses.adaptive_kl_coef(self.kl_coef, float(kl), hp.kl_target, hp.kl_horizon, n)
        return figures

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_align_ppo"] = {"kl_coef": self.kl_coef}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = float(checkpoint.get("lit_align_ppo", {}).get("kl_coef", self.kl_coef))
