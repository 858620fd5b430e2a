"""The vllm backend: its pure parts run everywhere; the engine itself only where vLLM and a GPU are present."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from lit_align.generation import SamplingParams, build_backend
from lit_align.generation.hf import HFBackend
from lit_align.generation.vllm import completion_from_vllm, merged_state_dict, vllm_sampling_kwargs
from lit_align.models import LoRAConfig, apply_lora, load_causal_lm, load_tokenizer


def test_sampling_params_convert_to_vllm_arguments():
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, n=3, stop=["\nx"], seed=5)
    assert vllm_sampling_kwargs(params, [2, 7]) == {
        "stop_token_ids": [2, 7], "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 7, "stop": ["\nx"], "seed": 5,
        "logprobs": 0,
        "include_stop_str_in_output": False, "skip_special_tokens": True,
    }
    greedy = vllm_sampling_kwargs(SamplingParams(temperature=0, top_p=0.5, stop=[]))
    assert (greedy["temperature"], greedy["top_p"], greedy["stop"], greedy["seed"]) == (0.0, 1.0, [], None)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_names_the_extra_to_install():
    with pytest.raises(ImportError, match=r"pip install lit_align\[vllm\]"):
        build_backend("vllm", model="preset:tiny")


def step(token_id, logprob):
    return {token_id: SimpleNamespace(logprob=logprob, rank=1)}


def test_vllm_output_loses_eos_and_stop_tokens_and_keeps_logprobs(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = [101, 102, 14, 104]  # "a" "b" "\n" "d": vLLM stopped on "\nd" and kept the tokens that formed it
    output = SimpleNamespace(text="ab", token_ids=ids, finish_reason="stop",
                             logprobs=[step(t, -0.1 * (i + 1)) for i, t in enumerate(ids)])
    completion = completion_from_vllm(output, decode, [2], ["\nd"])
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("ab", [101, 102], "stop")
    assert completion.end_token_id is None  # a stop string ended it
    assert completion.logprobs == pytest.approx([-0.1, -0.2])
    for end in (2, 7):  # the tokenizer's EOS, or another end token (a chat template's end of turn)
        ended = SimpleNamespace(text="ab", token_ids=[101, 102, end], finish_reason="stop", logprobs=None)
        completion = completion_from_vllm(ended, decode, [2, 7], [])
        assert (completion.text, completion.token_ids, completion.logprobs) == ("ab", [101, 102], None)
        assert completion.end_token_id == end
    cut_short = SimpleNamespace(text="ab\n", token_ids=[101, 102, 14], finish_reason="length", logprobs=None)
    assert completion_from_vllm(cut_short, decode, [2], ["\nd"]).finish_reason == "length"


def test_merged_state_dict_of_a_lora_policy_loads_into_the_plain_model(tiny_dir):
    torch.manual_seed(0)  # peft draws the A matrices from the global RNG
    policy = apply_lora(load_causal_lm(tiny_dir), LoRAConfig(r=4))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj
    base_before = q_proj.base_layer.weight.detach().clone()
    merged = dict(merged_state_dict(policy))
    plain = load_causal_lm(tiny_dir)
    assert set(merged) == set(plain.state_dict())  # plain Hugging Face names, nothing from peft
    scale = q_proj.scaling["default"]
    expected_q = base_before + scale * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected_q, atol=1e-6)
    assert torch.equal(q_proj.base_layer.weight, base_before)  # the policy itself is untouched
    plain.load_state_dict(merged, strict=True)
    policy.eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 14]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, policy(ids).logits, atol=1e-5)
        with policy.disable_adapter():
            assert (plain(ids).logits - policy(ids).logits).abs().max() > 1e-2
    untouched = dict(merged_state_dict(load_causal_lm(tiny_dir)))
    assert set(untouched) == set(plain.state_dict())


def test_vllm_engine_generates_like_the_hf_backend_and_syncs_lora_weights(tiny_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM engine needs a CUDA GPU")
    backend = build_backend("vllm", model=tiny_dir, dtype="float32", gpu_memory_utilization=0.2,
                            enable_prefix_caching=False)
    tokenizer = load_tokenizer(tiny_dir)
    prompts = ["def f(x):\n", "import os\n"]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=[])
    policy = load_causal_lm(tiny_dir).cuda()
    hf = HFBackend(policy, tokenizer)
    assert [r[0].token_ids for r in backend.generate(prompts, params)] == [r[0].token_ids for r in hf.generate(prompts, params)]
    lora = apply_lora(policy, LoRAConfig(r=4))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    backend.sync_weights(lora)
    synced = backend.generate(prompts, params)
    expected = HFBackend(lora, tokenizer).generate(prompts, params)
    assert [r[0].token_ids for r in synced] == [r[0].token_ids for r in expected]
    for r, e in zip(synced, expected):
        assert r[0].logprobs == pytest.approx(e[0].logprobs, abs=1e-3)


def test_the_engine_stops_at_every_end_token_the_checkpoint_declares(tmp_path):
    """The vllm backend's end tokens (its stop_token_ids, and what it strips from completions): the tokenizer's EOS, the
    generation config's and the chat template's end of turn, as the hf backend's; a directory without a generation
    config declares none."""
    from data_helpers import make_turn_chat_model
    from transformers import GenerationConfig

    from lit_align.generation.hf import model_eos_ids
    from lit_align.generation.vllm import _generation_config

    model_dir = make_turn_chat_model(tmp_path / "chat")
    GenerationConfig(eos_token_id=[2, 7]).save_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    assert model_eos_ids(_generation_config(model_dir), tokenizer) == [2, 7, 261]  # 261: <end_of_turn>
    assert model_eos_ids(_generation_config(str(tmp_path / "missing")), tokenizer) == [2, 261]
