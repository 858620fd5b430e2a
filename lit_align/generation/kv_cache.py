"""A KV cache for the hf backend's decoding loop whose keys and values are written into buffers reserved once.

transformers' default cache grows each layer's keys and values by concatenation, which copies the whole cache at every
generated token: traffic quadratic in the completion length. :func:`reserved_cache` gives the same cache with buffers
sized for the prompt and every token the loop can generate; each step writes its token's keys and values in place and
attention reads a view of the positions filled so far (the prefill reads its own contiguous states).

The view is strided along the positions, which CPU attention reads more slowly than a contiguous tensor: on the tiny
preset the copies saved outweigh that from about a hundred generated tokens, and short completions are a little
slower (BENCHMARKS.md). ``HFBackend(reserve_cache=True)`` turns it on; it is off by default until it is measured on
a GPU, where attention kernels are expected to read strided keys and values without a copy.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lit_align.models import outermost_transformers_model


class ReservedLayer(DynamicLayer):
    """One full-attention layer's keys and values, (batch, heads, positions, head_dim), in buffers of ``capacity``
    positions allocated at the first update. An update past the capacity moves them into larger buffers."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = self._reserve(key_states, self.capacity)
        self._value_buffer = self._reserve(value_states, self.capacity)
        self.is_initialized = True

    @staticmethod
    def _reserve(states: torch.Tensor, positions: int) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        return states.new_empty((batch, heads, positions, dim))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._grow(max(end, 2 * self._key_buffer.shape[-2]))
        self._key_buffer[:, :, start:end].copy_(key_states)
        self._value_buffer[:, :, start:end].copy_(value_states)
        self.length = end
        if start == 0:  # the prefill attends over its own states, contiguous as the default cache's (faster)
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
        else:
            self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, positions: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = self._reserve(old, positions)
            new[:, :, :self.length].copy_(old[:, :, :self.length])
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (repeats allowed), buffers included: a shared prompt's rows copied to each sample."""
        if self._key_buffer is None:
            return
        self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
        self.keys, self.values = self._key_buffer[:, :, :self.length], self._value_buffer[:, :, :self.length]

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self._key_buffer = self._value_buffer = self.keys = self.values = None
        self.is_initialized = False  # the next update reserves anew (transformers 4's reset keeps the flag)


def _default_cache(model: nn.Module, layer_types: tuple[type, ...]):
    """The cache transformers would make for ``model`` (a transformers causal LM, possibly wrapped by peft, FSDP or
    DeepSpeed), when every one of its layers is of ``layer_types``; else None."""
    config = getattr(outermost_transformers_model(model), "config", None)
    if config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config this transformers cannot build a cache from: let the model make its own
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in layer_types for layer in layers):
        return None
    return cache


def reserved_cache(model: nn.Module, capacity: int):
    """A cache for ``model`` whose layers reserve ``capacity`` positions, to pass to its first forward pass; None where
    transformers' own default cache must be used: a model with any layer other than plain full attention
    (sliding-window, linear-attention or shared-KV layers), which that default handles."""
    cache = _default_cache(model, (DynamicLayer,))
    if cache is not None:
        cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def row_selectable_cache(model: nn.Module):
    """transformers' default cache for ``model`` when each of its layers keeps every row's keys and values, so that
    ``batch_select_indices`` can copy a prompt's rows to its samples (full or sliding-window attention); None for a
    model with other layers (linear attention keeps a state that is not selected, a dummy layer nothing)."""
    return _default_cache(model, (DynamicLayer, DynamicSlidingWindowLayer))


__all__ = ["reserved_cache", "row_selectable_cache"]
