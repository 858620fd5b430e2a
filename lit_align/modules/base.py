"""The LightningModule every objective extends: model construction, completion log-probabilities, optimizer wiring.

An objective subclass adds only what differs: its extra hyperparameters, ``training_step``/``validation_step``
(usually through :meth:`AlignmentModule.shared_step`) and one overridable loss method. Models are built in
:meth:`configure_model` from the plain hyperparameters saved by ``save_hyperparameters``, so ``--ckpt_path`` resumes
and ``load_from_checkpoint`` rebuild them. With frozen weights (LoRA, QLoRA) checkpoints hold only the trainable
parameters; the frozen base is rebuilt from ``model_name_or_path``.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor
from torchmetrics import Metric

from lit_align import losses
from lit_align.models import (DType, LoRAConfig, apply_lora, compile_blocks, count_parameters, import_model_classes,
                              load_causal_lm, load_tokenizer, pinned_model_path)
from lit_align.modules.chunked_logps import ChunkedLogpsCheck, HeadCall, head_in_chunks


log = logging.getLogger(__name__)

NO_CACHE_ERRORS = (TypeError, AttributeError, NotImplementedError)
"""What a forward pass that fills or reuses a KV cache raises on an architecture without a usable one."""


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then a decay, stepped once per optimizer step (not per micro-batch)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); not applied to biases and norms."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment coefficients."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps (the paper: 5000)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    fused: bool | None = None
    """torch's fused AdamW kernel (one kernel per step for all parameters); null: on when every trainable parameter is
    on a CUDA device and DeepSpeed does not wrap the optimizer, else torch's default (the foreach kernels)."""

    def __post_init__(self) -> None:  # refused while the CLI builds the module, before a run directory exists
        checks = [("lr", self.lr >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"), ("eps", self.eps > 0, "> 0"),
                  ("betas", all(0.0 <= b < 1.0 for b in self.betas), "in [0, 1)"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"optimizer.{name} must be {expected}, got {getattr(self, name)}")


def warmup_decay(step: int, warmup_steps: int, total_steps: int | Callable[[], int], schedule: str,
                 min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then cosine/linear decay or constant.
    ``total_steps`` may be a function, called only at the steps whose multiplier depends on it (after the first)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or step == warmup_steps:
        return 1.0
    decay_steps = max(1, (total_steps() if callable(total_steps) else total_steps) - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


# Checkpoints store these plain dataclasses in their hyperparameters; let torch.load(weights_only=True) read them.
torch.serialization.add_safe_globals([OptimizerConfig, LoRAConfig])


def packed_causal_mask(position_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive (batch, 1, seq, seq) mask: token i sees token j iff j <= i and both belong to the same packed example.

    Examples are delimited by ``position_ids`` restarting at 0. Allowed entries are 0, blocked ones the dtype's minimum.
    """
    segment = (position_ids == 0).cumsum(-1)
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)
    seq = position_ids.size(-1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal).unsqueeze(1)
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def fsdp_roots(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost FSDP units inside ``module`` (each the root of its own network)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    roots, inside = [], set()
    for name, m in module.named_modules():
        if isinstance(m, FullyShardedDataParallel) and not any(name.startswith(p) for p in inside):
            roots.append(m)
            inside.add(name + ".")
    return roots


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts added by FSDP, activation-checkpoint wrappers and torch.compile, absent from saved state dicts."""


def clean_parameter_name(name: str) -> str:
    """A parameter's name without the parts wrapper modules insert (as in the state dict of the unwrapped model)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def batch_kind_of(batch: Any) -> str | None:
    """What a batch holds, judged by its layout, for a DataModule that does not say (``batch_kind`` None): "prompts" (a
    :class:`~lit_align.data_modules.prompts.PromptBatch`), "preference" (pairs split at the prompt, or keyed, as
    :class:`~lit_align.data_modules.preference.PreferenceDataModule` gives them), "sft" (``input_ids`` and ``labels``
    only), None for anything else."""
    from lit_align.data_modules.prompts import PromptBatch

    if isinstance(batch, PromptBatch):
        return "prompts"
    if not isinstance(batch, dict):
        return None
    if "completion_input_ids" in batch or "prompt_input_ids" in batch or "key" in batch:
        return "preference"
    return "sft" if "input_ids" in batch and "labels" in batch else None


class AlignmentModule(L.LightningModule):
    """Base of every lit_align objective: builds the policy, computes completion log-probs, wires the optimizer.

    Args:
        model_name_or_path: Hugging Face hub id, local model directory, or built-in preset ("preset:tiny").
        tokenizer_name_or_path: tokenizer to use when it differs from the model's.
        lora: LoRA adapter settings; null trains every weight (full fine-tuning).
        quantize_4bit: load the base weights in bitsandbytes 4-bit NF4 (QLoRA; needs lora).
        dtype: dtype the weights are loaded in.
        attn_implementation: attention kernel ("sdpa", "eager", "flash_attention_2"); null lets transformers choose.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        optimizer: AdamW and learning-rate schedule settings.
        torch_compile: torch.compile each transformer block for the training forward and backward (the first steps
            pay the compilation; generation runs them eager). One device, DDP or DeepSpeed ZeRO-1/2; refused under
            FSDP and ZeRO-3.
    """

    data_kind: str | None = None
    """The ``batch_kind`` of the DataModule this objective trains on ("sft", "preference", "prompts"); another kind is
    refused (:meth:`refuse_incompatible_data`), since it would be misread rather than fail."""

    def __init__(
        self,
        model_name_or_path: str = "preset:tiny",
        tokenizer_name_or_path: str | None = None,
        lora: LoRAConfig | None = None,
        quantize_4bit: bool = False,
        dtype: DType = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerConfig | None = None,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        # plain dicts (from Python, or hyperparameters read back from a checkpoint) become the typed configs
        lora = LoRAConfig(**lora) if isinstance(lora, dict) else lora
        optimizer = OptimizerConfig(**optimizer) if isinstance(optimizer, dict) else optimizer
        if quantize_4bit and lora is None:
            raise ValueError("quantize_4bit=True needs a LoRA adapter (`lora`): 4-bit base weights cannot be trained directly")
        self.save_hyperparameters()
        # after it: a subclass's own **kwargs frame would put the link back over a pinned value assigned before it
        self.hparams.update(model_name_or_path=pinned_model_path(model_name_or_path),
                            tokenizer_name_or_path=pinned_model_path(tokenizer_name_or_path))
        # typed configs live on the module: LightningCLI stores hparams as the raw config (dicts), so read these instead
        self.lora_config = lora
        self.optimizer_config = optimizer or OptimizerConfig()
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        # Adapter-only checkpoints lack the frozen base by design; on_load_checkpoint checks every trainable weight is there.
        self.strict_loading = False
        self._rng_state_to_restore: dict[str, Any] | None = None
        self._prompt_sharing_ok = True  # until a model returns no usable KV cache (prompt_sharing_failed)
        self._logits_to_keep_ok = True  # until an architecture refuses logits_to_keep (forward_keeping_logits)
        self.chunked_logps = ChunkedLogpsCheck()  # the chunked LM head checked once against the model's logits
        self._loading_trainable_only = False

    # ------------------------------------------------------------------ construction
    @property
    def tokenizer_source(self) -> str:
        return self.hparams.tokenizer_name_or_path or self.hparams.model_name_or_path

    def build_policy(self) -> torch.nn.Module:
        """The trainable policy: the causal LM with its LoRA adapter if one is configured."""
        hp = self.hparams
        model = load_causal_lm(hp.model_name_or_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                               quantize_4bit=hp.quantize_4bit, gradient_checkpointing=hp.gradient_checkpointing)
        if self.lora_config is not None:
            model = apply_lora(model, self.lora_config)
        return model.train()  # from_pretrained returns eval mode; Lightning toggles modes from here on

    def setup(self, stage: str) -> None:
        """Lightning calls this before ``configure_model``, outside DeepSpeed's ``zero.Init``: under ZeRO-3 the classes
        of every model in :meth:`model_sources` are imported here (``models.import_model_classes``)."""
        self.refuse_unsupported_compile(getattr(self._trainer, "strategy", None))
        self.refuse_incompatible_data(getattr(self._trainer, "datamodule", None))
        if self._deepspeed_zero3() is not None:
            for source in self.model_sources():
                import_model_classes(source)

    def refuse_incompatible_data(self, datamodule) -> None:
        """A DataModule whose batches are of another kind than this objective's (:attr:`data_kind`) is refused: they
        would be misread, not fail (DPO takes the first half of an SFT batch's rows as chosen completions and the
        second as rejected; SFT would fit the rejected completions of preference pairs). A DataModule that does not
        say what it holds (``batch_kind`` None, a user's own) is checked at its first batch instead
        (:meth:`refuse_misread_batch`)."""
        kind = getattr(datamodule, "batch_kind", None)
        if self.data_kind is None or kind is None or kind == self.data_kind:
            return
        raise ValueError(f"{type(self).__name__} trains on {self.data_kind} batches, but {type(datamodule).__name__} "
                         f"gives {kind} batches, which it would misread; use --data {self._fitting_data()}")

    def _fitting_data(self) -> str:
        fitting = {"sft": "SFTDataModule", "preference": "PreferenceDataModule", "prompts": "PromptsDataModule"}
        return fitting.get(self.data_kind, f"a DataModule of {self.data_kind} batches")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.refuse_misread_batch(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.refuse_misread_batch(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.refuse_misread_batch(batch)

    def refuse_misread_batch(self, batch: Any) -> None:
        """The first batch (training, validation, whose sanity check comes first, or test) of a DataModule that does
        not say what its batches hold (``batch_kind`` None) is judged by its layout (:func:`batch_kind_of`) and
        refused, before any update, when it is of another kind than this objective's: DPO would read an SFT batch's
        rows as pairs and train on it without an error."""
        if getattr(self, "_first_batch_checked", False):
            return
        self._first_batch_checked = True
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.data_kind is None or getattr(datamodule, "batch_kind", None) is not None:
            return
        kind = batch_kind_of(batch)
        if kind is None or kind == self.data_kind:
            return
        from lit_align.data_modules.sources import DataError

        name = type(datamodule).__name__ if datamodule is not None else "the training data"
        held = f" (it holds {', '.join(sorted(batch))})" if isinstance(batch, dict) else ""
        raise DataError(f"{type(self).__name__} trains on {self.data_kind} batches, but the first batch of {name} is "
                        f"laid out as {kind} batches{held}, which it would misread; use --data "
                        f"{self._fitting_data()}, or, if its batches are {self.data_kind} batches in lit_align's layout "
                        f"(docs/objectives.md), say so with batch_kind = {self.data_kind!r} on {name}")

    def refuse_unsupported_compile(self, strategy) -> None:
        """``torch_compile`` runs on one device, under DDP and under DeepSpeed ZeRO-1/2 (which leave the blocks'
        parameters whole). Refused, having been tried: FSDP, whose flat parameters the compiler fails on (it meets a
        block weight whose flat parameter holds a gradient shard of another size), and ZeRO-3, whose per-layer gather
        hooks the compiler traces into and recompiles for at every layer until it falls back to eager."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if not self.hparams.get("torch_compile"):
            return
        if isinstance(strategy, FSDPStrategy):
            raise ValueError("torch_compile is not supported with trainer.strategy FSDPStrategy (torch's compiler fails "
                             "on FSDP's flat parameters inside a compiled block); use ddp, deepspeed_stage_2 or one "
                             "device, or drop torch_compile")
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            raise ValueError("torch_compile is not supported with DeepSpeed ZeRO stage 3 (the compiler traces its "
                             "per-layer parameter gathering and recompiles at every layer until it gives up); use "
                             "deepspeed_stage_2, ddp or one device, or drop torch_compile")

    def model_sources(self) -> list[str]:
        """The models (hub ids, directories, presets) whose networks ``configure_model`` builds: the policy's, and in
        subclasses any other architecture they build there."""
        return [self.hparams.model_name_or_path]

    def configure_model(self) -> None:
        """Build tokenizer and policy once (Lightning calls this on fit/validate and in ``load_from_checkpoint``)."""
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_source)
        with self._deepspeed_zero3_loading():
            self.model = self.build_policy()
            self.configure_extra_models()
        if self.hparams.get("torch_compile"):  # after the extra models: a frozen reference copy stays uncompiled
            compile_blocks(self.model)

    @contextmanager
    def _deepspeed_zero3_loading(self):
        """Under DeepSpeed ZeRO-3 Lightning calls configure_model inside ``deepspeed.zero.Init``, which partitions each
        parameter as it is created, so ``from_pretrained`` must load the weights shard-wise. transformers does that
        only when it knows ZeRO-3 is on, which it reads from a global ``HfDeepSpeedConfig`` (through a weak reference):
        one is held while the networks are built, and dropped after (a model built later, outside Lightning's
        ``zero.Init``, such as LoRAMerge's export copy, is an ordinary one)."""
        strategy = self._deepspeed_zero3()
        if strategy is None:
            yield
            return
        if self.hparams.quantize_4bit:  # (ZeRO-2 and FSDP take it: tests/test_ddp_sft.py)
            raise ValueError("quantize_4bit (QLoRA) is not supported under DeepSpeed ZeRO-3: building a 4-bit model "
                             "inside DeepSpeed's zero.Init fails in transformers; use trainer.strategy "
                             "deepspeed_stage_2, FSDP (which shards the 4-bit base) or ddp")
        from transformers.integrations import HfDeepSpeedConfig

        announced = HfDeepSpeedConfig(strategy.config)
        try:
            yield
        finally:
            del announced

    def _deepspeed_zero3(self):
        """The trainer's DeepSpeed strategy when it runs ZeRO-3, else None."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = getattr(self._trainer, "strategy", None)
        return strategy if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 else None

    def configure_extra_models(self) -> None:
        """Hook for objectives that need more networks (a frozen reference copy, a value head)."""

    def keep_replicated(self, network: torch.nn.Module) -> None:
        """Hold a frozen ``network`` outside the module tree: no strategy shards, wraps or saves it, so every process
        keeps a whole copy (``reference_placement: replicate``). Read it back with :attr:`replicated_network`."""
        self.__dict__["_replicated_network"] = network

    @property
    def replicated_network(self) -> torch.nn.Module | None:
        """The network held by :meth:`keep_replicated`, moved to this process's device (None if there is none)."""
        network = self.__dict__.get("_replicated_network")
        if network is not None and next(network.parameters()).device != self.device:
            network.to(self.device)
        return network

    def recomputes_activations(self) -> bool:
        """Whether the backward pass re-runs the policy's blocks: ``gradient_checkpointing``, or activation
        checkpointing applied by the strategy (FSDP's ``activation_checkpointing_policy`` wraps blocks in a
        ``CheckpointWrapper``). A forward pass that fills a KV cache cannot be re-run (the cache would grow twice)."""
        if self.hparams.gradient_checkpointing:
            return True
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        return self.model is not None and any(isinstance(m, CheckpointWrapper) for m in self.model.modules())

    def can_share_prompts(self, network: torch.nn.Module | None = None) -> bool:
        """Whether a forward pass of ``network`` (default: the policy) may fill a KV cache that later passes reuse
        (``share_prompt``). A pass with gradient may not when the backward re-runs the blocks
        (:meth:`recomputes_activations`: the cache would grow twice); a pass without gradient (a reference,
        validation, scoring) may, since nothing re-runs it. Never through compiled blocks (``torch_compile``), which
        would recompile for each layer's view of a cache being filled (the 2B full sequences run compiled instead);
        a frozen reference copy is not compiled."""
        if self.hparams.get("torch_compile") and (network is None or network is self.model):
            return False
        return not torch.is_grad_enabled() or not self.recomputes_activations()

    def shares_prompts(self, network: torch.nn.Module | None = None) -> bool:
        """Whether a pass of ``network`` (default: the policy) runs each prompt once for all of its rows now: the
        module's ``share_prompt`` option is on, the model's KV cache has worked so far (:meth:`prompt_sharing_failed`)
        and the pass may fill a cache (:meth:`can_share_prompts`)."""
        return bool(self.hparams.get("share_prompt")) and self._prompt_sharing_ok and self.can_share_prompts(network)

    def prompt_sharing_failed(self, err: Exception) -> None:
        """Run full rows from now on: the model returned no usable KV cache (``err``, one of :data:`NO_CACHE_ERRORS`)."""
        log.warning("lit_align: prompt sharing is not supported by this model (%s); running full sequences", err)
        self._prompt_sharing_ok = False

    def forward_keeping_logits(self, net: torch.nn.Module, keep: int, **inputs: Any) -> Any:
        """``net(**inputs)`` with logits only at the last ``keep`` positions (``logits_to_keep``); at every position
        for an architecture without that argument (remembered for the rest of the run)."""
        if self._logits_to_keep_ok:
            try:
                return net(**inputs, logits_to_keep=keep)
            except TypeError:  # an architecture without logits_to_keep: compute every position
                self._logits_to_keep_ok = False
        return net(**inputs)

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self, wrapper=self.trainer.strategy.model)
        self.print(f"lit_align: {type(self).__name__} on {self.hparams.model_name_or_path}: "
                   f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")

    # ------------------------------------------------------------------ forward and log-probs
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                model: torch.nn.Module | None = None) -> Tensor:
        """Logits of ``model`` (the policy by default) over ``input_ids``.

        Packed batches come with ``position_ids`` (restarting at 0 for each example) and no attention mask; they get
        a block-diagonal causal mask so packed examples never attend to each other (flash-attention derives the
        same from the position ids itself).
        """
        net = model if model is not None else self.model
        return net(**self.forward_inputs(net, input_ids, attention_mask, position_ids)).logits

    def forward_inputs(self, net: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None) -> dict[str, Any]:
        """:meth:`forward`'s keyword arguments for ``net``: the packed batches' block-diagonal mask where needed."""
        if position_ids is not None and attention_mask is None and self.hparams.attn_implementation != "flash_attention_2":
            attention_mask = packed_causal_mask(position_ids, self._compute_dtype(net))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "use_cache": False}

    def target_logps(self, net: torch.nn.Module, start: int, targets: Tensor, **inputs: Any) -> tuple[Tensor, Tensor]:
        """Log-probabilities (B, n) in float32 of ``targets`` (B, n), the tokens positions ``start`` to
        ``start + n - 1`` of the pass ``net(**inputs)`` predict (``IGNORE_INDEX`` where none is wanted: 0 there), and
        their mask. Logits are computed from ``start`` on only; with the module's ``logits_chunk_size`` not even those
        are held whole: the LM head runs that many tokens at a time, only at the wanted positions
        (:mod:`~lit_align.modules.chunked_logps`), once the run's first such pass has given the model's own numbers."""
        if self.uses_chunked_logps(net, inputs["input_ids"]):
            return self._chunked_target_logps(net, start, targets, inputs)
        keep = inputs["input_ids"].size(1) - start
        logits = self.forward_keeping_logits(net, keep, **inputs).logits
        return losses.target_logps(logits[:, -keep:][:, :targets.size(1)], targets)

    def uses_chunked_logps(self, net: torch.nn.Module, input_ids: Tensor) -> bool:
        """Whether a pass of ``net`` over ``input_ids`` computes its log-probabilities through the chunked LM head:
        the module's ``logits_chunk_size`` is set, ``net`` is a causal LM with a plain linear head, and the run's
        first such pass found the two equal to the model's logits (:meth:`_compare_chunked`, on a short probe of
        ``input_ids``)."""
        if not self.hparams.get("logits_chunk_size"):
            return False
        return self.chunked_logps.allows(net, lambda: self._compare_chunked(net, input_ids))

    def chunked_head(self, net: torch.nn.Module, calls: list[HeadCall], entropy: bool = False):
        """A context in which ``net``'s passes call its LM head as ``calls`` say, ``logits_chunk_size`` tokens at a
        time (:func:`~lit_align.modules.chunked_logps.head_in_chunks`): a pass's ``logits`` are then the wanted
        log-probabilities (B, n, 1), with ``entropy`` (B, n, 2), computed inside the model's own forward."""
        return head_in_chunks(net, calls, self.hparams.logits_chunk_size, entropy)

    def _chunked_target_logps(self, net: torch.nn.Module, start: int, targets: Tensor,
                              inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        keep, n = inputs["input_ids"].size(1) - start, targets.size(1)
        with self.chunked_head(net, [(lambda hidden: hidden[:, -keep:][:, :n], targets)]):
            out = self.forward_keeping_logits(net, keep, **inputs).logits
        return out[..., 0], targets != losses.IGNORE_INDEX

    def _compare_chunked(self, net: torch.nn.Module, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        """The chunked LM head against the model's own logits, for the run's one check, on a probe of the first 64
        tokens of ``input_ids``' first row (a plain causal pass: what is checked is that the head, given what the
        model gives it, yields the model's logits, whatever the pass; so small that the logits it holds whole do not
        matter where chunks were needed). A model whose forward does not call its head module raises
        :class:`~lit_align.modules.chunked_logps.HeadNotCalled` here, which the check reports."""
        probe = input_ids[:1, :64].repeat(1, 2 if input_ids.size(1) < 2 else 1)  # at least one token to predict
        inputs = {"input_ids": probe[:, :-1], "use_cache": False}
        full, mask = losses.target_logps(net(**inputs).logits, probe[:, 1:])
        chunked, _ = self._chunked_target_logps(net, 0, probe[:, 1:], inputs)
        return chunked.sum(-1), full.sum(-1), mask.sum(-1), self.exact_pass(net, probe)

    @staticmethod
    def _compute_dtype(net: torch.nn.Module) -> torch.dtype:
        return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)

    def exact_pass(self, net: torch.nn.Module, like: Tensor) -> bool:
        """Whether a pass of ``net`` on tensors like ``like`` runs in float32 (float32 weights, no autocast on that
        device): what tolerance two ways of computing the same numbers can be held to."""
        return self._compute_dtype(net) == torch.float32 and not torch.is_autocast_enabled(like.device.type)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token id (0 without one): what fills rows the module builds itself."""
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return pad if pad is not None else 0

    def completion_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                         position_ids: Tensor | None = None, model: torch.nn.Module | None = None) -> dict[str, Tensor]:
        """Per-token and per-sequence log-probs of the completion tokens (labels != -100) of each row.

        Returns ``token_logps``/``mask`` (batch, seq-1), ``sum`` and ``mean`` (batch,), and ``logits``.
        """
        logits = self(input_ids, attention_mask, position_ids, model=model)
        token_logps, mask = losses.token_logps(logits, labels)
        return {
            "logits": logits,
            "token_logps": token_logps,
            "mask": mask,
            "sum": losses.sequence_logps(token_logps, mask),
            "mean": losses.sequence_logps(token_logps, mask, average=True),
        }

    # ------------------------------------------------------------------ steps
    def shared_step(self, batch: Any, stage: str) -> Tensor:
        """One step of the objective for ``stage`` ("train", "val" or "test"): compute, log and return the loss.

        Objectives with automatic optimization implement this one method; online objectives (manual optimization)
        override ``training_step`` instead.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement shared_step(batch, stage)")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train") * self._deepspeed_accumulation_correction()

    def _deepspeed_accumulation_correction(self) -> int:
        """Under DeepSpeed with ``accumulate_grad_batches`` k > 1, both Lightning (its closure) and DeepSpeed's engine
        (``backward`` scales by its ``gradient_accumulation_steps``, which Lightning sets to k) divide the loss by k:
        the gradient came out k times too small, and DeepSpeed's gradient clipping let through k times the set norm.
        The returned loss is multiplied by k there (1 elsewhere), so the step is the mean over its micro-batches."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, DeepSpeedStrategy):
            return 1
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        steps = engine.gradient_accumulation_steps() if engine is not None else trainer.accumulate_grad_batches
        return int(steps)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "test")

    # ------------------------------------------------------------------ optimization
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def clip_gradient_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Scale the gradients so that their global L2 norm is at most ``max_norm``.

        Under FSDP each process holds a shard of every gradient, so the norm must be taken over all shards by FSDP
        (Lightning's own norm clipping refuses FSDP): by the root unit Lightning wrapped the module in, or, when the
        module wrapped its networks in units of their own (online objectives), from each root's norm over all
        processes; otherwise Lightning clips as usual."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(max_norm)
        elif roots := [unit for unit in fsdp_roots(self) if any(p.requires_grad for p in unit.parameters())]:
            # each trained root's norm over all processes (max_norm=inf: measured, not clipped); frozen ones (a
            # reference copy, a sharded reward model) have no gradients
            norms = torch.stack([unit.clip_grad_norm_(math.inf).float() for unit in roots])
            scale = (max_norm / (torch.linalg.vector_norm(norms) + 1e-6)).clamp(max=1.0)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
        else:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` with the norm algorithm goes through :meth:`clip_gradient_norm` (FSDP-aware)."""
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            self.clip_gradient_norm(optimizer, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg = self.optimizer_config
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = {"fused": True} if self._fused_adamw(decay + no_decay) else {}
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      **fused)
        trainer = self.trainer
        if trainer.max_epochs == -1 or trainer.train_dataloader is not None:
            total = self.total_optimizer_steps()  # known without building the training data (max_steps alone)
        else:
            # epochs x batches: read at the first step that decays, once the fit loop has built its training loader.
            # Asking now would build it before Lightning restores a resumed run's loop state, and the loader would
            # start the epoch from its first batch instead of the checkpoint's position.
            total = functools.cache(self.total_optimizer_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_decay(step, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _fused_adamw(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether AdamW runs fused: ``optimizer.fused``, or by itself on CUDA outside DeepSpeed (which steps its own
        flat partitions with the optimizer it is given; not measured with a fused one)."""
        if self.optimizer_config.fused is not None:
            return self.optimizer_config.fused
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = getattr(self._trainer, "strategy", None)
        return bool(params) and not isinstance(strategy, DeepSpeedStrategy) and all(p.is_cuda for p in params)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in the whole run, for the decay schedule (max_steps, or epochs x batches / accumulation)."""
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("cannot size the learning-rate schedule: set trainer.max_steps or trainer.max_epochs")
        return int(steps)

    # ------------------------------------------------------------------ checkpoints
    def _trainable_names(self) -> set[str]:
        """State-dict names of the trainable parameters. Under FSDP with activation checkpointing the blocks sit inside
        wrapper modules; the state dicts Lightning saves use the unwrapped names, so the wrappers' parts are dropped."""
        return {clean_parameter_name(n) for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights when part of the network is frozen; keep the RNG so a resume continues exactly.

        Frozen weights and buffers (the base under LoRA, 4-bit quantization state) are rebuilt from
        ``model_name_or_path`` by :meth:`configure_model`, so the checkpoint of a LoRA run is the adapter's size.
        FSDP's sharded checkpoints and DeepSpeed's are the exception: they are read back into the whole sharded model,
        which needs every weight, so they keep the frozen ones too (each process writes only its shard of them;
        DeepSpeed's engine writes the weights itself, Lightning hands it the rest of this dict).
        """
        trainable = self._trainable_names()
        if len(trainable) < sum(1 for _ in self.parameters()) and not self._saves_sharded_checkpoints():
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["lit_align_trainable_only"] = True
            checkpoint["lit_align_trainable_names"] = sorted(checkpoint["state_dict"])
        checkpoint["lit_align_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}

    def _saves_sharded_checkpoints(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, DeepSpeedStrategy) or (
            isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained_from = (checkpoint.get("hyper_parameters") or {}).get("model_name_or_path")
        if (self.lora_config is not None and trained_from is not None  # (a link recorded before links were pinned)
                and pinned_model_path(trained_from) != self.hparams.model_name_or_path):
            rank_zero_warn(f"this checkpoint's adapter was trained on {trained_from!r}, and it is loaded onto "
                           f"{self.hparams.model_name_or_path!r} (model_name_or_path): if that is another model (a "
                           "link re-pointed by a later run), point model_name_or_path at the first")
        if checkpoint.get("lit_align_trainable_only"):
            # Lightning's FSDP strategy has already loaded (and removed) the state dict when resuming from a full
            # checkpoint; the names saved beside it tell what it held
            saved = checkpoint.get("state_dict")
            names = set(saved) if saved is not None else set(checkpoint.get("lit_align_trainable_names", ()))
            missing = sorted(self._trainable_names() - names) if saved is not None or names else []
            if self.model is not None and missing:
                raise ValueError(f"checkpoint lacks {len(missing)} trainable weights of this module (first: {missing[0]}); "
                                 "it was saved with a different LoRA/model configuration")
        self._loading_trainable_only = bool(checkpoint.get("lit_align_trainable_only"))
        self._rng_state_to_restore = checkpoint.get("lit_align_rng")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As torch's; after :meth:`on_load_checkpoint` of a trainable-only checkpoint, the frozen weights and buffers
        it lacks by design (rebuilt by :meth:`configure_model`) are not reported missing, so ``load_from_checkpoint``
        warns only about weights that are really absent."""
        keys = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._loading_trainable_only:
            self._loading_trainable_only = False
            trainable = self._trainable_names()
            keys.missing_keys[:] = [k for k in keys.missing_keys if k in trainable]
        return keys

    def on_train_start(self) -> None:
        if self._rng_state_to_restore is not None:
            torch.set_rng_state(self._rng_state_to_restore["torch"])
            random.setstate(self._rng_state_to_restore["python"])
            self._rng_state_to_restore = None

    # ------------------------------------------------------------------ metrics across grad modes
    def _reset_inference_metric_states(self) -> None:
        """Reset torchmetrics whose state was created under inference mode, when inference mode is now off.

        ``trainer.validate`` runs in inference mode; the validation inside ``fit`` does not. A metric last reset during
        the former holds inference tensors the latter cannot update in place, so drop that (finished) state first.
        """
        if torch.is_inference_mode_enabled():
            return
        for module in self.modules():
            if isinstance(module, Metric) and any(
                    isinstance(getattr(module, name, None), Tensor) and getattr(module, name).is_inference()
                    for name in module._defaults):
                module.reset()

    def on_train_epoch_start(self) -> None:
        self._reset_inference_metric_states()

    def on_validation_epoch_start(self) -> None:
        self._reset_inference_metric_states()

    def on_test_epoch_start(self) -> None:
        self._reset_inference_metric_states()

    # ------------------------------------------------------------------ data parallelism
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def global_sum(self, value: Tensor | float) -> Tensor:
        """Sum over processes of a per-process figure (float32; the figure itself with one process)."""
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum") if self._world_size() > 1 else t

    def global_mean(self, value: Tensor | float) -> Tensor:
        """Mean over processes of a per-process figure (each process weighs the same)."""
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        return self.trainer.strategy.reduce(t.clone(), reduce_op="mean") if self._world_size() > 1 else t

    def global_token_mean(self, loss: Tensor, n_tokens: Tensor,
                          window_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss to back-propagate, global token-mean loss, global token count) from this process's token mean.

        DDP averages gradients over processes, so a token mean per process would weigh a token on a process with
        fewer tokens more. With one process the loss is returned as is; with N, the loss to back-propagate is
        ``loss * N * n / total``, whose gradient averaged over processes is that of ``sum over all tokens / total``
        (one all-reduce of two numbers).

        ``window_tokens`` (the batch's tag from a DataModule with ``target_tokens``): the tokens of the whole
        accumulation window over every process. The loss to back-propagate is then ``loss * N * k * n / window``
        (k = ``accumulate_grad_batches``, which Lightning divides by), so the optimizer step's gradient is that of
        the token mean over every token of its k micro-batches on every process, as one process with the whole
        window as a single batch computes it; without the tag, accumulation averages the micro-batches' means."""
        world = self._world_size()
        scale = None
        if window_tokens is not None:
            every = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
            scale = world * every * n_tokens / window_tokens.to(loss.device).clamp(min=1)
        if world <= 1:
            return loss if scale is None else loss * scale, loss.detach(), n_tokens.detach().float()
        sums = self.global_sum(torch.stack([loss.detach().float() * n_tokens, n_tokens.float()]))
        total = sums[1].clamp(min=1)
        return loss * (world * n_tokens / total if scale is None else scale), sums[0] / total, sums[1]

    # ------------------------------------------------------------------ logging helpers
    def log_metrics(self, stage: str, metrics: dict[str, Tensor | float], batch_size: int, prog_bar: tuple[str, ...] = ("loss",)) -> None:
        """Log ``{stage}/{name}`` for every metric; per step in training, per epoch in validation/test."""
        on_step = stage == "train"
        for name, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().float().mean()
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                     prog_bar=name in prog_bar, sync_dist=not on_step)
