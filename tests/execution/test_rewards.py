"""The unit-test reward: the report's scale, partial credit, and the trivial-body penalty."""

import pytest

from lit_align.execution import ExecutionResult, Status
from lit_align.execution.rewards import ExecutionReward, UnitTestReward, is_trivial_completion

from .conftest import DOUBLE


def _result(status: str, passed: int = 0, total: int = 4) -> ExecutionResult:
    return ExecutionResult(Status(status), passed, total, 0.0)


def test_default_scale_is_the_reports():
    reward = UnitTestReward()
    assert [reward(_result(s)) for s in ("timeout", "syntax_error", "runtime_error", "failed")] == [-2, -1, -0.6, -0.3]
    assert reward(_result("passed", 4)) == 4.0
    assert reward(_result("memory_limit")) == -0.6


def test_partial_credit_interpolates_between_failed_and_passed():
    reward = UnitTestReward(partial_credit=True)
    assert reward(_result("failed", 0, 4)) == pytest.approx(-0.3)
    assert reward(_result("failed", 3, 4)) == pytest.approx(-0.3 + 4.3 * 0.75)
    assert reward(_result("runtime_error", 3, 4)) == pytest.approx(-0.6)  # only failed tests earn credit
    assert UnitTestReward(partial_credit=False)(_result("failed", 3, 4)) == pytest.approx(-0.3)


@pytest.mark.parametrize(
    "completion, trivial",
    [
        ("    pass\n", True),
        ("    ...\n", True),
        ("    return None\n", True),
        ("    return\n", True),
        ("", True),  # only the prompt's docstring
        ("    raise NotImplementedError\n", True),
        ("    # TODO\n    pass\n", True),
        ("    return 2 * x\n", False),
        ("    return 0\n", False),
        ("    print(x)\n", False),
        ("    return 2 *\n", False),  # a syntax error is scored as one, not as trivial
    ],
)
def test_trivial_body_detection(completion, trivial):
    assert is_trivial_completion(DOUBLE.prompt, completion, "double") is trivial


def test_trivial_penalty_makes_the_bare_pass_hack_not_pay():
    reward = UnitTestReward()
    bare = reward(_result("failed"), trivial=True)
    honest_crash = reward(_result("runtime_error"))
    assert bare == -1.0 < honest_crash < reward(_result("failed"))
    assert reward(_result("passed", 4), trivial=True) == 4.0  # a body that does nothing but passes is fine
    assert UnitTestReward(trivial=None)(_result("failed"), trivial=True) == -0.3


def test_execution_reward_runs_completions_in_the_sandbox():
    scorer = ExecutionReward(batch_deadline_s=60)
    rewards, results = scorer.score([DOUBLE] * 4, ["    return 2 * x\n", "    pass\n", "    return x +\n",
                                                   "    return [][0]\n"])
    assert [r.status for r in results] == [Status.PASSED, Status.FAILED, Status.SYNTAX_ERROR, Status.RUNTIME_ERROR]
    assert rewards == [4.0, -1.0, -1.0, -0.6]
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        scorer([DOUBLE, DOUBLE], ["    pass\n"])


def test_trivial_check_does_not_leak_syntax_warnings_from_generated_code():
    import warnings

    from lit_align.execution.rewards import is_trivial_completion

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a docstring with an invalid escape, then `pass`: trivial, and judged without a warning reaching the log
        assert is_trivial_completion('def f(x):\n', '    "\\d"\n    pass\n') is True
    assert [str(w.message) for w in caught] == []
