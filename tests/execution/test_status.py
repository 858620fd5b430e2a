"""The one status enum and the result record."""

import json

import pytest

from lit_align.execution import ExecutionResult, Status


def test_status_is_a_str_enum_with_exactly_six_values():
    assert [s.value for s in Status] == ["passed", "failed", "runtime_error", "syntax_error", "timeout", "memory_limit"]
    assert Status.PASSED == "passed" and isinstance(Status.TIMEOUT, str)
    assert json.dumps({"s": Status.MEMORY_LIMIT}) == '{"s": "memory_limit"}'
    assert f"{Status.SYNTAX_ERROR}" == "syntax_error"


def test_result_round_trip_and_properties():
    r = ExecutionResult("failed", 2, 5, 0.25, "boom", "test 3: assertion failed")
    assert r.status is Status.FAILED and not r.passed and r.compiled
    assert r.pass_fraction == pytest.approx(0.4)
    d = r.to_dict()
    assert d["status"] == "failed" and d["passed"] is False and d["tests_passed"] == 2
    assert ExecutionResult.from_dict(json.loads(json.dumps(d))) == r
    assert not ExecutionResult(Status.SYNTAX_ERROR, 0, 3, 0.1).compiled


def test_result_rejects_impossible_counts():
    with pytest.raises(ValueError, match="tests_passed=4 is outside 0..tests_total=3"):
        ExecutionResult(Status.FAILED, 4, 3, 0.0)
    with pytest.raises(ValueError):
        ExecutionResult("not_a_status", 0, 1, 0.0)
