"""Parallel execution of many jobs with a per-batch deadline.

Each job is a generator of sandboxed runs (one for a function problem; compile + one per test case for
a stdin/stdout problem). :class:`ExecutionPool` keeps ``max_workers`` jobs in flight (default: two per
CPU, see :func:`default_workers`), each with one run at a time, driven from the caller's thread; the
sandbox's I/O thread does the pumping.
When the batch deadline passes, every run still going is killed and every job not finished reports
``timeout``, so one stuck program never stalls training.
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import Future
from typing import Callable, Sequence

from lit_align.execution.problems import FunctionJob, Job, StdioJob
from lit_align.execution.python_runner import count_tests, function_job
from lit_align.execution.sandbox import Limits, Sandbox, get_sandbox
from lit_align.execution.status import ExecutionResult, Status
from lit_align.execution.stdio import stdio_job

__all__ = ["ExecutionPool", "default_workers", "usable_cpus"]

_DEADLINE_GRACE_S = 10.0


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Two runs in flight per usable CPU.

    A run's work is split across three processes (this one pumps its pipes, the sandbox server starts and
    reaps it, the program runs), so with one run per CPU the cores idle between runs; two keep them busy
    (on a 2-CPU machine: ~1.4x the executions per second). A run's time limit does not count the time it
    waits for a CPU (see ``Limits.timeout_s``), so the number of workers does not change verdicts: a correct
    program that takes 0.65 s alone passes a 1 s limit with 4 workers on 2 CPUs too (it timed out while the
    limit was plain wall-clock time). Programs stuck in loops are bounded by their own limit either way.
    """
    return 2 * usable_cpus()


def _tests_of(job: Job) -> int:
    if isinstance(job, FunctionJob):
        try:
            return count_tests(job.problem.test)
        except ValueError:
            return 1
    return len(job.selected_tests())


class ExecutionPool:
    """Runs jobs in parallel in the sandbox.

    Args:
        limits: resource limits of every run.
        max_workers: jobs in flight at once; default two per CPU (:func:`default_workers`).
        sandbox: the sandbox to use; default the process-wide one.
    """

    def __init__(self, limits: Limits | None = None, max_workers: int | None = None,
                 sandbox: Sandbox | None = None) -> None:
        self.limits = limits or Limits()
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or default_workers()
        self._sandbox = sandbox

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox runs go to."""
        return self._sandbox or get_sandbox()

    def _generator(self, job: Job):
        if isinstance(job, FunctionJob):
            return function_job(job, self.limits)
        if isinstance(job, StdioJob):
            return stdio_job(job, self.limits)
        raise TypeError(f"not a job: {type(job).__name__} (expected FunctionJob or StdioJob)")

    def run_one(self, job: Job) -> ExecutionResult:
        """Run a single job."""
        return self.run([job])[0]

    def run(
        self,
        jobs: Sequence[Job],
        deadline_s: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[ExecutionResult]:
        """Run every job; results come back in the jobs' order.

        Args:
            jobs: what to run.
            deadline_s: wall-clock seconds for the whole batch; jobs not finished by then are ``timeout``.
            progress: called with the number of jobs finished each time one finishes.
        """
        jobs = list(jobs)
        generators = [None] * len(jobs)
        for i, job in enumerate(jobs):  # validate everything before running anything
            generators[i] = self._generator(job)
        results: list[ExecutionResult | None] = [None] * len(jobs)
        sandbox = self.sandbox
        done: "queue.SimpleQueue[tuple[int, Future]]" = queue.SimpleQueue()
        active: dict[int, int] = {}  # job index -> run id in flight
        started = 0
        finished = 0
        end = time.monotonic() + deadline_s if deadline_s is not None else None
        expired = False

        def finish(i: int, result: ExecutionResult) -> None:
            nonlocal finished
            results[i] = result
            generators[i] = None
            finished += 1
            if progress is not None:
                progress(finished)

        def advance(i: int, value=None, first: bool = False) -> None:
            gen = generators[i]
            try:
                spec = gen.send(None) if first else gen.send(value)
            except StopIteration as stop:
                finish(i, stop.value)
                return
            if expired:
                gen.close()
                finish(i, _timeout_result(jobs[i], "stopped at the batch deadline"))
                return
            future = sandbox.submit(spec)
            active[i] = future.run_id
            future.add_done_callback(lambda f, i=i: done.put((i, f)))

        try:
            while finished < len(jobs):
                while not expired and started < len(jobs) and len(active) < self.max_workers:
                    i = started
                    started += 1
                    advance(i, first=True)
                if not active:
                    if started >= len(jobs) or expired:
                        break
                    continue
                timeout = None
                if end is not None:
                    timeout = max(0.0, end - time.monotonic()) if not expired else _DEADLINE_GRACE_S
                try:
                    i, future = done.get(timeout=timeout)
                except queue.Empty:
                    if not expired:
                        expired = True
                        sandbox.kill(list(active.values()), "deadline")
                        continue
                    break  # runs did not come back after the grace period
                active.pop(i, None)
                error = future.exception()
                if error is not None:
                    raise error
                advance(i, future.result())
        except BaseException:
            if active:
                sandbox.kill(list(active.values()), "deadline")
            for gen in generators:
                if gen is not None:
                    gen.close()
            raise
        for i, result in enumerate(results):
            if result is None:
                if generators[i] is not None:
                    generators[i].close()
                results[i] = _timeout_result(jobs[i], "not run: the batch deadline passed")
        return results  # type: ignore[return-value]


def _timeout_result(job: Job, message: str) -> ExecutionResult:
    return ExecutionResult(Status.TIMEOUT, 0, _tests_of(job), 0.0, "", message)
