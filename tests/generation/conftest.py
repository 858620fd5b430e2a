"""Fixtures of the generation tests: the tiny preset policy and a re-scoring forward pass."""

import pytest
import torch

from lit_align.models import load_causal_lm, load_tokenizer, materialize_preset


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared, busy CPU, OpenMP spinning makes tiny-model decoding ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    return materialize_preset("preset:tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny preset, loaded from its directory (a fresh copy per test module)."""
    return load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)


def rescore_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``completion_ids`` after ``prompt_ids`` from one plain forward pass (no padding, no cache)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    finally:
        model.train(was_training)
    steps = logits[len(prompt_ids) - 1:-1] / temperature
    return torch.log_softmax(steps, dim=-1).gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


@pytest.fixture
def rescore():
    return rescore_logprobs
