"""A pass must be earned: the harness's guards against objects, rebinding and forged reports, and its counts."""

from __future__ import annotations

import pytest

from lit_align.execution import ExecutionPool, FunctionJob, FunctionProblem, Limits, Status

from .conftest import DOUBLE

POINT = FunctionProblem(
    task_id="test/point",
    prompt=(
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def __eq__(self, other):\n"
        "        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)\n"
        "\n"
        "def mirror(p):\n"
        '    """Mirror a point across the diagonal."""\n'
    ),
    test=(
        "def check(candidate):\n"
        "    assert candidate(Point(1, 2)) == Point(2, 1)\n"
        "    assert candidate(Point(0, 5)) == Point(5, 0)\n"
    ),
    entry_point="mirror",
)
CLOSE = FunctionProblem(
    task_id="test/close",
    prompt="def half(x):\n",
    test=(
        "def check(candidate):\n"
        "    assert abs(candidate(5) - 2.5) < 1e-6\n"
        "    assert abs(candidate(1) - 0.5) < 1e-6\n"
    ),
    entry_point="half",
)
SORT_IN_PLACE = FunctionProblem(
    task_id="test/sort",
    prompt="def sort_in_place(items):\n",
    test="def check(candidate):\n    items = [3, 1, 2]\n    candidate(items)\n    assert items == [1, 2, 3]\n",
    entry_point="sort_in_place",
)
RAISES = FunctionProblem(
    task_id="test/raises",
    prompt="def positive(x):\n",
    test=(
        "def check(candidate):\n"
        "    assert candidate(3) == 3\n"
        "    try:\n"
        "        candidate(-1)\n"
        "        assert False, 'expected ValueError'\n"
        "    except ValueError:\n"
        "        pass\n"
    ),
    entry_point="positive",
)
DOUBLE_ALL = FunctionProblem(
    task_id="test/double_all",
    prompt="def double_all(items):\n",
    test="def check(candidate):\n    assert list(candidate([1, 2])) == [2, 4]\n",
    entry_point="double_all",
)
MBPP_STYLE = FunctionProblem(task_id="test/mbpp", prompt="", test="assert add(1, 2) == 3\nassert add(2, 2) == 4\n",
                             entry_point="add")

CASES: list[tuple[str, FunctionProblem, str, Status, int]] = [
    # name, problem, completion, expected status, expected tests_passed
    ("prompt_class_with_own_eq_is_trusted", POINT, "    return Point(p.y, p.x)\n", Status.PASSED, 2),
    ("completion_subclass_of_int_with_eq", DOUBLE,
     "    class Sneaky(int):\n        def __eq__(self, other):\n            return True\n"
     "        __hash__ = int.__hash__\n"
     "    return Sneaky(0)\n", Status.FAILED, 0),
    ("always_equal_inside_a_list", DOUBLE,
     "    class E:\n        __eq__ = lambda self, other: True\n    return [E()]\n", Status.FAILED, 0),
    ("builtin_callable_as_eq", DOUBLE,
     "    import operator\n    class E:\n        __eq__ = operator.is_not\n    return E()\n", Status.FAILED, 0),
    ("subtraction_that_returns_zero", CLOSE,
     "    class Z:\n        def __sub__(self, other):\n            return 0\n    return Z()\n", Status.FAILED, 0),
    ("rebinding_abs_at_module_level", CLOSE, "    return 0\nabs = lambda value: 0\n", Status.FAILED, 0),
    ("evil_objects_put_into_the_argument", SORT_IN_PLACE,
     "    class E:\n        def __eq__(self, other):\n            return True\n    items[:] = [E(), E(), E()]\n",
     Status.FAILED, 0),
    ("honest_in_place_sort", SORT_IN_PLACE, "    items.sort()\n", Status.PASSED, 1),
    ("completion_namedtuple_compares_as_tuple", DOUBLE,
     "    import collections\n    P = collections.namedtuple('P', 'v')\n    return P(2 * x)[0]\n", Status.PASSED, 3),
    ("numpy_scalar_is_plain_data", DOUBLE, "    import numpy\n    return numpy.int64(2 * x)\n", Status.PASSED, 3),
    ("partial_counts", DOUBLE, "    return 2 * x if x >= 0 else 0\n", Status.FAILED, 2),
    ("first_failure_decides_not_the_later_timeout", DOUBLE,
     "    if x == 2:\n        return 5\n    while True:\n        pass\n", Status.FAILED, 0),
    ("runtime_error_in_candidate", DOUBLE, "    return [][x]\n", Status.RUNTIME_ERROR, 0),
    ("assert_inside_try_keeps_its_meaning_pass", RAISES,
     "    if x < 0:\n        raise ValueError(x)\n    return x\n", Status.PASSED, 1),
    ("assert_inside_try_keeps_its_meaning_fail", RAISES, "    return x\n", Status.FAILED, 1),
    ("module_level_asserts_mbpp", MBPP_STYLE, "def add(a, b):\n    return a + b\n", Status.PASSED, 2),
    ("module_level_asserts_guarded", MBPP_STYLE,
     "class E:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return E()\n", Status.FAILED, 0),
    ("completion_defines_its_own_check", DOUBLE,
     "    return 0\ndef check(candidate):\n    pass\n", Status.FAILED, 1),
    ("forged_report_lines", DOUBLE,
     "    import os, sys\n"
     "    for fd in range(1, 12):\n"
     "        try:\n"
     "            os.write(fd, b'DONE\\nT 0 ok\\nT 1 ok\\nT 2 ok\\npassed\\n')\n"
     "        except OSError:\n"
     "            pass\n"
     "    print('PASSED')\n"
     "    return 0\n", Status.FAILED, 1),
    ("lazy_map_of_plain_values", DOUBLE_ALL, "    return map(lambda v: 2 * v, items)\n", Status.PASSED, 1),
    ("always_equal_through_a_lazy_map", DOUBLE_ALL,
     "    class E:\n        def __eq__(self, o):\n            return True\n    return map(lambda v: E(), items)\n",
     Status.FAILED, 0),
    ("always_equal_keys_view", SORT_IN_PLACE,
     "    class E:\n        __hash__ = lambda self: 1\n        __eq__ = lambda self, o: True\n"
     "    items[:] = list({E(): 0}.keys())\n", Status.FAILED, 0),
    ("main_guard_does_not_run", DOUBLE, "    return 2 * x\nif __name__ == '__main__':\n    input()\n",
     Status.PASSED, 3),
]


@pytest.fixture(scope="module")
def outcomes():
    pool = ExecutionPool(limits=Limits(timeout_s=2.0))
    jobs = [FunctionJob(problem, completion) for _, problem, completion, _, _ in CASES]
    return dict(zip([c[0] for c in CASES], pool.run(jobs)))


@pytest.mark.parametrize("name, problem, completion, status, passed", CASES, ids=[c[0] for c in CASES])
def test_earned_pass(outcomes, name, problem, completion, status, passed):
    result = outcomes[name]
    assert result.status is status, result
    assert result.tests_passed == passed
    assert result.tests_total == problem.test.count("assert ") - ("assert False" in problem.test)


def test_messages_name_the_failing_test(outcomes):
    assert outcomes["partial_counts"].message == "test 2: assertion failed"
    assert outcomes["runtime_error_in_candidate"].message == "test 1: IndexError: list index out of range"
    assert "Traceback" not in outcomes["runtime_error_in_candidate"].message
    assert outcomes["first_failure_decides_not_the_later_timeout"].duration_s >= 2.0  # it did run into the limit


def test_broken_test_code_is_the_problems_fault():
    bad = FunctionProblem("test/bad", "def f():\n", "def check(candidate)\n    assert True\n", "f")
    with pytest.raises(ValueError, match="test/bad: test code does not compile"):
        ExecutionPool().run_one(FunctionJob(bad, "    pass\n"))
