"""Benchmark loaders: HumanEval, MBPP records, problems files, the task suite; clear errors otherwise."""

from __future__ import annotations

import json

import pytest

from lit_align.execution import ExecutionPool, FunctionJob, FunctionProblem, Status, StdioProblem
from lit_align.execution.benchmarks import (
    load_benchmark,
    load_mbpp,
    load_problems_file,
    load_task_suite_problems,
    mbpp_problem,
)

MBPP_RECORD = {
    "task_id": 2,
    "text": "Write a function to find the similar elements from the given two tuple lists.",
    "code": (
        "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) "
    ),
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def test_mbpp_record_becomes_a_runnable_problem():
    problem = mbpp_problem(MBPP_RECORD)
    assert problem.task_id == "MBPP/2" and problem.entry_point == "similar_elements"
    assert problem.prompt.startswith('"""\nWrite a function') and "assert set(similar_elements(" in problem.prompt
    good, bad = ExecutionPool().run([FunctionJob(problem, problem.canonical_solution),
                                     FunctionJob(problem, "def similar_elements(a, b):\n    return ()\n")])
    assert (good.status, good.tests_passed, good.tests_total) == (Status.PASSED, 3, 3)
    assert bad.status is Status.FAILED


def test_mbpp_without_the_hub_says_what_to_do():
    with pytest.raises(ConnectionError, match="pass --problems"):
        load_mbpp(source="/nonexistent/mbpp-dataset")


def test_problems_file_schemas_and_errors(tmp_path):
    he = {"task_id": "a", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    cc = {"name": "b", "public_tests": {"input": ["1"], "output": ["1"]}}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(he) + "\n\n")
    assert load_problems_file(path) == [FunctionProblem("a", "def f():\n", he["test"], "f")]
    path.write_text(json.dumps(cc) + "\n")
    (problem,) = load_problems_file(path)
    assert isinstance(problem, StdioProblem) and problem.task_id == "b" and len(problem.public_tests) == 1
    path.write_text(json.dumps(he) + "\n" + json.dumps(cc) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:2: this record follows the code_contests schema"):
        load_problems_file(path)
    path.write_text(json.dumps(he) + "\n" + json.dumps(he) + "\n")
    with pytest.raises(ValueError, match="repeats task ids \\['a'\\]"):
        load_problems_file(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        load_problems_file(path)
    path.write_text(json.dumps({**he, "entry_point": "not an identifier"}) + "\n")
    with pytest.raises(ValueError, match="is not a Python identifier"):
        load_problems_file(path)


def test_full_code_contests_records_go_through_the_data_module(tmp_path):
    record = {"name": "c", "description": "d", "solutions": {"language": [3], "solution": ["print(1)"]},
              "incorrect_solutions": {"language": [], "solution": []},
              "public_tests": {"input": ["\n"], "output": ["1\n"]}, "private_tests": {"input": [], "output": []},
              "generated_tests": {"input": [], "output": []}, "time_limit": {"seconds": 3, "nanos": 0}}
    path = tmp_path / "cc.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (problem,) = load_problems_file(path)
    assert problem.time_limit_s == 3.0 and problem.description == "d"  # limits and statement carried over
    bad = {**record, "solutions": {"language": [9], "solution": ["x"]}}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="cc.jsonl:1"):
        load_problems_file(path)


def test_named_benchmarks():
    assert len(load_benchmark("humaneval")) == 164
    heldout = load_task_suite_problems("heldout")
    assert heldout and all(isinstance(p, FunctionProblem) for p in heldout)
    assert len(load_benchmark("task_suite", split="all")) > len(heldout)
    with pytest.raises(ValueError, match="unknown benchmark 'apps'"):
        load_benchmark("apps")
