"""Sandbox server: a small trusted process that starts one isolated process tree per program run.

Standard library only, and few modules (every fork copies this process, so it is kept small); started
by :class:`lit_align.execution.sandbox.Sandbox` as ``python -I [-S] _server.py <socket fd> <parent pid>
[site dirs...]`` with a scrubbed environment. It never runs untrusted code: it forks, and the forks
isolate themselves before any untrusted code exists in them.

Once, at start, the server enters fresh network and mount namespaces: no run has any network, and
directories that an unprivileged uid cannot traverse on the way to the interpreter (``/root`` when
Python lives under pyenv) are covered by an empty tmpfs into which only the interpreter's own trees are
bound back, so the interpreter stays importable and the rest (keys, caches, credentials) is out of sight;
``/proc`` is remounted with ``hidepid=2``, so a run sees no process but its own (they all have its uid).

Each run is two processes:

- a **supervisor** (trusted) forked from the server, which enters fresh PID, mount and IPC namespaces,
  forks the program, waits on a pidfd until its deadline (the wall-clock limit, not counting the time a program of
  one process and thread waited for a CPU held by other processes), kills on expiry or on request, and
  sends the exit report;
- the **program** process, PID 1 of its namespace. It mounts a size-capped tmpfs on ``/tmp`` (also bound
  over ``/dev/shm``; ``/var/tmp`` and ``/run/lock`` are read-only; the interpreter's import directories that lived
  under ``/tmp``, a virtualenv made there, are bound back into it read-only), works in ``/tmp/work``, starts a new
  session, sets rlimits (address space, CPU seconds, file size, open files, processes, no core), clears
  its environment, sets ``no_new_privs`` and drops to a fresh unprivileged uid/gid (so ``RLIMIT_NPROC``
  bites, root's files are out of reach and nothing outside the run can be signalled), and only then runs
  the harness or execs the program. Because it is its namespace's init, the kernel kills and reaps every
  process of the run (double-fork + ``setsid`` included) before the supervisor's wait returns, and the
  tmpfs goes with the namespace: nothing of the run outlives its exit report.

Where privileges or the kernel refuse a namespace the server degrades (the parent logs a warning):
without a PID namespace the supervisor is a child subreaper and kills every descendant it finds in
``/proc``; without a mount namespace the working directory is a temporary directory it removes.

``--minimal`` on the command line skips every namespace and the uid change (what an unprivileged user
gets), so that the fallback can be tested on a machine that allows more.

Protocol (SOCK_SEQPACKET, one JSON object per message): the parent sends ``{"op": "run", ...}`` with six
file descriptors attached (payload memfd, stdin, stdout, stderr, report pipe, extra) and
``{"op": "kill", "ids": [...]}``; supervisors answer each run with ``{"op": "exit", "id": ..., ...}``.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
_libc = ctypes.CDLL(None, use_errno=True)
# syscall() through PyDLL keeps the GIL held across clone(), so the child resumes with a consistent
# interpreter state, exactly as after os.fork() in a single-threaded process.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MS_RDONLY, MS_REMOUNT, MS_MOVE = 1, 32, 8192
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
UID_BASE = 1_600_000_000
UID_SPAN = 1 << 24
# A run's deadline moves by the time its process was runnable but waited for a CPU held by others, up to this many
# times its limit (keep in sync with sandbox.py); see _extension
MAX_CPU_WAIT_FACTOR = 3.0
WORKDIR_IN_NS = "/tmp/work"
RESULT_FD = 3
EXTRA_FD = 4
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Imported once here so that every run gets them for free (HumanEval prompts import typing, most
# solutions math/collections/itertools/re). Each MiB here costs ~0.1 ms per fork; keep it short.
PRELOAD = ("typing", "math", "collections", "itertools", "functools", "re", "string", "heapq", "bisect")


class _Quitter:
    """``exit()``/``quit()`` as ``site`` defines them (the server runs with ``-S``, and programs call them)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Use {self.name}() or Ctrl-D (i.e. EOF) to exit"

    def __call__(self, code: object = None) -> None:
        raise SystemExit(code)


def _load_harness() -> types.ModuleType:
    import builtins

    for name in ("exit", "quit"):
        if not hasattr(builtins, name):
            setattr(builtins, name, _Quitter(name))
    path = os.path.join(_HERE, "_harness.py")
    module = types.ModuleType("_lit_align_harness")
    module.__file__ = path
    with open(path, encoding="utf-8") as fh:
        exec(compile(fh.read(), path, "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def clone_into_new_pid_namespace() -> int:
    """fork(), but the child is PID 1 of a fresh PID namespace (saves the extra process that
    ``unshare(CLONE_NEWPID)`` + ``fork()`` would need). Returns the child's pid, or 0 in the child."""
    if _SYS_CLONE is None:
        raise OSError(38, f"clone() number unknown on {os.uname().machine}")
    syscall = _pylibc.syscall
    syscall.restype = ctypes.c_long
    pid = syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(CLONE_NEWPID | signal.SIGCHLD), None, None, None, None)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


# ---------------------------------------------------------------------------------------------------------
# Namespaces


def exposure_plan() -> list[tuple[str, list[str]]]:
    """Directories an unprivileged uid cannot traverse on the way to this interpreter's files, as
    ``(closed ancestor, [its children on the way])`` pairs (e.g. ``("/root", [".pyenv"])``). Files under /tmp are
    left out: every run has a /tmp of its own, into which its import directories are bound (``_run_mounts``); the
    server's stash for these exposures is a tmpfs on /tmp, which would hide them while they are bound."""
    needed = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    needed.update(p for p in sys.path if p and os.path.exists(p))
    plan: dict[str, set[str]] = {}
    for path in map(os.path.realpath, needed):
        if path.startswith("/tmp/"):  # each run's own /tmp replaces these: see kept_under_tmp
            continue
        parts = path.strip("/").split("/")
        current = "/"
        for index, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            try:
                mode = os.stat(current).st_mode
            except OSError:
                break
            if not mode & 0o001:
                plan.setdefault(current, set()).add(parts[index + 1])
                break
    return sorted((ancestor, sorted(children)) for ancestor, children in plan.items())


def _server_mounts(exposures: list[tuple[str, list[str]]]) -> None:
    """Once, in the server's own mount namespace: private propagation and the interpreter re-exposed."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if not exposures:
        return
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0700")  # stash space
    for number, (ancestor, children) in enumerate(exposures):
        stashes = []
        for child in children:
            stash = f"/tmp/stash{number}_{len(stashes)}"
            os.mkdir(stash)
            _mount(os.path.join(ancestor, child), stash, None, MS_BIND | MS_REC, None)
            stashes.append((child, stash))
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for child, stash in stashes:
            target = os.path.join(ancestor, child)
            os.mkdir(target, 0o755)
            _mount(stash, target, None, MS_BIND | MS_REC, None)
            _check(_libc.umount2(stash.encode(), MNT_DETACH), f"umount {stash}")
    _check(_libc.umount2(b"/tmp", MNT_DETACH), "umount /tmp")


@functools.cache
def kept_under_tmp() -> list[str]:
    """The interpreter's import directories that live under /tmp (a virtualenv created there: CI clones, scratch
    machines), which the run's own /tmp would otherwise hide; each run gets them back read-only. Found once, in the
    server (``probe``), before any run is forked."""
    kept = []
    for path in sys.path:
        real = os.path.realpath(path) if path else ""
        if real.startswith("/tmp/") and os.path.isdir(real):
            kept.append(real)
    return [p for p in sorted(set(kept)) if not any(p.startswith(q + "/") for q in kept)]  # outermost ones


def _run_mounts(disk_mb: int) -> None:
    """Per run, in the run's mount namespace: a fresh size-capped tmpfs on /tmp, also bound over /dev/shm.

    The interpreter's import directories under /tmp (``kept_under_tmp``) are bound into the fresh tmpfs at their
    own paths, read-only, under root-owned directories: the tmpfs is prepared on a staging mount point while the
    old /tmp is still visible, then moved onto /tmp."""
    options = f"size={max(disk_mb, 1)}m,mode=1777"
    kept = kept_under_tmp()
    staging = next((d for d in ("/dev/shm", "/mnt", "/var/tmp") if os.path.isdir(d)), None) if kept else None
    if staging is None:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)
    else:
        _mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, options)
        for path in kept:
            target = staging + path[len("/tmp"):]
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(path, target, None, MS_BIND | MS_REC, None)
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        for root, dirs, _ in os.walk(staging):  # the directories on the way: traversable, not writable by the run
            os.chmod(root, 0o1777 if root == staging else 0o755)
            dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        _mount(staging, "/tmp", None, MS_MOVE, None)
    if os.path.isdir("/dev/shm"):
        _mount("/tmp", "/dev/shm", None, MS_BIND, None)


def probe(minimal: bool = False) -> dict:
    """Enter the server's namespaces where allowed and report what isolation runs will get.

    Args:
        minimal: use none of them (what an unprivileged user gets; for tests of the fallback).
    """
    caps = {"root": os.geteuid() == 0, "netns": False, "pidns": False, "mountns": False, "setuid": False,
            "exposures": [], "errors": []}
    kept_under_tmp()  # sys.path is final here; every run's fork inherits the answer
    if minimal:
        caps["errors"].append("minimal isolation requested")
        return caps
    try:
        _unshare(CLONE_NEWNET)
        caps["netns"] = True
    except OSError as exc:
        caps["errors"].append(f"network namespace: {exc}")
    try:
        _unshare(CLONE_NEWNS)
        exposures = exposure_plan() if caps["root"] else []
        _server_mounts(exposures)
        caps["exposures"] = exposures
        server_ns = True
    except OSError as exc:
        caps["errors"].append(f"mount namespace: {exc}")
        server_ns = False
    # A /proc that shows an unprivileged uid only its own processes (the runs' private uids make that the
    # run's own tree): no other process's command line, status or environment is visible.
    if server_ns:
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        except OSError as exc:
            caps["errors"].append(f"/proc with hidepid: {exc}")
    # World-writable places outside the run's tmpfs: shadow them with root-owned read-only tmpfs.
    if server_ns and caps["root"]:
        for place in ("/var/tmp", "/run/lock"):
            if os.path.isdir(place):
                try:
                    _mount("tmpfs", place, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | 1, "size=1k,mode=0755")
                except OSError as exc:
                    caps["errors"].append(f"cover {place}: {exc}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a throwaway supervisor + program pair doing the per-run setup
        os.close(r)
        got: dict = {"errors": []}
        for name, flag in (("pidns", CLONE_NEWPID), ("mountns", CLONE_NEWNS | CLONE_NEWIPC)):
            if name == "mountns" and not server_ns:
                continue
            try:
                _unshare(flag)
                got[name] = True
            except OSError as exc:
                got["errors"].append(f"{name}: {exc}")
        inner = os.fork()
        if inner == 0:
            if got.get("mountns"):
                try:
                    _run_mounts(1)
                except OSError as exc:
                    got["mountns"] = False
                    got["errors"].append(f"mounts: {exc}")
            if caps["root"]:
                try:
                    os.setgroups([])
                    os.setresgid(UID_BASE, UID_BASE, UID_BASE)
                    os.setresuid(UID_BASE, UID_BASE, UID_BASE)
                    os.stat(sys.base_prefix)
                    got["setuid"] = True
                except OSError as exc:
                    got["errors"].append(f"setuid: {exc}")
            os.write(w, json.dumps(got).encode())
            os._exit(0)
        os.waitpid(inner, 0)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    got = json.loads(data or b"{}")
    for key in ("pidns", "mountns", "setuid"):
        caps[key] = bool(got.get(key))
    caps["errors"].extend(got.get("errors", []))
    return caps


# ---------------------------------------------------------------------------------------------------------
# The program process


def _close_fds_above(keep_max: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(keep_max + 1, 4096))
    for fd in fds:
        if fd > keep_max:
            try:
                os.close(fd)
            except OSError:
                pass


def _set_limits(limits: dict) -> None:
    def lim(res: int, soft: int, hard: int | None = None) -> None:
        try:
            resource.setrlimit(res, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    mib = 1 << 20
    lim(resource.RLIMIT_AS, int(limits["memory_mb"]) * mib)
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    lim(resource.RLIMIT_CPU, cpu, cpu + 1)
    lim(resource.RLIMIT_FSIZE, int(limits["file_size_mb"]) * mib)
    lim(resource.RLIMIT_NOFILE, int(limits["open_files"]))
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_STACK, int(limits["stack_mb"]) * mib)
    lim(resource.RLIMIT_NPROC, int(limits["max_processes"]))


def _program(harness: types.ModuleType, header: dict, payload: dict, caps: dict, uid: int, workdir: str) -> None:
    """Isolate, drop privileges, run. Never returns."""
    try:
        os.setsid()
        limits = header["limits"]
        if caps["mountns"]:
            _run_mounts(int(limits["disk_mb"]))
            os.mkdir(workdir, 0o700)
        if caps["setuid"]:
            os.chown(workdir, uid, uid)
        os.environ.clear()
        os.environ.update(CHILD_ENV)
        os.environ["HOME"] = workdir
        os.chdir(workdir)
        os.umask(0o077)
        _set_limits(limits)
        try:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        except OSError:
            pass
        if caps["setuid"]:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    except BaseException as exc:  # noqa: BLE001 - report, never run the program half-isolated
        try:
            os.write(RESULT_FD, f"{header['nonce']} SETUP {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        os._exit(112)
    mode = header["mode"]
    nonce = header["nonce"]
    if mode == "pyfunc":
        harness.run_function_problem(
            payload["program"], payload["test"], payload["entry_point"], int(payload["prompt_lines"]),
            RESULT_FD, nonce, payload.get("test_code"), payload.get("magic"),
        )
    elif mode == "pystdio":
        harness.run_stdio_program(payload["source"], RESULT_FD, nonce)
    elif mode == "cppcompile":
        _compile_cpp(payload, nonce)
    elif mode == "exec":
        _exec_binary(nonce)
    os._exit(113)


def _report(nonce: str, text: str) -> None:
    try:
        os.write(RESULT_FD, (nonce + " " + text.replace("\n", " ")[:2000] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _compile_cpp(payload: dict, nonce: str) -> None:
    with open("solution.cpp", "w", encoding="utf-8") as fh:
        fh.write(payload["source"])
    command = [payload.get("compiler", "g++"), *payload.get("flags", []), "-o", "solution", "solution.cpp"]
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(2, 1)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, f"cannot run the compiler: {exc}\n".encode())
        os._exit(127)
    _pid, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 127 and not os.path.exists("solution"):
        _report(nonce, "SETUP compiler not runnable")
        os._exit(114)
    if code != 0 or not os.path.exists("solution"):
        _report(nonce, f"SYNTAX compiler exited with status {code}")
        os._exit(1)
    size = 0
    with open("solution", "rb") as fh:
        while chunk := fh.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(EXTRA_FD, view):]
            size += len(chunk)
    _report(nonce, f"BINARY {size}")
    os._exit(0)


def _exec_binary(nonce: str) -> None:
    with open("solution", "wb") as fh:
        offset = 0
        while chunk := os.pread(EXTRA_FD, 1 << 20, offset):
            fh.write(chunk)
            offset += len(chunk)
    os.chmod("solution", 0o700)
    os.close(EXTRA_FD)
    _report(nonce, "START 1")
    os.close(RESULT_FD)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execve("./solution", ["./solution"], dict(os.environ))
    except OSError as exc:
        os.write(2, f"cannot execute the program: {exc}\n".encode())
        os._exit(126)


# ---------------------------------------------------------------------------------------------------------
# The supervisor


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    parents[int(name)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def _remove_tree(path: str) -> None:
    import shutil  # degraded mode only

    shutil.rmtree(path, ignore_errors=True)


def _cpu_wait(pid: int) -> float:
    """Seconds ``pid`` (its main thread) has spent runnable but waiting for a CPU: the run delay the kernel keeps in
    ``/proc/<pid>/schedstat`` (still readable while the process is an unreaped zombie); 0.0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[bytes]:
    """The child processes of ``pid``'s main thread."""
    with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
        return fh.read().split()


def _alone(pid: int, reaper: int | None = None) -> bool:
    """Whether ``pid`` is one thread without child processes; and, given the ``reaper`` that the run's orphans go to
    when it is not the PID 1 of a namespace of its own (a subreaper supervisor), whether that has no other child."""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) != 1 or _children(pid):
            return False
        return reaper is None or _children(reaper) == [str(pid).encode()]
    except OSError:
        return False


def _extension(pid: int, wall: float, reaper: int | None = None) -> float:
    """Seconds a run with a ``wall``-second limit gets past it, asked when the limit (or the last extension) is up: the
    time its process ``pid`` was runnable but waited for a CPU held by other processes (other runs, a training job),
    at most ``MAX_CPU_WAIT_FACTOR * wall``, so that how loaded the machine is does not decide a verdict. Only while
    the run is one single-threaded process: one with threads or child processes may be waiting for the CPUs its own
    processes hold (a fork bomb), and gets its bare wall-clock limit (``reaper``: see :func:`_alone`)."""
    return min(_cpu_wait(pid), MAX_CPU_WAIT_FACTOR * wall) if _alone(pid, reaper) else 0.0


def _wait_until(child: int, start: float, wall: float, killed: list[str], reaper: int | None) -> float:
    """Return once ``child`` has exited (still unreaped) or was killed at its deadline: ``start + wall`` plus the
    :func:`_extension` it was granted, which is returned."""
    extension = 0.0
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        pidfd = -1
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            remaining = start + wall + extension - time.monotonic()
            if remaining <= 0:
                extension = _extension(child, wall, reaper)
                if start + wall + extension > time.monotonic():
                    continue
                if not killed:
                    killed.append("timeout")
                os.kill(child, signal.SIGKILL)
                return extension
            if pidfd >= 0:
                if poller.poll(int(remaining * 1000) + 1):
                    return extension
            else:  # kernels before 5.3
                if os.waitid(os.P_PID, child, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return extension
                time.sleep(min(remaining, 0.002))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _exit_message(run_id: int, uid: int | None, status: int, usage, wall: float, cpu_wait: float,
                  extension: float, killed: str | None) -> dict:
    return {
        "op": "exit",
        "id": run_id,
        "uid": uid,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "wall": wall,
        "cpu_wait": cpu_wait,
        "extension": extension,
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "killed": killed,
    }


def _enter_program(harness: types.ModuleType, header: dict, payload: dict, fds: list[int], caps: dict, uid: int,
                   workdir: str, unshare_flags: int) -> None:
    """First steps of the program process: its descriptors, then :func:`_program`. Never returns."""
    os.dup2(fds[1], 0)
    os.dup2(fds[2], 1)
    os.dup2(fds[3], 2)
    os.dup2(fds[4], RESULT_FD)
    keep = RESULT_FD
    if fds[5] >= 0:
        os.dup2(fds[5], EXTRA_FD)
        keep = EXTRA_FD
    _close_fds_above(keep)
    if unshare_flags:
        try:
            _unshare(unshare_flags)
        except OSError as exc:
            _report(header["nonce"], f"SETUP {exc}")
            os._exit(112)
    _program(harness, header, payload, caps, uid, workdir)


def _supervise(server: "Server", header: dict, payload: dict, fds: list[int], uid: int, workdir: str) -> None:
    """In the forked supervisor: start the program, enforce the deadline, report. Never returns."""
    caps = server.caps
    run_id = header["id"]
    killed: list[str] = []
    child_pid: list[int] = []

    def on_kill_request(signum: int, frame: object) -> None:
        if not killed:
            killed.append("request")
        for pid in child_pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    try:
        signal.signal(signal.SIGUSR1, on_kill_request)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (server.wake_r, server.wake_w):
            os.close(fd)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        flags = (CLONE_NEWPID if caps["pidns"] else 0) | (CLONE_NEWNS | CLONE_NEWIPC if caps["mountns"] else 0)
        if flags:
            _unshare(flags)
        if not caps["pidns"]:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if not caps["mountns"]:
            os.mkdir(workdir, 0o711 if caps["setuid"] else 0o700)
        start = time.monotonic()
        child = os.fork()
        if child == 0:
            try:
                _enter_program(server.harness, header, payload, fds, caps, uid, workdir, 0)
            finally:
                os._exit(115)
        child_pid.append(child)
        if killed:  # a kill request arrived before the fork
            os.kill(child, signal.SIGKILL)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        extension = _wait_until(child, start, float(header["limits"]["wall_s"]), killed,
                                None if caps["pidns"] else os.getpid())  # without a PID namespace, orphans come here
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        cpu_wait = _cpu_wait(child)  # before the reap takes its /proc entry
        _pid, status, usage = os.wait4(child, 0)
        wall = time.monotonic() - start
        if not caps["pidns"]:  # no namespace to take the rest down: find and kill what is left
            for _ in range(100):
                left = _descendants(os.getpid())
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                while True:
                    try:
                        if os.waitpid(-1, os.WNOHANG)[0] == 0:
                            break
                    except ChildProcessError:
                        break
                time.sleep(0.002)
        if not caps["mountns"]:
            _remove_tree(workdir)
        message = _exit_message(run_id, uid if caps["setuid"] else None, status, usage, wall, cpu_wait, extension,
                                killed[0] if killed else None)
    except BaseException as exc:  # noqa: BLE001
        message = {"op": "error", "id": run_id, "error": f"supervisor: {type(exc).__name__}: {exc}"}
    try:
        server.sock.send(json.dumps(message).encode())
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------
# The server loop


class Run:
    """A program started directly by the server (PID namespace mode)."""

    __slots__ = ("id", "pid", "pidfd", "uid", "start", "wall", "extension", "deadline", "killed")

    def __init__(self, run_id: int, pid: int, pidfd: int, uid: int, start: float, wall: float) -> None:
        self.id = run_id
        self.pid = pid
        self.pidfd = pidfd
        self.uid = uid
        self.start = start
        self.wall = wall
        self.extension = 0.0  # as last granted (_extension)
        self.deadline = start + wall
        self.killed: str | None = None


class Server:
    def __init__(self, sock: socket.socket, minimal: bool = False) -> None:
        self.sock = sock
        self.caps = probe(minimal)
        # Programs become PID 1 of their own namespace by clone() from here, with the server as their
        # supervisor; without PID namespaces (or clone) a supervisor process per run does that job.
        self.direct = bool(self.caps["pidns"] and _SYS_CLONE is not None and hasattr(os, "pidfd_open"))
        self.caps["direct_clone"] = self.direct
        self.harness = _load_harness()
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass
        self.runs: dict[int, Run] = {}  # run id -> Run (direct mode)
        self.by_pidfd: dict[int, Run] = {}
        self.supervisors: dict[int, int] = {}  # supervisor pid -> run id (supervisor mode)
        self.by_id: dict[int, int] = {}  # run id -> supervisor pid
        self.uid_next = int.from_bytes(os.urandom(4), "little") % UID_SPAN
        self.tmp_root = None
        if not self.caps["mountns"]:
            import tempfile  # degraded mode only

            self.tmp_root = tempfile.mkdtemp(prefix="lit_align_sandbox_")
            os.chmod(self.tmp_root, 0o711)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller = select.poll()
        gc.collect()
        gc.freeze()  # children never scan (and so never copy) the server's objects

    def send(self, message: dict) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError:
            self.shutdown()

    def next_uid(self) -> int:
        self.uid_next = (self.uid_next + 1) % UID_SPAN
        return UID_BASE + self.uid_next

    # -- supervisor mode
    def reap_supervisors(self) -> None:
        for pid in list(self.supervisors):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            run_id = self.supervisors.pop(pid)
            self.by_id.pop(run_id, None)
            if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                self.send({"op": "error", "id": run_id, "error": f"supervisor died (status {status})"})

    # -- direct mode
    def start_direct(self, header: dict, payload: dict, fds: list[int], uid: int) -> None:
        start = time.monotonic()
        pid = clone_into_new_pid_namespace()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                _enter_program(self.harness, header, payload, fds, self.caps, uid, WORKDIR_IN_NS,
                               CLONE_NEWNS | CLONE_NEWIPC if self.caps["mountns"] else 0)
            finally:
                os._exit(115)
        pidfd = os.pidfd_open(pid)
        run = Run(header["id"], pid, pidfd, uid, start, float(header["limits"]["wall_s"]))
        self.runs[run.id] = run
        self.by_pidfd[pidfd] = run
        self.poller.register(pidfd, select.POLLIN)

    def kill_direct(self, run: Run, reason: str) -> None:
        if run.killed is None:
            run.killed = reason
        try:
            os.kill(run.pid, signal.SIGKILL)  # still our unreaped child: the pid cannot be reused
        except OSError:
            pass

    def finish_direct(self, run: Run) -> None:
        cpu_wait = _cpu_wait(run.pid)  # before the reap takes its /proc entry
        _pid, status, usage = os.wait4(run.pid, 0)
        wall = time.monotonic() - run.start
        self.poller.unregister(run.pidfd)
        os.close(run.pidfd)
        del self.by_pidfd[run.pidfd]
        del self.runs[run.id]
        self.send(_exit_message(run.id, run.uid if self.caps["setuid"] else None, status, usage, wall, cpu_wait,
                                run.extension, run.killed))

    # -- requests
    def start_run(self, header: dict, fds: list[int]) -> None:
        try:
            payload = b""
            while chunk := os.pread(fds[0], 1 << 20, len(payload)):
                payload += chunk
            os.close(fds[0])
            fds[0] = -1
            payload_obj = json.loads(payload) if payload else {}
            uid = self.next_uid()
            if self.direct:
                self.start_direct(header, payload_obj, fds, uid)
                return
            workdir = WORKDIR_IN_NS if self.caps["mountns"] else os.path.join(self.tmp_root, f"run{header['id']}")
            pid = os.fork()
            if pid == 0:
                try:
                    _supervise(self, header, payload_obj, fds, uid, workdir)
                finally:
                    os._exit(117)
            self.supervisors[pid] = header["id"]
            self.by_id[header["id"]] = pid
        except Exception as exc:  # noqa: BLE001 - answer instead of dying
            self.send({"op": "error", "id": header.get("id"), "error": f"{type(exc).__name__}: {exc}"})
        finally:
            for fd in fds:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def handle(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 8)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.shutdown()
        try:
            message = json.loads(data)
        except ValueError:
            message = {}
        op = message.get("op")
        fds = list(fds)
        if op == "run" and len(fds) == 6:
            # payload, stdin, stdout, stderr, report, extra; unused ones are /dev/null placeholders
            if not message.get("has_extra"):
                os.close(fds[5])
                fds[5] = -1
            self.start_run(message, fds)
            return
        for fd in fds:
            os.close(fd)
        if op == "run":
            self.send({"op": "error", "id": message.get("id"), "error": f"expected 6 fds, got {len(fds)}"})
        elif op == "kill":
            for run_id in message.get("ids", []):
                run = self.runs.get(run_id)
                if run is not None:
                    self.kill_direct(run, "request")
                pid = self.by_id.get(run_id)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except OSError:
                        pass
        elif op == "ping":
            self.send({"op": "pong"})

    def shutdown(self) -> None:
        for run in list(self.runs.values()):
            self.kill_direct(run, "shutdown")
        for pid in list(self.supervisors):
            try:
                os.kill(pid, signal.SIGKILL)  # their programs die with them (PDEATHSIG)
            except OSError:
                pass
        if self.tmp_root:
            _remove_tree(self.tmp_root)
        os._exit(0)

    def loop(self) -> None:
        self.send({"op": "hello", "caps": self.caps, "pid": os.getpid()})
        poller = self.poller
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            timeout = None
            if self.runs:
                nearest = min(run.deadline for run in self.runs.values() if run.killed is None) \
                    if any(run.killed is None for run in self.runs.values()) else None
                if nearest is not None:
                    timeout = max(0, int((nearest - time.monotonic()) * 1000) + 1)
            for fd, event in poller.poll(timeout):
                if fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif fd in self.by_pidfd:
                    self.finish_direct(self.by_pidfd[fd])
                elif event & (select.POLLHUP | select.POLLERR) and not event & select.POLLIN:
                    self.shutdown()
                else:
                    self.handle()
            if self.runs:
                now = time.monotonic()
                for run in list(self.runs.values()):
                    if run.killed is None and now >= run.deadline:
                        run.extension = _extension(run.pid, run.wall)
                        run.deadline = run.start + run.wall + run.extension
                        if now >= run.deadline:
                            self.kill_direct(run, "timeout")
            if self.supervisors:
                self.reap_supervisors()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    parent = int(sys.argv[2])
    options = [a for a in sys.argv[3:] if a.startswith("--")]
    for path in (a for a in sys.argv[3:] if not a.startswith("--")):  # the parent's site-packages (-S)
        if path not in sys.path:
            sys.path.append(path)
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(0)
    os.umask(0o077)
    Server(sock, minimal="--minimal" in options).loop()


if __name__ == "__main__":
    main()
