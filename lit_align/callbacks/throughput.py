"""Training throughput: tokens/s, samples/s, model FLOP/s and MFU, plus the generation rate of online objectives.

Add it to a config's callbacks::

    trainer:
      callbacks:
        - class_path: TokenThroughput
          init_args: {window_size: 20}          # peak_flops: 3.12e14 on hardware Lightning does not know

Rates are averages over the last ``window_size`` training batches, computed with Lightning's
:class:`lightning.fabric.utilities.throughput.Throughput` and logged per step as ``throughput/...``. FLOPs are *model*
FLOPs from the policy's shapes (the PaLM/Chinchilla convention, not counting gradient-checkpointing recomputation):

    per trained token: 2N (forward) + 2N (backward, input gradients) + 2N_t (backward, weight gradients of trainable
                       matmul weights) + 6 N_lora + 12 * layers * q_dim * seq (attention scores and values, fwd + bwd)

which is the familiar 6N + 12 L h s for full fine-tuning. N counts matmul parameters (blocks and LM head, not the
embedding lookup). Tokens are the non-padding tokens of the batch (every ``*attention_mask`` key summed; every
``*input_ids`` element when there is no mask, as with packing). Generation of online objectives is counted
separately: a module that generates keeps a running count in ``generated_tokens`` (an int attribute), and each
generated token costs 2N. MFU divides the per-device training FLOP/s by the device's peak: Lightning's table for the GPU
and precision in use, or ``peak_flops``; without either (on CPU), MFU is not logged.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_align.memory import ModelShape


def training_flops_per_token(shape: ModelShape, seq_len: int, trainable_matmul_params: int, lora_params: int = 0,
                             extra_forward_passes: int = 0) -> float:
    """Model FLOPs to train on one token of a ``seq_len``-token sequence (see the module docstring)."""
    n = shape.matmul_params
    attention = 12 * shape.num_layers * shape.q_dim * seq_len
    return 4 * n + 2 * trainable_matmul_params + 6 * lora_params + attention + extra_forward_passes * (
        2 * n + 4 * shape.num_layers * shape.q_dim * seq_len)


def generation_flops_per_token(shape: ModelShape) -> float:
    """Model FLOPs to generate one token: a forward pass through the matmul weights (2N)."""
    return 2 * shape.matmul_params


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
        count_padding: count padding tokens as processed tokens (the device does compute on them).
        extra_forward_passes: forward-only passes per trained token besides the policy's own, counted as 2N + attention
            each (1 for a DPO/PPO reference model evaluated on the same tokens).
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
        self._trainable_matmul = self._lora = 0
        self._t0 = 0.0
        self._paused_at: float | None = None
        self._totals = {"batches": 0, "samples": 0, "tokens": 0, "generated": 0}
        self._generated_seen = 0
        self._gen_window: deque[tuple[float, int]] = deque(maxlen=window_size)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        peak = self.peak_flops
        if peak is None:
            peak = get_available_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        if peak is None and stage == "fit":
            rank_zero_warn("TokenThroughput: no peak FLOP/s for this device (pass peak_flops); MFU is not logged")
        self._available_flops = peak
        self._world_size = trainer.world_size

    def _read_model(self, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, self.model_attribute, None)
        config = getattr(model, "config", None)
        if config is None:
            raise AttributeError(f"TokenThroughput: {type(pl_module).__name__}.{self.model_attribute} has no Hugging Face "
                                 "config to read the model's shapes from; set model_attribute")
        self._shape = ModelShape.from_hf_config(config)
        trainable_matmul = lora = 0
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_" in name:
                lora += p.numel()
            elif p.ndim == 2 and "embed" not in name:
                trainable_matmul += p.numel()
        self._trainable_matmul, self._lora = trainable_matmul, lora

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_model(pl_module)
        self._throughput = Throughput(available_flops=self._available_flops, world_size=self._world_size,
                                      window_size=self.window_size)
        self._totals = dict.fromkeys(self._totals, 0)
        self._generated_seen = int(getattr(pl_module, "generated_tokens", 0) or 0)
        self._gen_window.clear()
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
        """Training FLOPs of one batch (tokens x per-token FLOPs at the batch's sequence length)."""
        _, tokens, seq = batch_counts(batch, self.count_padding)
        return tokens * training_flops_per_token(self._shape, seq, self._trainable_matmul, self._lora,
                                                 self.extra_forward_passes)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._throughput is None:
            return
        elapsed = self._now(trainer) - self._t0
        samples, tokens, _ = batch_counts(batch, self.count_padding)
        generated_total = int(getattr(pl_module, "generated_tokens", 0) or 0)
        generated, self._generated_seen = generated_total - self._generated_seen, generated_total
        t = self._totals
        t["batches"] += 1
        t["samples"] += samples
        t["tokens"] += tokens
        t["generated"] += generated
        self._throughput.update(time=elapsed, batches=t["batches"], samples=t["samples"], lengths=t["tokens"],
                                flops=int(self.flops_per_batch(batch)))
        self._gen_window.append((elapsed, t["generated"]))
        metrics = self._rename(self._throughput.compute())
        if len(self._gen_window) == self.window_size and t["generated"]:
            (t_first, g_first), (t_last, g_last) = self._gen_window[0], self._gen_window[-1]
            rate = (g_last - g_first) / (t_last - t_first)
            metrics["throughput/generated_tokens_per_sec"] = rate
            metrics["throughput/generation_flops_per_sec"] = rate * generation_flops_per_token(self._shape)
        metrics["throughput/generated_tokens"] = float(t["generated"])
        self.last_metrics = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=samples)

    @staticmethod
    def _rename(raw: dict[str, float]) -> dict[str, float]:
        """Lightning's keys (``device/items_per_sec``...) -> ``throughput/tokens_per_sec`` (per device) and globals."""
        names = {"time": "time", "batches": "batches", "samples": "samples", "lengths": "tokens",
                 "device/batches_per_sec": "batches_per_sec", "device/samples_per_sec": "samples_per_sec",
                 "device/items_per_sec": "tokens_per_sec", "device/flops_per_sec": "flops_per_sec", "device/mfu": "mfu",
                 "samples_per_sec": "global_samples_per_sec", "items_per_sec": "global_tokens_per_sec",
                 "flops_per_sec": "global_flops_per_sec", "batches_per_sec": "global_batches_per_sec"}
        return {f"throughput/{names[k]}": float(v) for k, v in raw.items() if k in names}


__all__ = ["TokenThroughput", "batch_counts", "generation_flops_per_token", "training_flops_per_token"]
