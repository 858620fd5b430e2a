"""A run's time limit does not count the time it waited for a CPU held by other processes (other runs, a training
job): on a loaded machine, or with more workers than CPUs, a program is not timed out for the load's sake.

The load is made deterministic: the sandbox server (whose runs inherit its CPU affinity) and three busy processes, each
in a session of its own (so the kernel's autogroups give each an equal share), are pinned to one CPU, where a run gets
about a quarter of it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lit_align.execution import FunctionJob, FunctionProblem, Limits, Sandbox, Status

from .conftest import run_jobs

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"),
                                reason="the kernel reports no scheduler statistics (/proc/<pid>/schedstat)")

LIMIT = 1.0
TWICE = FunctionProblem(
    task_id="test/twice",
    prompt="def twice(x, seconds):\n",
    test="def check(candidate):\n    assert candidate(3, 0.6) == 6\n",
    entry_point="twice",
)
CPU_BOUND = ("    import time\n"
             "    start = time.process_time()\n"
             "    while time.process_time() - start < seconds:  # this much of its own CPU time\n"
             "        pass\n"
             "    return 2 * x\n")
LOOP = "    while True:\n        pass\n"
SLEEP = "    import time\n    time.sleep(3 * seconds)\n    return 2 * x\n"
ORPHAN = ("    import os\n"
          "    if os.fork() == 0:\n"
          "        os.setsid()\n"
          "        if os.fork() == 0:\n"
          "            while True:\n"
          "                pass\n"
          "        os._exit(0)\n"
          "    os.wait()\n") + CPU_BOUND  # its busy grandchild, an orphan, goes to PID 1 or to the subreaper supervisor
THREADED = ("    import threading\n"
            "    def spin():\n"
            "        while True:\n"
            "            pass\n"
            "    threading.Thread(target=spin, daemon=True).start()\n") + CPU_BOUND


@pytest.fixture(params=["auto", "minimal"])  # the server's own deadline loop, and per-run supervisors
def loaded_sandbox(request):
    cpu = min(os.sched_getaffinity(0))
    box = Sandbox(isolation=request.param)
    box._ensure_started()
    os.sched_setaffinity(box._server_pid, {cpu})
    hogs = [subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"],
                             start_new_session=True) for _ in range(3)]
    yield box
    for hog in hogs:
        hog.kill()
        hog.wait()
    box.close()


def _run(box: Sandbox, code: str) -> tuple:
    limits = Limits(timeout_s=LIMIT, cpu_time_s=10.0)  # the CPU-time limit out of the way of the wall-clock one
    [(result, outcome)] = run_jobs(box, [FunctionJob(TWICE, code)], limits)
    return result, outcome


def test_a_program_slowed_by_other_processes_is_not_timed_out(loaded_sandbox):
    result, outcome = _run(loaded_sandbox, CPU_BOUND)
    # 0.6 s of its own CPU took longer than the 1 s limit: the rest was waiting for the CPU, which is not counted
    assert result.status is Status.PASSED, result
    assert outcome.wall_s > LIMIT and outcome.cpu_wait_s > 0.5
    assert outcome.wall_s - outcome.cpu_wait_s < LIMIT


def test_a_loaded_infinite_loop_still_ends_within_four_times_its_limit(loaded_sandbox):
    result, outcome = _run(loaded_sandbox, LOOP)
    assert result.status is Status.TIMEOUT and outcome.killed == "timeout"
    assert result.message == f"wall-clock limit of 1s exceeded (not counting {outcome.extension_s:.2f}s spent waiting for a CPU)"
    # it had a quarter of the CPU: granted the time it waited, up to 3 x its limit, and no more
    assert 1.0 < outcome.extension_s <= min(outcome.cpu_wait_s, 3 * LIMIT)
    assert LIMIT + outcome.extension_s <= outcome.wall_s < LIMIT + outcome.extension_s + 0.5


def test_sleeping_is_not_waiting_for_a_cpu(loaded_sandbox):
    result, outcome = _run(loaded_sandbox, SLEEP)
    assert result.status is Status.TIMEOUT and outcome.killed == "timeout"
    assert outcome.extension_s < 0.2 and outcome.wall_s < LIMIT + 0.3


def test_a_run_with_a_busy_thread_gets_its_bare_limit(loaded_sandbox):
    # its two threads compete for the CPU with each other too: the main thread's wait is not the load's doing alone
    result, outcome = _run(loaded_sandbox, THREADED)
    assert result.status is Status.TIMEOUT and outcome.extension_s == 0
    assert result.message == "wall-clock limit of 1s exceeded"
    assert LIMIT <= outcome.wall_s < LIMIT + 0.5


def test_a_run_with_a_busy_orphan_gets_its_bare_limit(loaded_sandbox):
    result, outcome = _run(loaded_sandbox, ORPHAN)
    assert result.status is Status.TIMEOUT and outcome.extension_s == 0
    assert LIMIT <= outcome.wall_s < LIMIT + 0.5
