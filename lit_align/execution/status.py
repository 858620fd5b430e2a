"""The one status enum and the structured result of executing a program against its tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

__all__ = ["Status", "ExecutionResult", "FAILURE_PRIORITY"]


class Status(str, Enum):
    """Outcome of one program against its tests; shared by rewards, metrics and the evaluate command."""

    PASSED = "passed"
    FAILED = "failed"
    RUNTIME_ERROR = "runtime_error"
    SYNTAX_ERROR = "syntax_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"

    def __str__(self) -> str:  # json.dumps and f-strings show the value, not "Status.PASSED"
        return self.value


# Not used to pick a status (the first failing test decides); kept for reports that sort by severity.
FAILURE_PRIORITY: tuple[Status, ...] = (
    Status.SYNTAX_ERROR,
    Status.TIMEOUT,
    Status.MEMORY_LIMIT,
    Status.RUNTIME_ERROR,
    Status.FAILED,
    Status.PASSED,
)


@dataclass(frozen=True)
class ExecutionResult:
    """What the harness observed when it ran one program against one problem's tests.

    ``tests_passed``/``tests_total`` count assert statements of a function problem's test code
    (HumanEval protocol) or input/output cases of a stdin/stdout problem (CodeContests protocol).
    ``status`` is decided by the first failing test; it is ``passed`` only when the harness saw every
    test pass and the test code run to its end, never because the program exited with code 0.
    """

    status: Status
    """Outcome; see :class:`Status`."""
    tests_passed: int
    """Tests the harness saw pass."""
    tests_total: int
    """Tests the problem has (asserts in its test code, or input/output cases)."""
    duration_s: float
    """Wall-clock seconds spent running the program (all its runs, compilation included)."""
    stderr: str = ""
    """The program's standard error, truncated (compiler messages for a C++ syntax error)."""
    message: str = ""
    """The harness's one-line reason for a non-passing status (e.g. ``exited before the tests ran``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            object.__setattr__(self, "status", Status(self.status))
        if not 0 <= self.tests_passed <= max(self.tests_total, 0):
            raise ValueError(f"tests_passed={self.tests_passed} is outside 0..tests_total={self.tests_total}")

    @property
    def passed(self) -> bool:
        """True when every test passed."""
        return self.status is Status.PASSED

    @property
    def pass_fraction(self) -> float:
        """Fraction of tests passed (0.0 when the problem has no tests)."""
        return self.tests_passed / self.tests_total if self.tests_total else 0.0

    @property
    def compiled(self) -> bool:
        """True unless the program failed to parse or compile (what the compile rate counts)."""
        return self.status is not Status.SYNTAX_ERROR

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (status as its string value)."""
        d = asdict(self)
        d["status"] = self.status.value
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExecutionResult":
        """Inverse of :meth:`to_dict` (extra keys such as ``passed`` are ignored)."""
        return cls(
            status=Status(d["status"]),
            tests_passed=int(d["tests_passed"]),
            tests_total=int(d["tests_total"]),
            duration_s=float(d["duration_s"]),
            stderr=str(d.get("stderr", "")),
            message=str(d.get("message", "")),
        )
