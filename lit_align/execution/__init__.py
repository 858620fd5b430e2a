"""Sandboxed execution of untrusted programs against tests, output comparison, rewards and pass@k.

The trust boundary of lit_align: generated code only ever runs here, in separate sandboxed processes,
never with ``exec`` in the training process.

- ``status.py``: the one :class:`Status` enum and :class:`ExecutionResult` (status, tests passed/total,
  duration, truncated stderr, the harness's reason).
- ``sandbox.py`` / ``_server.py``: a small trusted server process that starts each run as PID 1 of fresh
  PID/mount/IPC namespaces (no network), with a private uid, rlimits, a size-capped tmpfs as its only
  writable place and a wall-clock deadline that does not count the time a run waits for a CPU (so load and
  the number of workers do not decide verdicts); when a run ends, the kernel has killed and reaped every
  process it started. Degrades (with a logged warning) where privileges or the kernel do not allow it.
- ``_harness.py`` / ``_rewrite.py``: how a function problem's pass is earned (HumanEval protocol): per-assert
  outcomes over a nonce-tagged pipe, early exits fail, completion-written ``__eq__`` & co. are rejected.
- ``python_runner.py`` / ``stdio.py``: jobs for function problems and for stdin/stdout problems (Python 3,
  C++ via g++; compile failure = ``syntax_error``), ``compare.py`` CodeContests' output checker.
- ``pool.py``: many jobs in parallel with a per-batch deadline. ``rewards.py``: the unit-test reward.
  ``metrics.py``: pass@k, n@k, compile rate. ``benchmarks.py`` / ``evaluate.py``: ``lit_align evaluate``.

    from lit_align.execution import ExecutionPool, FunctionJob, FunctionProblem, Status
    results = ExecutionPool().run([FunctionJob(problem, completion) for completion in samples])
"""

from lit_align.execution.compare import outputs_match
from lit_align.execution.metrics import compile_rate, n_at_k, pass_at_k
from lit_align.execution.pool import ExecutionPool, default_workers
from lit_align.execution.problems import (
    FunctionJob,
    FunctionProblem,
    IOTest,
    Job,
    StdioJob,
    StdioProblem,
    parse_stdio_language,
)
from lit_align.execution.rewards import ExecutionReward, UnitTestReward
from lit_align.execution.sandbox import Limits, Sandbox, SandboxError, get_sandbox
from lit_align.execution.status import ExecutionResult, Status

__all__ = [
    "Status",
    "ExecutionResult",
    "Limits",
    "Sandbox",
    "SandboxError",
    "get_sandbox",
    "ExecutionPool",
    "default_workers",
    "FunctionProblem",
    "StdioProblem",
    "IOTest",
    "FunctionJob",
    "StdioJob",
    "Job",
    "parse_stdio_language",
    "outputs_match",
    "pass_at_k",
    "n_at_k",
    "compile_rate",
    "UnitTestReward",
    "ExecutionReward",
    "execute",
]


def execute(
    problem: "FunctionProblem | StdioProblem",
    code: str,
    language: str = "python3",
    limits: Limits | None = None,
) -> ExecutionResult:
    """Run one program against one problem's tests (a convenience over :class:`ExecutionPool`).

    Args:
        problem: a function problem (``code`` is the completion) or a stdin/stdout problem (``code`` is the program).
        code: completion or whole program.
        language: for stdin/stdout problems, ``python3`` or ``cpp``.
        limits: resource limits; default :class:`Limits`.
    """
    pool = ExecutionPool(limits=limits, max_workers=1)
    if isinstance(problem, FunctionProblem):
        return pool.run_one(FunctionJob(problem, code))
    if isinstance(problem, StdioProblem):
        return pool.run_one(StdioJob(problem, code, parse_stdio_language(language)))
    raise TypeError(f"execute() needs a FunctionProblem or StdioProblem, got {type(problem).__name__}")
