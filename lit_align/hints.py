"""Suggestions for mistyped command-line options, shared by ``lit_align fit`` (LightningCLI's parser) and the plain
argparse commands (``lit_align sample``, ``evaluate``, ``plan-memory``, ``merge-lora``, ``iadpo``, ...)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import typing


def nearest_options(option: str, options: list[str]) -> list[str]:
    """The dotted ``options`` a mistyped ``option`` most likely meant, at most three: those with its last name
    (``lr`` -> ``optimizer.lr``), else those it is a prefix of (``max-new`` -> ``max-new-tokens``), else the closest
    spellings (``trainr.max_steps`` -> ``trainer.max_steps``, not also ``trainer.min_steps``: only spellings about as
    close as the closest are kept)."""
    matches = [o for o in options if o.rpartition(".")[2] == option.rpartition(".")[2] and o != option]
    if matches:
        return matches[:3]
    if matches := [o for o in options if o.startswith(option) and o != option]:  # a prefix: options are named in full
        return matches[:3]
    scored = sorted(((difflib.SequenceMatcher(None, option, o).ratio(), o) for o in options), reverse=True)
    return [o for score, o in scored[:3] if score >= 0.75 and score >= scored[0][0] - 0.03] if scored else []


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The ``--options`` of ``parser``, without the dashes (``trainer.max_steps``, ``ckpt_path``)."""
    return [s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")]


def did_you_mean(matches: list[str]) -> str:
    return "did you mean " + " or ".join(f"--{o}" for o in matches) + "?"


def unknown_argument_hint(message: str, known: list[str]) -> str | None:
    """For argparse's "unrecognized arguments: --X ..." (the command line) and jsonargparse's "does not accept option
    'X'" (a config file's key): the ``known`` options (without ``--``) whose name ends like X or is close to it
    (``trainer.precission`` -> ``--trainer.precision``, ``max_steps`` -> ``--trainer.max_steps``)."""
    found = re.search(r"unrecognized arguments: (.*)", message)
    if found:
        unknown = [token[2:].partition("=")[0] for token in found.group(1).split() if token.startswith("--")]
    else:
        unknown = re.findall(r"does not accept option '([\w.]+)'", message)
    hints = []
    for option in unknown:
        if matches := nearest_options(option, known):
            hints.append(did_you_mean(matches) if len(unknown) == 1 else f"--{option}: {did_you_mean(matches)}")
    return "; ".join(hints) or None


class HintingArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors suggest the nearest real option for each mistyped one (``--outptu`` ->
    ``--output``), also where argparse reports something else first, such as a required option that is missing
    (because it was mistyped). Options are named in full (``allow_abbrev`` off, as on the ``lit_align fit`` command
    line): ``--out`` is refused with a hint, not taken for ``--output``."""

    _given: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_options(self) -> list[str]:
        """The ``--options`` given that are none of this parser's, nor (with ``allow_abbrev``) a prefix of one."""
        known = long_options(self)
        unknown = []
        for token in self._given:
            if token == "--":
                break
            name = token[2:].partition("=")[0]
            if not token.startswith("--") or name in known or (self.allow_abbrev and any(k.startswith(name) for k in known)):
                continue
            unknown.append(name)
        return list(dict.fromkeys(unknown))

    def error(self, message: str) -> typing.NoReturn:
        known = long_options(self)
        if "unrecognized arguments:" in message:
            hints = [hint] if (hint := unknown_argument_hint(message, known)) else []
        else:  # an option the user mistyped is not named by argparse's message: name it
            hints = [f"--{option} is not an option: {did_you_mean(matches)}" for option in self.unknown_options()
                     if (matches := nearest_options(option, known))]
        super().error("".join([message, *(f"\n  hint: {hint}" for hint in hints)]))
