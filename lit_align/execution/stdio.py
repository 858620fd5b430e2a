"""Stdin/stdout problems (CodeContests protocol) in Python 3 and C++.

C++ is compiled once per job with g++ inside the sandbox (a compile failure is ``syntax_error``, what
the IotaCode paper's compile rate counts); each test case is then its own sandboxed run of the program
with the test's input on stdin, compared with :func:`lit_align.execution.compare.outputs_match`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Generator

from lit_align.execution.compare import outputs_match
from lit_align.execution.problems import StdioJob
from lit_align.execution.python_runner import decode_stderr, killed_status
from lit_align.execution.sandbox import Limits, RunOutcome, RunSpec, SandboxError
from lit_align.execution.status import ExecutionResult, Status

__all__ = ["stdio_job", "CPP_FLAGS", "classify_test_run", "limits_for"]

JobGenerator = Generator[RunSpec, RunOutcome, ExecutionResult]

CPP_FLAGS: tuple[str, ...] = ("-std=c++17", "-O2", "-pipe", "-w")
"""g++ flags (the compiler runs inside the sandbox, under ``Limits.compile_*``)."""

_COMPILE_CACHE_SIZE = 512
_compiled: "OrderedDict[str, tuple[bytes | None, str, str]]" = OrderedDict()
_compiled_lock = threading.Lock()


def _cache_key(source: str) -> str:
    return hashlib.sha256("\0".join((*CPP_FLAGS, source)).encode()).hexdigest()


def _cached_compile(source: str) -> tuple[bytes | None, str, str] | None:
    """(binary or None, compiler stderr, failure message) of a source compiled before in this process.

    Sampled programs repeat (low temperatures, 1000 samples per problem), and g++ costs about a second each.
    """
    with _compiled_lock:
        entry = _compiled.get(_cache_key(source))
        if entry is not None:
            _compiled.move_to_end(_cache_key(source))
        return entry


def _remember_compile(source: str, entry: tuple[bytes | None, str, str]) -> None:
    with _compiled_lock:
        _compiled[_cache_key(source)] = entry
        while len(_compiled) > _COMPILE_CACHE_SIZE:
            _compiled.popitem(last=False)


def limits_for(job: StdioJob, limits: Limits) -> Limits:
    """The limits of one test run: the problem's time limit and memory limit where it states them."""
    changes: dict = {}
    if job.problem.time_limit_s:
        changes["timeout_s"] = float(job.problem.time_limit_s)
        changes["cpu_time_s"] = None
    if job.problem.memory_limit_mb and job.problem.memory_limit_mb > limits.memory_mb:
        changes["memory_mb"] = int(job.problem.memory_limit_mb)
    return replace(limits, **changes) if changes else limits


def classify_test_run(outcome: RunOutcome, expected: str, limits: Limits, index: int) -> tuple[Status, str]:
    """Verdict of one test case run (``passed`` when the output matches)."""
    for line in outcome.reports:
        kind, _, rest = line.partition(" ")
        if kind == "SETUP":
            raise SandboxError(f"sandbox setup failed: {rest}")
        if kind == "SYNTAX":
            return Status.SYNTAX_ERROR, rest
    killed = killed_status(outcome, limits, limits.cpu_time_s or limits.timeout_s)
    if killed is not None:
        status, message = killed
        if status is Status.RUNTIME_ERROR and b"bad_alloc" in outcome.stderr:
            status, message = Status.MEMORY_LIMIT, "std::bad_alloc"
        return status, f"test {index + 1}: {message}"
    for line in outcome.reports:
        kind, _, rest = line.partition(" ")
        if kind == "MEMORY":
            return Status.MEMORY_LIMIT, f"test {index + 1}: MemoryError"
        if kind == "ERROR":
            return Status.RUNTIME_ERROR, f"test {index + 1}: {rest.partition(' ')[2] or rest}"
    if b"std::bad_alloc" in outcome.stderr:
        return Status.MEMORY_LIMIT, f"test {index + 1}: std::bad_alloc"
    if outcome.exit_code:
        return Status.RUNTIME_ERROR, f"test {index + 1}: exit status {outcome.exit_code}"
    if outputs_match(outcome.stdout, expected):
        return Status.PASSED, ""
    return Status.FAILED, f"test {index + 1}: wrong answer"


def stdio_job(job: StdioJob, limits: Limits) -> JobGenerator:
    """The generator that runs one program against a stdin/stdout problem's tests.

    Args:
        job: problem, program, language, which tests, and whether to stop at the first failure.
        limits: resource limits (the problem's own time/memory limits take precedence, see :func:`limits_for`).
    """
    tests = job.selected_tests()
    if not tests:
        raise ValueError(f"{job.problem.task_id}: no {job.tests} tests to run")
    run_limits = limits_for(job, limits)
    duration = 0.0
    binary: bytes | None = None
    if job.language == "cpp":
        cached = _cached_compile(job.source)
        if cached is None:
            outcome = yield RunSpec("cppcompile", {"source": job.source, "flags": list(CPP_FLAGS)}, limits=run_limits)
            duration += outcome.wall_s
            stderr = decode_stderr(outcome, run_limits.stderr_keep_bytes)
            for line in outcome.reports:
                if line.startswith("SETUP"):
                    raise SandboxError(f"sandbox setup failed: {line[6:]}")
            if outcome.binary is None and outcome.killed == "deadline":
                return ExecutionResult(Status.TIMEOUT, 0, len(tests), duration, stderr, "stopped at the batch deadline")
            why = ""
            if outcome.binary is None:
                why = next((line[7:] for line in outcome.reports if line.startswith("SYNTAX")), "")
                why = why or ("compilation timed out" if outcome.killed else
                              f"compilation failed (status {outcome.exit_code})")
            cached = (outcome.binary, stderr, why)
            if not outcome.killed:  # a timed-out compile may succeed on a quieter machine
                _remember_compile(job.source, cached)
        binary, stderr, why = cached
        if binary is None:
            return ExecutionResult(Status.SYNTAX_ERROR, 0, len(tests), duration, stderr, why)
    passed = 0
    first: tuple[Status, str, str] | None = None
    for index, test in enumerate(tests):
        test_limits = run_limits
        if len(test.output) * 2 + 4096 > run_limits.max_output_bytes:  # room for a correct answer, always
            test_limits = replace(run_limits, max_output_bytes=len(test.output) * 2 + 4096)
        if binary is not None:
            spec = RunSpec("exec", {}, limits=test_limits, stdin=test.input.encode(), binary=binary)
        else:
            spec = RunSpec("pystdio", {"source": job.source}, limits=test_limits, stdin=test.input.encode())
        outcome = yield spec
        duration += outcome.wall_s
        status, message = classify_test_run(outcome, test.output, run_limits, index)
        if status is Status.SYNTAX_ERROR:
            stderr = decode_stderr(outcome, run_limits.stderr_keep_bytes)
            return ExecutionResult(Status.SYNTAX_ERROR, 0, len(tests), duration, stderr, message)
        if status is Status.PASSED:
            passed += 1
            continue
        if first is None:
            first = (status, message, decode_stderr(outcome, run_limits.stderr_keep_bytes))
        if job.stop_on_first_failure or outcome.killed == "deadline":
            break
    if first is None:
        return ExecutionResult(Status.PASSED, passed, len(tests), duration)
    status, message, stderr = first
    return ExecutionResult(status, passed, len(tests), duration, stderr, message)
