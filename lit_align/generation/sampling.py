"""Next-token selection: pure tensor functions over a batch of logits (no model, no tokenizer)."""

from __future__ import annotations

import torch
from torch import Tensor


def top_p_mask(probs: Tensor, top_p: float) -> Tensor:
    """Boolean mask of the nucleus: per row, the most probable tokens whose total probability first reaches ``top_p``.

    The most probable token is always kept. ``probs`` has shape (batch, vocab) and rows summing to 1.
    """
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # A token is in the nucleus when the mass strictly before it is still short of top_p.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                       draws: Tensor | None = None) -> Tensor:
    """Token ids (batch,) drawn from softmax(logits / temperature) restricted to the top-p nucleus.

    ``temperature == 0`` is greedy (argmax, the lowest id on ties). Sampling inverts the cumulative
    distribution at one uniform draw per row from ``generator``, so a seeded generator makes it reproducible;
    ``draws`` (batch, 1) in [0, 1) are used instead when given.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    probs = probs * top_p_mask(probs, top_p)
    cdf = probs.cumsum(dim=-1)
    if draws is None:
        draws = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)
    u = draws * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # Rounding can put u at the very top of the cdf: fall back to the last token with probability mass.
    last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(picked, last_nonzero)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax(logits)[token] per row, at temperature 1 (the policy's log-probability of the token)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
