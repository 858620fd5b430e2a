"""Unit-test rewards for online objectives (PPO, GRPO, RAFT).

The default scale is the adversarial alignment report's: timeout -2, syntax error -1, runtime error
-0.6, failed tests -0.3, all tests pass +4. The report's policy learned to answer with a bare ``pass``
(a sure -0.3 beats the risk of -0.6 or -2); two options close that hole:

- ``partial_credit``: a failing program earns ``failed + (passed - failed) * fraction of tests passed``
  (the report's proposed fix: intermediate rewards by the number of tests passed);
- ``trivial``: a completion whose function body does nothing (``pass``, ``...``, ``return``,
  ``return None``, ``raise NotImplementedError``, only a docstring, empty) and does not pass scores this
  instead (default -1, as bad as a syntax error and worse than any honest failure but a timeout).
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from typing import Sequence

from lit_align.execution.pool import ExecutionPool
from lit_align.execution.problems import FunctionJob, FunctionProblem, StdioJob, StdioProblem, parse_stdio_language
from lit_align.execution.sandbox import Limits
from lit_align.execution.status import ExecutionResult, Status

__all__ = ["UnitTestReward", "ExecutionReward", "is_trivial_completion"]


@dataclass(frozen=True)
class UnitTestReward:
    """Maps an :class:`ExecutionResult` to a scalar reward."""

    passed: float = 4.0
    """Reward when every test passes."""
    failed: float = -0.3
    """Reward when the program runs but a test fails."""
    runtime_error: float = -0.6
    """Reward when the program raises or crashes."""
    syntax_error: float = -1.0
    """Reward when the program does not parse or compile."""
    timeout: float = -2.0
    """Reward when the program runs out of time."""
    memory_limit: float = -0.6
    """Reward when the program runs out of memory (a runtime error in the report's scale)."""
    partial_credit: bool = False
    """Failed programs earn ``failed + (passed - failed) * fraction of tests passed``."""
    trivial: float | None = -1.0
    """Reward for a non-passing completion with a trivial body; None disables the check."""

    def status_reward(self, status: Status) -> float:
        """The scale's value for a status."""
        return float(getattr(self, Status(status).value))

    def __call__(self, result: ExecutionResult, trivial: bool = False) -> float:
        """Reward of one result.

        Args:
            result: what the execution layer observed.
            trivial: the completion's body was trivial (see :func:`is_trivial_completion`).
        """
        if result.status is not Status.PASSED and trivial and self.trivial is not None:
            return float(self.trivial)
        if result.status is Status.FAILED and self.partial_credit and result.tests_total:
            return self.failed + (self.passed - self.failed) * result.tests_passed / result.tests_total
        return self.status_reward(result.status)


_TRIVIAL_CALLS = {"NotImplementedError", "NotImplemented"}


def _trivial_statement(node: ast.stmt) -> bool:
    if isinstance(node, ast.Pass):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # docstring, bare ``...`` or a stray constant
    if isinstance(node, ast.Return):
        return node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None)
    if isinstance(node, ast.Raise) and node.exc is not None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return isinstance(exc, ast.Name) and exc.id in _TRIVIAL_CALLS
    return False


def _parse_quietly(source: str) -> ast.Module:
    """ast.parse without the SyntaxWarnings generated code triggers (invalid escapes...) leaking into training logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # Python < 3.12 reports invalid escapes as this
        return ast.parse(source)


def is_trivial_completion(prompt: str, completion: str, entry_point: str | None = None) -> bool:
    """Whether the completed function's body does nothing.

    The function is ``entry_point`` (default: the last function the prompt defines). A program that does
    not parse is not "trivial" (it is a syntax error, scored as such).

    Args:
        prompt: code before the completion.
        completion: the generated code.
        entry_point: name of the function whose body is judged.
    """
    try:
        tree = _parse_quietly(prompt + completion)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if entry_point is None:
        try:
            prompt_tree = _parse_quietly(prompt)
            names = [n.name for n in ast.walk(prompt_tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        except SyntaxError:
            names = []
        entry_point = names[-1] if names else None
    targets = [f for f in functions if f.name == entry_point] if entry_point else functions[-1:]
    if not targets:
        return False
    body = targets[-1].body  # a redefinition in the completion wins, as at run time
    return all(_trivial_statement(stmt) for stmt in body)


class ExecutionReward:
    """Executes completions against their problems' tests and scores them with a :class:`UnitTestReward`.

    Args:
        scale: the reward scale.
        limits: resource limits of each run.
        max_workers: parallel runs; default two per CPU.
        batch_deadline_s: wall-clock seconds for a whole batch (stuck programs then score ``timeout``).
    """

    def __init__(
        self,
        scale: UnitTestReward | None = None,
        limits: Limits | None = None,
        max_workers: int | None = None,
        batch_deadline_s: float | None = 120.0,
    ) -> None:
        self.scale = scale or UnitTestReward()
        self.pool = ExecutionPool(limits=limits, max_workers=max_workers)
        self.batch_deadline_s = batch_deadline_s

    def score(
        self,
        problems: Sequence[FunctionProblem | StdioProblem],
        completions: Sequence[str],
        language: str = "python3",
    ) -> tuple[list[float], list[ExecutionResult]]:
        """Rewards and results for ``completions[i]`` against ``problems[i]``.

        Args:
            problems: one problem per completion.
            completions: function completions (function problems) or whole programs (stdin/stdout problems).
            language: language of stdin/stdout programs (``python3`` or ``cpp``).
        """
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        jobs = []
        trivial = []
        for problem, completion in zip(problems, completions):
            if isinstance(problem, FunctionProblem):
                jobs.append(FunctionJob(problem, completion))
                trivial.append(self.scale.trivial is not None
                               and is_trivial_completion(problem.prompt, completion, problem.entry_point))
            elif isinstance(problem, StdioProblem):
                jobs.append(StdioJob(problem, completion, parse_stdio_language(language),
                                     stop_on_first_failure=not self.scale.partial_credit))
                trivial.append(False)
            else:
                raise TypeError(f"not a problem: {type(problem).__name__}")
        results = self.pool.run(jobs, deadline_s=self.batch_deadline_s)
        return [self.scale(r, t) for r, t in zip(results, trivial)], results

    def __call__(self, problems: Sequence[FunctionProblem | StdioProblem], completions: Sequence[str],
                 language: str = "python3") -> list[float]:
        """Rewards only (see :meth:`score`)."""
        return self.score(problems, completions, language)[0]
