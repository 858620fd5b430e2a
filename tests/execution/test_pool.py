"""The worker pool: parallel jobs, the per-batch deadline, errors, and the sandbox's isolation report."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lit_align.execution import (
    ExecutionPool,
    FunctionJob,
    Limits,
    Sandbox,
    SandboxError,
    Status,
    default_workers,
    execute,
)
from lit_align.execution.sandbox import RunSpec

from .conftest import DOUBLE


def test_pool_is_sized_to_the_machine():
    pool = ExecutionPool()
    assert pool.max_workers == default_workers() == 2 * len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        ExecutionPool(max_workers=0)
    with pytest.raises(TypeError, match="not a job: str"):
        pool.run(["print(1)"])


def test_batch_deadline_stops_stuck_programs_and_unstarted_jobs():
    pool = ExecutionPool(limits=Limits(timeout_s=30.0), max_workers=2)
    jobs = [FunctionJob(DOUBLE, "    while True:\n        pass\n")] * 4 + [FunctionJob(DOUBLE, "    return 2 * x\n")]
    start = time.monotonic()
    results = pool.run(jobs, deadline_s=1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0  # not 30 s per stuck program
    assert [r.status for r in results] == [Status.TIMEOUT] * 5
    assert results[0].message == "stopped at the batch deadline"
    assert results[4].message == "not run: the batch deadline passed"
    assert results[4].tests_total == 3


def test_results_keep_job_order_and_progress_is_reported():
    pool = ExecutionPool(max_workers=2)
    completions = ["    return 2 * x\n", "    return x\n", "    return 2 * x\n", "    return [][1]\n"]
    seen = []
    results = pool.run([FunctionJob(DOUBLE, c) for c in completions], progress=seen.append)
    assert [r.status for r in results] == [Status.PASSED, Status.FAILED, Status.PASSED, Status.RUNTIME_ERROR]
    assert seen == [1, 2, 3, 4]
    assert execute(DOUBLE, "    return x + x\n").passed


def test_sandbox_reports_its_isolation_and_rejects_use_after_close():
    box = Sandbox()
    caps = box.capabilities
    assert {"root", "netns", "pidns", "mountns", "setuid"} <= set(caps)
    if caps["root"]:  # as root every isolation feature is available (the CI machine runs as root)
        assert all(caps[k] for k in ("netns", "pidns", "mountns", "setuid")), caps["errors"]
    box.close()
    with pytest.raises(SandboxError, match="closed"):
        box.submit(RunSpec("pystdio", {"source": "print(1)"}))


def test_limits_are_validated():
    with pytest.raises(ValueError, match="Limits.timeout_s must be > 0"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="Limits.memory_mb must be >= 1"):
        Limits(memory_mb=0)


def test_a_dead_server_fails_its_runs_and_a_new_one_takes_over():
    box = Sandbox()
    try:
        stuck = box.submit(RunSpec("pystdio", {"source": "while True:\n    pass\n"}, limits=Limits(timeout_s=30)))
        time.sleep(0.2)
        os.kill(box._server_pid, signal.SIGKILL)
        with pytest.raises(SandboxError, match="sandbox server exited"):
            stuck.result(timeout=10)
        outcome = box.run(RunSpec("pystdio", {"source": "print(6 * 7)"}))
        assert outcome.stdout == b"42\n" and outcome.exit_code == 0
    finally:
        box.close()
