"""Helpers for execution tests: run programs in the sandbox and look for anything that outlived a run."""

from __future__ import annotations

import os

from lit_align.execution import FunctionProblem, Limits, Sandbox
from lit_align.execution.problems import FunctionJob
from lit_align.execution.python_runner import function_job
from lit_align.execution.sandbox import RunOutcome
from lit_align.execution.status import ExecutionResult

DOUBLE = FunctionProblem(
    task_id="test/double",
    prompt='def double(x):\n    """Return 2 * x."""\n',
    test=(
        "def check(candidate):\n"
        "    assert candidate(2) == 4\n"
        "    assert candidate(-3) == -6\n"
        "    assert candidate(0) == 0\n"
    ),
    entry_point="double",
)


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                status = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(name))
    return found


def run_jobs(sandbox: Sandbox, jobs: list[FunctionJob], limits: Limits) -> list[tuple[ExecutionResult, RunOutcome]]:
    """Run function jobs concurrently; keep each run's raw outcome (uid, stdout) next to its result."""
    generators = [function_job(job, limits) for job in jobs]
    futures = [sandbox.submit(next(g)) for g in generators]
    pairs = []
    for gen, future in zip(generators, futures):
        outcome = future.result(timeout=120)
        try:
            gen.send(outcome)
        except StopIteration as stop:
            pairs.append((stop.value, outcome))
    return pairs
