"""Each loss against its paper equation on hand-computed values."""

import math

import pytest
import torch

from lit_align import losses

IGN = losses.IGNORE_INDEX


def _logits_with_probs(rows):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_sft_loss_counts_completion_tokens_only_and_weights_by_token():
    vocab_junk = [0.98, 0.01, 0.01]  # logits at prompt positions: must not matter
    # example 1: prompt (2 tokens) + completion tokens 1, 0 predicted with p = 0.5 and 0.25
    # example 2: prompt (3 tokens) + completion token 2 predicted with p = 0.75
    logits = torch.stack([
        _logits_with_probs([vocab_junk, [0.25, 0.5, 0.25], [0.25, 0.5, 0.25], vocab_junk]),
        _logits_with_probs([vocab_junk, vocab_junk, [0.125, 0.125, 0.75], vocab_junk]),
    ])
    logits[0, 2] = _logits_with_probs([[0.25, 0.5, 0.25]])[0].roll(1)  # p(token 0) = 0.25 at position 2
    labels = torch.tensor([[0, 1, 1, 0], [2, 2, 1, 2]])
    labels[0, :2] = IGN
    labels[1, :3] = IGN
    # labels[0] = [IGN, IGN, 1, 0]: token 1 predicted at position 1 (p=.5), token 0 at position 2 (p=.25)
    # labels[1] = [IGN, IGN, IGN, 2]: token 2 predicted at position 2 (p=.75)
    expected = -(math.log(0.5) + math.log(0.25) + math.log(0.75)) / 3
    assert losses.sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # token weighting: the per-example mean would give a different number
    per_example = (-(math.log(0.5) + math.log(0.25)) / 2 - math.log(0.75)) / 2
    assert abs(expected - per_example) > 0.05


def test_sft_loss_ignores_prompt_logits_entirely():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :3] = IGN
    losses.sft_loss(logits, labels).backward()
    # positions 0 and 1 predict prompt tokens 1 and 2: no gradient may reach them; the last position predicts nothing
    assert torch.all(logits.grad[:, :2] == 0)
    assert torch.all(logits.grad[:, -1] == 0)
    assert torch.all(logits.grad[:, 2:5].abs().sum(-1) > 0)


def test_sequence_logps_sum_and_mean():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert losses.sequence_logps(logps * mask, mask).tolist() == [-3.0, -0.5]
    assert losses.sequence_logps(logps * mask, mask, average=True).tolist() == [-1.5, -0.5]


def test_token_logps_match_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = IGN
    logps, mask = losses.token_logps(logits, labels)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps[mask], ref[mask], atol=1e-6)
    assert mask.tolist()[0] == [False, True, True, True]
