"""Preference losses against their equations (IotaCode Eq. 2, 3, 5-6) on hand-computed values, including extremes."""

import math

import pytest
import torch

from lit_align import losses


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- Bradley-Terry (Eq. 2)
def test_bradley_terry_is_minus_log_sigmoid_of_the_reward_difference():
    out = losses.bradley_terry_loss(t(2.0, 0.0, -1.0), t(0.5, 0.0, 1.0))
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1.5, 0, -2
    expected = [math.log1p(math.exp(-1.5)), math.log(2.0), math.log1p(math.exp(2.0))]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_margin_shifts_the_difference_scalar_and_per_example():
    chosen, rejected = t(2.0, 3.0), t(0.5, 0.0)
    scalar = losses.bradley_terry_loss(chosen, rejected, margin=1.0)
    assert scalar.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(-2.0))], abs=1e-6)
    per_example = losses.bradley_terry_loss(chosen, rejected, margin=t(1.5, 4.0))
    assert per_example.tolist() == pytest.approx([math.log(2.0), math.log1p(math.exp(1.0))], abs=1e-6)


def test_bradley_terry_is_finite_for_huge_reward_gaps_and_its_gradient_is_sigmoid():
    chosen = t(1000.0, -1000.0).requires_grad_()
    out = losses.bradley_terry_loss(chosen, t(0.0, 0.0))
    assert out.tolist() == pytest.approx([0.0, 1000.0], abs=1e-4)
    out.sum().backward()
    # d/dr_w [-log sigmoid(r_w - r_l)] = -sigmoid(r_l - r_w)
    assert chosen.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)


# ---------------------------------------------------------------- DPO (Eq. 3)
def test_dpo_loss_and_rewards_on_hand_values():
    # h = beta * [(pc - rc) - (pr - rr)] = 0.5 * [(-10 + 11) - (-12 + 11)] = 1
    out, chosen_r, rejected_r = losses.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5)
    assert out.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)  # 0.313262
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.5)
    assert not chosen_r.requires_grad


def test_dpo_label_smoothing_is_the_conservative_mixture():
    eps, h = 0.1, 1.0
    out, _, _ = losses.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, label_smoothing=eps)
    expected = (1 - eps) * math.log1p(math.exp(-h)) + eps * math.log1p(math.exp(h))
    assert out.item() == pytest.approx(expected, abs=1e-6)  # 0.413262


def test_dpo_gradient_matches_the_derivative_of_eq_3():
    beta, eps = 2.0, 0.2
    pc = t(-3.0).requires_grad_()
    out, _, _ = losses.dpo_loss(pc, t(-4.0), t(-3.5), t(-3.5), beta=beta, label_smoothing=eps)
    out.backward()
    h = beta * ((-3.0 + 3.5) - (-4.0 + 3.5))  # = 2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -beta * (1 - eps) * sig(-h) + beta * eps * sig(h)
    assert pc.grad.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_policy_equal_to_reference_gives_log2_and_zero_rewards():
    logps = t(-5.0, -80.0)
    out, chosen_r, rejected_r = losses.dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    assert out.tolist() == pytest.approx([math.log(2.0)] * 2, abs=1e-7)
    assert chosen_r.tolist() == [0.0, 0.0] and rejected_r.tolist() == [0.0, 0.0]


def test_dpo_stays_finite_for_extreme_log_prob_gaps():
    out, _, _ = losses.dpo_loss(t(-1e4), t(0.0), t(0.0), t(-1e4), beta=1.0)  # h = -2e4
    assert torch.isfinite(out).all() and out.item() == pytest.approx(2e4, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_refuses_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        losses.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=beta)


def test_dpo_refuses_label_smoothing_outside_its_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.5)


# ---------------------------------------------------------------- ORPO (Eq. 5-6)
def test_odds_ratio_loss_on_hand_values():
    # p_w = 0.8 -> odds 4; p_l = 0.4 -> odds 2/3; log odds ratio = log 6; L_OR = log(1 + 1/6)
    out, ratio = losses.odds_ratio_loss(t(math.log(0.8)), t(math.log(0.4)))
    assert ratio.item() == pytest.approx(math.log(6.0), abs=1e-5)
    assert out.item() == pytest.approx(math.log1p(1 / 6), abs=1e-6)


def test_log_odds_of_one_half_is_zero_and_is_antisymmetric():
    assert losses.log_odds(t(math.log(0.5))).item() == pytest.approx(0.0, abs=1e-7)
    a = losses.log_odds(t(math.log(0.3)))
    b = losses.log_odds(t(math.log(0.7)))
    assert (a + b).item() == pytest.approx(0.0, abs=1e-5)


def _exact_log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(-math.expm1(mean_logp))  # float64 reference


def test_orpo_is_finite_and_exact_where_the_naive_formula_overflows():
    chosen = t(-1e-6, -2e-5).requires_grad_()  # p so close to 1 that 1 - p loses (or is) everything in float32
    rejected = t(-120.0, -1e4)  # p so small that exp underflows to 0 in float32
    p = torch.exp(chosen.detach())
    naive_ratio = torch.log(p / (1 - p)) - torch.log(torch.exp(rejected) / (1 - torch.exp(rejected)))
    assert not torch.isfinite(naive_ratio).all()  # the naive float32 implementation breaks on these inputs

    out, ratio = losses.odds_ratio_loss(chosen, rejected)
    assert torch.isfinite(out).all() and torch.isfinite(ratio).all()
    expected = [_exact_log_odds(c) - _exact_log_odds(r) for c, r in zip([-1e-6, -2e-5], [-120.0, -1e4])]
    assert ratio.tolist() == pytest.approx(expected, rel=1e-4)
    assert out.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    out.sum().backward()
    assert torch.isfinite(chosen.grad).all()


def test_orpo_is_finite_when_the_rejected_completion_is_the_certain_one():
    out, ratio = losses.odds_ratio_loss(t(-50.0), t(-1e-6))
    expected = _exact_log_odds(-50.0) - _exact_log_odds(-1e-6)  # about -63.8
    assert ratio.item() == pytest.approx(expected, rel=1e-4)
    assert out.item() == pytest.approx(-expected, rel=1e-4)  # -log sigmoid(x) = -x for very negative x


def test_orpo_at_probability_exactly_one_stays_finite():
    out, ratio = losses.odds_ratio_loss(t(0.0), t(math.log(0.5)))
    assert torch.isfinite(out).all() and torch.isfinite(ratio).all()
    assert ratio.item() > 15  # log odds of the clamped p = exp(-1e-7)


def test_log_odds_keeps_precision_near_probability_one():
    mean_logp = -1e-6
    exact = _exact_log_odds(mean_logp)  # 13.8155...
    p = torch.exp(t(mean_logp))
    naive = torch.log(p / (1 - p)).item()  # 1 - p rounds in float32
    assert abs(naive - exact) > 1e-2
    assert losses.log_odds(t(mean_logp)).item() == pytest.approx(exact, abs=1e-5)
