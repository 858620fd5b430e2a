"""Problems and jobs the executor runs: HumanEval-protocol functions and CodeContests-protocol programs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Union

__all__ = [
    "FunctionProblem",
    "IOTest",
    "StdioProblem",
    "FunctionJob",
    "StdioJob",
    "Job",
    "StdioLanguage",
    "parse_stdio_language",
    "HUMANEVAL_KEYS",
    "as_function_problems",
]

HUMANEVAL_KEYS = ("task_id", "prompt", "test", "entry_point")
StdioLanguage = Literal["python3", "cpp"]


def _require_str(d: Mapping[str, Any], key: str, where: str) -> str:
    if key not in d:
        raise ValueError(f"{where}: missing field {key!r} (HumanEval problems need {', '.join(HUMANEVAL_KEYS)})")
    value = d[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class FunctionProblem:
    """A problem in HumanEval's protocol: ``prompt + completion``, then ``test``, then ``check(entry_point)``.

    The test code either defines ``check(candidate)`` (HumanEval, the built-in task suite) or holds
    module-level asserts that call ``entry_point`` by name (MBPP).
    """

    task_id: str
    """Identifier samples refer to (e.g. ``HumanEval/0``)."""
    prompt: str
    """Code before the completion (signature and docstring); trusted."""
    test: str
    """Test code; trusted."""
    entry_point: str
    """Name of the function under test."""
    canonical_solution: str | None = None
    """A reference completion, when the benchmark has one."""

    def __post_init__(self) -> None:
        if not self.entry_point.isidentifier():
            raise ValueError(f"{self.task_id}: entry_point {self.entry_point!r} is not a Python identifier")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "problem") -> "FunctionProblem":
        """Build from a HumanEval-format record (``task_id``, ``prompt``, ``test``, ``entry_point``)."""
        where = f"{where} {d.get('task_id', '?')!s}" if isinstance(d, Mapping) else where
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        canonical = d.get("canonical_solution")
        return cls(
            task_id=str(_require_str(d, "task_id", where)),
            prompt=_require_str(d, "prompt", where),
            test=_require_str(d, "test", where),
            entry_point=_require_str(d, "entry_point", where),
            canonical_solution=canonical if isinstance(canonical, str) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """HumanEval-format record."""
        d = {"task_id": self.task_id, "prompt": self.prompt, "test": self.test, "entry_point": self.entry_point}
        if self.canonical_solution is not None:
            d["canonical_solution"] = self.canonical_solution
        return d


@dataclass(frozen=True)
class IOTest:
    """One stdin/stdout test case."""

    input: str
    """Bytes fed to stdin (as text)."""
    output: str
    """Expected stdout, compared token by token (see ``compare.py``)."""


def _io_tests(value: Any, where: str) -> tuple[IOTest, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        inputs, outputs = value.get("input"), value.get("output")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError(f"{where}: expected {{'input': [...], 'output': [...]}}, got keys {sorted(value)}")
        if len(inputs) != len(outputs):
            raise ValueError(f"{where}: {len(inputs)} inputs but {len(outputs)} outputs")
        return tuple(IOTest(str(i), str(o)) for i, o in zip(inputs, outputs))
    if isinstance(value, (list, tuple)):
        tests = []
        for item in value:
            if isinstance(item, IOTest):
                tests.append(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                tests.append(IOTest(str(item[0]), str(item[1])))
            elif isinstance(item, Mapping) and {"input", "output"} <= set(item):
                tests.append(IOTest(str(item["input"]), str(item["output"])))
            else:
                raise ValueError(f"{where}: a test must be (input, output) or {{'input', 'output'}}, got {item!r:.80}")
        return tuple(tests)
    raise ValueError(f"{where}: expected tests as {{'input': [...], 'output': [...]}}, got {type(value).__name__}")


@dataclass(frozen=True)
class StdioProblem:
    """A problem in CodeContests' protocol: a whole program reads stdin and writes stdout."""

    task_id: str
    """Identifier samples refer to (CodeContests' ``name``)."""
    public_tests: tuple[IOTest, ...]
    """Tests shown in the statement (used to filter samples for n@k)."""
    hidden_tests: tuple[IOTest, ...] = ()
    """Private and generated tests."""
    time_limit_s: float | None = None
    """Per-test wall-clock limit from the problem (overrides ``Limits.timeout_s`` when set)."""
    memory_limit_mb: int | None = None
    """Memory limit from the problem (raises ``Limits.memory_mb`` to at least this when set)."""
    description: str = ""
    """Statement."""

    @property
    def tests(self) -> tuple[IOTest, ...]:
        """Public then hidden tests."""
        return self.public_tests + self.hidden_tests

    @classmethod
    def from_code_contests(cls, record: Mapping[str, Any] | Any, where: str = "problem") -> "StdioProblem":
        """Build from a CodeContests record (``name``, ``public_tests``, ``private_tests``, ``generated_tests``,
        optional ``time_limit`` ``{"seconds", "nanos"}`` and ``memory_limit_bytes``), or from
        :class:`lit_align.data_modules.code_contests.CodeContestsProblem`."""
        if not isinstance(record, Mapping):
            record = _record_of(record)
        name = record.get("name", record.get("task_id"))
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: CodeContests problems need a non-empty 'name'")
        where = f"{where} {name}"
        public = _io_tests(record.get("public_tests"), f"{where} public_tests")
        hidden = _io_tests(record.get("private_tests"), f"{where} private_tests") + _io_tests(
            record.get("generated_tests"), f"{where} generated_tests"
        )
        if not public and not hidden:
            raise ValueError(f"{where}: no tests in public_tests, private_tests or generated_tests")
        time_limit = record.get("time_limit", record.get("time_limit_seconds"))
        seconds: float | None = None
        if isinstance(time_limit, Mapping):
            seconds = float(time_limit.get("seconds") or 0) + float(time_limit.get("nanos") or 0) / 1e9
        elif isinstance(time_limit, (int, float)):
            seconds = float(time_limit)
        memory = record.get("memory_limit_bytes")
        return cls(
            task_id=name,
            public_tests=public,
            hidden_tests=hidden,
            time_limit_s=seconds if seconds else None,
            memory_limit_mb=int(memory) // (1 << 20) if memory else None,
            description=str(record.get("description") or ""),
        )


def _record_of(problem: Any) -> dict[str, Any]:
    """A CodeContests-schema dict from an object with the same attribute names (e.g. CodeContestsProblem)."""
    record: dict[str, Any] = {}
    for key in ("name", "description", "time_limit", "time_limit_seconds", "memory_limit_bytes"):
        if hasattr(problem, key):
            record[key] = getattr(problem, key)
    for key in ("public_tests", "private_tests", "generated_tests"):
        tests = getattr(problem, key, None)
        if tests is not None:
            record[key] = list(tests) if not isinstance(tests, Mapping) else tests
    if "name" not in record:
        raise ValueError(f"cannot read a CodeContests problem from {type(problem).__name__}: it has no 'name'")
    return record


_LANGUAGE_NAMES: dict[str, StdioLanguage] = {
    "python3": "python3", "py3": "python3", "python": "python3", "py": "python3",
    "cpp": "cpp", "c++": "cpp", "cxx": "cpp", "cc": "cpp",
}


def parse_stdio_language(value: str | int) -> StdioLanguage:
    """``python3`` or ``cpp`` from a name or a CodeContests language code (2 = C++, 3 = Python 3).

    Args:
        value: a name (``python3``, ``py3``, ``cpp``, ``c++``) or CodeContests' integer code.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        codes = {2: "cpp", 3: "python3"}
        if value in codes:
            return codes[value]  # type: ignore[return-value]
        raise ValueError(f"language code {value} is not runnable here: only 2 (C++) and 3 (Python 3) are")
    key = str(value).strip().lower().replace(" ", "")
    if key in _LANGUAGE_NAMES:
        return _LANGUAGE_NAMES[key]
    raise ValueError(f"language {value!r} is not runnable here; use one of python3, cpp")


@dataclass(frozen=True)
class FunctionJob:
    """Run ``completion`` against a function problem's tests."""

    problem: FunctionProblem
    """The problem."""
    completion: str
    """Code appended to the prompt."""


@dataclass(frozen=True)
class StdioJob:
    """Run a whole program against a stdin/stdout problem's tests."""

    problem: StdioProblem
    """The problem."""
    source: str
    """The program."""
    language: StdioLanguage = "python3"
    """``python3`` or ``cpp`` (compiled with g++)."""
    tests: Literal["all", "public", "hidden"] = "all"
    """Which tests to run."""
    stop_on_first_failure: bool = True
    """Stop at the first failing test (AlphaCode-style evaluation); False runs all for partial credit."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "language", parse_stdio_language(self.language))
        if self.tests not in ("all", "public", "hidden"):
            raise ValueError(f"StdioJob.tests must be 'all', 'public' or 'hidden', got {self.tests!r}")

    def selected_tests(self) -> tuple[IOTest, ...]:
        """The tests this job runs."""
        if self.tests == "public":
            return self.problem.public_tests
        if self.tests == "hidden":
            return self.problem.hidden_tests
        return self.problem.tests


Job = Union[FunctionJob, StdioJob]


def as_function_problems(records: Iterable[Mapping[str, Any]], where: str = "problems") -> list[FunctionProblem]:
    """Parse HumanEval-format records."""
    return [FunctionProblem.from_dict(r, where) for r in records]

