"""Training throughput: tokens/s, samples/s, model FLOP/s and MFU, plus the generation rate of online objectives.

Add it to a config's callbacks::

    trainer:
      callbacks:
        - class_path: TokenThroughput
          init_args: {window_size: 20}          # peak_flops: 3.12e14 on hardware Lightning does not know

Rates are averages over the last ``window_size`` training batches (Lightning's
:class:`lightning.fabric.utilities.throughput.Throughput` for samples, batches, FLOPs and MFU), logged per step as
``throughput/...``. FLOPs are *model* FLOPs from the policy's shapes (the PaLM/Chinchilla convention):

    per trained token:       2N (forward) + 2N (backward, input gradients) + 2N_t (backward, weight gradients of
                             trainable matmul weights) + 6 N_lora + 12 * layers * q_dim * seq (attention, fwd + bwd)
    per forward-only token:  2N + 4 * layers * q_dim * seq
    per generated token:     2N, and 2N per prompt token prefilled for generation
    per reward-model token:  2N_rm + 4 * layers_rm * q_dim_rm * seq (N_rm: the reward model's block matmul weights;
                             it has no LM head)

which is the familiar 6N + 12 L h s per trained token for full fine-tuning. N counts matmul parameters (blocks and LM
head, not the embedding lookup); seq is the padded length of the forward pass the token went through. Not counted:
gradient-checkpointing recomputation, attention over the KV cache while decoding, padding rows a batched decoder
keeps stepping after they ended (the hf backend's until half of them have), small heads (PPO's value head, a reward
model's score head), LoRA adapters of a reward model, and the one-token filler passes a sharded reward model makes to keep processes in step. Counted though
not computed: the prompt work that prompt sharing (the modules' ``share_prompt``, and the hf backend's, which prefills
a prompt once for its samples) and ``logits_to_keep`` save, since counts are of the full rows; FLOP/s and MFU are then
effective rates.

Where the counts come from:

- Offline batches (SFT, DPO, ORPO, reward models: dicts of tensors), by :func:`batch_counts`: samples are rows,
  tokens the non-padding tokens (every ``*attention_mask`` summed; every ``*input_ids`` element when there is no mask,
  as with packing), seq the batch's width. ``extra_forward_passes`` adds forward-only passes over the same tokens
  (1 for a DPO reference model).
- Online objectives (PPO, GRPO, RAFT) train on prompts, not tokens: their module counts what each step did in
  ``step_tokens`` (:class:`lit_align.modules.online.StepTokens`), and that is used instead of the batch. Samples are
  rollouts; tokens are the trained tokens (prompt + response of every trained row, once per epoch; for RAFT only the
  kept rows); FLOPs are trained + forward-only (old log-probs, values, reference log-probs) + reward-model scoring
  (``reward: reward_model``, replicated or sharded, at the reward model's own shapes) + generation. Online modules
  count all their own passes, reference included, so ``extra_forward_passes`` (and ``count_padding``) only apply to
  offline batches.
- Generation FLOPs enter ``flops_per_sec`` and ``mfu`` only when this device did the generating, in this process:
  the ``hf`` backend (the live policy). ``openai`` generates on a server, elsewhere. ``vllm`` runs its own engine,
  whose work cannot be counted from here: its prefix cache prefills a prompt once for all its samples, and
  ``engine_kwargs`` may spread it over several GPUs; its generation is left out of MFU rather than guessed. Whatever
  the backend, ``generated_tokens_per_sec`` and ``generation_flops_per_sec`` (2N per generated and prefilled token)
  report generation on their own.
- Generated tokens: a module that generates keeps a running count in an int attribute ``generated_tokens`` (the
  online modules count their training rollouts' response tokens; validation samples are not counted).

Under DDP each process counts its own batch or step; ``global_*`` figures are the per-device ones times the world size
(Lightning's convention). MFU divides the per-device FLOP/s by the device's peak: Lightning's table for the GPU and
precision in use, or ``peak_flops``; without either (on CPU), MFU is not logged.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_align.memory import ModelShape
from lit_align.models import is_score_model, parameter_shape, whole_shapes

if TYPE_CHECKING:
    from lit_align.modules.online import StepTokens

GENERATION_ON_DEVICE = frozenset({"hf"})
"""Generation backends whose FLOPs count in ``flops_per_sec`` and ``mfu`` (see the module docstring)."""


def training_flops_per_token(shape: ModelShape, seq_len: float, trainable_matmul_params: int, lora_params: int = 0,
                             extra_forward_passes: int = 0) -> float:
    """Model FLOPs to train on one token of a ``seq_len``-token sequence (see the module docstring)."""
    n = shape.matmul_params
    attention = 12 * shape.num_layers * shape.q_dim * seq_len
    return (4 * n + 2 * trainable_matmul_params + 6 * lora_params + attention
            + extra_forward_passes * forward_flops_per_token(shape, seq_len))


def forward_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Model FLOPs of one token in a forward pass without gradient over a ``seq_len``-token sequence: 2N + attention."""
    return 2 * shape.matmul_params + 4 * shape.num_layers * shape.q_dim * seq_len


def generation_flops_per_token(shape: ModelShape) -> float:
    """Model FLOPs to generate one token (or prefill one prompt token): the matmul weights' forward, 2N."""
    return 2 * shape.matmul_params


def scoring_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Model FLOPs of one token through a reward model's forward pass over a ``seq_len``-token sequence: its blocks'
    matmuls and attention, 2 N_blocks + 4 * layers * q_dim * seq (no LM head; the score head reads one position per
    sequence and is not counted)."""
    return 2 * shape.num_layers * shape.block_linear_params() + 4 * shape.num_layers * shape.q_dim * seq_len


def batch_counts(batch: Any, count_padding: bool = False) -> tuple[int, int, int]:
    """(sequences, tokens, longest sequence) of a batch dict.

    A batch with plain ``input_ids`` (and ``attention_mask``) is counted from those alone: lit_align's preference
    batches also carry the same tokens split at the prompt (``prompt_*``/``completion_*`` keys), which are another view
    of them, not more tokens. Without plain ``input_ids``, every ``*input_ids``/``*attention_mask`` pair is summed
    (``chosen_*``/``rejected_*`` batches)."""
    if not isinstance(batch, dict):
        raise TypeError(f"TokenThroughput reads dict batches with *input_ids keys, got {type(batch).__name__}")

    def is_2d(v: Any) -> bool:
        return torch.is_tensor(v) and v.ndim == 2

    if is_2d(batch.get("input_ids")):
        ids = {"input_ids": batch["input_ids"]}
        masks = {"attention_mask": batch["attention_mask"]} if is_2d(batch.get("attention_mask")) else {}
    else:
        ids = {k: v for k, v in batch.items() if k.endswith("input_ids") and is_2d(v)}
        masks = {k: v for k, v in batch.items() if k.endswith("attention_mask") and is_2d(v)}
    if not ids:
        raise KeyError(f"TokenThroughput: the batch has no 2-D '*input_ids' tensor (keys: {sorted(batch)})")
    samples = int(next(iter(ids.values())).size(0))
    if masks and not count_padding:
        tokens = int(sum(int(m.sum()) for m in masks.values()))
    else:
        tokens = int(sum(v.numel() for v in ids.values()))
    return samples, tokens, int(max(v.size(1) for v in ids.values()))


class TokenThroughput(L.Callback):
    """Logs ``throughput/tokens_per_sec``, ``samples_per_sec``, ``flops_per_sec``, ``mfu`` and generation rates.

    Args:
        window_size: training batches the rates are averaged over (at least 2; nothing is logged before that many).
        peak_flops: peak FLOP/s of one device for MFU; null takes Lightning's table for the GPU and precision in use
            (CPUs have no entry: MFU is then skipped and tokens/s still logged).
        count_padding: count padding tokens of offline batches as processed tokens (the device does compute on them).
        extra_forward_passes: forward-only passes per trained token of offline batches besides the policy's own,
            counted as 2N + attention each (1 for a DPO reference model evaluated on the same tokens); ignored for
            online objectives, which count their own passes.
        model_attribute: attribute of the LightningModule holding the Hugging Face (or peft) policy.
        clock: a zero-argument function returning seconds; ``time.perf_counter`` by default (tests pass a fake one).
    """

    def __init__(self, window_size: int = 20, peak_flops: float | None = None, count_padding: bool = False,
                 extra_forward_passes: int = 0, model_attribute: str = "model",
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (rates need two timestamps), got {window_size}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 FLOP/s, got {peak_flops}")
        if extra_forward_passes < 0:
            raise ValueError(f"extra_forward_passes must be >= 0, got {extra_forward_passes}")
        self.window_size = window_size
        self.peak_flops = peak_flops
        self.count_padding = count_padding
        self.extra_forward_passes = extra_forward_passes
        self.model_attribute = model_attribute
        self.clock = clock or time.perf_counter
        self.last_metrics: dict[str, float] = {}
        self._throughput: Throughput | None = None
        self._shape: ModelShape | None = None
        self._scorer_shape: ModelShape | None = None  # an online objective's reward model, when it scores rollouts
        self._warned_scorer = False
        self._trainable_matmul = self._lora = 0
        self._t0 = 0.0
        self._paused_at: float | None = None
        self._totals = {"batches": 0, "samples": 0, "tokens": 0, "generated": 0, "generation_flops": 0.0}
        self._generated_seen = 0
        self._window: deque[tuple[float, dict[str, float]]] = deque(maxlen=window_size)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        peak = self.peak_flops
        if peak is None:
            peak = get_available_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        if peak is None and stage == "fit":
            rank_zero_warn("TokenThroughput: no peak FLOP/s for this device (pass peak_flops); MFU is not logged")
        self._available_flops = peak
        self._world_size = trainer.world_size

    def _read_model(self, pl_module: L.LightningModule, wrapper: torch.nn.Module | None = None) -> None:
        model = getattr(pl_module, self.model_attribute, None)
        config = getattr(model, "config", None)
        if config is None:
            raise AttributeError(f"TokenThroughput: {type(pl_module).__name__}.{self.model_attribute} has no Hugging Face "
                                 "config to read the model's shapes from; set model_attribute")
        # a reward model's config is its causal LM's: under a score head the LM head's matmul is not there
        self._shape = replace(ModelShape.from_hf_config(config), score_head=is_score_model(model))
        trainable_matmul = lora = 0
        # FSDP and ZeRO-3 keep a shard here: count the whole parameter (Lightning's FSDP root wraps pl_module itself)
        shapes = whole_shapes(wrapper if wrapper is not None else pl_module)
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            shape = parameter_shape(p, shapes)
            if "lora_" in name:
                lora += math.prod(shape)
            elif len(shape) == 2 and "embed" not in name:
                trainable_matmul += math.prod(shape)
        self._trainable_matmul, self._lora = trainable_matmul, lora
        scorer_config = getattr(pl_module, "reward_model_config", None)
        scorer_config = scorer_config() if callable(scorer_config) else None
        self._scorer_shape = ModelShape.from_hf_config(scorer_config) if scorer_config is not None else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_model(pl_module, trainer.strategy.model)
        self._throughput = Throughput(available_flops=self._available_flops, world_size=self._world_size,
                                      window_size=self.window_size)
        self._totals = dict.fromkeys(self._totals, 0)
        self._generated_seen = int(getattr(pl_module, "generated_tokens", 0) or 0)
        self._window.clear()
        if self.extra_forward_passes and getattr(pl_module, "step_tokens", None) is not None:
            rank_zero_warn(f"TokenThroughput: extra_forward_passes={self.extra_forward_passes} is ignored for "
                           f"{type(pl_module).__name__}: online objectives count their own forward passes")
        self._t0 = self._now(trainer)

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # or the clock reads a time before queued kernels finished
        return self.clock()

    # ------------------------------------------------------------------ validation does not count as training time
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._throughput is not None:
            self._paused_at = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:
            self._t0 += self._now(trainer) - self._paused_at
            self._paused_at = None

    # ------------------------------------------------------------------ per batch
    def flops_per_batch(self, batch: Any) -> float:
        """Training FLOPs of one offline batch (tokens x per-token FLOPs at the batch's sequence length)."""
        _, tokens, seq = batch_counts(batch, self.count_padding)
        return tokens * training_flops_per_token(self._shape, seq, self._trainable_matmul, self._lora,
                                                 self.extra_forward_passes)

    def flops_per_step(self, step: StepTokens) -> tuple[float, float]:
        """(FLOPs counted in flops_per_sec and MFU, generation FLOPs) of one online training step.

        trained x per-trained-token + forward-only x per-forward-token FLOPs + the reward model's scoring FLOPs, each
        at the mean width of its passes, plus the generation FLOPs (2N per generated and prefilled token) when the
        backend generated on this device.
        """
        shape = self._shape
        trained = step.trained * training_flops_per_token(shape, step.trained_seq, self._trainable_matmul, self._lora)
        forward_only = step.forward_only * forward_flops_per_token(shape, step.forward_only_seq)
        scoring = 0.0
        if step.scored and self._scorer_shape is not None:
            scoring = step.scored * scoring_flops_per_token(self._scorer_shape, step.scored_seq)
        elif step.scored and not self._warned_scorer:
            self._warned_scorer = True
            rank_zero_warn("TokenThroughput: the module scored rollouts with a reward model but its "
                           "reward_model_config() gave no config at train start; scoring FLOPs are not counted")
        generation = (step.generated + step.prompt_tokens) * generation_flops_per_token(shape)
        on_device = generation if step.backend in GENERATION_ON_DEVICE else 0.0
        return trained + forward_only + scoring + on_device, generation

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._throughput is None:
            return
        elapsed = self._now(trainer) - self._t0
        generated_total = int(getattr(pl_module, "generated_tokens", 0) or 0)
        generated, self._generated_seen = generated_total - self._generated_seen, generated_total
        step = getattr(pl_module, "step_tokens", None)
        if step is not None:  # an online objective: what its step did, not what its batch of prompts holds
            samples, tokens = step.rollouts, step.trained
            flops, generation_flops = self.flops_per_step(step)
        else:
            samples, tokens, _ = batch_counts(batch, self.count_padding)
            flops, generation_flops = self.flops_per_batch(batch), generated * generation_flops_per_token(self._shape)
        t = self._totals
        t["batches"] += 1
        t["samples"] += samples
        t["tokens"] += tokens
        t["generated"] += generated
        t["generation_flops"] += generation_flops
        # tokens are rated here, not as Lightning's `lengths`: it requires lengths >= samples, and an online step can
        # train fewer tokens than it has rollouts (a RAFT step that keeps few or none)
        self._throughput.update(time=elapsed, batches=t["batches"], samples=t["samples"], flops=int(flops))
        self._window.append((elapsed, dict(t)))
        metrics = self._rename(self._throughput.compute())
        metrics["throughput/tokens"] = float(t["tokens"])
        if len(self._window) == self.window_size:
            (t_first, first), (t_last, last) = self._window[0], self._window[-1]
            rate = {k: (last[k] - first[k]) / (t_last - t_first) for k in ("tokens", "generated", "generation_flops")}
            metrics["throughput/tokens_per_sec"] = rate["tokens"]
            if self._world_size > 1:
                metrics["throughput/global_tokens_per_sec"] = rate["tokens"] * self._world_size
            if t["generated"]:
                metrics["throughput/generated_tokens_per_sec"] = rate["generated"]
                metrics["throughput/generation_flops_per_sec"] = rate["generation_flops"]
        metrics["throughput/generated_tokens"] = float(t["generated"])
        self.last_metrics = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=samples)

    @staticmethod
    def _rename(raw: dict[str, float]) -> dict[str, float]:
        """Lightning's keys (``device/samples_per_sec``...) -> ``throughput/samples_per_sec`` (per device), globals."""
        names = {"time": "time", "batches": "batches", "samples": "samples",
                 "device/batches_per_sec": "batches_per_sec", "device/samples_per_sec": "samples_per_sec",
                 "device/flops_per_sec": "flops_per_sec", "device/mfu": "mfu",
                 "samples_per_sec": "global_samples_per_sec", "flops_per_sec": "global_flops_per_sec",
                 "batches_per_sec": "global_batches_per_sec"}
        return {f"throughput/{names[k]}": float(v) for k, v in raw.items() if k in names}


__all__ = ["GENERATION_ON_DEVICE", "TokenThroughput", "batch_counts", "forward_flops_per_token",
           "generation_flops_per_token", "scoring_flops_per_token", "training_flops_per_token"]
