"""In-sandbox harness: runs an untrusted Python program and its tests inside the sandboxed child.

Standard library only: the sandbox server imports this file by path in a fresh interpreter, before any
untrusted code exists, and every sandboxed child is a fork of that server with privileges already
dropped when these functions run.

How a pass is earned (HumanEval protocol: program = prompt + completion, then test code, then
``check(entry_point)``):

- Results go to the parent through a dedicated pipe, one line per event, each line prefixed with a
  random nonce the parent chose. Nothing the program prints to stdout/stderr counts, and the exit code
  is ignored: a run is ``passed`` only if the parent reads ``START``, then an ``ok`` for the asserts,
  then ``DONE``. ``sys.exit``/``SystemExit``/``os._exit`` before ``DONE`` therefore fail.
- Every ``assert`` statement of the test code (outside ``try`` blocks, whose asserts keep their usual
  meaning) is rewritten to record its own outcome and carry on, so a run reports how many of its tests
  passed; the first failing one decides the status, exactly as a normal run of ``check`` would stop there.
- The function under test is wrapped: every value it returns (and every argument after the call) must
  be plain data. Objects of classes whose behaviour (``__eq__``, ``__bool__``, ``__sub__``, ``__str__``,
  ... any dunder but construction and pickling) was written by the completion are rejected, so an object
  that compares equal to anything fails instead of passing. Classes defined in the prompt, builtin and C
  types, and standard-library/site-packages classes are trusted; containers are checked element by element
  and instances attribute by attribute.
- The test code runs with pristine builtins, so a completion that rebinds ``abs`` or ``len`` at module
  level does not change what the tests compute.

What this does not claim: the program shares the process with the harness, so code written to attack
the harness itself (walking frames to find the nonce, patching this module through ``sys.modules``,
``ctypes``) could forge a report. The OS sandbox bounds what such a program can do to the machine; the
guards above close the reward hacks a policy stumbles into (early exit, always-equal objects, bare bodies).
"""

from __future__ import annotations

import binascii
import builtins
import io
import marshal
import os
import sys
import types

__all__ = ["run_function_problem", "run_stdio_program", "PROGRAM_FILE", "TEST_FILE"]

PROGRAM_FILE = "solution.py"
TEST_FILE = "tests.py"

# Captured at import, before any untrusted code runs in this interpreter.
_write = os.write
_exit = os._exit
_type = type
_isinstance = isinstance
_id = id
_vars = vars
_callable = callable
_getattr = getattr
_str = str
_BaseException = BaseException
_FunctionType = types.FunctionType
_MethodType = types.MethodType
_GeneratorType = types.GeneratorType
_HEAPTYPE = 1 << 9
PRISTINE_BUILTINS: dict = dict(builtins.__dict__)
_MAGIC: str = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER.hex()

# Code from files under the interpreter's own import path (standard library, site-packages) is trusted.
_TRUSTED_PREFIXES: tuple[str, ...] = tuple(
    sorted({os.path.realpath(p) + os.sep for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)})
)

# Dunders about construction, pickling and introspection: defining them does not change what a
# comparison, a truth test or an arithmetic expression in a test computes.
_SAFE_DUNDERS = frozenset(
    "__init__ __new__ __post_init__ __init_subclass__ __set_name__ __class_getitem__ __getnewargs__ "
    "__getnewargs_ex__ __reduce__ __reduce_ex__ __getstate__ __setstate__ __copy__ __deepcopy__ __sizeof__ "
    "__dir__ __subclasshook__ __del__ __enter__ __exit__ __doc__ __module__ __qualname__ __dict__ "
    "__weakref__ __slots__ __annotations__ __match_args__ __dataclass_fields__ __dataclass_params__ "
    "__orig_bases__ __parameters__ __abstractmethods__ __firstlineno__ __static_attributes__ "
    "__type_params__".split()
)
_PLAIN_LEAVES = frozenset([int, float, complex, bool, str, bytes, type(None), range, bytearray])
_CONTAINERS = frozenset([list, tuple, set, frozenset])
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


class UntrustedValue(Exception):
    """Raised when the function under test returns an object whose behaviour the completion wrote."""


class _Context:
    """Where the program's code lives, to tell prompt code from completion code."""

    def __init__(self, program_file: str, prompt_lines: int, test_file: str) -> None:
        self.program_file = program_file
        self.prompt_lines = prompt_lines
        self.test_file = test_file

    def trusted_code(self, code: types.CodeType) -> bool:
        filename = code.co_filename
        if filename == self.program_file:
            return code.co_firstlineno <= self.prompt_lines
        if filename == self.test_file:
            return True
        return filename.startswith(_TRUSTED_PREFIXES) and os.path.isfile(filename)

    def is_program_function(self, obj: object) -> bool:
        return _type(obj) is _FunctionType and obj.__code__.co_filename == self.program_file

    def trusted_member(self, owner: type, name: str, value: object) -> bool:
        if value is None:
            return True
        if _isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if _isinstance(value, property):
            return all(f is None or self.trusted_member(owner, name, f) for f in (value.fget, value.fset, value.fdel))
        if _type(value) is _FunctionType:
            return self.trusted_code(value.__code__)
        if not _callable(value) and not hasattr(_type(value), "__get__"):
            return True  # plain data stored under a dunder name
        # A builtin slot re-exposed under its own name by a subclass of its type (``__eq__ = int.__eq__``).
        objclass = _getattr(value, "__objclass__", None)
        return (
            _getattr(value, "__name__", None) == name
            and _isinstance(objclass, type)
            and objclass in owner.__mro__
            and not objclass.__flags__ & _HEAPTYPE
        )

    def trusted_class(self, cls: type, cache: dict) -> bool:
        key = _id(cls)
        if key in cache:
            return cache[key]
        ok = True
        for klass in cls.__mro__:
            if not klass.__flags__ & _HEAPTYPE:
                continue
            for name, value in list(_vars(klass).items()):
                if name[:2] == "__" and name[-2:] == "__" and name not in _SAFE_DUNDERS:
                    if not self.trusted_member(klass, name, value):
                        ok = False
                        break
            if not ok:
                break
        if ok and _type(cls) is not type:  # a metaclass decides comparisons of class objects
            ok = self.trusted_class(_type(cls), cache)
        cache[key] = ok
        return ok

    def check_value(self, value: object) -> None:
        """Raise :class:`UntrustedValue` if anything reachable from ``value`` has completion-written behaviour."""
        cache: dict = {}
        seen: set = set()
        stack = [value]
        while stack:
            obj = stack.pop()
            cls = _type(obj)
            if cls in _PLAIN_LEAVES:
                continue
            key = _id(obj)
            if key in seen:
                continue
            seen.add(key)
            if cls in _CONTAINERS or cls in _VIEWS:
                stack.extend(obj)
                continue
            if cls is dict:
                stack.extend(obj.keys())
                stack.extend(obj.values())
                continue
            if cls.__flags__ & _HEAPTYPE or _type(cls) is not type:
                if not self.trusted_class(cls, cache):
                    raise UntrustedValue(
                        f"the function under test returned a {cls.__qualname__} object whose behaviour the "
                        "completion defines; only plain data can pass a test"
                    )
            # Containers and objects that hold other objects: check what they hold.
            if _isinstance(obj, dict):
                stack.extend(obj.keys())
                stack.extend(obj.values())
            elif _isinstance(obj, (list, tuple, set, frozenset)) or _type(obj).__name__ == "deque":
                try:
                    stack.extend(obj)
                except _BaseException:  # noqa: BLE001 - an iterator that refuses is not data
                    raise UntrustedValue(f"cannot inspect the returned {cls.__qualname__} object") from None
            if cls.__flags__ & _HEAPTYPE:
                stack.extend(self._attributes(obj, cls))

    @staticmethod
    def _attributes(obj: object, cls: type) -> list:
        found = []
        instance_dict = _getattr(obj, "__dict__", None)
        if _type(instance_dict) is dict:
            found.extend(instance_dict.values())
        for klass in cls.__mro__:
            slots = _vars(klass).get("__slots__", ())
            if _type(slots) is str:
                slots = (slots,)
            if _type(slots) not in (tuple, list):
                continue
            for slot in slots:
                if _type(slot) is str and slot not in ("__dict__", "__weakref__"):
                    try:
                        found.append(object.__getattribute__(obj, slot))
                    except AttributeError:
                        pass
        return found

    def guard(self, fn):
        """Wrap a program function so that what it returns, and its arguments afterwards, are checked."""
        ctx = self

        def guarded(*args, **kwargs):
            result = fn(*args, **kwargs)
            ctx.check_value(args)
            ctx.check_value(kwargs)
            return ctx.wrap_result(result)

        guarded.__name__ = _getattr(fn, "__name__", "candidate")
        guarded.__qualname__ = _getattr(fn, "__qualname__", "candidate")
        guarded.__doc__ = _getattr(fn, "__doc__", None)
        return guarded

    def wrap_result(self, result):
        if _type(result) is _FunctionType and self.is_program_function(result):
            return self.guard(result)
        if _type(result) is _MethodType and self.is_program_function(result.__func__):
            return self.guard(result)
        if _type(result) is _GeneratorType or (
            _type(result) not in _PLAIN_LEAVES and _type(result) not in _CONTAINERS
            and hasattr(_type(result), "__next__")
        ):  # lazy iterators (generators, map, filter, zip...): check each item as it comes
            self.check_value(_type(result))
            return self._guarded_iter(result)
        self.check_value(result)
        return result

    def _guarded_iter(self, iterator):
        for item in iterator:
            yield self.wrap_result(item)


# ---------------------------------------------------------------------------------------------------------
# Reporting


class _Reporter:
    def __init__(self, fd: int, nonce: str) -> None:
        self.fd = fd
        self.prefix = nonce + " "

    def send(self, *parts: object) -> None:
        text = " ".join(_str(p) for p in parts).replace("\n", " ").replace("\r", " ")
        data = (self.prefix + text[:2000] + "\n").encode("utf-8", "replace")
        while data:
            try:
                written = _write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return
            data = data[written:]


def _describe(exc: BaseException) -> str:
    name = _type(exc).__name__
    try:
        text = _str(exc)
    except Exception:
        text = ""
    return f"{name}: {text}"[:300] if text else name


def _kind(exc: BaseException) -> str:
    if _isinstance(exc, MemoryError):
        return "memory"
    if _isinstance(exc, SystemExit):
        return "exit"
    if _isinstance(exc, UntrustedValue):
        return "fail"
    return "error"


class _Recorder:
    """Receives each rewritten assert's outcome; reports an assert's first pass and first failure."""

    def __init__(self, reporter: _Reporter) -> None:
        self.reporter = reporter
        self.passed: set = set()
        self.failed: set = set()

    def check(self, index: int, value: object) -> None:
        try:
            ok = value if _type(value) is bool else bool(value)
        except _BaseException as exc:  # noqa: BLE001 - a broken __bool__ is a failed test
            self.raised(index, exc)
            return
        if ok:
            if index not in self.passed:
                self.passed.add(index)
                self.reporter.send("T", index, "ok")
        elif index not in self.failed:
            self.failed.add(index)
            self.reporter.send("T", index, "fail", "assertion failed")

    def raised(self, index: int, exc: BaseException) -> None:
        kind = _kind(exc)
        if index not in self.failed:
            self.failed.add(index)
            self.reporter.send("T", index, kind, _describe(exc))
        if kind == "exit" or kind == "memory":
            raise exc  # the program asked to stop or is out of memory: stop the tests here
        if _isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            raise exc


_SOURCES: dict = {}


def _format_exception(exc: BaseException) -> str:
    """A traceback like the interpreter's, without importing ``traceback`` (sources are known here)."""
    lines = ["Traceback (most recent call last):"]
    entries = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if len(entries) > 40:  # deep recursion: the outermost frames and the innermost ones are what helps
        skipped = len(entries) - 30
        entries = entries[:10] + [None] + entries[-20:]
    for tb in entries:
        if tb is None:
            lines.append(f"  [... {skipped} frames omitted ...]")
            continue
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        source = _SOURCES.get(code.co_filename)
        if source is not None and 0 < tb.tb_lineno <= len(source):
            lines.append("    " + source[tb.tb_lineno - 1].strip())
    if _isinstance(exc, SyntaxError) and exc.text:
        lines.append(f'  File "{exc.filename}", line {exc.lineno}')
        lines.append("    " + exc.text.rstrip("\n"))
        if exc.offset:
            lines.append("    " + " " * (max(exc.offset, 1) - 1 - (len(exc.text) - len(exc.text.lstrip()))) + "^")
    lines.append(_describe(exc))
    return "\n".join(lines) + "\n"


def _print_traceback(exc: BaseException) -> None:
    try:
        text = _format_exception(exc)
    except _BaseException:  # noqa: BLE001
        text = _describe(exc) + "\n"
    try:
        _write(2, text.encode("utf-8", "replace"))
    except _BaseException:  # noqa: BLE001 - stderr may be closed or full
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:  # noqa: BLE001
            pass


def _load_tests(test: str, test_code_b64: str | None, magic: str | None) -> tuple[types.CodeType, int]:
    """The rewritten test code: the parent's precompiled code object when our interpreter matches it."""
    if test_code_b64 and magic:
        if _MAGIC == magic:
            code, count = marshal.loads(binascii.a2b_base64(test_code_b64))
            return code, count
    rewrite = _load_sibling("_rewrite")
    return rewrite.rewrite_asserts(test, TEST_FILE)


def _load_sibling(name: str) -> types.ModuleType:
    module = sys.modules.get("_lit_align" + name)
    if module is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
        module = types.ModuleType("_lit_align" + name)
        module.__file__ = path
        with open(path, encoding="utf-8") as fh:
            exec(compile(fh.read(), path, "exec"), module.__dict__)
        sys.modules["_lit_align" + name] = module
    return module


def run_function_problem(
    program: str,
    test: str,
    entry_point: str,
    prompt_lines: int,
    result_fd: int,
    nonce: str,
    test_code_b64: str | None = None,
    magic: str | None = None,
) -> None:
    """Run a HumanEval-protocol problem from the working directory; report through ``result_fd``; never returns.

    Args:
        program: prompt + completion.
        test: the test code; defines ``check(candidate)`` (HumanEval) or holds module-level asserts (MBPP).
        entry_point: name of the function under test.
        prompt_lines: lines of ``program`` that come from the prompt (trusted definitions).
        result_fd: the report pipe.
        nonce: prefix of every report line.
        test_code_b64: base64 of ``marshal.dumps((rewritten test code, assert count))`` from the parent.
        magic: the parent interpreter's bytecode magic number (hex); the code is used only if ours matches.
    """
    rep = _Reporter(result_fd, nonce)
    program_file, test_file = PROGRAM_FILE, TEST_FILE
    _SOURCES[program_file] = program.splitlines()
    _SOURCES[test_file] = test.splitlines()
    try:
        test_code, n_asserts = _load_tests(test, test_code_b64, magic)
    except _BaseException as exc:  # noqa: BLE001 - broken test code is the problem's fault
        rep.send("BADTEST", _describe(exc))
        _exit(0)
    try:
        program_code = compile(program, program_file, "exec", dont_inherit=True)
    except _BaseException as exc:  # noqa: BLE001
        rep.send("SYNTAX", _describe(exc))
        _print_traceback(exc)
        _exit(0)
    rep.send("START", n_asserts)
    ctx = _Context(program_file, prompt_lines, test_file)
    program_globals: dict = {"__name__": "solution", "__builtins__": builtins, "__file__": program_file}

    stage = "program"
    try:
        exec(program_code, program_globals)
        stage = "tests"
        test_globals = {
            k: v
            for k, v in program_globals.items()
            if not (k in PRISTINE_BUILTINS and v is not PRISTINE_BUILTINS[k] and k != entry_point)
        }
        for name, value in list(test_globals.items()):
            if ctx.is_program_function(value) or (name == entry_point and _callable(value)):
                test_globals[name] = ctx.guard(value)
        test_globals["__builtins__"] = dict(PRISTINE_BUILTINS)
        test_globals["__name__"] = "tests"
        test_globals["__file__"] = test_file
        test_globals["__lit_rec__"] = _Recorder(rep)
        exec(test_code, test_globals)
        check = test_globals.get("check")
        if _type(check) is _FunctionType and check.__code__.co_filename == test_file:
            stage = "check"
            if entry_point not in program_globals:
                raise NameError(f"name {entry_point!r} is not defined")
            check(test_globals.get(entry_point, program_globals[entry_point]))
    except _BaseException as exc:  # noqa: BLE001 - every way out of the program is reported
        kind = _kind(exc)
        if kind == "memory":
            rep.send("MEMORY", stage)
        elif kind == "exit":
            rep.send("EXIT", stage)
        elif _isinstance(exc, AssertionError) and stage != "program":
            rep.send("FAIL", stage, _describe(exc))
        elif kind == "fail":
            rep.send("FAIL", stage, _describe(exc))
        else:
            rep.send("ERROR", stage, _describe(exc))
            _print_traceback(exc)
        _flush_std()
        _exit(0)
    _flush_std()
    rep.send("DONE")
    _exit(0)


def _fresh_std_streams() -> None:
    def text(fd: int, mode: str):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors="surrogateescape" if fd else "strict",
                                line_buffering=False, write_through=fd == 2)

    sys.stdin = sys.__stdin__ = text(0, "r")
    sys.stdout = sys.__stdout__ = text(1, "w")
    sys.stderr = sys.__stderr__ = text(2, "w")


def run_stdio_program(source: str, result_fd: int, nonce: str) -> None:
    """Run a Python 3 program as ``__main__`` on the sandbox's stdin/stdout; never returns.

    Args:
        source: the program.
        result_fd: report pipe (syntax errors and the kind of an uncaught exception).
        nonce: prefix of every report line.
    """
    rep = _Reporter(result_fd, nonce)
    program_file = PROGRAM_FILE
    _SOURCES[program_file] = source.splitlines()
    _fresh_std_streams()
    try:
        code = compile(source, program_file, "exec", dont_inherit=True)
    except _BaseException as exc:  # noqa: BLE001
        rep.send("SYNTAX", _describe(exc))
        _print_traceback(exc)
        _flush_std()
        _exit(1)
    rep.send("START", 1)
    main = types.ModuleType("__main__")
    main.__file__ = program_file
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [program_file]
    exit_code = 0
    try:
        exec(code, main.__dict__)
    except SystemExit as exc:
        code_value = exc.code
        if code_value is None:
            exit_code = 0
        elif _isinstance(code_value, int):
            exit_code = code_value & 0xFF
        else:
            try:
                print(code_value, file=sys.stderr)
            except _BaseException:  # noqa: BLE001
                pass
            exit_code = 1
    except _BaseException as exc:  # noqa: BLE001
        rep.send("MEMORY" if _isinstance(exc, MemoryError) else "ERROR", "program", _describe(exc))
        _print_traceback(exc)
        exit_code = 1
    try:
        sys.stdout.flush()
    except _BaseException:  # noqa: BLE001 - output closed by the parent (limit reached)
        exit_code = exit_code or 1
    _flush_std()
    _exit(exit_code)
