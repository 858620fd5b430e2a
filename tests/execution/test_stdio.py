"""Stdin/stdout problems (CodeContests protocol) in Python 3 and C++."""

from __future__ import annotations

import uuid

import pytest

from lit_align.execution import ExecutionPool, IOTest, Limits, Status, StdioJob, StdioProblem

SUM = StdioProblem(
    task_id="sum",
    public_tests=(IOTest("1 2\n", "3\n"),),
    hidden_tests=(IOTest("10 -4\n", "6\n"), IOTest("100000000000 1\n", "100000000001\n")),
)
DIVIDE = StdioProblem(task_id="divide", public_tests=(IOTest("1 3\n", "0.333333\n"), IOTest("2 4\n", "0.5\n")))

PY_SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
CPP_SUM = "#include <bits/stdc++.h>\nint main(){long long a,b;std::cin>>a>>b;std::cout<<a+b<<std::endl;}\n"

CASES = [
    ("py_correct", SUM, PY_SUM, "python3", Status.PASSED, 3),
    ("py_wrong_on_hidden", SUM, "a, b = map(int, input().split())\nprint(a + b if a < 50 else 0)\n", "python3",
     Status.FAILED, 2),
    ("py_float_within_tolerance", DIVIDE, "a, b = map(int, input().split())\nprint('%.7f' % (a / b))\n", "python3",
     Status.PASSED, 2),
    ("py_float_outside_tolerance", DIVIDE, "a, b = map(int, input().split())\nprint('%.3f' % (a / b))\n", "python3",
     Status.FAILED, 0),
    ("py_syntax_error", SUM, "print(\n", "python3", Status.SYNTAX_ERROR, 0),
    ("py_runtime_error", SUM, "raise KeyError('boom')\n", "python3", Status.RUNTIME_ERROR, 0),
    ("py_nonzero_exit", SUM, "import sys\nsys.exit(3)\n", "python3", Status.RUNTIME_ERROR, 0),
    ("py_exit_builtin_after_answer", SUM, "a, b = map(int, input().split())\nprint(a + b)\nexit()\n", "python3",
     Status.PASSED, 3),
    ("py_timeout", SUM, "while True:\n    pass\n", "python3", Status.TIMEOUT, 0),
    ("py_memory", SUM, "x = bytes(1 << 40)\n", "python3", Status.MEMORY_LIMIT, 0),
    ("cpp_correct", SUM, CPP_SUM, "cpp", Status.PASSED, 3),
    ("cpp_compile_error", SUM, "int main( { return 0; }\n", "cpp", Status.SYNTAX_ERROR, 0),
    ("cpp_wrong", SUM, "#include <cstdio>\nint main(){int a,b;scanf(\"%d %d\",&a,&b);printf(\"%d\\n\",a+b);}\n", "cpp",
     Status.FAILED, 2),
    ("cpp_segfault", SUM, "int main(){int *p = 0; *p = 1; return 0;}\n", "cpp", Status.RUNTIME_ERROR, 0),
    ("cpp_bad_alloc", SUM, "#include <vector>\nint main(){std::vector<long long> v(1LL << 40); return v[0];}\n", "cpp",
     Status.MEMORY_LIMIT, 0),
    ("cpp_infinite_loop", SUM, "int main(){volatile int x = 0; while (true) x++;}\n", "cpp", Status.TIMEOUT, 0),
    ("cpp_fork_and_sleep", SUM,
     "#include <unistd.h>\n#include <cstdio>\nint main(){if(fork()==0){setsid(); sleep(100);} long long a,b;"
     " if(scanf(\"%lld %lld\",&a,&b)!=2) return 1; printf(\"%lld\\n\",a+b);}\n", "cpp", Status.PASSED, 3),
]


@pytest.fixture(scope="module")
def results():
    pool = ExecutionPool(limits=Limits(timeout_s=1.0, memory_mb=256))
    jobs = [StdioJob(problem, source, language) for _, problem, source, language, _, _ in CASES]
    return dict(zip([c[0] for c in CASES], pool.run(jobs)))


@pytest.mark.parametrize("name, problem, source, language, status, passed", CASES, ids=[c[0] for c in CASES])
def test_stdio_program(results, name, problem, source, language, status, passed):
    result = results[name]
    assert result.status is status, result
    assert result.tests_passed == passed
    assert result.tests_total == len(problem.tests)


def test_compile_errors_carry_the_compilers_message(results):
    result = results["cpp_compile_error"]
    assert "error" in result.stderr and result.message.startswith("compiler exited with status")
    assert "SyntaxError" in results["py_syntax_error"].message


def test_all_tests_mode_counts_every_case():
    pool = ExecutionPool(limits=Limits(timeout_s=2.0))
    wrong_first = "a, b = map(int, input().split())\nprint(a + b if a != 1 else 0)\n"
    stop, full = pool.run([StdioJob(SUM, wrong_first), StdioJob(SUM, wrong_first, stop_on_first_failure=False)])
    assert (stop.status, stop.tests_passed) == (Status.FAILED, 0)
    assert (full.status, full.tests_passed, full.tests_total) == (Status.FAILED, 2, 3)
    public = pool.run_one(StdioJob(SUM, PY_SUM, tests="public"))
    assert (public.tests_passed, public.tests_total) == (1, 1)


def test_problem_limits_and_parsing():
    record = {
        "name": "cc",
        "public_tests": {"input": ["1\n"], "output": ["1\n"]},
        "private_tests": {"input": ["2\n"], "output": ["2\n"]},
        "generated_tests": {"input": [], "output": []},
        "time_limit": {"seconds": 2, "nanos": 500000000},
        "memory_limit_bytes": 512 << 20,
    }
    problem = StdioProblem.from_code_contests(record)
    assert problem.time_limit_s == 2.5 and problem.memory_limit_mb == 512
    assert [t.input for t in problem.tests] == ["1\n", "2\n"]
    with pytest.raises(ValueError, match="problem cc public_tests: 2 inputs but 1 outputs"):
        StdioProblem.from_code_contests({**record, "public_tests": {"input": ["1", "2"], "output": ["1"]}})
    with pytest.raises(ValueError, match="no tests"):
        StdioProblem.from_code_contests({"name": "empty"})
    with pytest.raises(ValueError, match="only 2 \\(C\\+\\+\\) and 3 \\(Python 3\\)"):
        StdioJob(problem, "", 4)


def test_identical_cpp_sources_compile_once(monkeypatch):
    pool = ExecutionPool(limits=Limits(timeout_s=2.0), max_workers=1)
    modes = []
    submit = pool.sandbox.submit
    monkeypatch.setattr(pool.sandbox, "submit", lambda spec: modes.append(spec.mode) or submit(spec))
    source = CPP_SUM + f"// {uuid.uuid4()}\n"
    broken = f"int main( {{ // {uuid.uuid4()}\n"
    results = pool.run([StdioJob(SUM, source, "cpp")] * 3 + [StdioJob(SUM, broken, "cpp")] * 2)
    assert [r.status for r in results] == [Status.PASSED] * 3 + [Status.SYNTAX_ERROR] * 2
    assert modes.count("cppcompile") == 2 and modes.count("exec") == 9
    assert "error" in results[4].stderr  # the compiler's message is kept for the cached failure too
