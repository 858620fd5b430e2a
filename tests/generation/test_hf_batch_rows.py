"""The rows of the hf backend's decoding batch: each distinct prompt is prefilled once (``share_prompt``) and its keys
and values copied to every sample of it, and rows that ended are dropped (``drop_ended_rows``); either way the same
tokens and log-probabilities as a prefill per row and every row decoded to the end, with fewer rows per pass."""

import pytest
import torch

from lit_align.generation import HFBackend, SamplingParams
from lit_align.generation import kv_cache
from lit_align.generation.hf import distinct_rows

PROMPTS = ["x", "def add(a, b):\n    return", "import os\nimport sys\n\n"]


def prefill_rows(model, decoding: bool = False) -> list[int]:
    """Record the rows of every forward call of ``model`` that feeds more than one position (the prefills), or with
    ``decoding`` of every call that feeds one (the decoding steps)."""
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        ids = kwargs["input_ids"]
        if (ids.size(1) == 1) == decoding:
            seen.append(ids.size(0))
        return forward(*args, **kwargs)

    model.forward = recording
    return seen


def generate_both(model, tokenizer, params, **backend_kwargs):
    """(shared completions, prefill rows), (unshared completions, prefill rows) of PROMPTS in batches of 4."""
    seen = prefill_rows(model)
    try:
        shared = HFBackend(model, tokenizer, batch_size=4, **backend_kwargs).generate(PROMPTS, params)
        shared_rows = list(seen)
        seen.clear()
        full = HFBackend(model, tokenizer, batch_size=4, share_prompt=False, **backend_kwargs).generate(PROMPTS, params)
    finally:
        del model.forward
    return (shared, shared_rows), (full, seen)


def assert_same_completions(got, want):
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in want]
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in want]
    assert [[c.finish_reason for c in r] for r in got] == [[c.finish_reason for c in r] for r in want]
    for r_got, r_want in zip(got, want):
        for a, b in zip(r_got, r_want):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("reserve_cache", [False, True])
def test_each_prompt_is_prefilled_once_per_batch_and_samples_what_a_prefill_per_row_does(tiny, rescore, reserve_cache):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=30, temperature=1.0, n=3, seed=3, stop=["\n\n"])
    (shared, shared_rows), (full, full_rows) = generate_both(model, tokenizer, params, reserve_cache=reserve_cache)
    # 9 rows in batches of 4: (x, x, x, add) (add, add, os, os) (os): 2, 2 and 1 distinct prompts
    assert shared_rows == [2, 2, 1] and full_rows == [4, 4, 1]
    assert_same_completions(shared, full)
    assert sum(len(c.token_ids) for r in shared for c in r) > 60  # many decoding steps on the copied keys/values
    assert len({tuple(c.token_ids) for c in shared[1]}) == 3  # the copies are sampled independently
    backend = HFBackend(model, tokenizer)
    for prompt, completions in zip(PROMPTS, shared):  # each continues its own prompt
        for c in completions:
            torch.testing.assert_close(torch.tensor(c.logprobs), rescore(model, backend.encode_prompt(prompt), c.token_ids),
                                       atol=1e-4, rtol=0)


def test_sliding_window_layers_share_and_a_cache_whose_rows_cannot_be_copied_does_not(tiny, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    model, tokenizer = tiny
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               vocab_size=len(tokenizer), sliding_window=4)).eval()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=0, stop=[])
    (shared, shared_rows), (full, _) = generate_both(sliding, tokenizer, params)
    assert shared_rows == [2, 2, 1]  # the window evicts per row, so its rows can be copied too
    assert_same_completions(shared, full)
    # A model whose cache has a layer that would not copy its rows (linear attention): every row is prefilled, in
    # the one prefill pass a batch always makes
    monkeypatch.setattr(kv_cache, "_default_cache", lambda model, layer_types: None)
    (unshared, rows), (full, _) = generate_both(model, tokenizer, params)
    assert rows == [4, 4, 1]
    assert_same_completions(unshared, full)


@pytest.mark.parametrize("reserve_cache", [False, True])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_rows_that_ended_are_dropped_and_the_others_sample_what_they_would_have(tiny, reserve_cache, temperature, top_p):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=60, temperature=temperature, top_p=top_p, n=4, seed=5, stop=[])
    eos = list(range(100, 113))  # about one sampled token in twenty ends a row: rows end at many different steps
    seen = prefill_rows(model, decoding=True)
    try:
        dropping = HFBackend(model, tokenizer, batch_size=12, eos_token_ids=eos, reserve_cache=reserve_cache)
        got = dropping.generate(PROMPTS, params)
        dropping_rows = list(seen)
        seen.clear()
        keeping = HFBackend(model, tokenizer, batch_size=12, eos_token_ids=eos, reserve_cache=reserve_cache,
                            drop_ended_rows=False)
        want = keeping.generate(PROMPTS, params)
    finally:
        del model.forward
    assert_same_completions(got, want)
    lengths = [len(c.token_ids) for r in got for c in r]
    assert len(set(lengths)) >= 5 and max(lengths) > 2 * min(lengths)
    assert set(seen) == {12}  # every row to the end
    # each drop leaves at most half of the rows, and only rows still running
    assert dropping_rows[0] == 12 and len(dropping_rows) == len(seen)
    drops = [(a, b) for a, b in zip(dropping_rows, dropping_rows[1:]) if b != a]
    assert drops and all(b <= a // 2 for a, b in drops)
    assert dropping_rows[-1] >= 1


def test_distinct_rows_and_a_reserved_layer_copies_its_buffers():
    assert distinct_rows([[1, 2], [3], [1, 2], [3], [4]]) == ([[1, 2], [3], [4]], [0, 1, 0, 1, 2])
    assert distinct_rows([[1], [2]]) == ([[1], [2]], None)  # nothing repeats
    layer = kv_cache.ReservedLayer(capacity=8)
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    step = torch.randn(3, 3, 1, 4), torch.randn(3, 3, 1, 6)
    got_keys, got_values = layer.update(*step)  # the next token is written into the copied rows' buffers
    assert torch.equal(got_keys, torch.cat([keys[[1, 1, 0]], step[0]], dim=-2))
    assert torch.equal(got_values, torch.cat([values[[1, 1, 0]], step[1]], dim=-2))
    assert layer._key_buffer.shape == (3, 3, 8, 4)  # still reserved for the whole completion
