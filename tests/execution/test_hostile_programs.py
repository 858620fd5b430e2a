"""Hostile programs: each gets the status it deserves, and nothing it started or wrote outlives its run.

All programs run concurrently in one batch (a module fixture) to keep the suite fast; each test then
checks one program's result, that no live process has the run's private uid any more, and that its
files are nowhere on the host.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from lit_align.execution import FunctionJob, Limits, Sandbox, Status

from .conftest import DOUBLE, processes_of_uid, run_jobs

TIMEOUT = 1.5
LIMITS = Limits(timeout_s=TIMEOUT, memory_mb=256, max_processes=16, disk_mb=32, file_size_mb=8,
                max_output_bytes=1 << 20, max_stderr_bytes=1 << 20)
MARK = "lit_align_hostile_" + uuid.uuid4().hex[:8]
SECRET = "s3cr3t-" + uuid.uuid4().hex
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def programs(port: int, host_pids: list[int]) -> dict[str, str]:
    return {
        "infinite_loop": "    while True:\n        pass\n",
        "fork_bomb": (
            "    import os\n"
            "    while True:\n"
            "        try:\n"
            "            os.fork()\n"
            "        except OSError:\n"
            "            pass\n"
        ),
        "double_fork_setsid_escape": (
            "    import os, time\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(120)\n"
            "        os._exit(0)\n"
            "    time.sleep(0.05)\n"
            "    return 2 * x\n"
        ),
        "memory_bomb": "    blocks = []\n    while True:\n        blocks.append(bytes(64 << 20))\n",
        "huge_integer_in_c": "    return (3 ** (10 ** 8)) % 7\n",
        "write_outside_sandbox": (
            "    import os\n"
            f"    for path in ['/work/{MARK}', '/root/{MARK}', '/etc/{MARK}', '/tmp/{MARK}', '/var/tmp/{MARK}',\n"
            f"                 '/dev/shm/{MARK}', '/run/lock/{MARK}', '../{MARK}', '{MARK}']:\n"
            "        try:\n"
            "            with open(path, 'w') as f:\n"
            "                f.write('x')\n"
            "        except OSError:\n"
            "            pass\n"
            "    return 2 * x\n"
        ),
        "fill_the_disk": (
            "    i = 0\n"
            "    while True:\n"
            f"        with open('{MARK}_fill%d' % i, 'wb') as f:\n"
            "            f.write(bytes(4 << 20))\n"
            "        i += 1\n"
        ),
        "read_parent_environment": (
            "    import os, sys\n"
            "    found = [k for k, v in os.environ.items()\n"
            "             if 'LIT_ALIGN_TEST_SECRET' in k or " + repr(SECRET) + " in v]\n"
            "    for pid in os.listdir('/proc'):\n"
            "        for what in ('environ', 'cmdline'):\n"
            "            try:\n"
            "                with open('/proc/%s/%s' % (pid, what), 'rb') as f:\n"
            "                    if " + repr(SECRET.encode()) + " in f.read():\n"
            "                        found.append(pid)\n"
            "            except OSError:\n"
            "                pass\n"
            "    uids = set()\n"
            "    for pid in os.listdir('/proc'):\n"
            "        try:\n"
            "            uids.add(os.stat('/proc/' + pid).st_uid if pid.isdigit() else os.getuid())\n"
            "        except OSError:\n"
            "            pass\n"
            "    print('foreign processes visible:', uids != {os.getuid()}, file=sys.stderr)\n"
            "    return 2 * x if not found else -1\n"
        ),
        "network_connection": (
            "    import socket\n"
            "    connected = []\n"
            f"    for address in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            "        try:\n"
            "            socket.create_connection(address, timeout=0.3).close()\n"
            "            connected.append(address)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return 2 * x if not connected else -1\n"
        ),
        "ignore_sigterm": (
            "    import signal\n"
            "    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "        signal.signal(sig, signal.SIG_IGN)\n"
            "    while True:\n"
            "        pass\n"
        ),
        "print_gigabytes": (
            "    import sys\n    chunk = 'x' * (1 << 20)\n    while True:\n        sys.stdout.write(chunk)\n"
        ),
        "sys_exit_before_tests": "    return 2 * x\nimport sys\nsys.exit(0)\n",
        "raise_system_exit_before_tests": "    return 2 * x\nraise SystemExit(0)\n",
        "os_exit_before_tests": "    return 2 * x\nimport os\nos._exit(0)\n",
        "exit_during_a_test": "    import sys\n    sys.exit(0)\n",
        "eq_always_true": (
            "    class AlwaysEqual:\n"
            "        def __eq__(self, other):\n"
            "            return True\n"
            "        __hash__ = object.__hash__\n"
            "    return AlwaysEqual()\n"
        ),
        "kill_the_parent": (
            "    import os, signal\n"
            f"    for pid in [os.getppid(), 1, -1, *{host_pids!r}, *range(2, 200)]:\n"
            "        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return 2 * x\n"
        ),
        "read_stdin": "    return int(input()) * 0 + 2 * x\n",
    }


def _host_entries() -> set[str]:
    found = set()
    for place in WORLD_WRITABLE + ("/work", "/etc", os.getcwd()):
        try:
            found |= {os.path.join(place, n) for n in os.listdir(place) if MARK in n}
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def hostile():
    os.environ["LIT_ALIGN_TEST_SECRET"] = SECRET  # set before the server starts: it must not inherit it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    box = Sandbox()
    try:
        caps = box.capabilities
        if not all(caps[k] for k in ("netns", "pidns", "mountns", "setuid")):
            pytest.skip(f"full isolation needs root with namespaces here: {caps['errors']}")
        progs = programs(listener.getsockname()[1], [os.getpid(), box._server_pid])
        names = list(progs)
        pairs = run_jobs(box, [FunctionJob(DOUBLE, progs[n]) for n in names], LIMITS)
        try:
            accepted = listener.accept()
        except BlockingIOError:
            accepted = None
        yield {"results": dict(zip(names, pairs)), "box": box, "accepted": accepted}
        # After everything: the server survived and still runs programs correctly.
        assert box._proc.poll() is None
        (result, _outcome), = run_jobs(box, [FunctionJob(DOUBLE, "    return 2 * x\n")], LIMITS)
        assert result.status is Status.PASSED
    finally:
        os.environ.pop("LIT_ALIGN_TEST_SECRET", None)
        listener.close()
        box.close()


EXPECTED = {
    "infinite_loop": Status.TIMEOUT,
    "fork_bomb": Status.TIMEOUT,
    "double_fork_setsid_escape": Status.PASSED,
    "memory_bomb": Status.MEMORY_LIMIT,
    "huge_integer_in_c": Status.TIMEOUT,
    "write_outside_sandbox": Status.PASSED,
    "fill_the_disk": Status.RUNTIME_ERROR,
    "read_parent_environment": Status.PASSED,
    "network_connection": Status.PASSED,
    "ignore_sigterm": Status.TIMEOUT,
    "print_gigabytes": Status.RUNTIME_ERROR,
    "sys_exit_before_tests": Status.FAILED,
    "raise_system_exit_before_tests": Status.FAILED,
    "os_exit_before_tests": Status.FAILED,
    "exit_during_a_test": Status.FAILED,
    "eq_always_true": Status.FAILED,
    "kill_the_parent": Status.PASSED,
    "read_stdin": Status.RUNTIME_ERROR,
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hostile_program_status_and_nothing_outlives_it(hostile, name):
    result, outcome = hostile["results"][name]
    assert result.status is EXPECTED[name], (result, outcome.reports)
    assert outcome.uid is not None and outcome.uid >= 1_600_000_000
    assert processes_of_uid(outcome.uid) == []  # killed and reaped before the result came back
    assert _host_entries() == set()


def test_timeouts_are_enforced_on_the_wall_clock(hostile):
    # (not counting the time the run waited for a CPU, which a loaded machine adds: tests/execution/test_cpu_wait.py)
    for name in ("infinite_loop", "fork_bomb", "huge_integer_in_c", "ignore_sigterm"):
        result, outcome = hostile["results"][name]
        assert outcome.killed == "timeout"
        assert 0 <= outcome.extension_s <= min(outcome.cpu_wait_s, 3 * TIMEOUT), name
        assert TIMEOUT + outcome.extension_s <= result.duration_s < TIMEOUT + outcome.extension_s + 1.0, name
        assert result.message.startswith(f"wall-clock limit of {TIMEOUT:g}s exceeded"), name
    # its processes wait for the CPUs the bomb's other processes hold: no run with child processes gets more time
    assert hostile["results"]["fork_bomb"][1].extension_s == 0


def test_early_exits_are_reported_as_such(hostile):
    messages = {name: hostile["results"][name][0].message for name in (
        "sys_exit_before_tests", "raise_system_exit_before_tests", "os_exit_before_tests", "exit_during_a_test")}
    assert messages["sys_exit_before_tests"] == "exited (SystemExit) before the tests ran"
    assert messages["raise_system_exit_before_tests"] == "exited (SystemExit) before the tests ran"
    assert messages["os_exit_before_tests"] == "exited (status 0) before the tests finished"
    assert messages["exit_during_a_test"] == "test 1: exited (SystemExit) during a test"
    for name in messages:
        assert hostile["results"][name][0].tests_passed == 0


def test_always_equal_object_is_rejected_not_passed(hostile):
    result, _ = hostile["results"]["eq_always_true"]
    assert result.tests_passed == 0 and result.tests_total == 3
    assert "AlwaysEqual object whose behaviour the completion defines" in result.message


def test_resource_limits_give_clear_messages(hostile):
    results = hostile["results"]
    assert results["memory_bomb"][0].message.startswith("test 1: MemoryError")
    fill = results["fill_the_disk"][0].message
    assert "No space left on device" in fill or "File too large" in fill
    out, outcome = results["print_gigabytes"]
    assert out.message == "output limit exceeded" or "Broken pipe" in out.message
    assert len(outcome.stdout) <= LIMITS.max_output_bytes
    assert "EOFError" in results["read_stdin"][0].message  # stdin is closed, not waited on
    assert results["read_stdin"][0].duration_s < TIMEOUT


def test_isolation_from_host_processes_network_and_secrets(hostile):
    assert hostile["accepted"] is None  # nothing reached the test's own listening socket
    result, outcome = hostile["results"]["read_parent_environment"]
    assert SECRET not in outcome.stderr.decode()
    # /proc shows the program its own processes only, never the host's.
    assert "foreign processes visible: False" in outcome.stderr.decode()


def test_import_directories_under_tmp_are_read_only_and_nothing_else_of_tmp_shows(tmp_path, monkeypatch):
    """An interpreter whose site-packages live under /tmp (a virtualenv made there, as in a CI clone): each run's
    private /tmp would hide them, so they are bound back read-only at their own paths, and only they are."""
    import site

    site_dir = tmp_path / "venv" / "site-packages"
    site_dir.mkdir(parents=True)
    (site_dir / "lit_align_probe_mod.py").write_text("VALUE = 21\n")
    (tmp_path / "venv" / "beside.txt").write_text(SECRET)
    site_dir.chmod(0o777)  # writable by anyone: only the read-only bind keeps a run from planting a module there
    if not str(site_dir.resolve()).startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    original = site.getsitepackages
    monkeypatch.setattr(site, "getsitepackages", lambda *a: [*original(*a), str(site_dir)])  # what the server gets
    body = (
        "    import os, lit_align_probe_mod\n"
        f"    here = {str(site_dir)!r}\n"
        "    try:\n"
        "        open(os.path.join(here, 'planted.py'), 'w').close()\n"
        "        raise AssertionError('the import directory is writable')\n"
        "    except OSError:\n"
        "        pass\n"
        "    assert not os.path.exists(os.path.join(os.path.dirname(here), 'beside.txt')), 'other files of /tmp show'\n"
        "    return 2 * lit_align_probe_mod.VALUE * x // 21\n"
    )
    box = Sandbox()
    try:
        if not box.capabilities["mountns"]:
            pytest.skip(f"needs a mount namespace here: {box.capabilities['errors']}")
        (result, outcome), = run_jobs(box, [FunctionJob(DOUBLE, body)], LIMITS)
    finally:
        box.close()
    assert result.status is Status.PASSED, (result, outcome.stderr.decode()[-2000:])
    assert sorted(p.name for p in site_dir.iterdir()) == ["lit_align_probe_mod.py"]
