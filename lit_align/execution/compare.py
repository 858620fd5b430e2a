"""Output comparison for stdin/stdout problems, as CodeContests' own checker does it.

Both outputs are split on whitespace (space, tab, newline, carriage return, vertical tab, form feed)
and lower-cased. They match when the token lists are equal, or when they have the same length and
each pair matches: two integers must be equal, two numbers of which one is not an integer must be
within an absolute 1e-5, anything else must be the same string. Line breaks and runs of spaces do not
matter. Unlike the original (which parses integers as 32-bit ``int``), integers of any size compare
exactly. ``nan``/``inf`` spellings are compared as strings.
"""

from __future__ import annotations

import re

__all__ = ["outputs_match", "tokens_match", "FLOAT_TOLERANCE"]

FLOAT_TOLERANCE = 1e-5

_INT = re.compile(r"[+-]?\d+\Z", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z", re.ASCII)
_TOKEN = re.compile(r"[^ \t\n\r\v\f]+")


def tokens_match(a: str, b: str, tolerance: float = FLOAT_TOLERANCE) -> bool:
    """Whether one output token matches the expected one (both already lower-cased).

    Args:
        a: the program's token.
        b: the expected token.
        tolerance: absolute tolerance when at least one of two numbers is not an integer.
    """
    if a == b:
        return True
    a_num, b_num = _NUMBER.match(a), _NUMBER.match(b)
    if not (a_num and b_num):
        return False
    if _INT.match(a) and _INT.match(b):
        return int(a) == int(b)
    try:
        return abs(float(a) - float(b)) < tolerance
    except OverflowError:  # pragma: no cover - float() gives inf rather than raising, kept for safety
        return False


def outputs_match(output: str | bytes, expected: str | bytes, tolerance: float = FLOAT_TOLERANCE) -> bool:
    """Whether a program's output matches the expected output token by token.

    Args:
        output: what the program printed.
        expected: the test's expected output.
        tolerance: absolute tolerance for numbers that are not both integers.
    """
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    if isinstance(expected, bytes):
        expected = expected.decode("utf-8", errors="replace")
    got = _TOKEN.findall(output.lower())
    want = _TOKEN.findall(expected.lower())
    if got == want:
        return True
    if len(got) != len(want):
        return False
    return all(tokens_match(a, b, tolerance) for a, b in zip(got, want))
