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
from typing import Any, Callable

import torch
from torch import Tensor

from lit_align import losses

log = logging.getLogger(__name__)

PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a custom 4D mask as given (flash attention and flex attention do not)."""


Comparison = tuple[Tensor, Tensor, "Tensor | float", bool]
"""What :meth:`PackingCheck.allows` compares: (packed result, full-row result, scale, exact), as :meth:`verify` takes."""


class PackingCheck:
    """Whether a module may run packed rows: its network's attention applies a 4D mask as given, and the run's first
    packed pass gave what full sequences give (checked once, :meth:`verify`; ``ok`` is None until then)."""

    warning = ("lit_align: packed pairs differ from full sequences on this model (largest difference %.3g); running "
               "full sequences where the prompt cannot be shared through a cache")
    """Logged, with the largest difference, when the check fails."""

    def __init__(self) -> None:
        self.ok: bool | None = None

    def usable(self, net: torch.nn.Module) -> bool:
        """Not refused by an earlier check, and ``net``'s attention implementation in :data:`PACKABLE_ATTENTION`."""
        return self.ok is not False and attention_implementation(net) in PACKABLE_ATTENTION

    def allows(self, net: torch.nn.Module, compare: Callable[[], Comparison]) -> bool:
        """Whether packed rows may run through ``net`` now: :meth:`usable`, and the first time ``compare()`` (run
        without gradient: a packed and a full-row pass over the same rows) agreeing (:meth:`verify`)."""
        if not self.usable(net):
            return False
        if self.ok is None:
            with torch.no_grad():
                self.verify(*compare())
        return bool(self.ok)

    def verify(self, packed: Tensor, full: Tensor, scale: Tensor | float, exact: bool) -> bool:
        """Record whether ``packed`` equals ``full`` within a tolerance: 1e-3 per unit of ``scale`` (a completion's
        token count for log-probability sums) where the pass was ``exact`` (float32), 0.1 in half precision; warn
        when not."""
        difference = float(((packed.float() - full.float()).abs() / torch.as_tensor(scale).clamp(min=1)).max())
        self.ok = difference <= (1e-3 if exact else 0.1)
        if not self.ok:
            log.warning(self.warning, difference)
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


def packed_groups(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                  of_row: Tensor, pad_token_id: int, mask_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Completions packed after their shared prompts: one row per prompt, the prompt then each of its completions.

    ``prompt_ids``/``prompt_mask`` (G, P) left-padded; ``completion_ids``/``completion_mask`` (N, C) right-padded;
    ``of_row`` (N,) each completion's prompt. Returns ``input_ids`` and ``position_ids`` (G, L), right-padded to the
    longest row; ``attention_mask`` (G, 1, L, L): a token sees the earlier tokens of its prompt and of its own
    completion only (True where it may, or with ``mask_dtype`` 0 there and that dtype's minimum elsewhere, for eager
    attention, which adds it); ``index`` (N, C): where each completion token sits in its prompt's row (clamped on
    padding). A completion's positions continue from its prompt's length, as in its own full sequence, so every output
    at its tokens equals that of a pass over prompt + completion. Tensor operations only."""
    device = prompt_ids.device
    width, c_width = prompt_ids.size(1), completion_ids.size(1)
    prompt_len, completion_len = prompt_mask.sum(-1), completion_mask.sum(-1)
    same = of_row.unsqueeze(0) == of_row.unsqueeze(1)  # (N, N)
    earlier = torch.tril(same, diagonal=-1)  # [n, m]: m is before n in n's row
    # where each completion begins in its row (a sum, not a matmul: CUDA has no integer matmul)
    start = prompt_len[of_row] + (earlier * completion_len.unsqueeze(0)).sum(-1)
    total = prompt_len.index_add(0, of_row, completion_len)
    length = int(total.max())
    t = torch.arange(length, device=device).unsqueeze(0)
    in_prompt = t < prompt_len.unsqueeze(-1)
    input_ids = torch.where(in_prompt, prompt_ids.gather(1, (width - prompt_len.unsqueeze(-1) + t).clamp(0, width - 1)),
                            torch.full_like(t, pad_token_id))
    position_ids = torch.where(in_prompt, t, torch.zeros_like(t))
    segment = torch.where(in_prompt, -1, -2)  # -1: prompt, -2: padding, n: completion n
    k = torch.arange(c_width, device=device).unsqueeze(0)
    index = start.unsqueeze(-1) + k
    real = k < completion_len.unsqueeze(-1)
    rows, cols = of_row.unsqueeze(-1).expand_as(index)[real], index[real]
    input_ids[rows, cols] = completion_ids[real]
    position_ids[rows, cols] = (prompt_len[of_row].unsqueeze(-1) + k).expand_as(index)[real]
    segment[rows, cols] = torch.arange(of_row.numel(), device=device).unsqueeze(-1).expand_as(index)[real]
    query, key = segment.unsqueeze(-1), segment.unsqueeze(-2)
    allowed = (t.unsqueeze(-1) >= t.unsqueeze(-2)) & (key != -2) & ((key == -1) | (key == query))
    allowed = allowed.unsqueeze(1)
    if mask_dtype is not None:
        allowed = torch.zeros(allowed.shape, dtype=mask_dtype, device=device).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": allowed,
            "index": index.clamp(max=length - 1)}


def packed_pairs(batch: dict[str, Any], pad_token_id: int, mask_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A preference batch's ``B`` pairs as ``B`` packed rows (:func:`packed_groups`): each prompt but its last token,
    then the chosen and the rejected completion, each led by that last prompt token, so the outputs at a completion's
    own positions predict all of its tokens. Adds to :func:`packed_groups`' keys ``ends`` (2B,): the position of each
    completion's last token (where a reward model reads its score). From the batch's split layout
    (:func:`~lit_align.data_modules.preference.collate_pairs`; prompts left-padded, so their last column is their last
    token)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    completion_ids, completion_mask = batch["completion_input_ids"], batch["completion_attention_mask"]
    b = prompt_ids.size(0)
    of_row = torch.arange(2 * b, device=prompt_ids.device) % b
    led_ids = torch.cat([prompt_ids[of_row, -1:], completion_ids], dim=1)
    led_mask = torch.cat([prompt_mask[of_row, -1:], completion_mask], dim=1)
    packed = packed_groups(prompt_ids[:, :-1], prompt_mask[:, :-1], led_ids, led_mask, of_row, pad_token_id,
                           mask_dtype)
    packed["ends"] = packed["index"].gather(1, (led_mask.sum(-1, keepdim=True) - 1)).squeeze(-1)
    return packed


def packed_targets(packed: dict[str, Tensor], first_position: int, labels: Tensor) -> tuple[Tensor, Tensor]:
    """What to predict in :func:`packed_pairs` rows from ``first_position`` on, for the completions in ``labels``
    (``completion_labels``, chosen rows first): ``targets`` (B, L - first_position - 1), the next packed token at each
    position that predicts a completion token and ``IGNORE_INDEX`` elsewhere, and ``at`` (2B, C), where completion
    token ``k``'s log-probability lands in them (``targets`` column; completion token ``k`` is the one after its
    completion's position ``k``, the first being the prompt's last token)."""
    b = packed["input_ids"].size(0)
    following = packed["input_ids"][:, first_position + 1:]
    at = (packed["index"][:, :labels.size(1)] - first_position).clamp(0, following.size(1) - 1)
    rows = (torch.arange(2 * b, device=labels.device) % b).unsqueeze(-1).expand_as(at)
    real = labels != losses.IGNORE_INDEX
    wanted = torch.zeros(following.shape, dtype=torch.bool, device=labels.device)
    wanted[rows[real], at[real]] = True
    return following.masked_fill(~wanted, losses.IGNORE_INDEX), at


def unpack_logps(logps: Tensor, at: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities ``(2B, C)`` of the completions in ``labels`` and their mask, from the log-probabilities
    of :func:`packed_targets`' ``targets`` (B, K)."""
    mask = labels != losses.IGNORE_INDEX
    rows = torch.arange(at.size(0), device=at.device) % logps.size(0)
    return logps[rows.unsqueeze(-1), at] * mask, mask


__all__ = ["PACKABLE_ATTENTION", "PackingCheck", "attention_implementation", "packed_groups", "packed_mask_dtype",
           "packed_pairs", "packed_targets", "unpack_logps"]
