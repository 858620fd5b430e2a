"""The math of every objective: pure tensor functions, no model, no I/O.

Conventions shared by all functions here:

- ``labels`` are aligned with ``input_ids`` (Hugging Face's convention) and hold ``IGNORE_INDEX`` on every
  position that must not count: prompt tokens and padding. Token ``t`` is predicted by the logits at ``t - 1``;
  :func:`token_logps` does that shift, so callers never do.
- A sequence log-probability ``log pi(y|x)`` is the *sum* over completion tokens; the *mean* is that sum divided by
  the number of completion tokens. Prompt tokens never count.
- Per-example losses are returned unreduced where a caller may want to weight or inspect them (DPO, ORPO's
  odds-ratio term, Bradley-Terry); the module takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Log-probability of every label token under ``logits``, and the mask of tokens that count.

    logits: (batch, seq, vocab) from a causal LM over ``input_ids``; labels: (batch, seq) aligned with input_ids.
    Returns ``(logps, mask)``, both (batch, seq - 1): ``logps[:, t]`` = log p(labels[:, t+1] | tokens <= t), zero where
    ``mask`` is False. Computed with a fused cross-entropy in float32, so no (batch, seq, vocab) log-softmax copy is kept.
    """
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != ignore_index
    safe_labels = shifted_labels.masked_fill(~mask, 0)
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)).float(),
        safe_labels.reshape(-1),
        reduction="none",
    ).view_as(safe_labels)
    return (-nll) * mask, mask


def sequence_logps(logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability: the sum over counted tokens, or their mean when ``average`` (0 for none)."""
    total = (logps * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Supervised fine-tuning loss, IotaCode Eq. 7, token-weighted.

    L_SFT = - (1 / N) * sum_{examples} sum_{i in completion} log p(y_i | x, y_<i)

    where N is the number of completion tokens in the batch, so a long completion weighs by its tokens rather
    than as one example. Prompt and padding tokens (``ignore_index`` in ``labels``) never count. Returns a scalar
    (0 with zero gradient if the batch holds no completion token).
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    return -(logps.sum() / mask.sum().clamp(min=1))


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Reward-model loss, IotaCode Eq. 2: -log sigmoid(r(x, y_w) - r(x, y_l) - margin), per example.

    ``margin`` (optional, scalar or per example) asks the chosen reward to exceed the rejected one by at least that
    much, as in Llama 2's margin loss. Computed as softplus(-(diff)) for stability.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    return F.softplus(-diff)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization, IotaCode Eq. 3, with optional label smoothing (conservative DPO).

    h = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    ``eps = label_smoothing`` is the assumed probability that a preference label is flipped; 0 gives Eq. 3 exactly.
    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (batch,), where the implicit rewards are
    beta * (log pi - log ref) of each side, detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps.float() - reference_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - reference_rejected_logps.float()
    h = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y|x) = log p - log(1 - p) for p = exp(mean_logps) <= 1, stable for p -> 0 and p -> 1.

    log(1 - p) is computed as log(-expm1(log p)), which keeps full precision where 1 - p would round to 1 or 0.
    """
    logp = mean_logps.float().clamp(max=-1e-7)  # p = 1 exactly has infinite odds; keep the term finite
    return logp - torch.log(-torch.expm1(logp))


def odds_ratio_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term, IotaCode Eq. 5-6, from mean per-token log-probabilities.

    L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x)),   odds(y|x) = p(y|x) / (1 - p(y|x))

    Returns ``(losses, log_odds_ratio)``, each (batch,). Float32, log1p/expm1 throughout: no overflow where a naive
    ``p / (1 - p)`` does (p near 1) and no -inf where ``log(1 - p)`` rounds (p near 0).
    """
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return -F.logsigmoid(ratio), ratio
