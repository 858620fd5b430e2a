"""Function problems (HumanEval protocol): one sandboxed run, read back from the harness's report.

A job is a generator: it yields the :class:`RunSpec` it wants run, receives the :class:`RunOutcome`,
and returns the :class:`ExecutionResult`. The pool drives many such generators at once.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import marshal
import signal as _signal
from typing import Generator

from lit_align.execution._harness import TEST_FILE
from lit_align.execution._rewrite import rewrite_asserts
from lit_align.execution.problems import FunctionJob, FunctionProblem
from lit_align.execution.sandbox import Limits, RunOutcome, RunSpec, SandboxError
from lit_align.execution.status import ExecutionResult, Status

__all__ = ["function_job", "count_tests", "interpret_function_run", "decode_stderr"]

JobGenerator = Generator[RunSpec, RunOutcome, ExecutionResult]

_KIND_STATUS = {
    "ok": Status.PASSED,
    "fail": Status.FAILED,
    "error": Status.RUNTIME_ERROR,
    "memory": Status.MEMORY_LIMIT,
    "exit": Status.FAILED,
}


@functools.lru_cache(maxsize=4096)
def _compiled_tests(test: str) -> tuple[str, int]:
    """The rewritten test code as base64 marshal (what the sandbox harness loads) and its assert count."""
    try:
        code, n = rewrite_asserts(test, TEST_FILE)
    except SyntaxError as exc:
        raise ValueError(f"test code does not compile: {exc}") from exc
    return base64.b64encode(marshal.dumps((code, n))).decode("ascii"), n


def count_tests(test: str) -> int:
    """Number of assert statements the harness counts as tests in ``test`` (at least 1).

    Args:
        test: a problem's test code.

    Raises:
        ValueError: the test code does not parse (the problem is broken, not the program).
    """
    return max(_compiled_tests(test)[1], 1)


def decode_stderr(outcome: RunOutcome, limit: int) -> str:
    """The run's stderr as text, marked when truncated."""
    text = outcome.stderr.decode("utf-8", "replace")[:limit]
    if outcome.stderr_truncated or len(outcome.stderr) > limit:
        text += "\n... [stderr truncated]"
    return text


def _signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def killed_status(outcome: RunOutcome, limits: Limits, cpu_limit: float) -> tuple[Status, str] | None:
    """Status for a run that ended without a verdict of its own (killed, crashed, exited early)."""
    if outcome.killed == "timeout":
        waited = f" (not counting {outcome.extension_s:.2f}s spent waiting for a CPU)" if outcome.extension_s >= 0.01 else ""
        return Status.TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded{waited}"
    if outcome.killed == "deadline":
        return Status.TIMEOUT, "stopped at the batch deadline"
    if outcome.killed == "output":
        return Status.RUNTIME_ERROR, "output limit exceeded"
    if outcome.killed:
        return Status.TIMEOUT, f"stopped by the sandbox ({outcome.killed})"
    if outcome.signal is not None:
        if outcome.signal == _signal.SIGXCPU or (
            outcome.signal == _signal.SIGKILL and outcome.cpu_s >= max(1.0, cpu_limit) - 0.05
        ):
            return Status.TIMEOUT, f"CPU-time limit of {cpu_limit:g}s exceeded"
        if outcome.signal == _signal.SIGKILL:
            return Status.MEMORY_LIMIT, "killed by SIGKILL (out of memory)"
        return Status.RUNTIME_ERROR, f"killed by {_signal_name(outcome.signal)}"
    return None


def interpret_function_run(outcome: RunOutcome, n_tests: int, limits: Limits) -> ExecutionResult:
    """Turn a ``pyfunc`` run's report into a result. The first failing test decides the status.

    Args:
        outcome: what the run did.
        n_tests: assert statements in the test code (from :func:`count_tests`).
        limits: the limits it ran under (for messages).
    """
    passed: set[str] = set()
    failed: set[str] = set()
    first: tuple[Status, str] | None = None
    syntax: str | None = None
    done = False
    for line in outcome.reports:
        kind, _, rest = line.partition(" ")
        if kind == "SETUP":
            raise SandboxError(f"sandbox setup failed: {rest}")
        if kind == "T":
            index, _, rest = rest.partition(" ")
            verdict, _, detail = rest.partition(" ")
            if verdict == "ok":
                passed.add(index)
                continue
            failed.add(index)
            if first is None:
                what = "exited (SystemExit) during a test" if verdict == "exit" else detail or verdict
                first = (_KIND_STATUS.get(verdict, Status.RUNTIME_ERROR), f"test {int(index) + 1}: {what}")
        elif kind == "SYNTAX":
            syntax = rest
        elif kind == "BADTEST":
            raise ValueError(f"test code does not compile: {rest}")
        elif kind in ("FAIL", "ERROR", "MEMORY", "EXIT") and first is None:
            stage, _, detail = rest.partition(" ")
            if kind == "EXIT":
                first = (Status.FAILED, "exited (SystemExit) before the tests finished" if stage != "program"
                         else "exited (SystemExit) before the tests ran")
            elif kind == "MEMORY":
                first = (Status.MEMORY_LIMIT, f"MemoryError in the {stage}")
            elif kind == "FAIL":
                first = (Status.FAILED, detail or "assertion failed")
            else:
                where = "while defining the program" if stage == "program" else f"in the {stage}"
                first = (Status.RUNTIME_ERROR, f"{detail} ({where})")
        elif kind == "DONE":
            done = True
    stderr = decode_stderr(outcome, limits.stderr_keep_bytes)
    n_passed = len(passed - failed)
    if syntax is not None:
        return ExecutionResult(Status.SYNTAX_ERROR, 0, n_tests, outcome.wall_s, stderr, syntax)
    if first is None and done:
        return ExecutionResult(Status.PASSED, n_tests, n_tests, outcome.wall_s, stderr)
    if first is None:
        first = killed_status(outcome, limits, limits.cpu_time_s or limits.timeout_s)
    if first is None:
        if not any(line.startswith("START") for line in outcome.reports):
            first = (Status.RUNTIME_ERROR, f"the harness did not start (exit status {outcome.exit_code})")
        else:
            first = (Status.FAILED, f"exited (status {outcome.exit_code}) before the tests finished")
    status, message = first
    return ExecutionResult(status, min(n_passed, n_tests), n_tests, outcome.wall_s, stderr, message)


def function_job(job: FunctionJob, limits: Limits) -> JobGenerator:
    """The generator that runs one completion against a function problem.

    Args:
        job: problem and completion.
        limits: resource limits.
    """
    problem: FunctionProblem = job.problem
    try:
        n_tests = count_tests(problem.test)
    except ValueError as exc:
        raise ValueError(f"{problem.task_id}: {exc}") from None
    test_code, _ = _compiled_tests(problem.test)
    spec = RunSpec(
        mode="pyfunc",
        payload={
            "program": problem.prompt + job.completion,
            "test": problem.test,
            "entry_point": problem.entry_point,
            "prompt_lines": problem.prompt.count("\n"),
            "test_code": test_code,
            "magic": importlib.util.MAGIC_NUMBER.hex(),
        },
        limits=limits,
    )
    outcome = yield spec
    return interpret_function_run(outcome, n_tests, limits)
