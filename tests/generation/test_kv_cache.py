"""The hf backend's reserved KV cache: the same completions as transformers' default cache, written in place."""

import inspect

import pytest
import torch

from lit_align.generation import HFBackend, SamplingParams
from lit_align.generation import kv_cache
from lit_align.models import LoRAConfig, apply_lora, load_causal_lm

PROMPTS = ["x", "def add(a, b):\n    return", "import os\nimport sys\n\n"]


def caches_handed_to(model) -> list:
    """Record the cache object of every forward call of ``model`` (None when the call passed none)."""
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return forward(*args, **kwargs)

    model.forward = recording
    return seen


def test_reserved_cache_decodes_the_tokens_of_the_default_cache_in_place(tiny):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=40, temperature=1.0, n=3, seed=7, stop=["\n\n"])
    # 9 rows in batches of 4: mixed prompt lengths and padding in each batch
    reserved = HFBackend(model, tokenizer, batch_size=4, reserve_cache=True)
    default = HFBackend(model, tokenizer, batch_size=4)  # off by default
    seen = caches_handed_to(model)
    try:
        got = reserved.generate(PROMPTS, params)
        reserved_calls = list(seen)
        seen.clear()
        want = default.generate(PROMPTS, params)
    finally:
        del model.forward
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in want]
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in want]
    for r_got, r_want in zip(got, want):
        for a, b in zip(r_got, r_want):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert sum(len(c.token_ids) for r in got for c in r) > 100  # long enough to step many times
    # The reserved path really ran: each batch's first pass got a cache of ReservedLayers, sized for the prompt and
    # every new token, and every later pass got that same object back; the default path passed transformers' own
    # cache (built for it so that a prompt's rows can be copied to its samples, see test_shared_prefill.py).
    caches = {id(c): c for c in reserved_calls}
    assert len(caches) == 3  # one per batch (9 rows in batches of 4)
    for cache in caches.values():
        assert all(isinstance(layer, kv_cache.ReservedLayer) for layer in cache.layers)
        layer = cache.layers[0]
        assert layer._key_buffer.shape[-2] == layer.capacity  # never grown: the capacity covered every step
        assert layer.length <= layer.capacity
    assert {type(layer).__name__ for layer in seen[0].layers} == {"DynamicLayer"}


def test_a_layer_holds_what_concatenation_would_and_grows_past_its_capacity():
    layer = kv_cache.ReservedLayer(capacity=4)
    chunks = [(torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 7)) for n in (3, 1, 4)]  # value dim != key dim (MLA)
    for i, (k, v) in enumerate(chunks):
        keys, values = layer.update(k, v)
        assert torch.equal(keys, torch.cat([c[0] for c in chunks[:i + 1]], dim=-2))
        assert torch.equal(values, torch.cat([c[1] for c in chunks[:i + 1]], dim=-2))
        assert layer.get_seq_length() == keys.shape[-2]
    assert layer._key_buffer.shape[-2] == 8  # 3 + 1 fit in 4; 8 tokens doubled it
    # the model's mask covers the cached positions and the next token (transformers 4 passes the cache positions)
    takes_length = "query_length" in inspect.signature(layer.get_mask_sizes).parameters
    assert layer.get_mask_sizes(1 if takes_length else torch.arange(8, 9))[0] == 9
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized
    keys, _ = layer.update(*chunks[0])  # reserved anew after a reset
    assert torch.equal(keys, chunks[0][0]) and layer._key_buffer.shape[-2] == 4


def test_reserved_cache_through_peft_and_not_where_the_model_has_other_layers(tiny_dir):
    from transformers import MistralConfig, MistralForCausalLM

    policy = apply_lora(load_causal_lm(tiny_dir), LoRAConfig(r=4))
    cache = kv_cache.reserved_cache(policy, 16)
    assert len(cache.layers) == 4 and all(isinstance(layer, kv_cache.ReservedLayer) for layer in cache.layers)
    # Sliding-window layers keep transformers' own cache, which evicts the positions outside the window.
    sliding = MistralForCausalLM(MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                               sliding_window=4))
    assert kv_cache.reserved_cache(sliding, 16) is None
    assert kv_cache.reserved_cache(torch.nn.Linear(2, 2), 16) is None  # not a transformers model
