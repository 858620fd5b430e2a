"""The hf backend on the tiny preset: batching, stop strings, ordering, seeding, log-probabilities, LoRA."""

import inspect

import pytest
import torch

from lit_align.generation import HFBackend, SamplingParams, build_backend
from lit_align.models import LoRAConfig, apply_lora, load_causal_lm

PROMPTS = ["x", "def add(a, b):\n    return", "import os\n"]


def greedy(max_new_tokens=24, stop=()):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop))


def test_left_padded_batch_matches_one_by_one_greedy(tiny):
    model, tokenizer = tiny
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 3  # really mixed lengths, so the batch is padded
    batched = HFBackend(model, tokenizer, batch_size=3).generate(PROMPTS, greedy())
    single = HFBackend(model, tokenizer, batch_size=1).generate(PROMPTS, greedy())
    for b, s in zip(batched, single):
        assert len(b) == len(s) == 1
        assert b[0].token_ids == s[0].token_ids and b[0].text == s[0].text
        assert len(b[0].token_ids) == 24 and b[0].finish_reason == "length"
        assert b[0].logprobs == pytest.approx(s[0].logprobs, abs=1e-4)
    assert tokenizer.padding_side == "right"  # the tokenizer was not switched to left padding


def test_logprobs_match_a_rescoring_forward_pass(tiny, rescore):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, batch_size=4)  # 6 rows: batches mix prompts, lengths and padding
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, n=2, seed=0, stop=[])
    results = backend.generate(PROMPTS, params)
    for prompt, completions in zip(PROMPTS, results):
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) == 20
            ids = backend.encode_prompt(prompt)
            assert torch.allclose(torch.tensor(c.logprobs), rescore(model, ids, c.token_ids), atol=1e-4)
            # They are temperature-1 log-probabilities, not those of the temperature-0.8 distribution.
            scaled = rescore(model, ids, c.token_ids, temperature=0.8)
            assert (torch.tensor(c.logprobs) - scaled).abs().max() > 1e-3


def test_n_completions_per_prompt_come_back_in_prompt_order(tiny, rescore):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, batch_size=4)
    prompts = PROMPTS[1:]
    results = backend.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=1, stop=[]))
    assert [len(r) for r in results] == [3, 3]
    for i, completions in enumerate(results):
        assert len({tuple(c.token_ids) for c in completions}) == 3  # three distinct samples
        for c in completions:  # each completion scores as a continuation of its own prompt, not the other
            own = rescore(model, backend.encode_prompt(prompts[i]), c.token_ids)
            other = rescore(model, backend.encode_prompt(prompts[1 - i]), c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), own, atol=1e-4)
            assert (torch.tensor(c.logprobs) - other).abs().max() > 1e-3
    greedy_n = backend.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, n=3, stop=[]))
    greedy_1 = backend.generate(prompts, greedy(12))
    for many, one in zip(greedy_n, greedy_1):
        assert [c.token_ids for c in many] == [one[0].token_ids] * 3


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=123, stop=[])
    state = torch.get_rng_state()
    first = backend.generate(PROMPTS[:2], params)
    assert torch.equal(torch.get_rng_state(), state)
    again = backend.generate(PROMPTS[:2], params)
    other = backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=124, stop=[]))
    ids = lambda res: [[c.token_ids for c in r] for r in res]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    unseeded = SamplingParams(max_new_tokens=16, temperature=1.0, stop=[])
    torch.manual_seed(5)
    a = backend.generate(PROMPTS[:1], unseeded)
    b = backend.generate(PROMPTS[:1], unseeded)
    torch.manual_seed(5)
    c = backend.generate(PROMPTS[:1], unseeded)
    assert ids(a) == ids(c) != ids(b)  # without a seed, torch's global RNG decides


def test_stop_string_cuts_text_and_tokens_consistently(tiny):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer)
    reference = backend.generate(["def f(x):\n"], greedy(30))[0][0]
    assert reference.finish_reason == "length" and len(reference.token_ids) == 30
    # A stop string taken from the middle of the greedy text: generation must end right before it.
    start = next(i for i in range(3, 30) if " " < reference.text[i] <= "~")
    stop = reference.text[start]
    cut = reference.text.index(stop)
    stopped = backend.generate(["def f(x):\n"], greedy(30, stop=["\ndef ", stop]))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == reference.text[:cut]
    k = len(stopped.token_ids)
    assert 0 < k < 30 and stopped.token_ids == reference.token_ids[:k]
    assert backend.decode(stopped.token_ids) == stopped.text  # byte-level tokens: the cut falls between tokens
    assert stopped.logprobs == pytest.approx(reference.logprobs[:k], abs=1e-6)


def test_eos_token_ends_the_completion_and_is_not_returned(tiny):
    model, tokenizer = tiny
    reference = HFBackend(model, tokenizer).generate(["import os\n"], greedy(30))[0][0]
    ids = reference.token_ids
    j = next(i for i in range(2, 30) if ids[i] not in ids[:i])
    backend = HFBackend(model, tokenizer, eos_token_ids=[ids[j]])
    ended = backend.generate(["import os\n"], greedy(30))[0][0]
    assert ended.token_ids == ids[:j] and ended.finish_reason == "stop" and ended.end_token_id == ids[j]
    assert ended.text == backend.decode(ids[:j])
    assert reference.end_token_id is None  # the length ended it
    assert HFBackend(model, tokenizer).eos_token_ids == {tokenizer.eos_token_id}


@pytest.mark.filterwarnings("error:.*past_key_values:FutureWarning")  # the KV cache goes by its current name
def test_lora_policy_generates_with_its_adapter_and_keeps_its_modes(tiny_dir, tokenizer_of_tiny, rescore):
    torch.manual_seed(0)  # peft draws the A matrices from the global RNG
    policy = apply_lora(load_causal_lm(tiny_dir), LoRAConfig(r=4))
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter change the outputs
            torch.nn.init.normal_(param, std=0.05)
    policy.train()
    frozen_block = policy.get_base_model().model.layers[0].mlp
    frozen_block.eval()  # a submodule deliberately in eval mode must stay so
    backend = HFBackend(policy, tokenizer_of_tiny)
    first = backend.generate(PROMPTS, greedy(16))
    second = backend.generate(PROMPTS, greedy(16))  # lora dropout is off while generating: same output
    assert [r[0].token_ids for r in first] == [r[0].token_ids for r in second]
    assert policy.training and not frozen_block.training
    dropouts = [m for n, m in policy.named_modules() if n.endswith("lora_dropout.default") and "layers.0.mlp" not in n]
    assert dropouts and all(m.training for m in dropouts)
    assert all(p.grad is None for p in policy.parameters())
    with policy.disable_adapter():
        plain = backend.generate(PROMPTS, greedy(16))
    assert [r[0].token_ids for r in plain] != [r[0].token_ids for r in first]
    for prompt, result in zip(PROMPTS, first):
        scored = rescore(policy, backend.encode_prompt(prompt), result[0].token_ids)
        assert torch.allclose(torch.tensor(result[0].logprobs), scored, atol=1e-4)


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_takes(tiny_dir):
    """transformers deprecated ``past_key_values`` for ``cache`` (the old name goes in 5.40): the name is read from the
    model's forward, through peft's wrapper, and a module that is not a transformers model gets the old one."""
    from transformers import LlamaForCausalLM

    from lit_align.models import cache_keyword, returned_cache

    takes = inspect.signature(LlamaForCausalLM.forward).parameters
    name = "cache" if "cache" in takes else "past_key_values"
    assert name in takes
    policy = apply_lora(load_causal_lm(tiny_dir), LoRAConfig(r=4))
    assert cache_keyword(policy) == cache_keyword(policy.get_base_model()) == name
    assert cache_keyword(torch.nn.Linear(2, 2)) == "past_key_values"
    out = policy(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert returned_cache(out) is out[name] and returned_cache(out).get_seq_length() == 3
    assert returned_cache(policy(input_ids=torch.tensor([[1, 2]]), use_cache=False)) is None


@pytest.fixture
def tokenizer_of_tiny(tiny):
    return tiny[1]


def test_bad_inputs_get_clear_errors(tiny):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer)
    with pytest.raises(TypeError, match="list of strings"):
        backend.generate("def f():", greedy())
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        backend.generate(["a", ""], SamplingParams(n=2, temperature=0))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        HFBackend(model, tokenizer, batch_size=0)
    assert backend.generate([], greedy()) == []


def test_build_backend_hf(tiny):
    model, tokenizer = tiny
    backend = build_backend("hf", model=model, tokenizer=tokenizer, batch_size=5)
    assert isinstance(backend, HFBackend) and backend.batch_size == 5
    backend.sync_weights(model)  # the hf backend already uses the live policy: nothing to do
    out = backend.generate(["x"], greedy(4))
    assert len(out) == 1 and len(out[0][0].token_ids) == 4


def _sentencepiece_like_tokenizer():
    """A fast tokenizer trained here: BPE with SentencePiece's metaspace (word-leading spaces are part of tokens and
    dropped at the start of a decoding), a byte fallback, and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    lines = ["def add(a, b):\n    return a + b\n", "    if x > 0:\n        print('héllo')\n"] * 20
    raw.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_decoding_through_the_tokenizers_library_equals_the_tokenizers_decode(tiny):
    """Generation decodes every step through the Rust tokenizer directly; the text is the tokenizer's own decode
    (special tokens skipped, no clean-up) for any ids, on the tiny preset and on a SentencePiece-like tokenizer. A
    tokenizer class that overrides decoding keeps its own."""
    from lit_align.generation.hf import rust_decoder

    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    for tokenizer in (tiny[1], _sentencepiece_like_tokenizer()):
        backend = HFBackend(model, tokenizer)
        assert backend._rust_decode is not None
        vocab = len(tokenizer)
        for length in (0, 1, 2, 7, 40):
            for _ in range(20):
                ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
                assert backend.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False), ids
        assert backend.decode([tokenizer.eos_token_id]) == ""  # special tokens are skipped

    class Shouting(type(tiny[1])):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()

    shouting = Shouting.from_pretrained(tiny[1].name_or_path)
    assert rust_decoder(shouting) is None
    ids = tiny[1]("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert HFBackend(model, shouting).decode(ids) == "DEF ADD(A, B):"
