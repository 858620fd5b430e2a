"""Direct Preference Optimization (IotaCode Eq. 3).

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
from torch import Tensor, nn

from lit_align import losses
from lit_align.generation.hf import inference_mode
from lit_align.models import is_zero3_partitioned
from lit_align.modules.preference import PreferenceModule, preference_metrics

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "adapter_disabled", "frozen_copy", "precomputed"]


class DPO(PreferenceModule):
    """Direct Preference Optimization: IotaCode Eq. 3 with optional label smoothing (conservative DPO).

    Logs ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (implicit
    rewards beta * (log pi - log ref) of each completion) and ``logps/chosen``, ``logps/rejected`` (policy sequence
    log-probs). The loss is :meth:`compute_loss`; override it alone to make a new objective (see docs/objectives.md).

    Args:
        beta: inverse temperature of the implicit reward (the paper: 1.0); must be > 0.
        label_smoothing: assumed probability that a preference label is flipped (conservative DPO), in [0, 0.5).
        rpo_alpha: weight of an added negative log-likelihood of the chosen completions (token mean over the step's
            chosen tokens, as ORPO's NLL term; RPO), >= 0; 0 (default) is plain DPO. It keeps the chosen log-probs
            from falling along with the rejected ones; logged as ``nll`` when > 0.
        reference: where the reference log-probs come from. adapter_disabled: the LoRA policy with its adapter
            disabled (no extra memory); frozen_copy: a frozen copy of the initial policy; precomputed: computed once
            before the first step for every training and validation pair, cached by content hash and saved in
            checkpoints; auto: adapter_disabled with LoRA, frozen_copy without.
        reference_placement: where a frozen_copy reference lives when training on several devices. shard: it is a
            submodule, so FSDP (and DeepSpeed ZeRO-3) shard it with the policy and gather it block by block for its
            forward pass (least memory); replicate: it is kept outside the module tree, every process holds a whole
            copy on its device and the sharding strategy never touches it (no gathering; the copy runs in its load
            dtype, outside FSDP's mixed precision). DDP keeps a whole copy per process either way. Only for
            frozen_copy: the adapter-disabled reference is the policy itself.
        reference_batch_size: pairs per forward pass when precomputing reference log-probs (default: the DataModule's
            eval_batch_size).
        share_prompt: compute each prompt once for its chosen and rejected completions (reused keys/values).
        packed_pairs: where a pass cannot reuse keys/values (the policy under gradient checkpointing or
            torch_compile), share the prompt by packing each pair into one row instead (with share_prompt).
        disable_dropout: turn dropout off in the policy and the reference.
        logits_chunk_size: run the LM head this many completion tokens at a time, so no (tokens x vocabulary)
            logits are held (:class:`~lit_align.modules.preference.PreferenceModule`); null: all at once.
    """

    def __init__(self, *args, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                 reference: ReferenceMode = "auto", reference_placement: Literal["shard", "replicate"] = "shard",
                 reference_batch_size: int | None = None, share_prompt: bool = True, packed_pairs: bool = True,
                 disable_dropout: bool = True, logits_chunk_size: int | None = None, **kwargs) -> None:
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0 (it scales the implicit reward), got beta={beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
        if not rpo_alpha >= 0:
            raise ValueError(f"DPO rpo_alpha must be >= 0 (weight of the chosen NLL term), got rpo_alpha={rpo_alpha}")
        if reference not in ("auto", "adapter_disabled", "frozen_copy", "precomputed"):
            raise ValueError(f"DPO reference must be auto, adapter_disabled, frozen_copy or precomputed, got {reference!r}")
        super().__init__(*args, share_prompt=share_prompt, packed_pairs=packed_pairs,
                         disable_dropout=disable_dropout, logits_chunk_size=logits_chunk_size, **kwargs)
        if reference == "adapter_disabled" and self.lora_config is None:
            raise ValueError("DPO reference='adapter_disabled' needs a LoRA adapter (`lora`); without one use "
                             "'frozen_copy' or 'precomputed'")
        self.reference_mode: str = reference if reference != "auto" else (
            "adapter_disabled" if self.lora_config is not None else "frozen_copy")
        if reference_placement not in ("shard", "replicate"):
            raise ValueError(f"DPO reference_placement must be shard or replicate, got {reference_placement!r}")
        if reference_placement == "replicate" and self.reference_mode != "frozen_copy":
            raise ValueError(f"DPO reference_placement='replicate' places a frozen copy of the policy, but the reference "
                             f"is {self.reference_mode} (set reference: frozen_copy, or keep reference_placement: shard)")
        self.reference_model: nn.Module | None = None
        self._ref_cache: dict[str, Tensor] | None = None  # sorted "key", "chosen", "rejected" (CPU tensors)
        self._ref_cache_built = False

    # ------------------------------------------------------------------ reference
    def configure_extra_models(self) -> None:
        super().configure_extra_models()
        if self.reference_mode == "frozen_copy":
            # configure_model runs before any checkpoint is loaded (and before a strategy wraps the policy), so this is
            # the initial policy
            if is_zero3_partitioned(self.model):  # DeepSpeed ZeRO-3: a partitioned model cannot be deep-copied
                if self.hparams.reference_placement == "replicate":
                    raise ValueError("DPO reference_placement='replicate' is not available under DeepSpeed ZeRO-3 "
                                     "(every model built during setup is partitioned there); use reference_placement: "
                                     "shard, which ZeRO-3 shards and gathers like the policy")
                reference = self.build_policy()  # full fine-tuning: the initial policy is the loaded model again
            else:
                reference = copy.deepcopy(self.model)
            # frozen; scored in eval mode (_compute_reference). Kept in train mode otherwise, as the online objectives'
            # reference copy, so that Lightning does not warn about modules in eval mode at the start of training
            reference = reference.train().requires_grad_(False)
            if self.hparams.reference_placement == "replicate":
                self.keep_replicated(reference)
            else:
                self.reference_model = reference

    @property
    def reference_network(self) -> nn.Module | None:
        """The frozen reference copy (a submodule, or the replicated copy moved to this process's device), if any."""
        replica = self.replicated_network
        return replica if replica is not None else self.reference_model

    def reference_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Reference sequence log-probs (chosen, rejected), each (B,), without gradient."""
        if self.reference_mode == "precomputed":
            return self._cached_reference_logps(batch)
        with torch.no_grad():
            out = self._compute_reference(batch)
        return out["chosen_logps"], out["rejected_logps"]

    def _compute_reference(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        reference = self.reference_network
        if reference is not None:
            with inference_mode(reference):
                return self.concatenated_logps(batch, model=reference)
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
        metrics = {**preference_metrics(chosen_rewards, rejected_rewards),
                   "logps/chosen": policy["chosen_logps"], "logps/rejected": policy["rejected_logps"]}
        metrics["loss"] = loss
        if self.hparams.rpo_alpha > 0:
            nll, metrics["nll"] = self.chosen_nll(policy, stage, batch.get("window_tokens"))
            # the NLL to back-propagate is rescaled (processes, accumulation); the logged loss is the micro-batch's
            dpo_term = self.global_mean(loss.detach()) if stage == "train" else loss
            metrics["loss"] = dpo_term + self.hparams.rpo_alpha * metrics["nll"]
            loss = loss + self.hparams.rpo_alpha * nll
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


__all__ = ["DPO"]
