"""PPO/GRPO math against hand-computed values: GAE, whitening, clipped losses, group advantages, KL estimators."""

import math

import pytest
import torch

from lit_align import losses


def assert_values(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_gae_matches_the_recursion_by_hand_with_a_padded_row():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])  # the 7 sits on padding and must be ignored
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 1 - .5 = .5 -> A2 = .5; d1 = .9*.5 - .5 = -.05 -> A1 = -.05 + .45*.5 = .175;
    #        d0 = -.05 -> A0 = -.05 + .45*.175 = .02875
    # row 1 (last real token t=1, terminal): A1 = 2 - 0 = 2; d0 = .9*0 - 1 = -1 -> A0 = -1 + .45*2 = -.1
    assert_values(adv, [[0.02875, 0.175, 0.5], [-0.1, 2.0, 0.0]], atol=1e-6)
    assert_values(ret, [[0.52875, 0.675, 1.0], [0.9, 2.0, 0.0]], atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards = torch.tensor([[0.1, -0.2, 3.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_values(ret, [[2.9, 2.8, 3.0, 0.0]], atol=1e-6)
    assert_values(adv, [[1.9, 0.8, 0.0, 0.0]], atol=1e-6)


def test_whiten_uses_masked_mean_and_population_variance():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = losses.whiten(x, mask)
    s = math.sqrt(2 / 3)  # mean 2, population variance 2/3
    assert_values(out, [[-1 / s, 0.0], [1 / s, 0.0]], atol=1e-4)
    # shift_mean=False: unit variance, the mean (2) kept
    assert_values(losses.whiten(x, mask, shift_mean=False), [[2 - 1 / s, 2.0], [2 + 1 / s, 0.0]], atol=1e-4)


def test_ppo_policy_loss_takes_the_pessimistic_term_per_token():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 50.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the huge ratio is on padding
    old = torch.zeros_like(ratios)
    logps = torch.log(ratios).requires_grad_()
    loss, clip_fraction, approx_kl = losses.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): (1.5, +) -> max(-1.5, -1.2) = -1.2 clipped; (.5, +) -> max(-.5, -.8) = -.5;
    # (.5, -) -> max(.5, .8) = .8 clipped; (1.5, -) -> max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.5)
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    assert approx_kl.item() == pytest.approx((2 * k3(1.5) + 2 * k3(0.5)) / 4, abs=1e-6)
    loss.backward()
    # the clipped tokens and the padding get no gradient; an unclipped token's is -A * r / 4
    assert_values(logps.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]], atol=1e-6)


def test_ppo_policy_loss_clip_higher_widens_only_the_upper_side():
    logps = torch.log(torch.tensor([[1.25, 0.7]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, frac, _ = losses.ppo_policy_loss(logps, torch.zeros(1, 2), adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    # 1.25 < 1.28: not clipped (-1.25); 0.7 < 0.8 with A < 0: max(.7, .8) = .8 clipped
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2, abs=1e-6)
    assert frac.item() == pytest.approx(0.5)


def test_sequence_and_token_aggregation_differ_as_documented():
    token_losses = torch.tensor([[1.0, 3.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert losses.aggregate_token_losses(token_losses, mask, "token").item() == pytest.approx(10 / 3)
    assert losses.aggregate_token_losses(token_losses, mask, "sequence").item() == pytest.approx((2 + 6) / 2)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        losses.aggregate_token_losses(token_losses, mask, "batch")


def test_ppo_value_loss_is_clipped_around_the_old_values():
    values = torch.tensor([[0.5, 0.1, -0.5, 0.5]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 0.0, -1.0, 0.6]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, frac = losses.ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    # clipped values .2, .1, -.2, .2 -> errors max(.25, .64), max(.01, .01), max(.25, .64), max(.01, .16)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 0.64 + 0.16) / 4, abs=1e-6)
    assert frac.item() == pytest.approx(0.75)
    plain, _ = losses.ppo_value_loss(values, old, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.01 + 0.25 + 0.01) / 4, abs=1e-6)


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([4.0, -0.3, -0.3, -1.0, 1.0, 1.0, 1.0, 1.0])
    adv = losses.group_advantages(rewards, group_size=4)
    mean = (4.0 - 0.3 - 0.3 - 1.0) / 4  # 0.6
    std = math.sqrt((3.4 ** 2 + 0.9 ** 2 + 0.9 ** 2 + 1.6 ** 2) / 4)  # population std
    expected = [3.4 / std, -0.9 / std, -0.9 / std, -1.6 / std, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert mean == pytest.approx(0.6)
    centred = losses.group_advantages(rewards, group_size=4, normalize_std=False)
    assert centred.tolist() == pytest.approx([3.4, -0.9, -0.9, -1.6, 0, 0, 0, 0], abs=1e-6)
    # K = 2: one passes, one fails -> exactly +1 and -1
    assert losses.group_advantages(torch.tensor([4.0, -0.3]), 2).tolist() == pytest.approx([1.0, -1.0], abs=1e-5)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        losses.group_advantages(torch.tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        losses.group_advantages(torch.zeros(6), group_size=4)


def test_kl_estimators_by_hand():
    ln2 = math.log(2.0)
    logps = torch.tensor([ln2 + math.log(0.25), math.log(0.25), math.log(0.5)])  # d = ln 2, 0, -ln 2
    ref = torch.tensor([math.log(0.25), math.log(0.25), math.log(1.0)])
    d = [ln2, 0.0, -ln2]
    assert losses.kl_penalty(logps, ref, "k1").tolist() == pytest.approx(d, abs=1e-6)
    assert losses.kl_penalty(logps, ref, "kl").tolist() == pytest.approx(d, abs=1e-6)
    assert losses.kl_penalty(logps, ref, "abs").tolist() == pytest.approx([ln2, 0.0, ln2], abs=1e-6)
    assert losses.kl_penalty(logps, ref, "mse").tolist() == pytest.approx([ln2 ** 2 / 2, 0.0, ln2 ** 2 / 2], abs=1e-6)
    # k3 = exp(-d) - 1 + d: 1/2 - 1 + ln 2 and 2 - 1 - ln 2
    k3 = [0.5 - 1 + ln2, 0.0, 2 - 1 - ln2]
    assert losses.kl_penalty(logps, ref, "k3").tolist() == pytest.approx(k3, abs=1e-6)
    assert losses.kl_penalty(logps, ref, "low_var_kl").tolist() == pytest.approx(k3, abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        losses.kl_penalty(logps, ref, "k4")


def test_k3_averages_to_the_true_kl_on_samples():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    samples = torch.multinomial(p, 200_000, replacement=True)
    k3 = losses.kl_penalty(torch.log(p[samples]), torch.log(q[samples]), "k3")
    true_kl = float((p * (p / q).log()).sum())
    assert float(k3.mean()) == pytest.approx(true_kl, rel=0.02)
    assert float(k3.min()) >= 0


def test_entropy_from_logits():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 1e-30]]))
    ent = losses.entropy_from_logits(logits)
    assert ent.tolist() == pytest.approx([math.log(4), 0.5 * math.log(2) + 0.5 * math.log(4)], abs=1e-5)


def test_explained_variance_and_adaptive_kl():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert losses.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert losses.explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    assert losses.adaptive_kl_coef(0.1, observed_kl=12.0, target=6.0, horizon=1000, n_steps=100) == pytest.approx(0.102)
    assert losses.adaptive_kl_coef(0.1, observed_kl=5.4, target=6.0, horizon=1000, n_steps=100) == pytest.approx(0.099)
    with pytest.raises(ValueError, match="target > 0"):
        losses.adaptive_kl_coef(0.1, 1.0, target=0.0, horizon=10, n_steps=1)
