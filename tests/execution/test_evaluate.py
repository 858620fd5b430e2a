"""`lit_align evaluate` through its entry point: HumanEval, problems files in both schemas, the task suite."""

from __future__ import annotations

import json

import pytest

from lit_align.execution.benchmarks import load_humaneval
from lit_align.execution.evaluate import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_humaneval_canonical_solutions_all_pass_and_empty_or_pass_bodies_all_fail(tmp_path, capsys):
    problems = load_humaneval()
    assert len(problems) == 164
    good = _write(tmp_path / "canonical.jsonl", [{"task_id": p.task_id, "completion": p.canonical_solution}
                                                 for p in problems])
    code, out, _ = _run(capsys, ["--benchmark", "humaneval", "--samples", good, "--k", "1", "--no-progress"])
    assert code == 0
    summary = json.loads(out)
    assert summary["pass@1"] == 1.0
    assert summary["status_counts"]["passed"] == 164 and summary["num_problems"] == 164
    rows = [json.loads(line) for line in (tmp_path / "canonical.jsonl_results.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and r["status"] == "passed" for r in rows)

    bad = _write(tmp_path / "bad.jsonl", [{"task_id": p.task_id, "completion": c}
                                          for p in problems for c in ("", "    pass\n")])
    code, out, _ = _run(capsys, ["--benchmark", "humaneval", "--samples", bad, "--k", "1", "2", "10"])
    assert code == 0
    summary = json.loads(out)
    assert summary["pass@1"] == 0.0 and summary["pass@2"] == 0.0 and "pass@10" not in summary
    assert summary["status_counts"]["passed"] == 0 and summary["num_samples"] == 328
    assert summary["compile_rate"] == 1.0


def test_existing_results_are_never_overwritten_silently(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    return False\n"}])
    results = tmp_path / "s.jsonl_results.jsonl"
    results.write_text("precious\n")
    code, out, err = _run(capsys, ["--benchmark", "humaneval", "--samples", samples, "--k", "1"])
    assert code == 2 and out == ""
    assert "already exists; pass --overwrite" in err
    assert results.read_text() == "precious\n"
    code, out, _ = _run(capsys, ["--benchmark", "humaneval", "--samples", samples, "--k", "1", "--overwrite"])
    assert code == 0 and json.loads(out)["status_counts"]["failed"] == 1
    assert json.loads(results.read_text())["status"] == "failed"


def test_bad_samples_and_problems_give_errors_naming_the_line(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "nope",
                                                                                         "completion": "x"}])
    code, _, err = _run(capsys, ["--benchmark", "humaneval", "--samples", samples])
    assert code == 2 and f"{samples}:2: task_id 'nope' is not a problem of this benchmark" in err
    problems = _write(tmp_path / "p.jsonl", [{"task_id": "a", "prompt": "", "test": ""}])
    code, _, err = _run(capsys, ["--problems", problems, "--samples", samples])
    assert code == 2 and f"{problems}:1:" in err and "HumanEval's keys" in err
    code, _, err = _run(capsys, ["--problems", tmp_path / "missing.jsonl", "--samples", samples])
    assert code == 2 and "problems file not found" in err
    with pytest.raises(SystemExit):
        main(["--samples", str(samples)])  # neither --benchmark nor --problems


def test_problems_file_in_humaneval_format(tmp_path, capsys):
    problem = {"task_id": "t/0", "prompt": "def inc(x):\n", "entry_point": "inc",
               "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n"}
    problems = _write(tmp_path / "p.jsonl", [problem])
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "t/0", "completion": c} for c in
                                            ("    return x + 1\n", "    return x\n", "    return x +\n")])
    code, out, _ = _run(capsys, ["--problems", problems, "--samples", samples, "--k", "1", "3"])
    assert code == 0
    summary = json.loads(out)
    assert summary["pass@1"] == pytest.approx(1 / 3) and summary["pass@3"] == 1.0
    assert summary["status_counts"] == {"passed": 1, "failed": 1, "runtime_error": 0, "syntax_error": 1,
                                        "timeout": 0, "memory_limit": 0}
    assert summary["compile_rate"] == pytest.approx(2 / 3)


def test_problems_file_in_code_contests_schema(tmp_path, capsys):
    record = {
        "name": "add",
        "description": "Add two numbers.",
        "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
        "private_tests": {"input": ["5 5\n", "60 1\n"], "output": ["10\n", "61\n"]},
        "generated_tests": {"input": [], "output": []},
    }
    problems = _write(tmp_path / "cc.jsonl", [record])
    good_py = "a, b = map(int, input().split())\nprint(a + b)\n"
    public_only = "a, b = map(int, input().split())\nprint(a + b if a < 50 else 0)\n"
    good_cpp = "#include <iostream>\nint main(){int a,b;std::cin>>a>>b;std::cout<<a+b;}\n"
    samples = _write(tmp_path / "s.jsonl", [
        {"task_id": "add", "completion": good_py},
        {"task_id": "add", "completion": public_only},
        {"task_id": "add", "completion": good_cpp, "language": "cpp"},
        {"task_id": "add", "completion": "int main( {}", "language": 2},
    ])
    code, out, _ = _run(capsys, ["--problems", problems, "--samples", samples, "--k", "1", "4", "--n-submissions",
                                 "1"])
    assert code == 0, out
    summary = json.loads(out)
    assert summary["pass@1"] == 0.5 and summary["pass@4"] == 1.0
    assert summary["status_counts"]["syntax_error"] == 1 and summary["compile_rate"] == 0.75
    # 1@4: one submission drawn from the 3 samples that pass the public test, 2 of which are correct.
    assert summary["1@4"] == pytest.approx(2 / 3) and summary["solved_problems@4"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["passed", "failed", "passed", "syntax_error"]
    assert rows[1]["tests_passed"] == 2 and rows[1]["message"] == "test 3: wrong answer"


def test_task_suite_benchmark(tmp_path, capsys):
    from lit_align.data_modules.task_suite import load_task_suite

    tasks = load_task_suite(split="heldout")[:6]
    rows = []
    for task in tasks:
        rows.append({"task_id": task.task_id, "completion": task.canonical_solution})
        rows.append({"task_id": task.task_id, "completion": dict(task.incorrect_solutions)["bare_pass"]})
    samples = _write(tmp_path / "s.jsonl", rows)
    code, out, _ = _run(capsys, ["--benchmark", "task_suite", "--samples", samples, "--k", "1", "2"])
    assert code == 0
    summary = json.loads(out)
    assert summary["num_problems"] == 6 and summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
