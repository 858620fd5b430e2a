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
    return target_logps(logits[:, :-1, :], labels[:, 1:], ignore_index)


def target_logps(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """:func:`token_logps` with the targets already shifted: ``logps[:, t]`` = log softmax(logits[:, t])[targets[:, t]]
    (batch, n) in float32, zero where ``targets`` is ``ignore_index``, and that mask."""
    mask = targets != ignore_index
    safe_targets = targets.masked_fill(~mask, 0)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        safe_targets.reshape(-1),
        reduction="none",
    ).view_as(safe_targets)
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
    return token_mean_nll(*token_logps(logits, labels, ignore_index))


def token_mean_nll(logps: Tensor, mask: Tensor) -> Tensor:
    """:func:`sft_loss` from the completion tokens' log-probabilities ``logps`` and their ``mask``: minus their sum over
    the number of tokens counted (0 with zero gradient for none)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Online objectives (PPO, GRPO, RAFT).
#
# Token-level tensors below are *response-aligned*: shape (batch, T) where column t is the t-th generated token of each
# rollout, and ``mask`` (batch, T) is True on real response tokens (responses are contiguous from column 0, padding on
# the right). Log-probabilities are log pi(a_t | s_t) of the sampled token; values V(s_t) are the critic's estimate
# *before* token t is emitted.
# ---------------------------------------------------------------------------------------------------------------------

KLEstimator = str  # one of KL_ESTIMATORS (kept a plain str so modules can expose it as a Literal)
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over ``dim`` (all elements when None); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of the masked elements: mean((x - mean(x))^2) (no Bessel correction)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def aggregate_token_losses(token_losses: Tensor, mask: Tensor, mode: str = "token") -> Tensor:
    """Reduce per-token losses (batch, T) to a scalar; the choice of normalisation matters for long vs short answers.

    - ``"token"``: sum over every counted token of the batch / number of counted tokens. Each *token* weighs the
      same, so long responses carry more total weight (DAPO, TRL's "dapo"/"bnpo" style).
    - ``"sequence"``: mean over sequences of each sequence's token mean, (1/B) sum_i (1/|y_i|) sum_t l_it. Each
      *response* weighs the same whatever its length (the GRPO paper's Eq. 3); tokens of short responses weigh more.

    Rows without any counted token contribute 0 and, in ``"sequence"`` mode, still count in B.
    """
    if mode == "token":
        return masked_mean(token_losses, mask)
    if mode == "sequence":
        return masked_mean(token_losses, mask, dim=-1).mean()
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {mode!r}")


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked elements to zero mean and unit variance: (x - mu) / sqrt(sigma^2 + eps).

    mu and sigma^2 are the masked mean and population variance over *all* masked elements of ``x``. With
    ``shift_mean=False`` the mean is added back (only the scale changes, as for PPO's reward scaling). Unmasked
    elements come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al., 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},    R_t = A_t + V_t

    where V_{t+1} and A_{t+1} are 0 past the last response token of the row (the episode ends there: a terminal
    state). ``rewards``, ``values``, ``mask``: (batch, T), response-aligned (see above). Returns ``(advantages,
    returns)``, both (batch, T) and zero on padding; the returns are the value targets. Computed in float32 with
    no gradient (advantages and returns are targets).
    """
    with torch.no_grad():
        m = mask.float()
        r, v = rewards.float() * m, values.float() * m
        T = r.size(-1)
        adv = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        next_adv = torch.zeros_like(r[:, 0])
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * next_value - v[:, t]
            a = delta + gamma * lam * next_adv
            adv[:, t] = a * m[:, t]
            # a padding column passes nothing back: the token before it is the last one of its row
            next_value = v[:, t] * m[:, t]
            next_adv = adv[:, t]
        return adv, (adv + v) * m


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token",
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate objective (Schulman et al., 2017, Eq. 7), as a loss to minimise.

    rho_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
    l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps_high))

    reduced with :func:`aggregate_token_losses` (``aggregation``: "token" or "sequence"). ``eps_high`` defaults to
    ``eps`` (symmetric clipping; DAPO's "clip-higher" sets it larger). Returns ``(loss, clip_fraction, approx_kl)``:
    the share of counted tokens where the clipped term was the active one, and the k3 estimate of
    KL(pi_old || pi) = mean((rho - 1) - log rho) over counted tokens (both detached, for logging).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps <= 0 or eps_high <= 0:
        raise ValueError(f"clip ranges must be > 0, got clip_eps={clip_eps}, clip_eps_high={eps_high}")
    log_ratio = logps.float() - old_logps.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = aggregate_token_losses(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip_range: float | None = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss: the critic may move at most ``clip_range`` from its rollout-time estimate per update.

    V^clip_t = V_old,t + clip(V_t - V_old,t, -c, c)
    L_V = 1/2 * mean_t max((V_t - R_t)^2, (V^clip_t - R_t)^2)

    over counted tokens (token mean). ``clip_range=None`` gives the plain 1/2 * mean (V_t - R_t)^2. Returns
    ``(loss, clip_fraction)``, the latter the share of tokens where the clipped error was the larger (detached).
    """
    v, r = values.float(), returns.float()
    err = (v - r) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=v.device)
    v_clipped = old_values.float() + torch.clamp(v - old_values.float(), -clip_range, clip_range)
    err_clipped = (v_clipped - r) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).float(), mask)
    return loss, clip_fraction


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantages (Shao et al., 2024, DeepSeekMath Sec. 4.1.2, outcome supervision).

    For the K = ``group_size`` completions of one prompt (consecutive entries of ``rewards``):

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     (normalize_std=True)
    A_i =  r_i - mean_j r_j                          (normalize_std=False, as in Dr. GRPO)

    with the population standard deviation of the group. A group whose rewards are all equal gets advantages 0:
    it carries no learning signal. ``rewards``: (num_prompts * K,). Returns the same shape, float32.
    """
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 completions per prompt (group_size >= 2), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(-1, unbiased=False, keepdim=True) + eps)
    return centred.view(-1)


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities (Schulman, "Approximating KL").

    With d_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t) and a_t ~ pi:

    - ``"k1"`` / ``"kl"``: d_t  (unbiased, high variance, can be negative)
    - ``"abs"``: |d_t|
    - ``"k2"`` / ``"mse"``: d_t^2 / 2  (biased, low variance, >= 0)
    - ``"k3"`` / ``"low_var_kl"``: exp(-d_t) - 1 + d_t  (unbiased, >= 0; GRPO's estimator, DeepSeekMath Eq. 4)

    Every estimator is 0 where pi and pi_ref agree on the token. Returns a tensor shaped like ``logps`` (float32).
    """
    d = logps.float() - ref_logps.float()
    if estimator in ("k1", "kl"):
        return d
    if estimator == "abs":
        return d.abs()
    if estimator in ("k2", "mse"):
        return 0.5 * d * d
    if estimator in ("k3", "low_var_kl"):
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position: H = logsumexp(z) - sum_v softmax(z)_v * z_v.

    ``logits``: (..., vocab). Returns (...), float32, in nats.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over counted tokens: 1 is a perfect critic, 0 no better than a constant, < 0 worse.

    NaN when the returns have no variance.
    """
    var_r = masked_var(returns.float(), mask)
    var_err = masked_var(returns.float() - values.float(), mask)
    return torch.where(var_r > 0, 1.0 - var_err / var_r.clamp(min=1e-12), torch.full_like(var_r, float("nan")))


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019)'s proportional controller for the KL coefficient beta.

    e = clip(KL_observed / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)

    ``n_steps`` is the number of rollouts (samples) the observation came from; ``horizon`` sets how many samples it
    takes to move beta by a factor of about e. Raises when ``target`` or ``horizon`` is not positive.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
