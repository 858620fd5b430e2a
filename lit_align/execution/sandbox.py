"""Parent side of the sandbox: starts the sandbox server, sends it runs, collects their output.

One :class:`Sandbox` owns one server process (``_server.py``, standard library only, started as
``python -I`` with a scrubbed environment) and one I/O thread that pumps every run's pipes. A run is
one isolated process (see ``_server.py`` for what isolates it); :meth:`Sandbox.submit` returns a
future of its :class:`RunOutcome`. Jobs (a program against all of a problem's tests) are built on runs
in ``python_runner.py`` and ``stdio.py``; the worker pool in ``pool.py`` runs many jobs at once.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Limits", "RunSpec", "RunOutcome", "Sandbox", "SandboxError", "get_sandbox", "UID_BASE", "UID_SPAN"]

log = logging.getLogger("lit_align.execution")

_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")
UID_BASE = 1_600_000_000  # keep in sync with _server.py
UID_SPAN = 1 << 24
MAX_CPU_WAIT_FACTOR = 3.0  # keep in sync with _server.py: a run's deadline moves by its CPU wait, up to 3 x its limit
_MIB = 1 << 20
_READ_CHUNK = 1 << 16
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")


class SandboxError(RuntimeError):
    """The sandbox itself failed (server died, setup failed): an infrastructure error, not the program's."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of sandboxed runs (one run = one process tree)."""

    timeout_s: float = 3.0
    """Wall-clock seconds per run: a function problem's whole test code, or one stdin/stdout test case. The time the
    run spent runnable but waiting for a CPU held by other processes (other runs, a training job) is not counted, up
    to 3 x ``timeout_s`` of it, so that a verdict does not depend on the machine's load or the number of workers;
    this holds for runs of one process and thread (a program with threads or child processes gets the bare
    wall-clock limit)."""
    cpu_time_s: float | None = None
    """CPU seconds per run (RLIMIT_CPU, whole seconds); default: ``timeout_s`` rounded up."""
    memory_mb: int = 1024
    """Address-space limit per process in MiB (RLIMIT_AS); running out is ``memory_limit``."""
    max_processes: int = 16
    """Processes and threads the run may have at once (RLIMIT_NPROC of its private uid)."""
    file_size_mb: int = 16
    """Largest file the run may write, in MiB (RLIMIT_FSIZE)."""
    disk_mb: int = 64
    """Size of the run's private tmpfs (working directory, /tmp, /var/tmp, /dev/shm), in MiB."""
    open_files: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    stack_mb: int = 64
    """Stack size per process in MiB (RLIMIT_STACK)."""
    max_output_bytes: int = 4 * _MIB
    """Standard output kept per run; a run printing more is stopped (``output limit exceeded``)."""
    max_stderr_bytes: int = 4 * _MIB
    """Standard error read per run before it is stopped (only the first ``stderr_keep_bytes`` are kept)."""
    stderr_keep_bytes: int = 4096
    """Standard error kept in results."""
    compile_timeout_s: float = 30.0
    """Wall-clock seconds for compiling a C++ program."""
    compile_memory_mb: int = 2048
    """Address-space limit of the compiler in MiB."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "compile_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("memory_mb", "max_processes", "file_size_mb", "disk_mb", "open_files", "stack_mb",
                     "max_output_bytes", "max_stderr_bytes", "compile_memory_mb"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.cpu_time_s is not None and not self.cpu_time_s > 0:
            raise ValueError(f"Limits.cpu_time_s must be > 0, got {self.cpu_time_s!r}")

    def wire(self, compile_step: bool = False) -> dict[str, Any]:
        """The limits as the server reads them."""
        wall = self.compile_timeout_s if compile_step else self.timeout_s
        return {
            "wall_s": wall,
            "cpu_s": wall if compile_step else (self.cpu_time_s or wall),
            "memory_mb": self.compile_memory_mb if compile_step else self.memory_mb,
            "max_processes": max(self.max_processes, 8) if compile_step else self.max_processes,
            "file_size_mb": max(self.file_size_mb, 64) if compile_step else self.file_size_mb,
            "disk_mb": max(self.disk_mb, 128) if compile_step else self.disk_mb,
            "open_files": self.open_files,
            "stack_mb": self.stack_mb,
        }


Mode = Literal["pyfunc", "pystdio", "cppcompile", "exec"]


@dataclass
class RunSpec:
    """One sandboxed run: a mode the server knows, its payload, limits and optional stdin/binary."""

    mode: Mode
    """``pyfunc`` (HumanEval protocol), ``pystdio`` (Python 3 on stdin/stdout), ``cppcompile``, ``exec``."""
    payload: dict[str, Any]
    """JSON-ready inputs of the mode (program and tests, source, compiler flags)."""
    limits: Limits = field(default_factory=Limits)
    """Resource limits."""
    stdin: bytes | None = None
    """Bytes fed to the program's stdin; None means stdin is /dev/null (reads see end of file)."""
    binary: bytes | None = None
    """The executable for ``exec`` runs."""
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    """Prefix of the harness's report lines; the program never sees it on any channel it reads."""

    @property
    def compile_step(self) -> bool:
        return self.mode == "cppcompile"


@dataclass
class RunOutcome:
    """What a run did, as observed from outside."""

    exit_code: int | None
    """Exit status if it exited."""
    signal: int | None
    """Signal that killed it, if any."""
    killed: str | None
    """Why the sandbox killed it: ``timeout``, ``output``, ``deadline`` (batch), or None."""
    wall_s: float
    """Wall-clock seconds from fork to exit."""
    cpu_s: float
    """User + system CPU seconds of the process and the children it waited for."""
    maxrss_kb: int
    """Peak resident memory (KiB)."""
    stdout: bytes
    """Standard output (at most ``Limits.max_output_bytes``)."""
    stderr: bytes
    """Head of standard error (at most ``Limits.stderr_keep_bytes``)."""
    stderr_truncated: bool
    """True when standard error was longer than what is kept."""
    reports: list[str]
    """Harness report lines carrying this run's nonce (nonce stripped), in order."""
    binary: bytes | None = None
    """Compiled executable (``cppcompile`` runs that succeeded)."""
    uid: int | None = None
    """The private uid the run had (None without root)."""
    cpu_wait_s: float = 0.0
    """Seconds the run's first process was runnable but waited for a CPU held by other processes (0.0 where the
    kernel does not report it)."""
    extension_s: float = 0.0
    """Seconds its deadline was moved past its limit for that wait (see ``Limits.timeout_s``)."""


class _Run:
    __slots__ = (
        "id", "spec", "future", "fds", "stdin_data", "stdin_pos", "stdout", "stderr", "stderr_total",
        "report_buf", "reports", "exit", "extra_fd", "kill_sent", "backstop", "prefix",
    )

    def __init__(self, run_id: int, spec: RunSpec, future: Future) -> None:
        self.id = run_id
        self.spec = spec
        self.future = future
        self.fds: dict[int, str] = {}
        self.stdin_data = memoryview(spec.stdin or b"")
        self.stdin_pos = 0
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.stderr_total = 0
        self.report_buf = bytearray()
        self.reports: list[str] = []
        self.exit: dict | None = None
        self.extra_fd = -1
        self.kill_sent: str | None = None
        wall = spec.limits.wire(spec.compile_step)["wall_s"]
        self.backstop = time.monotonic() + wall * (1 + MAX_CPU_WAIT_FACTOR) + 15.0
        self.prefix = (spec.nonce + " ").encode()


class Sandbox:
    """A sandbox server plus the I/O thread that serves its runs; thread-safe.

    Args:
        python: interpreter for the server (and so for sandboxed Python programs).
        isolation: ``"auto"`` uses every isolation the machine allows; ``"minimal"`` uses only what an
            unprivileged user gets (rlimits, sessions, killing descendants, a temporary directory), for testing
            that fallback.
    """

    def __init__(self, python: str | None = None, isolation: Literal["auto", "minimal"] = "auto") -> None:
        if isolation not in ("auto", "minimal"):
            raise ValueError(f"Sandbox isolation must be 'auto' or 'minimal', got {isolation!r}")
        self.python = python or sys.executable
        self.isolation = isolation
        self._lock = threading.RLock()  # lifecycle (start/stop)
        self._runs_lock = threading.Lock()  # the run tables, shared with the I/O thread
        self._send_lock = threading.Lock()
        self._runs: dict[int, _Run] = {}
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._new: list[_Run] = []
        self._caps: dict[str, Any] | None = None
        self._server_pid: int | None = None
        self._closed = False
        self._pid = os.getpid()

    # ------------------------------------------------------------------ lifecycle
    @property
    def capabilities(self) -> dict[str, Any]:
        """What isolation the server got: ``root``, ``netns``, ``mountns``, ``setuid`` (bools), ``errors``."""
        self._ensure_started()
        assert self._caps is not None
        return dict(self._caps)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise SandboxError("this Sandbox is closed")
            if self._proc is not None and self._proc.poll() is None and self._thread and self._thread.is_alive():
                return
            self._start()

    def _start(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError("lit_align.execution needs Linux (fork, namespaces, rlimits)")
        self._stop_server()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env["LANG"] = env["LC_ALL"] = "C.UTF-8"
        command = [self.python, "-I", _SERVER, str(child_sock.fileno()), str(os.getpid())]
        if self.isolation == "minimal":
            command.append("--minimal")
        if os.path.realpath(self.python) == os.path.realpath(sys.executable):
            # Same interpreter: skip site (its .pth hooks cost every fork memory) and hand over our
            # site-packages directories instead, so sandboxed programs can still import them.
            import site

            command[1:2] = ["-I", "-S"]
            command += [p for p in site.getsitepackages() if os.path.isdir(p)]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(child_sock.fileno(),),
            env=env,
            cwd="/",
            start_new_session=True,
        )
        child_sock.close()
        parent_sock.settimeout(60.0)
        try:
            hello = json.loads(parent_sock.recv(1 << 16) or b"{}")
        except (OSError, ValueError) as exc:
            self._proc.kill()
            raise SandboxError(f"sandbox server did not start: {exc}") from exc
        if hello.get("op") != "hello":
            self._proc.kill()
            raise SandboxError(f"sandbox server sent {hello!r} instead of hello")
        parent_sock.settimeout(None)
        self._sock = parent_sock
        self._server_pid = hello["pid"]
        first = self._caps is None
        self._caps = hello["caps"]
        if first:
            self._warn_capabilities()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._io_loop, name="lit_align-sandbox-io", daemon=True)
        self._thread.start()

    def _warn_capabilities(self) -> None:
        caps = self._caps or {}
        reasons = "; ".join(caps.get("errors", [])) or "not permitted"
        if not caps.get("netns"):
            log.warning("sandbox: no network namespace (%s); sandboxed programs can reach the network", reasons)
        if not caps.get("pidns"):
            log.warning("sandbox: no PID namespace; escaped processes are found through /proc and killed, which a "
                        "program racing its own forks can outrun")
        if not caps.get("mountns"):
            log.warning("sandbox: no private mount namespace; runs work in a temporary directory on disk and can "
                        "write wherever this user can")
        if not caps.get("setuid"):
            log.warning("sandbox: runs keep your uid (not root): the process limit counts all your processes, and "
                        "a run can read your files and signal your other processes")

    def close(self) -> None:
        """Stop the server (killing every run in flight) and the I/O thread."""
        with self._lock:
            self._closed = True
            self._stop_server()

    def _stop_server(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._sock is not None:
            self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._sock = None
        self._proc = None
        self._thread = None
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def run(self, spec: RunSpec) -> RunOutcome:
        """Run one spec and wait for its outcome."""
        return self.submit(spec).result()

    def submit(self, spec: RunSpec) -> "Future[RunOutcome]":
        """Start a run; the future resolves once it has exited and every process it started is dead."""
        self._ensure_started()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        run = _Run(next(self._ids), spec, future)
        future.run_id = run.id  # type: ignore[attr-defined]
        child_fds: list[int] = []
        try:
            payload_fd = os.memfd_create("lit_align_payload", os.MFD_CLOEXEC)
            child_fds.append(payload_fd)
            _write_all(payload_fd, json.dumps(spec.payload).encode())
            if spec.stdin is not None:
                stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(stdin_w, False)
                child_fds.append(stdin_r)
                run.fds[stdin_w] = "stdin"
            else:
                child_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for name in ("stdout", "stderr", "report"):
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)
                run.fds[r] = name
                child_fds.append(w)
            if spec.mode == "exec":
                if spec.binary is None:
                    raise ValueError("an exec run needs RunSpec.binary")
                extra = os.memfd_create("lit_align_binary", os.MFD_CLOEXEC)
                _write_all(extra, spec.binary)
                child_fds.append(extra)
            elif spec.mode == "cppcompile":
                run.extra_fd = os.memfd_create("lit_align_compiled", os.MFD_CLOEXEC)
                child_fds.append(os.dup(run.extra_fd))
            else:
                child_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            header = {
                "op": "run",
                "id": run.id,
                "mode": spec.mode,
                "nonce": spec.nonce,
                "limits": spec.limits.wire(spec.compile_step),
                "has_stdin": spec.stdin is not None,
                "has_extra": spec.mode in ("exec", "cppcompile"),
            }
            with self._runs_lock:
                self._runs[run.id] = run  # before sending: the exit report must find it
            with self._send_lock:
                sock = self._sock
                if sock is None:
                    raise SandboxError("sandbox server is not running")
                try:
                    socket.send_fds(sock, [json.dumps(header).encode()], child_fds)
                except OSError as exc:
                    raise SandboxError(f"cannot reach the sandbox server: {exc}") from exc
            with self._runs_lock:
                self._new.append(run)  # the I/O thread registers its pipes from here on
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # already woken
                pass
        except BaseException:
            with self._runs_lock:
                self._runs.pop(run.id, None)
            for fd in list(run.fds):
                os.close(fd)
            if run.extra_fd >= 0:
                os.close(run.extra_fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        return future

    def kill(self, run_ids: list[int], reason: str = "deadline") -> None:
        """Stop runs early; their outcomes report ``killed=reason``."""
        if not run_ids:
            return
        with self._runs_lock:
            for run_id in run_ids:
                run = self._runs.get(run_id)
                if run is not None and run.kill_sent is None:
                    run.kill_sent = reason
        with self._send_lock:
            if self._sock is not None:
                try:
                    self._sock.send(json.dumps({"op": "kill", "ids": list(run_ids), "reason": reason}).encode())
                except OSError:
                    pass

    # ------------------------------------------------------------------ I/O thread
    def _io_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sock = self._sock
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, ("sock", None))
        sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        alive = True
        try:
            while alive:
                timeout = None
                with self._runs_lock:
                    new, self._new = self._new, []
                    if self._runs:
                        timeout = max(0.0, min(r.backstop for r in self._runs.values()) - time.monotonic())
                for run in new:
                    for fd, name in run.fds.items():
                        sel.register(fd, selectors.EVENT_WRITE if name == "stdin" else selectors.EVENT_READ,
                                     (name, run))
                for key, _events in sel.select(timeout):
                    kind, run = key.data
                    if kind == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                    elif kind == "sock":
                        if not self._on_message(sock):
                            alive = False
                            break
                    elif run.future.done():
                        continue
                    elif kind == "stdin":
                        self._pump_stdin(sel, key.fd, run)
                    else:
                        self._pump_output(sel, key.fd, kind, run)
                self._check_backstops(sel)
                self._complete_ready(sel)
        except BaseException as exc:  # noqa: BLE001 - never leave futures hanging
            log.exception("sandbox I/O thread failed")
            self._fail_all(sel, SandboxError(f"sandbox I/O thread failed: {exc}"))
            return
        self._fail_all(sel, SandboxError("sandbox server exited"))

    def _fail_all(self, sel: selectors.BaseSelector, error: Exception) -> None:
        with self._runs_lock:
            runs = list(self._runs.values()) + self._new
            self._runs.clear()
            self._new = []
        for run in runs:
            self._release(sel, run)
            if not run.future.done():
                run.future.set_exception(error)
        sel.close()

    def _on_message(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        message = json.loads(data)
        op = message.get("op")
        with self._runs_lock:
            run = self._runs.get(message.get("id"))
        if run is None:
            return True
        if op == "exit":
            run.exit = message
        elif op == "error":
            run.exit = {"error": message.get("error", "unknown error")}
        return True

    def _pump_stdin(self, sel: selectors.BaseSelector, fd: int, run: _Run) -> None:
        try:
            while run.stdin_pos < len(run.stdin_data):
                n = os.write(fd, run.stdin_data[run.stdin_pos : run.stdin_pos + _READ_CHUNK])
                run.stdin_pos += n
        except BlockingIOError:
            return
        except OSError:  # the program closed stdin or exited
            pass
        self._close_fd(sel, fd, run)

    def _pump_output(self, sel: selectors.BaseSelector, fd: int, kind: str, run: _Run) -> None:
        limits = run.spec.limits
        while True:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close_fd(sel, fd, run)
                return
            if kind == "stdout":
                room = limits.max_output_bytes - len(run.stdout)
                run.stdout += chunk[: max(room, 0)]
                if len(chunk) > room:
                    self._close_fd(sel, fd, run)
                    self._request_kill(run, "output")
                    return
            elif kind == "stderr":
                run.stderr_total += len(chunk)
                room = limits.stderr_keep_bytes - len(run.stderr)
                if room > 0:
                    run.stderr += chunk[:room]
                if run.stderr_total > limits.max_stderr_bytes:
                    self._close_fd(sel, fd, run)
                    self._request_kill(run, "output")
                    return
            else:
                run.report_buf += chunk
                while b"\n" in run.report_buf:
                    line, _, rest = bytes(run.report_buf).partition(b"\n")
                    run.report_buf = bytearray(rest)
                    if line.startswith(run.prefix):
                        run.reports.append(line[len(run.prefix) :].decode("utf-8", "replace"))
                if len(run.report_buf) > 1 << 16:  # a line that never ends: not ours
                    run.report_buf.clear()

    def _request_kill(self, run: _Run, reason: str) -> None:
        if run.kill_sent is None:
            self.kill([run.id], reason)

    def _close_fd(self, sel: selectors.BaseSelector, fd: int, run: _Run) -> None:
        if fd in run.fds:
            try:
                sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)
            del run.fds[fd]

    def _check_backstops(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        with self._runs_lock:
            late = [r for r in self._runs.values() if r.exit is None and now > r.backstop]
        for run in late:
            if run.kill_sent != "lost":
                self.kill([run.id], "lost")
                run.kill_sent = "lost"
                run.backstop = now + 5.0
            else:
                run.exit = {"error": "the sandbox server never reported this run's exit"}

    def _complete_ready(self, sel: selectors.BaseSelector) -> None:
        with self._runs_lock:
            ready = [r for r in self._runs.values() if r.exit is not None and not any(
                name != "stdin" for name in r.fds.values())]
            for run in ready:
                del self._runs[run.id]
        for run in ready:
            self._release(sel, run)
            exit_info = run.exit or {}
            if "error" in exit_info:
                run.future.set_exception(SandboxError(exit_info["error"]))
                continue
            binary = None
            if run.extra_fd >= 0 and any(line.startswith("BINARY ") for line in run.reports):
                binary = _read_memfd(run.extra_fd)
            if run.extra_fd >= 0:
                os.close(run.extra_fd)
                run.extra_fd = -1
            killed = exit_info.get("killed")
            if killed in (None, "request") and run.kill_sent:
                killed = run.kill_sent
            outcome = RunOutcome(
                exit_code=exit_info.get("exit_code"),
                signal=exit_info.get("signal"),
                killed=killed,
                wall_s=float(exit_info.get("wall", 0.0)),
                cpu_wait_s=float(exit_info.get("cpu_wait", 0.0)),
                extension_s=float(exit_info.get("extension", 0.0)),
                cpu_s=float(exit_info.get("cpu", 0.0)),
                maxrss_kb=int(exit_info.get("maxrss_kb", 0)),
                stdout=bytes(run.stdout),
                stderr=bytes(run.stderr),
                stderr_truncated=run.stderr_total > len(run.stderr),
                reports=run.reports,
                binary=binary,
                uid=exit_info.get("uid"),
            )
            run.future.set_result(outcome)

    def _release(self, sel: selectors.BaseSelector, run: _Run) -> None:
        for fd in list(run.fds):
            self._close_fd(sel, fd, run)
        if run.extra_fd >= 0 and run.future.done():
            os.close(run.extra_fd)
            run.extra_fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_memfd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


_default: Sandbox | None = None
_default_lock = threading.Lock()


def get_sandbox() -> Sandbox:
    """The process-wide sandbox (started on first use, one per process even after ``fork``)."""
    global _default
    with _default_lock:
        if _default is None or _default._pid != os.getpid() or _default._closed:
            _default = Sandbox()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None and _default._pid == os.getpid():
        _default.close()
