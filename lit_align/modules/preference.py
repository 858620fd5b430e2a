"""What the preference objectives (DPO, ORPO, the reward model) share: the pair-batch forward and the metrics.

A batch from :class:`~lit_align.data_modules.preference.PreferenceDataModule` holds ``B`` pairs as ``(2B, T)`` rows,
chosen first; :func:`shared_prompt_forward` runs each prompt once and both completions on its keys and values.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lit_align import losses
from lit_align.generation.hf import inference_mode
from lit_align.models import cache_keyword, disable_dropout, returned_cache
from lit_align.modules.base import NO_CACHE_ERRORS, AlignmentModule
from lit_align.modules.chunked_logps import check_chunk_size
from lit_align.modules.packed_pairs import (PackingCheck, packed_mask_dtype, packed_pairs, packed_targets,
                                            unpack_logps)


_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """rewards/chosen, rewards/rejected, rewards/margins (chosen minus rejected) and rewards/accuracies (chosen > rejected)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


def shared_prompt_forward(net: nn.Module, batch: dict[str, Any], rows: Tensor | None = None,
                          output_hidden_states: bool = False, **prompt_kwargs) -> tuple[Any, Any, Tensor]:
    """Run each prompt once, then every completion on its prompt's keys/values: ``(prompt_out, completion_out, rows)``.

    ``batch`` holds left-padded prompts (B, P) and right-padded completions (M, C) under the keys of
    :func:`~lit_align.data_modules.preference.collate_pairs`; ``rows`` maps completion row -> prompt row (default: the
    pair layout, M = 2B with chosen rows first, ``arange(B).repeat(2)``). The prompt cache is repeated for the
    completions of each prompt and every position continues from its own prompt's length, so the result equals a pass
    over the full sequences. ``net`` is any HF decoder (causal LM or bare backbone) that takes a KV cache
    (:func:`~lit_align.models.cache_keyword`); ``output_hidden_states`` goes to both passes, ``prompt_kwargs`` to the
    prompt pass (``logits_to_keep=1``).
    Raises NotImplementedError when the model returns no cache.
    """
    if rows is None:
        rows = torch.arange(batch["prompt_input_ids"].size(0), device=batch["prompt_input_ids"].device).repeat(2)
    with inference_mode(net) if _drops_cache_in_training(net) else contextlib.nullcontext():
        return _shared_prompt_forward(net, batch, rows, output_hidden_states, **prompt_kwargs)


def _drops_cache_in_training(net: nn.Module) -> bool:
    """Whether this pass must run ``net`` in eval mode to get its cache back: a pass without gradient through
    gradient-checkpointed layers in training mode under transformers < 5, whose layers drop the cache being filled
    (5.x keeps it without gradient, so there dropout is left as configured)."""
    return (_TRANSFORMERS_MAJOR < 5 and net.training and not torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) is True for m in net.modules()))


def _shared_prompt_forward(net: nn.Module, batch: dict[str, Any], rows: Tensor, output_hidden_states: bool,
                           **prompt_kwargs) -> tuple[Any, Any, Tensor]:
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    ids, mask = batch["completion_input_ids"], batch["completion_attention_mask"]
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = {"output_hidden_states": True} if output_hidden_states else {}
    prompt_out = net(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                     **hidden, **prompt_kwargs)
    cache = returned_cache(prompt_out)
    if cache is None:
        raise NotImplementedError("the model returned no KV cache")
    cache.batch_select_indices(rows)
    positions = prompt_mask.sum(-1)[rows].unsqueeze(-1) + torch.arange(ids.size(1), device=ids.device)
    out = net(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], dim=-1), position_ids=positions,
              use_cache=True, **hidden, **{cache_keyword(net): cache})
    return prompt_out, out, rows


class PreferenceModule(AlignmentModule):
    """Base of policy-side preference objectives (DPO, ORPO): the paired forward pass, the steps and the metrics.

    Args:
        share_prompt: run each prompt once for both of its completions: the prompt's keys and values are computed a
            single time and reused by the chosen and the rejected row (needs a model with a KV cache). With gradient
            or activation checkpointing, whose recomputation cannot re-run a cached pass, only passes without gradient
            share through the cache (the reference, validation); with torch_compile none through the compiled policy.
            Off: one forward pass over the 2B full sequences.
        packed_pairs: where the cache cannot be used (the policy's pass under checkpointing or torch_compile), pack
            each pair into one row, prompt | chosen | rejected (:mod:`~lit_align.modules.packed_pairs`), so the prompt
            still runs once; needs share_prompt and an attention that applies a 4D mask (sdpa, eager). Off: those
            passes run the 2B full sequences.
        disable_dropout: turn dropout off in the policy (and reference), so the policy's and the reference's log-probs
            of the same weights agree exactly and the implicit rewards are not noise.
        logits_chunk_size: run the LM head over this many completion tokens at a time, on the backbone's last hidden
            states, so no (tokens x vocabulary) logits are held (lit_align/modules/chunked_logps.py), in the
            policy's and the reference's passes; prompt and padding tokens skip the head. Checked once against the
            model's own logits. null: the logits of every completion position at once.
    """

    data_kind = "preference"

    def __init__(self, *args, share_prompt: bool = True, packed_pairs: bool = True, disable_dropout: bool = True,
                 logits_chunk_size: int | None = None, **kwargs) -> None:
        check_chunk_size(logits_chunk_size)
        super().__init__(*args, **kwargs)
        self.packing = PackingCheck()  # packed rows checked against full ones on the first packed batch

    def configure_extra_models(self) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(self.model)

    # ------------------------------------------------------------------ the paired forward pass
    def chosen_nll(self, out: dict[str, Tensor], stage: str,
                   window_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(term to back-propagate, figure to log): the chosen completions' NLL as a token mean over the batch's chosen
        tokens (ORPO's first term, DPO's RPO term); in training under DDP over every process's chosen tokens, and with
        ``window_tokens`` (the batch's tag under gradient accumulation) over every chosen token of the optimizer step.
        The figure logged is the micro-batch's (all processes')."""
        b = out["chosen_logps"].size(0)
        tokens = out["mask"][:b].sum()
        nll = -(out["chosen_logps"].sum() / tokens.clamp(min=1))
        if stage != "train":
            return nll, nll
        nll, logged, _ = self.global_token_mean(nll, tokens, window_tokens)
        return nll, logged

    def concatenated_logps(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
        """Completion log-probs of the chosen and rejected rows of ``batch``, both halves in one pass of the network.

        Returns ``chosen_logps``/``rejected_logps`` (sums over completion tokens, (B,)), ``chosen_mean_logps``/
        ``rejected_mean_logps`` (per-token means), and ``token_logps``/``mask`` of all 2B completions. With
        ``share_prompt`` (and a batch split at the prompt, as :class:`PreferenceDataModule` gives) each prompt runs
        once and both completions attend to its cached keys/values; otherwise the 2B full sequences run together,
        with logits computed only from the last prompt position on (``logits_to_keep``).
        """
        if self._use_prompt_sharing(batch, model):
            try:
                token_logps, mask = self._shared_prompt_token_logps(batch, model)
            except NO_CACHE_ERRORS as err:
                self.prompt_sharing_failed(err)
                token_logps, mask = self._full_token_logps(batch, model)
        elif self._use_packed_pairs(batch, model):
            token_logps, mask = self._packed_token_logps(batch, model)
        else:
            token_logps, mask = self._full_token_logps(batch, model)
        sums = losses.sequence_logps(token_logps, mask)
        means = sums / mask.sum(-1).clamp(min=1)
        b = sums.size(0) // 2
        return {"chosen_logps": sums[:b], "rejected_logps": sums[b:], "chosen_mean_logps": means[:b],
                "rejected_mean_logps": means[b:], "token_logps": token_logps, "mask": mask}

    def _use_prompt_sharing(self, batch: dict[str, Any], model: nn.Module | None = None) -> bool:
        return "prompt_input_ids" in batch and self.shares_prompts(model)

    def _use_packed_pairs(self, batch: dict[str, Any], model: nn.Module | None = None) -> bool:
        """Share the prompt in one packed row per pair (:mod:`~lit_align.modules.packed_pairs`) where a cache may not
        be filled (checkpointing, compiled blocks): ``share_prompt`` and ``packed_pairs`` on, the batch split at the
        prompt, an attention that applies a 4D mask, and the first packed pass of the run equal to full rows
        (:meth:`_compare_packing`)."""
        net = model if model is not None else self.model
        hp = self.hparams
        return bool(hp.get("share_prompt") and hp.get("packed_pairs", True) and "prompt_input_ids" in batch
                    and self.packing.allows(net, lambda: self._compare_packing(batch, net)))

    def _compare_packing(self, batch: dict[str, Any], net: nn.Module) -> tuple[Tensor, Tensor, Tensor, bool]:
        """The packed pass against full rows, for the run's one check: an architecture whose attention does not apply
        the 4D mask as given (or positions as given) shows here, and the run keeps full rows, with a warning.
        Compared: each completion's log-probability per token."""
        packed, mask = self._packed_token_logps(batch, net)
        full, _ = self._full_token_logps(batch, net)
        return packed.sum(-1), full.sum(-1), mask.sum(-1), self.exact_pass(net, batch["input_ids"])

    def _packed_token_logps(self, batch: dict[str, Any], model: nn.Module | None) -> tuple[Tensor, Tensor]:
        """One row per pair, prompt | chosen | rejected, with the mask and positions of
        :func:`~lit_align.modules.packed_pairs.packed_pairs`; logits from the shortest prompt's last position on."""
        net = model if model is not None else self.model
        packed = packed_pairs(batch, self.pad_token_id, mask_dtype=packed_mask_dtype(net))
        first = int(batch["prompt_attention_mask"].sum(-1).min()) - 1
        targets, at = packed_targets(packed, first, batch["completion_labels"])
        logps, _ = self.target_logps(net, first, targets, input_ids=packed["input_ids"],
                                     attention_mask=packed["attention_mask"], position_ids=packed["position_ids"],
                                     use_cache=False)
        return unpack_logps(logps, at, batch["completion_labels"])

    def _full_token_logps(self, batch: dict[str, Any], model: nn.Module | None) -> tuple[Tensor, Tensor]:
        """The 2B full sequences; logits from the first completion token's predecessor on."""
        net = model if model is not None else self.model
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        seq = input_ids.size(1)
        start = batch.get("completion_start")
        if start is None:  # a batch built elsewhere: the first position holding a completion label in any row
            start = int((labels != losses.IGNORE_INDEX).int().argmax(-1).min())
        first = max(0, int(start) - 1)
        return self.target_logps(net, first, labels[:, first + 1:], input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)

    def _shared_prompt_token_logps(self, batch: dict[str, Any], model: nn.Module | None) -> tuple[Tensor, Tensor]:
        """Prompts (B rows, left-padded) once with a KV cache, then the 2B completions on top of the repeated cache.

        The last prompt position's logits predict each completion's first token; the completion pass predicts the
        rest. Positions continue from each prompt's own length, so the numbers match the full-sequence pass.
        """
        net = model if model is not None else self.model
        if self.uses_chunked_logps(net, batch["completion_input_ids"]):
            return self._chunked_shared_prompt_token_logps(batch, net)
        return self._logits_shared_prompt_token_logps(batch, net)

    def _logits_shared_prompt_token_logps(self, batch: dict[str, Any], net: nn.Module) -> tuple[Tensor, Tensor]:
        """:meth:`_shared_prompt_token_logps` through the model's logits."""
        labels = batch["completion_labels"]
        prompt_out, out, both = shared_prompt_forward(net, batch, logits_to_keep=1)
        first = -F.cross_entropy(prompt_out.logits[both, -1].float(), labels[:, 0].clamp(min=0), reduction="none")
        first_mask = labels[:, 0] != losses.IGNORE_INDEX
        rest, rest_mask = losses.token_logps(out.logits, labels)
        token_logps = torch.cat([(first * first_mask).unsqueeze(-1), rest], dim=-1)
        return token_logps, torch.cat([first_mask.unsqueeze(-1), rest_mask], dim=-1)

    def _chunked_shared_prompt_token_logps(self, batch: dict[str, Any], net: nn.Module) -> tuple[Tensor, Tensor]:
        """:meth:`_shared_prompt_token_logps` through the chunked LM head: in the prompt pass the last prompt
        position predicts each completion's first token, in the completion pass the completion's own positions the
        rest."""
        labels = batch["completion_labels"]
        both = torch.arange(batch["prompt_input_ids"].size(0), device=labels.device).repeat(2)  # the pair layout
        with self.chunked_head(net, [(lambda hidden: hidden[both, -1:], labels[:, :1]),
                                     (lambda hidden: hidden[:, :-1], labels[:, 1:])]):
            prompt_out, out, _ = shared_prompt_forward(net, batch, logits_to_keep=1)
        return torch.cat([prompt_out.logits[..., 0], out.logits[..., 0]], dim=1), labels != losses.IGNORE_INDEX

    # ------------------------------------------------------------------ steps
    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
