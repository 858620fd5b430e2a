"""The completions server's request handling, in process (the HTTP round trip is in test_openai_backend.py)."""

import subprocess
import sys

import pytest

from lit_align.generation import HFBackend
from lit_align.generation.serve import CompletionService, RequestError, check_loopback


@pytest.fixture(scope="module")
def service(tiny):
    return CompletionService(HFBackend(*tiny), "tiny", max_tokens_limit=64, max_n=4)


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": "x", "top_k": 5}, "top_k", "top_k is not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of is not supported"),
        ({"prompt": "x", "n": 5}, "n", "n must be an integer between 1 and 4, got 5"),
        ({"prompt": "x", "max_tokens": 65}, "max_tokens", "max_tokens must be an integer between 1 and 64"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be in"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop", "stop must be a non-empty string"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "only 0"),
        ({"prompt": "x", "echo": True}, "echo", "echo=true is not supported"),
        ({"prompt": []}, "prompt", "non-empty list of strings"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(service, body, param, message):
    with pytest.raises(RequestError, match=message) as err:
        service.parse(body)
    assert err.value.param == param and err.value.status == 400
    assert err.value.payload()["error"]["param"] == param


def test_a_request_maps_onto_sampling_params(service):
    prompts, params, options = service.parse({"prompt": ["a", "b"], "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                                              "n": 2, "stop": "\n", "seed": 3, "logprobs": 1,
                                              "return_tokens_as_token_ids": True})
    assert prompts == ["a", "b"]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.n, params.stop, params.seed) == (
        5, 0.5, 0.9, 2, ["\n"], 3)
    assert options == {"logprobs": 1, "as_token_ids": True, "token_ids": False}
    defaults = service.parse({"prompt": "a"})[1]
    assert (defaults.max_new_tokens, defaults.temperature, defaults.n, defaults.stop) == (16, 1.0, 1, [])


def test_response_carries_token_ids_logprobs_and_offsets(service):
    response = service.complete({"prompt": "ab", "max_tokens": 4, "temperature": 0, "logprobs": 0,
                                 "return_tokens_as_token_ids": True, "return_token_ids": True})
    (choice,) = response["choices"]
    ids = choice["token_ids"]
    assert len(ids) == 4 and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    assert len(choice["logprobs"]["token_logprobs"]) == 4 and choice["logprobs"]["text_offset"][0] == 0
    assert choice["text"] == service.backend.decode(ids)
    assert response["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_only_loopback_addresses_are_accepted():
    check_loopback("127.0.0.1")
    check_loopback("localhost")
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback("0.0.0.0")
    result = subprocess.run([sys.executable, "-m", "lit_align.generation.serve", "--model", "preset:tiny",
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a loopback address" in result.stderr
