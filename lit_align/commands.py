"""The ``lit_align`` console command: its commands and their dispatch, importable without Lightning.

``lit_align evaluate``, ``sample``, ``plan-memory``, ``merge-lora`` and ``iadpo`` run their own modules, and
``lit_align --help`` and a missing or mistyped command are answered here, so none of them waits for Lightning's
import (several seconds: it pulls in torch's compiler stack and torchmetrics). The trainer commands (fit, validate,
test) go to :func:`lit_align.cli.run_trainer_command`, LightningCLI's. LightningCLI's fourth, predict, is not one: no
lit_align module has a prediction step, and drawing completions from a trained model is ``lit_align sample``.
"""

from __future__ import annotations

import importlib
import os
import sys
import typing

from lit_align.hints import nearest_options

# Subcommands that are not trainer runs: name -> "module:function" taking argv and returning an exit code.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("lit_align.sample:main", "sample completions for a benchmark's problems into a samples file"),
    "evaluate": ("lit_align.execution.evaluate:main", "score a samples file against a benchmark: pass@k, statuses"),
    "plan-memory": ("lit_align.memory:main", "estimate per-device memory of a config before allocating anything"),
    "merge-lora": ("lit_align.callbacks.lora_merge:main", "merge a checkpoint's LoRA adapter into a standard HF model directory"),
    "iadpo": ("lit_align.iadpo:main", "run iterative adversarial DPO: student/oracle rounds with margin resampling"),
}

TRAINER_COMMANDS = ("fit", "validate", "test")
"""LightningCLI's subcommands that lit_align keeps: training runs, each taking ``--config FILE.yaml``."""

TRAINER_HELP = {"fit": "train (and validate) a model; --ckpt_path resumes a run",
                "validate": "one pass over the validation data, reporting its metrics",
                "test": "the validation pass again (val_sources: no data module holds a separate test set), its "
                        "metrics named test/*"}

NOT_COMMANDS = {"predict": "lit_align has no predict command (no module has a prediction step): draw completions from "
                           "a trained model with 'lit_align sample --model DIR --benchmark NAME --output samples.jsonl', "
                           "score them with 'lit_align evaluate', or add the PassAtK callback to a fit"}
"""LightningCLI subcommands lit_align does not offer, and what to use instead."""

DESCRIPTION = "Align code-generation language models with SFT, reward models, DPO, ORPO, PPO, GRPO and RAFT."

ROOT_USAGE = "%(prog)s [-h] [-c CONFIG] {" + ",".join([*TRAINER_COMMANDS, *EXTRA_COMMANDS]) + "} ..."
"""Usage line of ``lit_align`` itself: argparse's names only the trainer subcommands its parser holds."""


def refuse_unknown_command(name: str | None) -> typing.NoReturn:
    """No command, or one that is neither a trainer subcommand nor one of :data:`EXTRA_COMMANDS`: a usage line naming
    every command, the nearest one to what was typed, and exit status 2 (LightningCLI's own message named only the
    trainer subcommands, so ``lit_align evalute`` was told to choose from fit, validate, test and predict)."""
    commands = [*TRAINER_COMMANDS, *EXTRA_COMMANDS]
    lines = [f"usage: {ROOT_USAGE % {'prog': 'lit_align'}}",
             f"lit_align: error: unknown command {name!r}" if name is not None else "lit_align: error: no command given"]
    if name is not None and (matches := nearest_options(name, commands)):
        lines.append("  hint: did you mean " + " or ".join(repr(m) for m in matches) + "?")
    lines.append(f"  commands: {', '.join(TRAINER_COMMANDS)} (training runs, each with --config FILE.yaml) and "
                 f"{', '.join(EXTRA_COMMANDS)}; 'lit_align --help' describes them")
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


def root_help() -> str:
    """``lit_align --help``: every command, one line each (LightningCLI's own described only its four, cut mid-sentence
    from their docstrings)."""
    width = max(map(len, [*TRAINER_COMMANDS, *EXTRA_COMMANDS])) + 2
    lines = [f"usage: {ROOT_USAGE % {'prog': 'lit_align'}}", "", DESCRIPTION, "",
             "training runs (each takes --config FILE.yaml; 'lit_align fit --help' lists every option):"]
    lines += [f"  {name:<{width}}{TRAINER_HELP[name]}" for name in TRAINER_COMMANDS]
    lines += ["", "other commands (each takes --help):"]
    lines += [f"  {name:<{width}}{help_}" for name, (_, help_) in EXTRA_COMMANDS.items()]
    lines += ["", "options:", "  -h, --help       show this help and exit",
              "  -V, --version    show lit_align's version, the releases it runs with and the CPU, and exit",
              "  -c, --config     a config file holding each command's settings under its name (fit: {trainer: ...})",
              "",
              "example: lit_align fit --config configs/quickstart/dpo.yaml --trainer.max_steps 50"]
    return "\n".join(lines)


def version_text() -> str:
    """``lit_align --version``: its own version, then what a result depends on, one per line, as ``results.json``
    records it (Python, torch, transformers, tokenizers, lightning, peft, numpy, and the CPU with torch's kernels for
    it), to paste into a bug report or compare two machines."""
    from lit_align import __version__
    from lit_align.report import environment

    env = environment()
    lines = [f"lit_align {__version__}", f"python {env['python']}"]
    lines += [f"{name} {release}" for name, release in env["packages"].items()]
    lines.append(f"cpu {env['cpu']['model']} (torch kernels {env['cpu']['kernels']})")
    return "\n".join(lines)


def run_extra_command(name: str, argv: list[str]) -> int:
    target, _ = EXTRA_COMMANDS[name]
    module_name, func_name = target.split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (:func:`dispatch`), quiet when its reader goes away (``lit_align --help | head``): the
    rest of the output is dropped and the exit status is 141, a shell's for a broken pipe, without Python's
    BrokenPipeError traceback."""
    try:
        try:
            return dispatch(argv)
        finally:
            sys.stdout.flush()  # here, not at the interpreter's exit, where a broken pipe can only be reported
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush cannot fail
        return 141


def importable_working_directory() -> None:
    """Let a config name a class of the user's own by its module in the directory the command runs from
    (``--model.class_path my_objectives.IPO`` next to ``my_objectives.py``), as ``python -m`` would: the console
    script's ``sys.path`` starts with the script's own folder, not the working directory. Appended, so a file there
    never shadows an installed package."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under the shell
        return
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def dispatch(argv: list[str] | None = None) -> int:
    """The command ``argv`` names; ``argv`` is for calls from Python (tests), the command line is read otherwise.

    From the command line, bad input found after parsing (a model that cannot be loaded, bad data, an output
    directory holding another run) ends with a one-line error and exit status 2 instead of a traceback; called from
    Python, the exception propagates."""
    args = sys.argv[1:] if argv is None else list(argv)
    importable_working_directory()
    if args and args[0] in EXTRA_COMMANDS:
        return run_extra_command(args[0], args[1:])
    if args and args[0] in NOT_COMMANDS:
        print(f"lit_align: error: {NOT_COMMANDS[args[0]]}", file=sys.stderr)
        raise SystemExit(2)
    if args in (["-h"], ["--help"]):
        print(root_help())
        raise SystemExit(0)  # as argparse's --help does, here and in every command
    if args in (["-V"], ["--version"]):
        print(version_text())
        raise SystemExit(0)
    if not args or not (args[0].startswith("-") or args[0] in TRAINER_COMMANDS):
        refuse_unknown_command(args[0] if args else None)
    from lit_align.cli import run_trainer_command

    return run_trainer_command(argv)


if __name__ == "__main__":
    sys.exit(main())
