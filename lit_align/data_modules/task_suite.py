"""The built-in code task suite: small, parameterised Python problems with hidden tests and known-bad solutions.

Every task follows HumanEval's protocol: ``prompt`` is a function signature plus docstring, a completion
continues it, and the program that grades a completion is::

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"

Problems come from templates (``add_const``, ``count_char``, ...) grouped in five families. A template is
parameterised by one value (a constant, a character, a threshold) that appears in the function name and is written
plainly in the docstring. The train/held-out split is by that value: for each template and seed, a fixed set of
values (drawn from inside the range of the template's values) is reserved for held-out problems and never used in
train, so a model has to read the docstring to solve a held-out problem. The texts are short on purpose: the offline
quickstart trains a tiny byte-level model on them on CPU.

Each task also carries incorrect completions, labelled with a kind from :data:`INCORRECT_KINDS`, for preference pairs
and reward checks. Nothing here runs generated code: the suite is built from plain Python reference functions, and
``compile()`` is the only check applied to the strings.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = [
    "FAMILIES",
    "INCORRECT_KINDS",
    "BEHAVIOURAL_KINDS",
    "SPLITS",
    "CodeTask",
    "generate_task_suite",
    "load_task_suite",
    "validation_tasks",
    "write_jsonl",
    "read_jsonl",
]

FAMILIES = ("arithmetic", "strings", "lists", "conditionals", "loops")
INCORRECT_KINDS = ("off_by_one", "wrong_operator", "missed_edge_case", "syntax_error", "infinite_loop", "bare_pass")
BEHAVIOURAL_KINDS = ("off_by_one", "wrong_operator", "missed_edge_case")
"""Kinds that compile and terminate but return a wrong value on at least one hidden test."""
SPLITS = ("train", "heldout", "validation")
"""``validation``: problems on the held-out parameter values that the ``heldout`` split leaves out (see
:func:`validation_tasks`); :func:`generate_task_suite` makes ``train`` and ``heldout``."""

_HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
_BARE_PASS = "    pass\n"


@dataclass(frozen=True)
class CodeTask:
    """One problem of the suite, in HumanEval's format plus labelled incorrect completions."""

    task_id: str
    """Unique and stable for a seed: ``suite/<family>/<template>/<parameter>``, e.g. ``suite/arithmetic/add_const/7``.
    """
    family: str
    """One of :data:`FAMILIES`."""
    split: str
    """``"train"`` or ``"heldout"``."""
    prompt: str
    """Signature plus docstring, ending with a newline."""
    entry_point: str
    """Name of the function the prompt defines."""
    canonical_solution: str
    """A correct body that continues the prompt (indented, ending with a newline)."""
    test: str
    """``def check(candidate):`` followed by asserts that call ``candidate(...)`` only."""
    incorrect_solutions: tuple[tuple[str, str], ...]
    """``(kind, completion)`` pairs, kinds from :data:`INCORRECT_KINDS`, each kind at most once."""

    def __post_init__(self) -> None:
        for name in ("task_id", "prompt", "entry_point", "canonical_solution", "test"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"CodeTask.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"CodeTask.family must be one of {FAMILIES}, got {self.family!r} ({self.task_id})")
        if self.split not in SPLITS:
            raise ValueError(f"CodeTask.split must be one of {SPLITS}, got {self.split!r} ({self.task_id})")
        if not self.prompt.endswith("\n"):
            raise ValueError(f"CodeTask.prompt must end with a newline ({self.task_id})")
        if not isinstance(self.incorrect_solutions, tuple):
            raise ValueError(
                f"CodeTask.incorrect_solutions must be a tuple of (kind, completion) pairs ({self.task_id})"
            )
        seen: set[str] = set()
        for pair in self.incorrect_solutions:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ValueError(
                    f"CodeTask.incorrect_solutions items must be (kind, completion) string pairs, got {pair!r}"
                    f" ({self.task_id})"
                )
            if pair[0] not in INCORRECT_KINDS:
                raise ValueError(
                    f"CodeTask.incorrect_solutions kind must be one of {INCORRECT_KINDS}, got {pair[0]!r}"
                    f" ({self.task_id})"
                )
            if pair[0] in seen:
                raise ValueError(f"CodeTask.incorrect_solutions repeats kind {pair[0]!r} ({self.task_id})")
            seen.add(pair[0])

    def program(self, completion: str) -> str:
        """The HumanEval program that grades ``completion`` (exactly what the execution layer runs).

        Args:
            completion: a function body continuing ``prompt``.
        """
        return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with HumanEval's keys first, then ``family``, ``split`` and ``incorrect_solutions``."""
        return {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "entry_point": self.entry_point,
            "canonical_solution": self.canonical_solution,
            "test": self.test,
            "family": self.family,
            "split": self.split,
            "incorrect_solutions": [{"kind": k, "completion": c} for k, c in self.incorrect_solutions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodeTask":
        """Rebuild a task from :meth:`to_dict`'s output; ``incorrect_solutions`` may be omitted.

        Args:
            d: a dict with the keys of :meth:`to_dict`; pairs may be ``{"kind", "completion"}`` dicts or 2-lists.
        """
        if not isinstance(d, dict):
            raise ValueError(f"CodeTask.from_dict expects a dict, got {type(d).__name__}")
        required = (*_HUMANEVAL_KEYS, "family", "split")
        missing = [k for k in required if k not in d]
        if missing:
            task_id = d.get("task_id", "<no task_id>")
            raise ValueError(f"CodeTask.from_dict: missing key(s) {missing} in task {task_id!r}")
        pairs: list[tuple[str, str]] = []
        for item in d.get("incorrect_solutions", ()):
            if isinstance(item, dict):
                if set(item) != {"kind", "completion"}:
                    raise ValueError(
                        f"CodeTask.from_dict: incorrect_solutions items need keys 'kind' and 'completion',"
                        f" got {sorted(item)} in task {d['task_id']!r}"
                    )
                pairs.append((item["kind"], item["completion"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise ValueError(f"CodeTask.from_dict: bad incorrect_solutions item {item!r} in task {d['task_id']!r}")
        return cls(
            task_id=d["task_id"],
            family=d["family"],
            split=d["split"],
            prompt=d["prompt"],
            entry_point=d["entry_point"],
            canonical_solution=d["canonical_solution"],
            test=d["test"],
            incorrect_solutions=tuple(pairs),
        )


# --------------------------------------------------------------------------------------------------------------------
# Templates. A builder gets the template's parameter and a seeded RNG and returns a _Problem: the function's name and
# single argument, the docstring's sentence, a reference implementation (plain Python, used to compute expected
# values), an example input, the hidden test inputs (the first one is a typical, non-empty case, so a loop that never
# advances hangs on it), the canonical body and the behavioural/infinite-loop bodies. Bodies are written unindented.


@dataclass(frozen=True)
class _Problem:
    entry_point: str
    arg: str
    doc: str
    ref: Callable[[Any], Any]
    example: Any
    inputs: tuple[Any, ...]
    canonical: str
    bugs: dict[str, str]


@dataclass(frozen=True)
class _Template:
    family: str
    name: str
    pool: tuple[Any, ...]
    build: Callable[[Any, random.Random], _Problem]


_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, n: int, exclude: str = "") -> str:
    """``n`` distinct random lowercase letters, none of them in ``exclude``."""
    return "".join(rng.sample([c for c in _LETTERS if c not in exclude], n))


def _insert(rng: random.Random, word: str, ch: str, times: int, inner: bool = False) -> str:
    """``word`` with ``ch`` inserted ``times`` times; with ``inner`` never as the first or last character."""
    chars = list(word)
    for _ in range(times):
        pos = rng.randint(1, len(chars) - 1) if inner else rng.randint(0, len(chars))
        chars.insert(pos, ch)
    return "".join(chars)


# arithmetic ---------------------------------------------------------------------------------------------------------


def _add_const(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"add_{c}", "x", f"Return x plus {c}.", lambda x: x + c, rng.randint(1, 9),
        (rng.randint(10, 20), 0, -rng.randint(1, 20), rng.randint(21, 99)),
        f"return x + {c}",
        {"off_by_one": f"return x + {c + 1}", "wrong_operator": f"return x - {c}"},
    )


def _times_const(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"times_{c}", "x", f"Return x times {c}.", lambda x: x * c, rng.randint(1, 2),
        (rng.randint(3, 12), 0, -rng.randint(1, 9), rng.randint(13, 30)),
        f"return x * {c}",
        {"off_by_one": f"return x * {c + 1}", "wrong_operator": f"return x + {c}"},
    )


def _floordiv_const(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"div_{c}", "x", f"Return x divided by {c}, rounded down.", lambda x: x // c, c * rng.randint(2, 9),
        (c * rng.randint(2, 9) + rng.randint(1, c - 1), c - 1, 0, -1, -c * rng.randint(1, 5)),
        f"return x // {c}",
        {
            "off_by_one": f"return (x + 1) // {c}",
            "wrong_operator": f"return x / {c}",
            "missed_edge_case": f"return int(x / {c})",
        },
    )


def _mod_const(c: int, rng: random.Random) -> _Problem:
    bugs = {"off_by_one": f"return x % {c + 1}", "wrong_operator": f"return x // {c}"}
    if c > 2:  # for c == 2, abs(x) % 2 == x % 2 on every integer
        bugs["missed_edge_case"] = f"return abs(x) % {c}"
    return _Problem(
        f"mod_{c}", "x", f"Return x modulo {c}, a value from 0 to {c - 1}.", lambda x: x % c,
        c * rng.randint(2, 5) + rng.randint(0, c - 1),
        (c * rng.randint(6, 9) + rng.randint(1, c - 1), c, 0, -1),
        f"return x % {c}",
        bugs,
    )


def _square_plus(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"sq_plus_{c}", "x", f"Return x squared plus {c}.", lambda x: x * x + c, rng.randint(1, 2),
        (rng.randint(3, 9), 0, -rng.randint(1, 9), rng.randint(10, 20)),
        f"return x * x + {c}",
        {"off_by_one": f"return x * x + {c + 1}", "wrong_operator": f"return x * 2 + {c}"},
    )


# strings ------------------------------------------------------------------------------------------------------------


def _count_char(ch: str, rng: random.Random) -> _Problem:
    return _Problem(
        f"count_{ch}", "s", f"Return how many times '{ch}' appears in s.", lambda s: s.count(ch),
        _insert(rng, _word(rng, 2, ch), ch, 1),
        (_insert(rng, _word(rng, 4, ch), ch, 2), _word(rng, 5, ch), ch * 3, ""),
        f"return s.count('{ch}')",
        {
            "off_by_one": f"return s[1:].count('{ch}')",
            "infinite_loop": f"n = i = 0\nwhile i < len(s):\n    n += s[i] == '{ch}'\nreturn n",
        },
    )


def _drop_char(ch: str, rng: random.Random) -> _Problem:
    return _Problem(
        f"drop_{ch}", "s", f"Return s with every '{ch}' removed.", lambda s: s.replace(ch, ""),
        _insert(rng, _word(rng, 3, ch), ch, 1),
        (_insert(rng, _word(rng, 4, ch), ch, 2, inner=True), ch + _word(rng, 3, ch) + ch, _word(rng, 4, ch), ""),
        f"return s.replace('{ch}', '')",
        {"missed_edge_case": f"return s.replace('{ch}', '', 1)"},
    )


def _starts_with(ch: str, rng: random.Random) -> _Problem:
    return _Problem(
        f"starts_{ch}", "s", f"Return True if s starts with '{ch}', else False.", lambda s: s.startswith(ch),
        ch + _word(rng, 2, ch),
        (ch + _word(rng, 3, ch), _word(rng, 3, ch) + ch, "", ch, _insert(rng, _word(rng, 3, ch), ch, 1, inner=True)),
        f"return s.startswith('{ch}')",
        {"off_by_one": f"return s[1:2] == '{ch}'", "wrong_operator": f"return s[:1] != '{ch}'"},
    )


def _wrap_char(ch: str, rng: random.Random) -> _Problem:
    return _Problem(
        f"wrap_{ch}", "s", f"Return s with '{ch}' added at both ends.", lambda s: ch + s + ch,
        _word(rng, 2, ch),
        (_word(rng, 3, ch), "", ch, _word(rng, 1, ch)),
        f"return '{ch}' + s + '{ch}'",
        {"off_by_one": f"return '{ch}' + s"},
    )


def _first_n(n: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"first_{n}", "s", f"Return the first {n} characters of s.", lambda s: s[:n],
        _word(rng, n + 1),
        (_word(rng, n + rng.randint(2, 4)), _word(rng, rng.randint(1, n - 1)), "", _word(rng, n)),
        f"return s[:{n}]",
        {"off_by_one": f"return s[:{n + 1}]", "wrong_operator": f"return s[-{n}:]"},
    )


# lists --------------------------------------------------------------------------------------------------------------


def _add_each(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"add_each_{c}", "xs", f"Return xs with {c} added to each item.", lambda xs: [x + c for x in xs],
        rng.sample(range(1, 10), 2),
        (rng.sample(range(1, 10), 3), [], [0], [-rng.randint(1, 9), rng.randint(10, 20)]),
        f"return [x + {c} for x in xs]",
        {"off_by_one": f"return [x + {c + 1} for x in xs]", "wrong_operator": f"return [x * {c} for x in xs]"},
    )


def _count_over(t: int, rng: random.Random) -> _Problem:
    first = [t - rng.randint(1, 5), t, t + rng.randint(1, 4), t + rng.randint(5, 9)]
    rng.shuffle(first)
    return _Problem(
        f"count_over_{t}", "xs", f"Return how many items of xs are greater than {t}.",
        lambda xs: len([x for x in xs if x > t]),
        [t - rng.randint(1, 9), t + rng.randint(1, 9)],
        (first, [], [t], [t + 1, t + rng.randint(2, 9)]),
        f"return len([x for x in xs if x > {t}])",
        {
            "off_by_one": f"return len([x for x in xs if x >= {t}])",
            "wrong_operator": f"return len([x for x in xs if x < {t}])",
            "infinite_loop": f"n = i = 0\nwhile i < len(xs):\n    n += xs[i] > {t}\nreturn n",
        },
    )


def _multiples_of(k: int, rng: random.Random) -> _Problem:
    m1, m2 = rng.sample(range(2, 6), 2)
    return _Problem(
        f"multiples_of_{k}", "xs", f"Return the items of xs that are multiples of {k}.",
        lambda xs: [x for x in xs if x % k == 0],
        [k * rng.randint(2, 6), k * rng.randint(2, 6) + 1],
        ([k, k * m1 + rng.randint(1, k - 1), k * m2], [], [0, -k], [1]),
        f"return [x for x in xs if x % {k} == 0]",
        {
            "off_by_one": f"return [x for x in xs if x % {k + 1} == 0]",
            "wrong_operator": f"return [x for x in xs if x % {k} != 0]",
        },
    )


def _sum_times(c: int, rng: random.Random) -> _Problem:
    a = rng.randint(1, 9)
    return _Problem(
        f"sum_times_{c}", "xs", f"Return the sum of xs times {c}.", lambda xs: sum(xs) * c,
        rng.sample(range(1, 10), 2),
        (rng.sample(range(1, 10), 3), [], [-a, a], [rng.randint(10, 20)]),
        f"return sum(xs) * {c}",
        {
            "off_by_one": f"return sum(xs[1:]) * {c}",
            "wrong_operator": f"return sum(xs) + {c}",
            "infinite_loop": f"total = i = 0\nwhile i < len(xs):\n    total += xs[i]\nreturn total * {c}",
        },
    )


def _max_or(c: int, rng: random.Random) -> _Problem:
    first = rng.sample(range(-9, 30), 3)
    top = first.index(max(first))
    first[top], first[1] = first[1], first[top]  # largest item in the middle
    big, small = sorted(rng.sample(range(1, 20), 2), reverse=True)
    return _Problem(
        f"max_or_{c}", "xs", f"Return the largest item of xs, or {c} if xs is empty.",
        lambda xs: max(xs) if xs else c,
        rng.sample(range(1, 10), 2),
        (first, [-big, -small], [], [rng.randint(-9, 40)]),
        f"return max(xs) if xs else {c}",
        {
            "off_by_one": f"return max(xs[:-1], default={c})",
            "wrong_operator": f"return min(xs) if xs else {c}",
            "missed_edge_case": "return max(xs, default=0)",
        },
    )


# conditionals -------------------------------------------------------------------------------------------------------


def _cap(t: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"cap_{t}", "x", f"Return x, but never more than {t}.", lambda x: min(x, t), t + rng.randint(1, 9),
        (t + rng.randint(10, 20), t - rng.randint(1, 9), t, -rng.randint(1, 9)),
        f"return min(x, {t})",
        {"off_by_one": f"return min(x, {t - 1})", "wrong_operator": f"return max(x, {t})"},
    )


def _is_over(t: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"is_over_{t}", "x", f"Return True if x is greater than {t}, else False.", lambda x: x > t,
        t + rng.randint(10, 20),
        (t + rng.randint(1, 9), t, t - rng.randint(1, 9), -rng.randint(1, 9)),
        f"return x > {t}",
        {"off_by_one": f"return x >= {t}", "wrong_operator": f"return x < {t}"},
    )


def _distance(c: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"dist_{c}", "x", f"Return the distance between x and {c}.", lambda x: abs(x - c), c + rng.randint(10, 20),
        (c + rng.randint(1, 9), c - rng.randint(1, 9), c, 0),
        f"return abs(x - {c})",
        {
            "off_by_one": f"return abs(x - {c + 1})",
            "wrong_operator": f"return abs(x + {c})",
            "missed_edge_case": f"return x - {c}",
        },
    )


def _size_label(t: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"size_{t}", "x", f"Return 'big' if x is at least {t}, else 'small'.", lambda x: "big" if x >= t else "small",
        t + rng.randint(10, 20),
        (t + rng.randint(1, 9), t, t - 1, -rng.randint(1, 9)),
        f"return 'big' if x >= {t} else 'small'",
        {
            "off_by_one": f"return 'big' if x > {t} else 'small'",
            "wrong_operator": f"return 'big' if x <= {t} else 'small'",
        },
    )


def _in_range(t: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"in_range_{t}", "x", f"Return True if x is between 0 and {t}, inclusive.", lambda x: 0 <= x <= t,
        t + rng.randint(10, 20),
        (rng.randint(1, t - 1), t, t + rng.randint(1, 9), 0, -rng.randint(1, 9)),
        f"return 0 <= x <= {t}",
        {
            "off_by_one": f"return 0 <= x < {t}",
            "wrong_operator": f"return x >= 0 or x <= {t}",
            "missed_edge_case": f"return x <= {t}",
        },
    )


# loops --------------------------------------------------------------------------------------------------------------


def _sum_multiples(k: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"sum_mult_{k}", "n", f"Return the sum of the multiples of {k} below n.", lambda n: sum(range(0, n, k)),
        k * rng.randint(3, 5),
        (k * rng.randint(3, 6) + rng.randint(1, k - 1), 2 * k, 0, 1),
        f"return sum(range(0, n, {k}))",
        {
            "off_by_one": f"return sum(range(0, n + 1, {k}))",
            "infinite_loop": "total = i = 0\nwhile i < n:\n    total += i\nreturn total",
        },
    )


def _power(b: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"pow_{b}", "n", f"Return {b} to the power n, for n >= 0.", lambda n: b**n, 2,
        (rng.randint(3, 4), 0, 1, 5),
        f"r = 1\nfor _ in range(n):\n    r *= {b}\nreturn r",
        {
            "off_by_one": f"r = 1\nfor _ in range(n + 1):\n    r *= {b}\nreturn r",
            "wrong_operator": f"r = 1\nfor _ in range(n):\n    r += {b}\nreturn r",
            "infinite_loop": f"r = 1\nwhile n > 0:\n    r *= {b}\nreturn r",
        },
    )


def _sum_from(a: int, rng: random.Random) -> _Problem:
    return _Problem(
        f"sum_from_{a}", "n", f"Return the sum of the integers from {a} to n, inclusive.",
        lambda n: sum(range(a, n + 1)), a + rng.randint(1, 3),
        (a + rng.randint(4, 8), a, 0, a - 3 if a != 3 else -2),
        f"return sum(range({a}, n + 1))",
        {
            "off_by_one": f"return sum(range({a}, n))",
            "missed_edge_case": f"return (n - {a} + 1) * ({a} + n) // 2",
            "infinite_loop": f"total, i = 0, {a}\nwhile i <= n:\n    total += i\nreturn total",
        },
    )


def _doublings(t: int, rng: random.Random) -> _Problem:
    def ref(n: int) -> int:
        k = 0
        while n < t:
            n, k = n * 2, k + 1
        return k

    return _Problem(
        f"doublings_{t}", "n", f"Return how many times n (n > 0) must be doubled to reach at least {t}.", ref,
        rng.randint(2, t - 2),
        (1, t, t - 1, t + rng.randint(1, 9)),
        f"k = 0\nwhile n < {t}:\n    n *= 2\n    k += 1\nreturn k",
        {
            "off_by_one": f"k = 0\nwhile n <= {t}:\n    n *= 2\n    k += 1\nreturn k",
            "infinite_loop": f"k = 0\nwhile n < {t}:\n    n * 2\n    k += 1\nreturn k",
        },
    )


def _halvings(k: int, rng: random.Random) -> _Problem:
    def ref(n: int) -> int:
        c = 0
        while n > 0:
            n, c = n // k, c + 1
        return c

    return _Problem(
        f"halvings_{k}", "n", f"Return how many times n must be floor-divided by {k} to reach 0.", ref,
        k * rng.randint(2, k - 1) if k > 2 else 3,
        (k * k + rng.randint(0, k - 1), 0, 1, k),
        f"c = 0\nwhile n > 0:\n    n //= {k}\n    c += 1\nreturn c",
        {
            "off_by_one": f"c = 1\nwhile n > 0:\n    n //= {k}\n    c += 1\nreturn c",
            "wrong_operator": f"c = 0\nwhile n > 0:\n    n -= {k}\n    c += 1\nreturn c",
            "infinite_loop": f"c = 0\nwhile n > 0:\n    n // {k}\n    c += 1\nreturn c",
        },
    )


_INTS = tuple(range(2, 41))
_TEMPLATES: dict[str, tuple[_Template, ...]] = {
    "arithmetic": (
        _Template("arithmetic", "add_const", _INTS, _add_const),
        _Template("arithmetic", "times_const", _INTS, _times_const),
        _Template("arithmetic", "floordiv_const", _INTS, _floordiv_const),
        _Template("arithmetic", "mod_const", _INTS, _mod_const),
        _Template("arithmetic", "square_plus", _INTS, _square_plus),
    ),
    "strings": (
        _Template("strings", "count_char", tuple(_LETTERS), _count_char),
        _Template("strings", "drop_char", tuple(_LETTERS), _drop_char),
        _Template("strings", "starts_with", tuple(_LETTERS), _starts_with),
        _Template("strings", "wrap_char", tuple(_LETTERS), _wrap_char),
        _Template("strings", "first_n", tuple(range(2, 23)), _first_n),
    ),
    "lists": (
        _Template("lists", "add_each", _INTS, _add_each),
        _Template("lists", "count_over", tuple(range(1, 41)), _count_over),
        _Template("lists", "multiples_of", tuple(range(2, 31)), _multiples_of),
        _Template("lists", "sum_times", _INTS, _sum_times),
        _Template("lists", "max_or", tuple(range(1, 41)), _max_or),
    ),
    "conditionals": (
        _Template("conditionals", "cap", _INTS, _cap),
        _Template("conditionals", "is_over", tuple(range(1, 41)), _is_over),
        _Template("conditionals", "distance", tuple(range(1, 41)), _distance),
        _Template("conditionals", "size_label", tuple(range(1, 41)), _size_label),
        _Template("conditionals", "in_range", _INTS, _in_range),
    ),
    "loops": (
        _Template("loops", "sum_multiples", tuple(range(2, 31)), _sum_multiples),
        _Template("loops", "power", tuple(range(2, 31)), _power),
        _Template("loops", "sum_from", tuple(range(1, 41)), _sum_from),
        _Template("loops", "doublings", tuple(range(4, 61)), _doublings),
        _Template("loops", "halvings", tuple(range(2, 31)), _halvings),
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# Assembly: prompt, test, incorrect completions, and the split.


def _indent(body: str) -> str:
    return "".join(f"    {line}\n" for line in body.split("\n"))


def _fails_to_compile(source: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<task>", "exec")
        except SyntaxError:
            return True
    return False


_DANGLING_OPERAND = re.compile(r"^(.*\s(?:\+|-|\*|//|%|<=|>=|<|>|==|!=))\s\S+$")


def _syntax_error_candidates(body: str) -> list[str]:
    """Realistic broken versions of an indented body (not all of them are guaranteed to be syntax errors)."""
    lines = body.rstrip("\n").split("\n")
    out: list[str] = []

    def joined(new_lines: list[str]) -> str:
        return "\n".join(new_lines) + "\n"

    for i, line in enumerate(lines):  # missing colon after for/while/if
        if line.rstrip().endswith(":"):
            out.append(joined(lines[:i] + [line.rstrip()[:-1]] + lines[i + 1 :]))
            break
    for closer in (")", "]", "'"):  # unclosed bracket or string
        pos = body.rfind(closer)
        if pos >= 0:
            out.append(body[:pos] + body[pos + 1 :])
    for i, line in enumerate(lines):  # expression cut short after an operator
        match = _DANGLING_OPERAND.match(line)
        if match:
            out.append(joined(lines[:i] + [match.group(1)] + lines[i + 1 :]))
            break
    if "return " in body:
        out.append(body.replace("return ", "retrun ", 1))
    out.append("  " + body[4:])  # body indented by two spaces under a four-space docstring
    return out


def _syntax_error(prompt: str, body: str, rng: random.Random) -> str:
    candidates = _syntax_error_candidates(body)
    rng.shuffle(candidates)
    for candidate in candidates:
        if _fails_to_compile(prompt + candidate):
            return candidate
    raise RuntimeError(f"no syntax-error variant of {body!r} fails to compile")  # the indentation one always does


def _build_task(template: _Template, param: Any, split: str, seed: int) -> CodeTask:
    rng = random.Random(f"lit_align.task_suite/{seed}/{template.family}/{template.name}/{param}")
    problem = template.build(param, rng)
    task_id = f"suite/{template.family}/{template.name}/{param}"
    name = problem.entry_point
    prompt = (
        f"def {name}({problem.arg}):\n"
        f'    """{problem.doc}\n'
        f"    >>> {name}({problem.example!r})\n"
        f"    {problem.ref(problem.example)!r}\n"
        f'    """\n'
    )
    asserts = []
    for value in problem.inputs:
        expected = problem.ref(value)
        if expected is None:
            raise RuntimeError(f"{task_id}: expected value None would let a bare `pass` pass")
        asserts.append(f"    assert candidate({value!r}) == {expected!r}\n")
    test = "def check(candidate):\n" + "".join(asserts)
    canonical = _indent(problem.canonical)
    bodies = {kind: _indent(body) for kind, body in problem.bugs.items()}
    bodies["syntax_error"] = _syntax_error(prompt, canonical, rng)
    bodies["bare_pass"] = _BARE_PASS
    incorrect = tuple((kind, bodies[kind]) for kind in INCORRECT_KINDS if kind in bodies)

    if _fails_to_compile(prompt + canonical):
        raise RuntimeError(f"{task_id}: canonical solution does not compile")
    completions = [canonical] + [c for _, c in incorrect]
    if len(set(completions)) != len(completions):
        raise RuntimeError(f"{task_id}: incorrect solutions must differ from the canonical one and from each other")
    if not any(kind in bodies for kind in BEHAVIOURAL_KINDS):
        raise RuntimeError(f"{task_id}: needs at least one behavioural bug")
    return CodeTask(
        task_id=task_id,
        family=template.family,
        split=split,
        prompt=prompt,
        entry_point=name,
        canonical_solution=canonical,
        test=test,
        incorrect_solutions=incorrect,
    )


def _heldout_pool(template: _Template, seed: int, heldout_fraction: float) -> tuple[list[Any], list[Any]]:
    """Split a template's parameter values into (train values, held-out values) for a seed.

    Held-out values come from inside the range (never the smallest or largest value, which train always uses), so a
    held-out problem asks the model to interpolate between parameters it saw; the split does not depend on
    ``problems_per_family``.
    """
    rng = random.Random(f"lit_align.task_suite/{seed}/{template.family}/{template.name}/split")
    inner = list(template.pool[1:-1])
    rng.shuffle(inner)
    n_heldout = min(len(inner), max(1, round(len(template.pool) * heldout_fraction)))
    heldout = inner[:n_heldout]
    train = [p for p in template.pool if p not in heldout]
    return train, heldout


def generate_task_suite(seed: int = 0, problems_per_family: int = 60, heldout_fraction: float = 0.25) -> list[CodeTask]:
    """Build the suite: ``problems_per_family`` tasks for each of :data:`FAMILIES`, split by template parameter.

    Args:
        seed: picks the parameters, the held-out values and the test inputs; the same seed gives the same suite.
        problems_per_family: tasks per family, shared evenly among its templates (at least 2 per template).
        heldout_fraction: share of each template's parameter values reserved for held-out tasks, and roughly the
            share of held-out tasks; in (0, 1).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) or not (
        0.0 < heldout_fraction < 1.0
    ):
        raise ValueError(f"heldout_fraction must be a number strictly between 0 and 1, got {heldout_fraction!r}")
    min_per_family = 2 * max(len(t) for t in _TEMPLATES.values())
    if isinstance(problems_per_family, bool) or not isinstance(problems_per_family, int) or (
        problems_per_family < min_per_family
    ):
        raise ValueError(
            f"problems_per_family must be an int >= {min_per_family} (2 per template), got {problems_per_family!r}"
        )
    tasks: list[CodeTask] = []
    for family in FAMILIES:
        templates = _TEMPLATES[family]
        base, extra = divmod(problems_per_family, len(templates))
        for index, template in enumerate(templates):
            n = base + (1 if index < extra else 0)
            train_pool, heldout_pool = _heldout_pool(template, seed, heldout_fraction)
            n_heldout = min(n - 1, max(1, round(n * heldout_fraction)))
            n_train = n - n_heldout
            if n_heldout > len(heldout_pool) or n_train > len(train_pool):
                raise ValueError(
                    f"problems_per_family={problems_per_family} with heldout_fraction={heldout_fraction} asks template"
                    f" {family}/{template.name} for {n_train} train and {n_heldout} held-out problems, but it has only"
                    f" {len(train_pool)} train and {len(heldout_pool)} held-out parameter values; lower"
                    f" problems_per_family"
                )
            rng = random.Random(f"lit_align.task_suite/{seed}/{family}/{template.name}/pick")
            ends = [template.pool[0], template.pool[-1]][:n_train]  # train always spans the whole range
            middle = [p for p in train_pool if p not in ends]
            chosen = {
                "train": sorted(ends + rng.sample(middle, n_train - len(ends)), key=template.pool.index),
                "heldout": sorted(rng.sample(heldout_pool, n_heldout), key=template.pool.index),
            }
            for split, params in chosen.items():
                tasks.extend(_build_task(template, param, split, seed) for param in params)
    return tasks


def validation_tasks(seed: int = 0, problems_per_family: int = 60, heldout_fraction: float = 0.25) -> list[CodeTask]:
    """A split for choosing settings without looking at the reported one: a problem for every held-out parameter
    value that the suite's ``heldout`` split (for these arguments) does not use. Held-out values are never in any
    train split, whatever its size, so a model trained on a larger suite has not seen these either; and they are not
    the problems the ``heldout`` split reports. Same templates, tests and prompts as the other splits."""
    heldout = {t.task_id for t in load_task_suite("heldout", seed, problems_per_family=problems_per_family,
                                                  heldout_fraction=heldout_fraction)}
    tasks = []
    for family in FAMILIES:
        for template in _TEMPLATES[family]:
            _, pool = _heldout_pool(template, seed, heldout_fraction)
            built = (_build_task(template, param, "validation", seed) for param in sorted(pool, key=template.pool.index))
            tasks.extend(t for t in built if t.task_id not in heldout)
    return tasks


@functools.lru_cache(maxsize=8)
def _cached_suite(seed: int, kwargs: tuple[tuple[str, Any], ...]) -> tuple[CodeTask, ...]:
    return tuple(generate_task_suite(seed=seed, **dict(kwargs)))


def load_task_suite(split: str | None = None, seed: int = 0, **kwargs: Any) -> list[CodeTask]:
    """The suite (cached per arguments), optionally one split of it.

    Args:
        split: ``"train"``, ``"heldout"``, ``"validation"`` (:func:`validation_tasks`), or None for every train and
            held-out task.
        seed: passed to :func:`generate_task_suite`.
        **kwargs: ``problems_per_family`` and ``heldout_fraction`` for :func:`generate_task_suite` (None: its
            default). The held-out parameter values do not depend on ``problems_per_family``, so training on a
            larger suite's train split and evaluating on the default suite's held-out split never leaks a problem.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if split == "validation":
        return validation_tasks(seed, **kwargs)
    tasks = _cached_suite(seed, tuple(sorted(kwargs.items())))
    return [t for t in tasks if split is None or t.split == split]


def write_jsonl(tasks: Iterable[CodeTask], path: str | Path) -> Path:
    """Write one :meth:`CodeTask.to_dict` per line (a HumanEval problems file with extra keys); returns the path.

    Args:
        tasks: the tasks to write.
        path: the ``.jsonl`` file to create (parent folders are created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task.to_dict()) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[CodeTask]:
    """Read tasks written by :func:`write_jsonl`; blank lines are skipped.

    Args:
        path: the ``.jsonl`` file to read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task suite file not found: {path}")
    tasks = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                tasks.append(CodeTask.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: {err}") from err
    return tasks
