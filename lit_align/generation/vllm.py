"""In-process vLLM engine as a generation backend (optional: ``pip install lit_align[vllm]``, GPU).

The engine loads the policy's base checkpoint once; :meth:`VLLMBackend.sync_weights` then pushes the
policy's current weights into it after each update, LoRA adapters merged on the fly (the merge is computed
out of place, so the policy's own weights are never touched and no rounding drift accumulates).

vLLM is imported lazily: this module imports without it, and its pure parts (sampling-parameter conversion,
output conversion, merged state dicts) work and are tested without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lit_align.generation.base import Completion, GenerationBackend, SamplingParams, check_prompts, cut_at_stop
from lit_align.generation.hf import model_eos_ids

INSTALL_HINT = "the vllm backend needs vLLM: pip install lit_align[vllm] (Linux with a CUDA GPU)"


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


def vllm_sampling_kwargs(params: SamplingParams, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to ``params``, ending completions also at
    ``stop_token_ids`` (the ``hf`` backend's :func:`~lit_align.generation.hf.model_eos_ids`).

    ``logprobs=0`` asks for the sampled token's log-probability only; the stop string is left out of the text.
    """
    return {
        "stop_token_ids": list(stop_token_ids),
        "n": params.n,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p) if params.temperature > 0 else 1.0,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "seed": params.seed,
        "logprobs": 0,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }


def _generation_config(path: str) -> Any:
    """An object with the checkpoint's generation config (for :func:`model_eos_ids`); without one, nothing declared."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except (OSError, ValueError):
        return SimpleNamespace()


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def completion_from_vllm(
    output: Any, decode: Callable[[list[int]], str], eos_token_ids: Sequence[int], stop: Sequence[str]
) -> Completion:
    """A :class:`Completion` from one vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``, ``finish_reason``).

    vLLM keeps the end-of-sequence token and the tokens that completed a stop string in ``token_ids``; they
    are removed here, and text and tokens are cut with the same rule as the ``hf`` backend.
    """
    ids = [int(t) for t in output.token_ids]
    logprobs = None
    if output.logprobs is not None:
        logprobs = [_logprob_value(step[tok]) for tok, step in zip(ids, output.logprobs)]
    stopped = output.finish_reason == "stop"
    end = None
    if stopped and ids and ids[-1] in set(eos_token_ids):
        end, ids = ids[-1], ids[:-1]
        logprobs = logprobs[:-1] if logprobs is not None else None
    text, kept, _ = cut_at_stop(ids, decode, stop)
    return Completion(
        text=text, token_ids=ids[:kept], logprobs=logprobs[:kept] if logprobs is not None else None,
        finish_reason="stop" if stopped else "length", end_token_id=end,
    )


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a linear layer, dequantizing bitsandbytes 4-bit weights."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()


def _merged_lora_weight(layer: nn.Module) -> torch.Tensor:
    weight = _dense_weight(layer.base_layer)
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return weight  # already merged in place, or adapters switched off
    merged = weight.clone()
    for name in layer.active_adapters:
        if name in layer.lora_A.keys():
            merged += layer.get_delta_weight(name).to(merged.dtype)
    return merged


def merged_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of the plain Hugging Face model that ``model`` is or wraps.

    For a peft model the names are those of the base model's own state dict (``model.layers.0...weight``)
    and each LoRA-adapted weight is ``W + scaling * B @ A`` computed out of place; ``modules_to_save``
    copies replace the originals. Tensors are yielded lazily (one merged matrix in memory at a time).
    """
    root = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if _is_lora_layer(module):
            yield prefix + "weight", _merged_lora_weight(module)
            bias = getattr(module.base_layer, "bias", None)
            if bias is not None:
                yield prefix + "bias", bias.detach()
            return
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):  # peft ModulesToSaveWrapper
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) else active
            chosen = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            yield from walk(chosen, prefix)
            return
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + name, param.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    with torch.no_grad():
        yield from walk(root, "")


class VLLMBackend(GenerationBackend):
    """Generate with an in-process vLLM engine that holds a copy of the policy (refreshed by :meth:`sync_weights`)."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        engine_kwargs: dict | None = None,
    ) -> None:
        """
        Args:
            model: the policy's base checkpoint: a directory, hub id or preset (before any training update).
            tokenizer: its tokenizer if elsewhere (default: ``model``).
            dtype: weight dtype in the engine ("auto", "bfloat16", "float16", "float32").
            gpu_memory_utilization: share of GPU memory vLLM may take (the trainer needs the rest).
            max_model_len: longest prompt + completion; None: the model's maximum.
            enable_prefix_caching: reuse KV cache across prompts sharing a prefix (reset on each weight sync).
            seed: engine seed.
            engine_kwargs: more ``vllm.LLM`` arguments, passed as they are.
        """
        from lit_align.models import materialize_preset

        vllm = import_vllm()
        # The engine core must live in this process for sync_weights to reach the model's tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        path = materialize_preset(model)
        kwargs = dict(model=path, tokenizer=materialize_preset(tokenizer) if tokenizer else path, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                      seed=seed)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_token_ids = model_eos_ids(_generation_config(path), self.tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        prompts = check_prompts(prompts)
        if not prompts:
            return []
        sampling = self._vllm.SamplingParams(**vllm_sampling_kwargs(params, self.eos_token_ids))
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [[completion_from_vllm(o, self.decode, self.eos_token_ids, params.stop) for o in request.outputs]
                for request in outputs]

    def _engine_model(self) -> nn.Module | None:
        """The engine's torch model when it lives in this process (vLLM V0 and in-process V1 layouts)."""
        executor = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        for candidate in (getattr(worker, "worker", None), worker):
            runner = getattr(candidate, "model_runner", None)
            if runner is not None and getattr(runner, "model", None) is not None:
                return runner.model
        return None

    def sync_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights (LoRA merged) into the engine and drop cached prefixes."""
        target = self._engine_model()
        if target is not None:
            target.load_weights(merged_state_dict(model))
        elif hasattr(self.llm, "collective_rpc"):
            weights = [(name, tensor) for name, tensor in merged_state_dict(model)]
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        else:
            raise RuntimeError("cannot reach the vLLM engine's model to update its weights; run with "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0 and tensor_parallel_size=1")
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        del llm


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights)
