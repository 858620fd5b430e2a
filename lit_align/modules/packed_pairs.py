"""Preference pairs packed one row per pair: ``prompt | chosen | rejected``, the rejected tokens masked from the chosen.

With a KV cache each prompt runs once for both of its completions (:func:`~lit_align.modules.preference.
shared_prompt_forward`), but a pass whose backward re-runs the blocks (gradient or activation checkpointing) cannot fill
a cache, and compiled blocks should not. This layout shares the prompt in one plain forward pass instead: row ``i`` holds
pair ``i``'s prompt, its chosen completion and then its rejected completion. A 4D attention mask lets each token see the
tokens before it except that rejected tokens do not see the chosen ones, and the rejected tokens' positions continue
from the prompt's end as if the chosen were not there, so every completion token's log-probability is the one a pass
over its own full sequence gives. The rejected completion's first token is predicted from the prompt's last position,
like the chosen one's.

A row has ``P + C + R`` tokens instead of two rows of ``P + max(C, R)``: the prompt's compute and activations once per
pair. The mask is ``(B, 1, L, L)`` (boolean for SDPA, additive for eager attention), so attention runs without the fused
causal kernels; it is meant for the passes that cannot share through a cache.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align import losses

log = logging.getLogger(__name__)

PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a custom 4D mask as given (flash attention and flex attention do not)."""


class PackingCheck:
    """Whether a module may run packed rows: its network's attention applies a 4D mask as given, and the run's first
    packed pass gave what full sequences give (checked once, :meth:`verify`; ``ok`` is None until then)."""

    def __init__(self) -> None:
        self.ok: bool | None = None

    def usable(self, net: torch.nn.Module) -> bool:
        """Not refused by an earlier check, and ``net``'s attention implementation in :data:`PACKABLE_ATTENTION`."""
        return self.ok is not False and attention_implementation(net) in PACKABLE_ATTENTION

    def verify(self, packed: Tensor, full: Tensor, scale: Tensor | float, exact: bool) -> bool:
        """Record whether ``packed`` equals ``full`` within a tolerance: 1e-3 per unit of ``scale`` (a completion's
        token count for log-probability sums) where the pass was ``exact`` (float32), 0.1 in half precision; warn
        when not."""
        difference = float(((packed.float() - full.float()).abs() / torch.as_tensor(scale).clamp(min=1)).max())
        self.ok = difference <= (1e-3 if exact else 0.1)
        if not self.ok:
            log.warning("lit_align: packed pairs differ from full sequences on this model (largest difference %.3g); "
                        "running full sequences where the prompt cannot be shared through a cache", difference)
        return self.ok


def attention_implementation(net: torch.nn.Module) -> str | None:
    """The attention implementation of a transformers model (under peft or FSDP wrappers too), if it says."""
    return getattr(getattr(net, "config", None), "_attn_implementation", None)


def packed_mask_dtype(net: torch.nn.Module) -> torch.dtype | None:
    """What :func:`packed_pairs` should build the mask as for ``net``: additive in its compute dtype for eager
    attention (which adds the mask to the scores), boolean (None) for SDPA."""
    if attention_implementation(net) != "eager":
        return None
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


def packed_pairs(batch: dict[str, Any], pad_token_id: int, mask_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The batch's ``B`` pairs as ``B`` packed rows (right-padded to the longest): ``input_ids`` and ``position_ids``
    (B, L), ``attention_mask`` (B, 1, L, L): True where a query may attend to a key, or with ``mask_dtype`` a float
    mask of 0 and that dtype's minimum (eager attention adds it); ``positions`` (2B, C): the position whose
    logits predict each completion token of ``completion_labels`` (chosen rows first); and ``ends`` (2B,): the
    position of each completion's last token (where a reward model reads its score). Built from the batch's split
    layout (:func:`~lit_align.data_modules.preference.collate_pairs`), with tensor operations only."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    completion_ids, completion_mask = batch["completion_input_ids"], batch["completion_attention_mask"]
    b, width = prompt_ids.shape
    c_width = completion_ids.size(1)
    prompt_len = prompt_mask.sum(-1, keepdim=True)
    chosen_len = completion_mask[:b].sum(-1, keepdim=True)
    total = prompt_len + chosen_len + completion_mask[b:].sum(-1, keepdim=True)
    t = torch.arange(int(total.max()), device=prompt_ids.device).unsqueeze(0)
    in_prompt, in_chosen = t < prompt_len, (t >= prompt_len) & (t < prompt_len + chosen_len)
    in_rejected = (t >= prompt_len + chosen_len) & (t < total)
    prompt_tokens = prompt_ids.gather(1, (width - prompt_len + t).clamp(0, width - 1))  # left-padded prompts
    chosen_tokens = completion_ids[:b].gather(1, (t - prompt_len).clamp(0, c_width - 1))
    rejected_tokens = completion_ids[b:].gather(1, (t - prompt_len - chosen_len).clamp(0, c_width - 1))
    input_ids = torch.where(in_prompt, prompt_tokens, torch.where(
        in_chosen, chosen_tokens, torch.where(in_rejected, rejected_tokens, torch.full_like(t, pad_token_id))))
    position_ids = torch.where(in_rejected, t - chosen_len, t)
    # query q may see key k: k <= q, k a real token, and not (q rejected and k chosen)
    causal = t.unsqueeze(-1) >= t.unsqueeze(-2)  # (1, L, L)
    allowed = causal & (t < total).unsqueeze(1) & ~(in_rejected.unsqueeze(-1) & in_chosen.unsqueeze(1))
    allowed = allowed.unsqueeze(1)
    if mask_dtype is not None:
        allowed = torch.zeros(allowed.shape, dtype=mask_dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min)
    j = torch.arange(c_width, device=prompt_ids.device).unsqueeze(0)
    chosen_positions = prompt_len - 1 + j
    rejected_positions = torch.where(j == 0, prompt_len - 1, prompt_len + chosen_len - 1 + j)
    positions = torch.cat([chosen_positions, rejected_positions]).clamp(max=int(total.max()) - 1)
    ends = torch.cat([prompt_len + chosen_len - 1, total - 1]).squeeze(-1)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": allowed, "positions": positions,
            "ends": ends}


def packed_token_logps(logits: Tensor, first_position: int, packed: dict[str, Tensor],
                       labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities ``(2B, C)`` of the completions in ``labels`` (``completion_labels``, chosen rows
    first) and their mask, from the packed rows' ``logits`` (B, K, V), which start at position ``first_position``.

    One fused cross-entropy gives each packed position's log-probability of the next packed token (every chosen token,
    and every rejected token but the first); a second one, over B positions, the rejected completions' first tokens
    from the prompts' last positions."""
    b = logits.size(0)
    mask = labels != losses.IGNORE_INDEX
    following = packed["input_ids"][:, first_position + 1:first_position + logits.size(1)]
    next_logps, _ = losses.token_logps(logits[:, :following.size(1) + 1], torch.cat(
        [following[:, :1], following], dim=1))  # (B, K - 1): position first + t predicting token first + t + 1
    at = (packed["positions"] - first_position).clamp(0, next_logps.size(1) - 1)
    rows = torch.arange(2 * b, device=logits.device) % b
    token_logps = next_logps[rows.unsqueeze(-1), at]
    prompt_last = at[b:, 0]  # the rejected rows' first tokens are predicted where the chosen ones' are
    first = -F.cross_entropy(logits[torch.arange(b, device=logits.device), prompt_last].float(),
                             labels[b:, 0].clamp(min=0), reduction="none")
    token_logps = torch.cat([token_logps[:b], torch.cat([first.unsqueeze(-1), token_logps[b:, 1:]], dim=1)])
    return token_logps * mask, mask


__all__ = ["PACKABLE_ATTENTION", "PackingCheck", "attention_implementation", "packed_mask_dtype", "packed_pairs",
           "packed_token_logps"]
