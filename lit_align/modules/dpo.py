"""Direct Preference Optimization (IotaCode Eq. 3), and the policy-side base shared by preference objectives.

A batch from :class:`~lit_align.data_modules.preference.PreferenceDataModule` holds ``B`` pairs as ``(2B, T)`` rows,
chosen first; the policy scores both halves in one forward pass. The reference policy of DPO is, by default, the
same LoRA network with its adapter disabled (no second copy in memory, as in the paper), a frozen copy of the
initial policy for full fine-tuning, or log-probabilities computed once before training and cached by example.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_align import losses
from lit_align.modules.base import AlignmentModule

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "adapter_disabled", "frozen_copy", "precomputed"]


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """rewards/chosen, rewards/rejected, rewards/margins (chosen minus rejected) and rewards/accuracies (chosen > rejected)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (nn.Dropout modules and the attention-dropout rates of HF attention layers)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def shared_prompt_forward(net: nn.Module, batch: dict[str, Any], **prompt_kwargs) -> tuple[Any, Any, Tensor]:
    """Run each prompt once, then the 2B completions on its keys/values: ``(prompt_out, completion_out, rows)``.

    ``batch`` holds the split layout of :func:`~lit_align.data_modules.preference.collate_pairs`: left-padded
    prompts (B, P) and right-padded completions (2B, C), chosen rows first. The prompt cache is repeated for both
    completions of each prompt (``rows`` maps completion row -> prompt row) and every position continues from its own
    prompt's length, so the result equals a pass over the full sequences. ``net`` is any HF decoder (causal LM or
    bare backbone) that accepts ``past_key_values``; ``prompt_kwargs`` go to the prompt pass (``logits_to_keep=1``).
    Raises NotImplementedError when the model returns no cache.
    """
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    ids, mask = batch["completion_input_ids"], batch["completion_attention_mask"]
    rows = torch.arange(prompt_ids.size(0), device=prompt_ids.device).repeat(2)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = net(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                     **prompt_kwargs)
    cache = prompt_out.past_key_values
    if cache is None:
        raise NotImplementedError("the model returned no KV cache")
    cache.batch_select_indices(rows)
    positions = prompt_mask.sum(-1)[rows].unsqueeze(-1) + torch.arange(ids.size(1), device=ids.device)
    out = net(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], dim=-1), position_ids=positions,
              past_key_values=cache, use_cache=True)
    return prompt_out, out, rows


class PreferenceModule(AlignmentModule):
    """Base of policy-side preference objectives (DPO, ORPO): the paired forward pass, the steps and the metrics.

    Args:
        share_prompt: run each prompt once for both of its completions: the prompt's keys and values are computed a
            single time and reused by the chosen and the rejected row (needs a model with a KV cache; ignored with
            gradient checkpointing, which drops caches). Off: one forward pass over the 2B full sequences.
        disable_dropout: turn dropout off in the policy (and reference), so the policy's and the reference's log-probs
            of the same weights agree exactly and the implicit rewards are not noise.
    """

    def __init__(self, *args, share_prompt: bool = True, disable_dropout: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._logits_to_keep_ok = True
        self._prompt_sharing_ok = True

    def configure_extra_models(self) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(self.model)

    # ------------------------------------------------------------------ the paired forward pass
    def concatenated_logps(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
        """Completion log-probs of the chosen and rejected rows of ``batch``, both halves in one pass of the network.

        Returns ``chosen_logps``/``rejected_logps`` (sums over completion tokens, (B,)), ``chosen_mean_logps``/
        ``rejected_mean_logps`` (per-token means), and ``token_logps``/``mask`` of all 2B completions. With
        ``share_prompt`` (and a batch split at the prompt, as :class:`PreferenceDataModule` gives) each prompt runs
        once and both completions attend to its cached keys/values; otherwise the 2B full sequences run together,
        with logits computed only from the last prompt position on (``logits_to_keep``).
        """
        if self._use_prompt_sharing(batch):
            try:
                token_logps, mask = self._shared_prompt_token_logps(batch, model)
            except (TypeError, AttributeError, NotImplementedError) as err:  # no usable KV cache in this architecture
                log.warning("lit_align: prompt sharing is not supported by this model (%s); running full sequences", err)
                self._prompt_sharing_ok = False
                token_logps, mask = self._full_token_logps(batch, model)
        else:
            token_logps, mask = self._full_token_logps(batch, model)
        sums = losses.sequence_logps(token_logps, mask)
        means = sums / mask.sum(-1).clamp(min=1)
        b = sums.size(0) // 2
        return {"chosen_logps": sums[:b], "rejected_logps": sums[b:], "chosen_mean_logps": means[:b],
                "rejected_mean_logps": means[b:], "token_logps": token_logps, "mask": mask}

    def _use_prompt_sharing(self, batch: dict[str, Any]) -> bool:
        return (self.hparams.share_prompt and self._prompt_sharing_ok and "prompt_input_ids" in batch
                and not self.hparams.gradient_checkpointing)

    def _full_token_logps(self, batch: dict[str, Any], model: nn.Module | None) -> tuple[Tensor, Tensor]:
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        seq = input_ids.size(1)
        start = batch.get("completion_start")
        if start is None:  # a batch built elsewhere: the first position holding a completion label in any row
            start = int((labels != losses.IGNORE_INDEX).int().argmax(-1).min())
        keep = min(seq, seq - int(start) + 1)
        logits = self._logits(input_ids, attention_mask, keep, model)
        return losses.token_logps(logits, labels[:, seq - logits.size(1):])

    def _shared_prompt_token_logps(self, batch: dict[str, Any], model: nn.Module | None) -> tuple[Tensor, Tensor]:
        """Prompts (B rows, left-padded) once with a KV cache, then the 2B completions on top of the repeated cache.

        The last prompt position's logits predict each completion's first token; the completion pass predicts the
        rest. Positions continue from each prompt's own length, so the numbers match the full-sequence pass.
        """
        net = model if model is not None else self.model
        labels = batch["completion_labels"]
        prompt_out, out, both = shared_prompt_forward(net, batch, logits_to_keep=1)
        first = -F.cross_entropy(prompt_out.logits[both, -1].float(), labels[:, 0].clamp(min=0), reduction="none")
        first_mask = labels[:, 0] != losses.IGNORE_INDEX
        rest, rest_mask = losses.token_logps(out.logits, labels)
        token_logps = torch.cat([(first * first_mask).unsqueeze(-1), rest], dim=-1)
        return token_logps, torch.cat([first_mask.unsqueeze(-1), rest_mask], dim=-1)

    def _logits(self, input_ids: Tensor, attention_mask: Tensor, keep: int, model: nn.Module | None) -> Tensor:
        net = model if model is not None else self.model
        if self._logits_to_keep_ok:
            try:
                return net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=keep).logits
            except TypeError:  # an architecture without logits_to_keep: compute every position
                self._logits_to_keep_ok = False
        return net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # ------------------------------------------------------------------ steps
    def shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "test")

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}


class DPO(PreferenceModule):
    """Direct Preference Optimization: IotaCode Eq. 3 with optional label smoothing (conservative DPO).

    Logs ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (implicit
    rewards beta * (log pi - log ref) of each completion) and ``logps/chosen``, ``logps/rejected`` (policy sequence
    log-probs). The loss is :meth:`compute_loss`; override it alone to make a new objective (see docs/objectives.md).

    Args:
        beta: inverse temperature of the implicit reward (the paper: 1.0); must be > 0.
        label_smoothing: assumed probability that a preference label is flipped (conservative DPO), in [0, 0.5).
        reference: where the reference log-probs come from. adapter_disabled: the LoRA policy with its adapter
            disabled (no extra memory); frozen_copy: a frozen copy of the initial policy; precomputed: computed once
            before the first step for every training and validation pair, cached by content hash and saved in
            checkpoints; auto: adapter_disabled with LoRA, frozen_copy without.
        reference_batch_size: pairs per forward pass when precomputing reference log-probs (default: the DataModule's
            eval_batch_size).
        share_prompt: compute each prompt once for its chosen and rejected completions (reused keys/values).
        disable_dropout: turn dropout off in the policy and the reference.
    """

    def __init__(self, *args, beta: float = 0.1, label_smoothing: float = 0.0, reference: ReferenceMode = "auto",
                 reference_batch_size: int | None = None, share_prompt: bool = True, disable_dropout: bool = True,
                 **kwargs) -> None:
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0 (it scales the implicit reward), got beta={beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
        if reference not in ("auto", "adapter_disabled", "frozen_copy", "precomputed"):
            raise ValueError(f"DPO reference must be auto, adapter_disabled, frozen_copy or precomputed, got {reference!r}")
        super().__init__(*args, share_prompt=share_prompt, disable_dropout=disable_dropout, **kwargs)
        if reference == "adapter_disabled" and self.lora_config is None:
            raise ValueError("DPO reference='adapter_disabled' needs a LoRA adapter (`lora`); without one use "
                             "'frozen_copy' or 'precomputed'")
        self.reference_mode: str = reference if reference != "auto" else (
            "adapter_disabled" if self.lora_config is not None else "frozen_copy")
        self.reference_model: nn.Module | None = None
        self._ref_cache: dict[str, Tensor] | None = None  # sorted "key", "chosen", "rejected" (CPU tensors)
        self._ref_cache_built = False

    # ------------------------------------------------------------------ reference
    def configure_extra_models(self) -> None:
        super().configure_extra_models()
        if self.reference_mode == "frozen_copy":
            # configure_model runs before any checkpoint is loaded, so this is the initial policy
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    def reference_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Reference sequence log-probs (chosen, rejected), each (B,), without gradient."""
        if self.reference_mode == "precomputed":
            return self._cached_reference_logps(batch)
        with torch.no_grad():
            out = self._compute_reference(batch)
        return out["chosen_logps"], out["rejected_logps"]

    def _compute_reference(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.reference_model is not None:
            return self.concatenated_logps(batch, model=self.reference_model)
        if self.lora_config is not None:
            with self.model.disable_adapter():
                return self.concatenated_logps(batch)
        # full fine-tuning, precomputed: valid only while the policy is still the initial one (checked by the caller)
        return self.concatenated_logps(batch)

    def _cached_reference_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if not self._ref_cache_built:
            self.precompute_reference()
        keys = batch["key"].cpu()
        cache = self._ref_cache
        found = torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.zeros_like(keys)
        if cache is not None and cache["key"].numel():
            pos = torch.searchsorted(cache["key"], keys).clamp(max=cache["key"].numel() - 1)
            found = cache["key"][pos] == keys
        if not bool(found.all()):
            if not self._reference_is_exact():
                raise ValueError(
                    f"DPO reference='precomputed': {int((~found).sum())} pair(s) of this batch are not in the reference "
                    "cache and the initial policy is no longer available to score them (full fine-tuning after the "
                    "first step); give every pair through the DataModule before training, or use LoRA")
            with torch.no_grad():
                out = self._compute_reference(batch)
            self._add_to_cache(keys, out["chosen_logps"], out["rejected_logps"])
            return out["chosen_logps"], out["rejected_logps"]
        device = batch["input_ids"].device
        return cache["chosen"][pos].to(device), cache["rejected"][pos].to(device)

    def _reference_is_exact(self) -> bool:
        """Whether the reference can be recomputed now: an adapter to disable, or a policy not yet trained."""
        return self.lora_config is not None or (self._trainer is not None and self.trainer.global_step == 0
                                                and not self._resumed)

    @property
    def _resumed(self) -> bool:
        return getattr(self, "_loaded_from_checkpoint", False)

    def _add_to_cache(self, keys: Tensor, chosen: Tensor, rejected: Tensor) -> None:
        new = {"key": keys.cpu(), "chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu()}
        if self._ref_cache is not None:
            new = {k: torch.cat([self._ref_cache[k], v]) for k, v in new.items()}
        order = torch.argsort(new["key"])
        new = {k: v[order] for k, v in new.items()}
        keep = torch.ones_like(new["key"], dtype=torch.bool)
        keep[1:] = new["key"][1:] != new["key"][:-1]
        self._ref_cache = {k: v[keep] for k, v in new.items()}

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """Score every pair of the attached DataModule with the reference once (eval mode) and cache the log-probs.

        Runs on the first step that needs the cache (sanity validation or the first training step), before any
        optimizer step; a resumed run finds the cache in its checkpoint instead.
        """
        self._ref_cache_built = True
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "reference_dataloader"):
            if not self._reference_is_exact() or self.lora_config is None:
                raise ValueError("DPO reference='precomputed' needs a PreferenceDataModule attached to the Trainer "
                                 "(trainer.fit(module, datamodule=...)) to precompute the reference log-probs")
            return  # LoRA: pairs are scored with the adapter disabled when first seen
        if not self._reference_is_exact():
            raise ValueError("DPO reference='precomputed': the checkpoint holds no reference cache and the initial "
                             "policy is no longer available; restart from the beginning or use LoRA")
        was_training = self.training
        self.eval()
        try:
            for batch in datamodule.reference_dataloader(self.hparams.reference_batch_size):
                batch = self._on_device(batch)
                out = self._compute_reference(batch)
                self._add_to_cache(batch["key"], out["chosen_logps"], out["rejected_logps"])
        finally:
            self.train(was_training)
        n = 0 if self._ref_cache is None else self._ref_cache["key"].numel()
        log.info("lit_align: DPO precomputed reference log-probs of %d pairs", n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_mode == "precomputed" and self._ref_cache is not None:
            checkpoint["lit_align_reference_cache"] = {k: v.clone() for k, v in self._ref_cache.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._loaded_from_checkpoint = True
        cache = checkpoint.get("lit_align_reference_cache")
        if self.reference_mode == "precomputed" and cache is not None:
            self._ref_cache = {k: v.cpu() for k, v in cache.items()}
            self._ref_cache_built = True

    # ------------------------------------------------------------------ loss
    def compute_loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                     reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The objective: per-example losses and the implicit rewards (chosen, rejected); override this one method."""
        return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.hparams.beta,
                               label_smoothing=self.hparams.label_smoothing)

    def shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        ref_chosen, ref_rejected = self.reference_logps(batch)  # first: no policy graph is held meanwhile
        policy = self.concatenated_logps(batch)
        per_example, chosen_rewards, rejected_rewards = self.compute_loss(
            policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected)
        loss = per_example.mean()
        metrics = {"loss": loss, **preference_metrics(chosen_rewards, rejected_rewards),
                   "logps/chosen": policy["chosen_logps"], "logps/rejected": policy["rejected_logps"]}
        self.log_metrics(stage, metrics, batch_size=policy["chosen_logps"].size(0))
        return loss

    @torch.no_grad()
    def example_margins(self, batch: dict[str, Any]) -> Tensor:
        """Per-pair implicit reward margin (chosen reward minus rejected reward), (B,), in eval mode, without gradient.

        The rewards are the ones :meth:`compute_loss` returns, so a subclass's reward definition is used.
        """
        batch = self._on_device(batch)
        was_training = self.training
        self.eval()
        try:
            ref_chosen, ref_rejected = self.reference_logps(batch)
            policy = self.concatenated_logps(batch)
            _, chosen_rewards, rejected_rewards = self.compute_loss(
                policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected)
        finally:
            self.train(was_training)
        return (chosen_rewards - rejected_rewards).float()


__all__ = ["DPO", "PreferenceModule", "disable_dropout", "preference_metrics", "shared_prompt_forward"]
