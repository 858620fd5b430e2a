"""The fallback without namespaces or a private uid (what an unprivileged user gets), forced on this machine."""

from __future__ import annotations

import logging
import os
import time

import pytest

from lit_align.execution import FunctionJob, Limits, Sandbox, Status

from .conftest import DOUBLE, run_jobs

ESCAPE = (
    "    import os, sys, time\n"
    "    r, w = os.pipe()\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        pid = os.fork()\n"
    "        if pid == 0:\n"
    "            time.sleep(120)\n"
    "        os.write(w, str(pid).encode())\n"
    "        os._exit(0)\n"
    "    print('escaped', os.read(r, 32).decode(), file=sys.stderr)\n"
    "    return 2 * x\n"
)


@pytest.fixture(scope="module")
def minimal(request):
    box = Sandbox(isolation="minimal")
    yield box
    box.close()


def test_minimal_mode_warns_about_what_it_lacks(caplog):
    box = Sandbox(isolation="minimal")
    try:
        with caplog.at_level(logging.WARNING, logger="lit_align.execution"):
            caps = box.capabilities
        assert not any(caps[k] for k in ("netns", "pidns", "mountns", "setuid"))
        text = caplog.text
        assert "no network namespace" in text and "no PID namespace" in text and "no private mount namespace" in text
    finally:
        box.close()
    with pytest.raises(ValueError, match="isolation must be 'auto' or 'minimal'"):
        Sandbox(isolation="none")


def test_minimal_mode_still_times_out_kills_escapees_and_removes_its_directory(minimal):
    before = {n for n in os.listdir("/tmp") if n.startswith("lit_align_sandbox_")}
    # CPU limit above the wall limit: with both at 1 s a busy loop given a whole core hit RLIMIT_CPU first (SIGXCPU),
    # a correct outcome too, but this test is about the wall-clock kill in minimal mode
    limits = Limits(timeout_s=1.0, cpu_time_s=3)
    jobs = [FunctionJob(DOUBLE, c) for c in ("    return 2 * x\n", "    while True:\n        pass\n", ESCAPE,
                                             "    open('left_behind.txt', 'w').write('x')\n    return 2 * x\n")]
    (ok, _), (loop, loop_out), (escape, escape_out), (wrote, _) = run_jobs(minimal, jobs, limits)
    assert ok.status is Status.PASSED
    assert loop.status is Status.TIMEOUT and loop_out.killed == "timeout" and loop.duration_s < 2.5
    assert escape.status is Status.PASSED
    escaped = [int(line.split()[1]) for line in escape_out.stderr.decode().splitlines() if line.startswith("escaped")]
    assert len(escaped) == 3  # one per call of the candidate
    time.sleep(0.05)
    for pid in escaped:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert wrote.status is Status.PASSED
    roots = [n for n in os.listdir("/tmp") if n.startswith("lit_align_sandbox_")]
    assert set(roots) - before, "the server's temporary root exists while it runs"
    for root in set(roots) - before:
        assert os.listdir(os.path.join("/tmp", root)) == []  # each run's directory was removed with it
