"""The interface's pure parts: parameter validation, stop-string cutting, token sampling, the backend factory."""

import math

import pytest
import torch

from lit_align.generation import DEFAULT_STOP, SamplingParams, build_backend, cut_at_stop
from lit_align.generation.base import covering_prefix, find_stop
from lit_align.generation.sampling import sample_next_tokens, token_logprobs, top_p_mask

PIECES = {0: "ab", 1: "c\nd", 2: "ef ", 3: "gh"}


def decode_pieces(ids):
    return "".join(PIECES[i] for i in ids)


def test_sampling_params_defaults_and_stop_string_promotion():
    params = SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.n, params.seed) == (256, 1.0, 1.0, 1, None)
    assert params.stop == ["\ndef ", "\nclass ", "\nif __name__", "\nprint("] == DEFAULT_STOP
    params.stop.append("x")
    assert SamplingParams().stop == DEFAULT_STOP  # no shared default list
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_cut_at_stop_keeps_the_token_where_the_stop_string_starts():
    # "ab" + "c\nd" + "ef " + "gh" = "abc\ndef gh": the stop "\ndef " starts inside token 1.
    text, kept, stopped = cut_at_stop([0, 1, 2, 3], decode_pieces, ["\ndef "])
    assert (text, kept, stopped) == ("abc", 2, True)
    assert decode_pieces([0, 1]).startswith(text) and not decode_pieces([0]).startswith(text)


def test_cut_at_stop_uses_the_earliest_stop_and_handles_edges():
    assert cut_at_stop([0, 1, 2, 3], decode_pieces, ["gh", "c\n"]) == ("ab", 1, True)
    assert cut_at_stop([0, 1, 2, 3], decode_pieces, ["ab"]) == ("", 0, True)
    assert cut_at_stop([0, 1, 2, 3], decode_pieces, ["zz"]) == ("abc\ndef gh", 4, False)
    assert cut_at_stop([0, 1, 2, 3], decode_pieces, []) == ("abc\ndef gh", 4, False)
    assert cut_at_stop([], decode_pieces, ["a"]) == ("", 0, False)
    assert find_stop("x\nclass A\ndef f", DEFAULT_STOP) == 1


def test_covering_prefix_drops_trailing_tokens_that_add_no_text():
    pieces = {0: "ab", 1: "c", 2: ""}  # 2 decodes to nothing, like an eos token with skip_special_tokens
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert covering_prefix([0, 1, 2, 2], decode, "abc") == 2
    assert covering_prefix([0, 1], decode, "abz") == 2  # text the tokens do not produce: keep them all


def test_greedy_is_argmax_and_logprobs_are_temperature_one():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0]])
    assert sample_next_tokens(logits, 0.0, 0.5, None).tolist() == [1, 0]  # ties go to the lowest id
    lp = token_logprobs(logits, torch.tensor([2, 1]))
    expected = [-1.0 - math.log(math.exp(0.1) + math.exp(2.0) + math.exp(-1.0)), 3.0 - math.log(2 * math.exp(3.0) + 1)]
    assert lp.tolist() == pytest.approx(expected, abs=1e-6)


def test_top_p_mask_keeps_the_smallest_nucleus_reaching_top_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert top_p_mask(probs, 0.7).tolist() == [[False, True, False, True]]
    assert top_p_mask(probs, 0.5).tolist() == [[False, True, False, False]]
    assert top_p_mask(probs, 0.01).tolist() == [[False, True, False, False]]  # the top token always stays
    assert top_p_mask(probs, 1.0).all()


def test_sampling_follows_temperature_and_top_p_and_is_seeded():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(8000, 4)
    draw = lambda t, p, seed: sample_next_tokens(logits, t, p, torch.Generator().manual_seed(seed))  # noqa: E731
    nucleus = draw(1.0, 0.7, 0)
    assert set(nucleus.tolist()) == {0, 1}
    assert (nucleus == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    sharp = draw(0.5, 1.0, 1)  # p**2 renormalised
    assert (sharp == 0).float().mean().item() == pytest.approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025), abs=0.03)
    assert torch.equal(draw(1.0, 1.0, 3), draw(1.0, 1.0, 3))
    assert not torch.equal(draw(1.0, 1.0, 3), draw(1.0, 1.0, 4))


def test_build_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'.*'hf', 'vllm', 'openai'"):
        build_backend("tgi")


def test_build_backend_openai_passes_arguments():
    backend = build_backend("openai", base_url="http://127.0.0.1:9/v1/", max_concurrency=4, timeout=3)
    assert (backend.base_url, backend.max_concurrency, backend.timeout) == ("http://127.0.0.1:9/v1", 4, 3.0)
    with pytest.raises(ValueError, match="base_url must start with http"):
        build_backend("openai", base_url="127.0.0.1:8000")
