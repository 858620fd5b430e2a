"""The ``lit_align`` command: LightningCLI's fit/validate/test plus lit_align's own subcommands.

    lit_align fit --config configs/quickstart/sft.yaml --model.init_args.lora.r 8 --trainer.max_steps 50
    lit_align sample --model runs/quickstart/sft-model --benchmark humaneval --n 10 --output samples.jsonl
    lit_align evaluate --benchmark humaneval --samples samples.jsonl --k 1 10

Modules and DataModules are given as ``class_path``/``init_args`` (short class names work: ``class_path: SFT``).
Every run writes its logs, its resolved ``config.yaml`` and its checkpoints under a fresh versioned directory
(``runs/<name>/version_<n>``), so nothing already written is overwritten; an explicit checkpoint directory that
already holds checkpoints is refused unless the run resumes with ``--ckpt_path``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import logging
import pkgutil
import re
import sys
import traceback
import typing
import warnings
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lit_align.callbacks
import lit_align.data_modules
import lit_align.modules
from lit_align.callbacks.checkpoint import Checkpoint
from lit_align.callbacks.progress import ProgressBar
from lit_align.callbacks.summary import ModelSummary
from lit_align.data_modules.base import TokenizedDataModule
from lit_align.commands import DESCRIPTION, EXTRA_COMMANDS, ROOT_USAGE, TRAINER_COMMANDS, main  # noqa: F401 (main: python -m lit_align.cli, tests)
from lit_align.hints import did_you_mean, long_options, nearest_options, unknown_argument_hint
from lit_align.modules.base import AlignmentModule

SUBCOMMAND_USAGE = ("%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--ckpt_path PATH]\n"
                    "  [--seed_everything SEED] [--trainer.OPTION VALUE] [--checkpoint.OPTION VALUE]\n"
                    "  [--model CLASS] [--model.init_args.OPTION VALUE]\n"
                    "  [--data CLASS] [--data.init_args.OPTION VALUE]\n"
                    "  [--lr_monitor.OPTION VALUE] [--progress_bar.OPTION VALUE] [--model_summary.OPTION VALUE]")
"""Usage line of fit/validate/test (``--help`` lists every option below it)."""

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "lit_align"},
}


def import_submodules(package) -> None:
    """Import every module of a package so that config files can name its classes by their short names."""
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


for _package in (lit_align.modules, lit_align.data_modules, lit_align.callbacks):
    import_submodules(_package)


def init_options(cls: type) -> list[str]:
    """The dotted ``init_args`` options of ``cls``: its constructor's parameters and those of the classes it passes
    ``**kwargs`` to, with a dataclass parameter's fields under its name (``optimizer.lr``, ``lora.r``)."""
    options: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass.__module__.startswith(("lightning.", "torch.")):
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: names only
            hints = {}
        params = inspect.signature(init).parameters.values()
        for param in params:
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            options.append(param.name)
            for kind in typing.get_args(hints.get(param.name)) or (hints.get(param.name),):
                if dataclasses.is_dataclass(kind):
                    options += [f"{param.name}.{f.name}" for f in dataclasses.fields(kind)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(options))


def unknown_class_option(message: str) -> tuple[str, str, str, list[str]] | None:
    """For jsonargparse's "Option 'X' is not accepted" about a ``--model``/``--data`` class (the command line or a
    config file's key): ``(key, class name, dotted option under init_args, the class's options nearest to it)``, the
    nearest being those whose name ends like X or is close to it (``lr`` -> ``optimizer.lr``)."""
    found = re.search(r'Parser key "(\w+)"[\s\S]*?class_path \'([\w.]+)\'[\s\S]*?Option \'([\w.]+)\' is not accepted',
                      message)
    if found is None:
        return None
    key, class_path, option = found.groups()
    given = re.findall(r"NestedArg\(key='([\w.]+)'", message)
    # the whole dotted option under init_args: from the command line the outermost NestedArg; from a config file the
    # keys jsonargparse descended through after the class's own ("lora" for lora: {rr: 3})
    nested = re.findall(r'Parser key "(\w+)"', message)[1:]
    option = given[-1] if given else ".".join([*nested, option])
    module, _, name = class_path.rpartition(".")
    try:
        options = init_options(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        options = []
    return key, name, option, nearest_options(option, options)


def class_value_error(message: str) -> str | None:
    """jsonargparse's error for a value a ``--model``/``--data`` class's option refuses by type, nested through a union
    per class (``model`` -> SFT -> ``lora`` -> LoRAConfig -> ``r``), as one line: ``model.init_args.lora.r: Expected a
    <class 'int'>. Got value: abc``. None for any other message."""
    lines = message.splitlines()
    if not lines or not re.fullmatch(r'Parser key "(model|data)":', lines[0].strip()):
        return None
    chain: list[tuple[int, str]] = []
    detail: list[str] = []
    last = 0
    for i, line in enumerate(lines):
        found = re.fullmatch(r'(\s*)Parser key "([\w.]+)":', line)
        if found is None:
            continue
        last = i
        indent = len(found.group(1))
        if chain and indent <= chain[-1][0]:
            return None  # a second error beside the first: leave jsonargparse's message as it is
        chain.append((indent, found.group(2)))
        following = lines[i + 1:]
        if following and following[0].strip() != "Does not validate against any of the Union subtypes":
            for text in following:
                if len(text) - len(text.lstrip()) <= indent:
                    break
                detail.append(text.strip())
            break
    keys = [key for _, key in chain]
    option = f"{keys[0]}.init_args.{'.'.join(keys[1:])}"
    if len(chain) >= 2 and not detail:  # the option's own type is a union (``int | None``): its simple alternatives
        detail = _union_value_error(lines[last + 1:], chain[-1][0], option)
    if len(chain) < 2 or not detail:
        return None
    return f"{option}: {_literal_choices(' '.join(detail))}"


def _literal_choices(text: str) -> str:
    """jsonargparse's "Expected a typing.Literal['float32', 'bfloat16']. Got value: float61" as "Expected one of
    float32, bfloat16. Got value: float61; did you mean float32?"; any other text as it is."""
    found = re.fullmatch(r"Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)", text)
    if found is None:
        return text
    return " ".join(_one_of([v.strip("'\"") for v in _top_level_items(found.group(1))], [], found.group(2)))


def _one_of(values: list[str], others: list[str], given: str) -> list[str]:
    """``["Expected one of a, b, or null.", "Got value: c; did you mean a?"]``: an option's fixed choices as a user
    types them, then its other accepted types (``others``, as :func:`_type_name` prints them), and the nearest choice."""
    nearest = nearest_options(given, values)
    expected = f"one of {', '.join(values)}" + "".join(f", or {'' if t == 'null' else 'a '}{t}" for t in others)
    return [f"Expected {expected}.", f"Got value: {given}" + (f"; did you mean {' or '.join(nearest)}?" if nearest
                                                              else "")]


def _union_value_error(block: list[str], indent: int, option: str) -> list[str]:
    """``["Expected a <class 'int'> or null.", "Got value: abc"]`` from jsonargparse's report of a value that none of
    a union's types (``int | None``, ``LoRAConfig | None``, ``list[DataSource] | None``, Literals) takes: the lines of
    ``block`` indented deeper than ``indent``; ``option`` is the dotted key (named in a dataclass's hint). [] where the
    report is not of that form."""
    block = list(itertools.takewhile(lambda text: not text.strip() or len(text) - len(text.lstrip()) > indent, block))
    levels = [len(text) - len(text.lstrip()) for text in block if text.strip()]
    own = [text.strip() for text in block if text.strip() and len(text) - len(text.lstrip()) == min(levels, default=0)]
    subtypes = next((text for text in own if text.startswith("Subtypes: [") and text.endswith("]")), None)
    given = [text.removeprefix("Given value: ") for text in own if text.startswith("Given value: ")]
    if subtypes is None or len(given) != 1:
        return []
    items = _top_level_items(subtypes[len("Subtypes: ["):-1])
    literal = [re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", item) for item in items]
    values = list(dict.fromkeys(v.strip("'\"") for found in literal if found for v in _top_level_items(found.group(1))))
    shown = [_type_name(item, option) for item, found in zip(items, literal) if found is None]
    if not (shown or values) or None in shown:
        return []
    if not values:
        return [f"Expected a {' or '.join(shown)}.", f"Got value: {given[0]}"]
    # Literal groups (trainer.precision has three: ints, names, and strings of the ints) as one list of plain values
    return _one_of(values, shown, given[0])


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: "A, list[B, C], D" -> ["A", "list[B, C]", "D"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return items + [text[start:].strip()]


def _type_name(text: str, option: str) -> str | None:
    """A union member as jsonargparse prints it, for one line: None as null, a dataclass with how its fields are
    given, module paths dropped (``list[lit_align.data_modules.sources.DataSource]`` -> ``list[DataSource]``)."""
    if text == "<class 'NoneType'>":
        return "null"
    found = re.fullmatch(r"<class '([\w.]+)'>", text)
    if found is None or "." not in found.group(1):
        return re.sub(r"\b(?:[a-z_]\w*\.)+([A-Z]\w*)", r"\1", text)
    module, _, name = found.group(1).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if dataclasses.is_dataclass(cls) and dataclasses.fields(cls):
        return f"{name} (its fields as options, e.g. --{option}.{dataclasses.fields(cls)[0].name})"
    return name


def top_level_value_error(message: str) -> str | None:
    """jsonargparse's error for a plain option's value of the wrong type (``--trainer.max_steps abc``, or one that none
    of a union's types takes: ``--trainer.precision bf17``) as one line naming the option; None for any other
    message."""
    lines = message.splitlines()
    found = re.fullmatch(r'Parser key "([\w.]+)":', lines[0].strip()) if lines else None
    if found is None or found.group(1) in ("model", "data") or message.count('Parser key "') > 1:
        return None
    rest = [text.strip() for text in lines[1:] if text.strip()]
    detail = rest if len(rest) == 1 else _union_value_error(lines[1:], 0, found.group(1))
    return f"{found.group(1)}: {_literal_choices(' '.join(detail))}" if detail else None


def lit_align_classes(base: type) -> list[str]:
    """The names of lit_align's classes that a config's ``class_path`` can name for ``base`` (AlignmentModule or
    LightningDataModule): its subclasses defined in lit_align that no other lit_align class derives from."""
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        inner = [c for c in cls.__subclasses__() if c.__module__.startswith("lit_align.")]
        if cls.__module__.startswith("lit_align.") and not inner and cls.__name__ not in found:
            found.append(cls.__name__)
    return sorted(found)


def unknown_class_hint(message: str) -> str | None:
    """For a ``--model``/``--data`` class that does not exist (``SFTT``, ``lit_align.modules.sft.SFTT``, a config's
    ``class_path``): the nearest of lit_align's classes for that key, and all of them."""
    if message.count('Parser key "') > 1:  # the class exists: the problem is one of its options' values
        return None
    key = re.search(r'Parser key "(model|data)"', message)
    name = re.search(r"Expected a dot import path string: (\S+)|module '[\w.]+' has no attribute '(\w+)'", message)
    if key is None or name is None:
        return None
    typed = (name.group(1) or name.group(2)).rpartition(".")[2]
    model = key.group(1) == "model"
    names = lit_align_classes(AlignmentModule if model else LightningDataModule)
    listed = f"lit_align's {'modules' if model else 'DataModules'}: {', '.join(names)}"
    matches = nearest_options(typed, names)
    return f"did you mean {' or '.join(matches)}? ({listed})" if matches else listed


def class_import_error(message: str) -> tuple[str, str | None] | None:
    """For a ``class_path`` that cannot be imported (``--model.class_path my_objectives.IPO`` run from a directory
    without ``my_objectives.py``, a class its module lacks, a short name no class has): one line naming the key and
    the path, and a hint: the nearest of lit_align's classes for a mistyped lit_align path, where lit_align looks for
    a module of the user's own when the module is missing."""
    key = re.match(r'\s*Parser key "([\w.]+)":', message)
    bare = re.search(r"Expected a dot import path string: (\S+)", message)
    if (key is not None and key.group(1) in ("model", "data") and bare is not None
            and message.count('Parser key "') == 1):  # a name that is no class's
        return (f"{key.group(1)}.class_path: {bare.group(1)} is neither a class lit_align knows by name nor an import "
                f"path (module.Class)", unknown_class_hint(message))
    found = re.search(r"Problem with given class_path '([^']+)':\s*(No module named '[^']+'|module '[\w.]+' has no "
                      r"attribute '\w+')", message)
    if key is None or found is None:
        return None
    path, reason = found.groups()
    line = f"{key.group(1)}.class_path: cannot import {path} ({reason})"
    if path.startswith("lit_align."):
        return line, unknown_class_hint(f'Parser key "{key.group(1)}"\nExpected a dot import path string: {path}')
    if reason.startswith("No module named"):
        return line, (f"a class of your own is imported from its module's file in the directory lit_align runs from "
                      f"({Path.cwd()}) or from a folder on PYTHONPATH")
    return line, None


class LitAlignParser(LightningArgumentParser):
    """LightningCLI's parser, whose error for an unknown option (of a module, a DataModule, the trainer, a callback)
    suggests the nearest real ones. Options are named in full: argparse's prefix matching would take ``--trainer.max_step``
    for ``--trainer.max_steps`` without a word, and a config or script written that way would break, or change meaning,
    once an option sharing the prefix is added."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        if not self.exit_on_error:  # a nested parser (a class's options): its message goes into the outer one's
            super().error(message, ex)
        parser = self
        subcommand = re.match(r"Subcommand '(\w+)' does not accept", message)  # a config file's key, found by the root
        if subcommand and getattr(self, "_subcommands_action", None) is not None:
            parser = self._subcommands_action._name_parser_map.get(subcommand.group(1), self)
        if unknown := unknown_class_option(message):  # jsonargparse's ten lines about union subtypes, in one
            key, name, option, matches = unknown
            command = (getattr(ex, "subcommand_parser", None) or parser).prog.replace(" [options]", "")
            if len(command.split()) == 1:  # parsed without a subcommand (quickstart --set, iadpo's fit): fit's help
                command += " fit"
            message = f"{key}.init_args.{option}: {name} has no such option ('{command} --{key}.help {name}' lists them)"
            hint = did_you_mean([f"{key}.init_args.{o}" for o in matches]) if matches else None
        elif import_error := class_import_error(message):
            message, hint = import_error
        elif value_error := class_value_error(message) or top_level_value_error(message):
            message, hint = value_error, None
        else:
            hint = unknown_class_hint(message) or unknown_argument_hint(message, long_options(parser))
        super().error(f"{message}\n  hint: {hint}" if hint else message, ex)


class OutputDirectoryError(RuntimeError):
    """The run would write into a directory that already holds another run's checkpoints."""


class LightningOptionError(RuntimeError):
    """Lightning refused a trainer or callback option (``--trainer.*``, ``--checkpoint.*``, ...) while the trainer and
    its callbacks were built, before anything ran: ``save_top_k`` without ``monitor``, an unknown strategy name."""


class ResumeOptionError(RuntimeError):
    """A module option given another value than the ``--ckpt_path`` checkpoint was trained with (LightningCLI would
    silently replace it with the checkpoint's)."""


class LitAlignCLI(LightningCLI):
    """LightningCLI with lit_align's defaults: always-on checkpointing, LR monitor and progress bar, versioned runs."""

    def __init__(self, *args, **kwargs) -> None:
        quiet_unactionable_output()  # also for the runs the quickstart and iadpo make through this class
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", LitAlignParser)
        kwargs.setdefault("auto_configure_optimizers", False)
        # our batch samplers shard across ranks themselves; Lightning's replacement sampler would break them
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER, "use_distributed_sampler": False})
        # the trainer subcommands' usage line names the option groups: argparse's own lists all ~80 options, and
        # jsonargparse prints it before every error (a wrong-typed override, an unknown option)
        kwargs.setdefault("parser_kwargs", {"description": _description(),
                                            **{name: {"usage": SUBCOMMAND_USAGE} for name in self.subcommands()}})
        super().__init__(AlignmentModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's, without predict (``commands.NOT_COMMANDS`` says what to use instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_COMMANDS}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """As LightningCLI's, then the root usage line names every command (set afterwards: argparse derives each
        subcommand's program name from the root's usage when the subcommand parser is made)."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.usage = ROOT_USAGE

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.monitor": None})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ProgressBar, "progress_bar")
        parser.add_lightning_class_args(ModelSummary, "model_summary")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """As LightningCLI's; the command line's options are kept for :meth:`_parse_ckpt_path`."""
        given = sys.argv[1:] if args is None else [] if isinstance(args, dict) or hasattr(args, "as_dict") else args
        self._command_line = [str(a).split("=", 1)[0] for a in given if str(a).startswith("--")]
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's: with ``--ckpt_path``, the checkpoint's hyperparameters replace the module options of the
        config and the command line. A ``--model.*`` option given on the command line with another value would be
        dropped without a word, so it is refused (``ResumeOptionError``), except those of :data:`RUNTIME_FIELDS`, which
        replace the checkpoint's with a line saying so; a config value that differs is replaced with a line saying so;
        a model path given as a link (LoRAMerge's ``link``) gives way to the directory the checkpoint
        recorded (``models.pinned_model_path``), with a line when the link has moved since."""
        given = self._module_options()
        super()._parse_ckpt_path()
        differences = _differences(given, self._module_options(), "model")
        changed = {key: value for key, (value, _) in differences.items()}
        resumed = {key: value for key, (_, value) in differences.items()}
        if not changed:
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        for key in [k for k in changed if k.rpartition(".")[2] in MODEL_PATH_FIELDS]:
            if isinstance(changed[key], str) and Path(changed[key]).expanduser().is_symlink():
                print(f"lit_align: {changed[key]} ({key}) now points at {Path(changed[key]).resolve()}; the run resumes on "
                      f"{resumed[key]}, the model {ckpt_path} was trained from", file=sys.stderr)
                del changed[key]
        for key in [k for k in changed if k.rpartition(".")[2] in RUNTIME_FIELDS and self._on_command_line(k)]:
            self.config[self.config.subcommand][key] = changed[key]
            print(f"lit_align: the run resumes with {key} {changed[key]!r} ({resumed[key]!r} in {ckpt_path}): it "
                  "changes how the model runs, not what it computes", file=sys.stderr)
            del changed[key]
        overridden = {key: value for key, value in changed.items() if self._on_command_line(key)}
        if overridden:
            raise ResumeOptionError(
                f"--ckpt_path {ckpt_path} resumes with the module options it was trained with, and "
                + ", ".join(f"{key} is {value!r} here but {resumed[key]!r} there" for key, value in overridden.items())
                + ": drop the override (or give the checkpoint's value), or train with new options as a new run from "
                  "the exported model (--model.init_args.model_name_or_path <run dir>/model)")
        for key, value in changed.items():
            print(f"lit_align: {key} is {resumed[key]!r} in {ckpt_path}, which the run resumes with (the config says "
                  f"{value!r})", file=sys.stderr)

    def _on_command_line(self, key: str) -> bool:
        """Whether the dotted module option ``key`` (``model.init_args.lora.r``), or an option group holding it
        (``--model.init_args.lora``; the short ``--model.lora.r`` too), was given on the command line (``--model
        DPO`` names the class, not its options)."""
        parts = key.split(".")
        if len(parts) < 3 or parts[1] != "init_args":
            return False
        options = {"--" + ".".join(parts[:i]) for i in range(3, len(parts) + 1)}
        options |= {"--" + ".".join([parts[0], *parts[2:i]]) for i in range(3, len(parts) + 1)}
        return any(option in options for option in getattr(self, "_command_line", ()))

    def _module_options(self) -> dict[str, typing.Any]:
        """The subcommand's ``model`` options as plain nested dicts."""
        return _plain(self.config[self.config.subcommand].get("model")) if self.config.get("subcommand") else {}

    def instantiate_classes(self) -> None:
        """As LightningCLI's, except that an option Lightning's own classes refuse while being built (the trainer, the
        checkpoint and other callbacks) raises a ``LightningOptionError``, shown without a traceback."""
        try:
            super().instantiate_classes()
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
            if not raised_in(err, Path(importlib.import_module("lightning").__file__).parent.resolve()):
                raise
            if "No supported gpu backend" in str(err):  # Lightning's whole message for accelerator gpu without one
                import torch

                raise LightningOptionError(
                    f"trainer.accelerator: gpu, but torch finds no GPU here (torch {torch.__version__}, CUDA "
                    f"{torch.version.cuda or 'not built in'}); --trainer.accelerator cpu --trainer.devices 1 runs on "
                    "the CPU") from err
            raise LightningOptionError(f"{err} (a --trainer or callback option; 'lit_align {self.subcommand} --help' "
                                       "lists them)") from err

    def instantiate_trainer(self, **kwargs):
        """As LightningCLI's, except that ``--trainer.enable_progress_bar false`` also drops the default progress bar,
        ``--trainer.enable_model_summary false`` the default model summary (Lightning refuses either beside it), and
        ``--trainer.logger false`` the default learning-rate monitor (Lightning refuses it without a logger)."""
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if trainer_config.get("enable_progress_bar") is False:
            extra = [cb for cb in extra if not isinstance(cb, RichProgressBar)]
        if trainer_config.get("enable_model_summary") is False:
            extra = [cb for cb in extra if not isinstance(cb, ModelSummary)]
        if trainer_config.get("logger") is False:  # Lightning refuses a learning-rate monitor with nothing to log to
            extra = [cb for cb in extra if not isinstance(cb, LearningRateMonitor)]
        return self._instantiate_trainer(trainer_config, extra)

    def before_fit(self) -> None:
        self.refuse_bad_inputs("fit")
        refuse_existing_checkpoints(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))
        refuse_existing_exports(self.trainer)
        if self.save_config_callback and not self.save_config_kwargs.get("overwrite"):
            refuse_existing_config(self.trainer, self.save_config_kwargs.get("config_filename", "config.yaml"))

    def before_validate(self) -> None:
        self.refuse_bad_inputs("validate")

    def before_test(self) -> None:
        self.refuse_bad_inputs("test")

    def refuse_bad_inputs(self, stage: str) -> None:
        """Model and data paths that do not exist, and data that cannot be trained on, are refused before the trainer
        starts: Lightning's setup hook starts the logger, which makes the run directory, before the DataModule's
        ``setup``, so lit_align's DataModules read their data here (once: their ``setup`` keeps what is built)."""
        refuse_missing_model_paths(self.model)
        refuse_unmatched_lora_targets(self.model)
        refuse_missing_backend(self.model)
        if isinstance(self.model, AlignmentModule):  # as its setup() would, but before the run directory is made
            try:
                self.model.refuse_unsupported_compile(self.trainer.strategy)
            except ValueError as err:
                raise LightningOptionError(f"model.init_args.{err}") from err
            try:
                self.model.refuse_incompatible_data(self.datamodule)
            except ValueError as err:
                raise LightningOptionError(f"data: {err}") from err
        if isinstance(self.datamodule, TokenizedDataModule):
            self.datamodule.read_before_trainer(self.model, stage)


def _plain(value):
    """A jsonargparse Namespace (or dataclass-like value) as plain dicts and lists."""
    value = value.as_dict() if hasattr(value, "as_dict") else value
    if isinstance(value, dict):
        return {key: _plain(inner) for key, inner in value.items()}
    return [_plain(inner) for inner in value] if isinstance(value, (list, tuple)) else value


def _differences(given, resumed, key: str) -> dict[str, tuple]:
    """Where the nested options ``resumed`` differ from ``given``, as dotted key: (given value, resumed value); a
    whole option group where one side is not a group (``lora: null`` against ``lora: {r: 4, ...}``)."""
    if isinstance(given, dict) and isinstance(resumed, dict):
        out = {}
        for name in [name for name in given if name in resumed]:  # in the options' order, not a set's (hash) order
            out.update(_differences(given[name], resumed[name], f"{key}.{name}"))
        return out
    return {} if given == resumed else {key: (given, resumed)}


RUNTIME_FIELDS = ("torch_compile", "gradient_checkpointing", "attn_implementation")
"""Module options that change how the model runs (speed, memory, kernels), not what it computes: given on the command
line with ``--ckpt_path``, they replace the checkpoint's (a run checkpointed on one machine resumes on another)."""

MODEL_PATH_FIELDS = ("model_name_or_path", "tokenizer_name_or_path", "reward_model")
"""Module options that name a model to load: a hub id, a preset, or a local directory (or checkpoint) path."""


def refuse_missing_model_paths(module) -> None:
    """A model option given as a local path (``models.looks_like_local_path``) that does not exist is refused before
    the trainer starts, so no run directory is made for a run that cannot load its model."""
    from lit_align.models import ModelLoadError, looks_like_local_path

    for field in MODEL_PATH_FIELDS:
        value = module.hparams.get(field)
        if isinstance(value, str) and looks_like_local_path(value) and not Path(value).expanduser().exists():
            raise ModelLoadError(f"model.init_args.{field}: {value!r} does not exist (train and export the stage that "
                                 "writes it first, or point at an existing model)")


def refuse_unmatched_lora_targets(module) -> None:
    """A ``lora.target_modules`` entry that names no linear layer of the policy's architecture is refused before the
    trainer starts (``models.check_lora_targets`` builds the network on the meta device, reading only its config)."""
    from lit_align.models import check_lora_targets

    lora = getattr(module, "lora_config", None)
    if lora is not None and isinstance(module.hparams.get("model_name_or_path"), str):
        check_lora_targets(module.hparams.model_name_or_path, lora)


def refuse_missing_backend(module) -> None:
    """An online objective whose ``generation_backend`` needs a package that is not installed (vllm) is refused before
    the trainer starts, not at its first rollout (the module itself can still be built, to read a checkpoint)."""
    from lit_align.generation.base import missing_requirement

    backend = module.hparams.get("generation_backend")
    hint = missing_requirement(backend) if isinstance(backend, str) else None
    if hint:
        raise LightningOptionError(f"model.init_args.generation_backend: {hint}; or use hf (the live policy) or openai "
                                   "(a server)")


def refuse_existing_checkpoints(trainer, ckpt_path: str | None) -> None:
    """A fresh run never writes into a checkpoint directory that already holds checkpoints."""
    if ckpt_path:
        return
    for cb in trainer.checkpoint_callbacks:
        # ModelCheckpoint's own default: <logger.log_dir>/checkpoints (a fresh version unless one was pinned)
        root = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
        dirpath = Path(cb.dirpath or Path(root) / "checkpoints")
        if dirpath.is_dir() and any(dirpath.glob("*.ckpt")):
            raise OutputDirectoryError(
                f"checkpoint directory {dirpath} already holds checkpoints of another run; resume it with "
                f"--ckpt_path {Path(dirpath) / 'last.ckpt'}, or choose another --checkpoint.dirpath / logger version")


def refuse_existing_config(trainer, filename: str) -> None:
    """The run's resolved config is saved as ``<trainer.log_dir>/<filename>``: a fresh version directory with a
    logger, but ``--trainer.default_root_dir`` (the working directory by default) without one, or a logger version
    pinned to an earlier run's. One already there, an earlier run's, is refused here in one line (Lightning would
    refuse it with a traceback once the trainer had started)."""
    path = Path(trainer.log_dir or ".") / filename
    if path.exists():
        where = ("--trainer.default_root_dir, the working directory unless set" if trainer.logger is None
                 else "the logger's version directory")
        raise OutputDirectoryError(
            f"{path} holds an earlier run's config, and this run would save its own there ({where}): run from "
            f"another directory or give another --trainer.default_root_dir"
            + (" or logger version" if trainer.logger is not None else ", or keep a logger (each run a new version)"))


def refuse_existing_exports(trainer) -> None:
    """A run whose ``LoRAMerge`` export directory already holds something is refused before the trainer starts (the
    callback checks again when fit starts, for runs built without the command line): exports never overwrite."""
    from lit_align.callbacks.lora_merge import ExportError, LoRAMerge, check_output_dir

    for cb in trainer.callbacks:
        if isinstance(cb, LoRAMerge):
            target = cb.export_dir(trainer)
            try:
                check_output_dir(target)
            except ExportError:
                raise OutputDirectoryError(
                    f"LoRAMerge output_dir {target} already exists and is not empty (exports never overwrite): remove "
                    "it, or export elsewhere with --trainer.callbacks.init_args.output_dir DIR (when LoRAMerge is the "
                    "last of trainer.callbacks; otherwise in the config)") from None


def _description() -> str:
    extra = "; ".join(f"'lit_align {name}' to {help_}" for name, (_, help_) in EXTRA_COMMANDS.items())
    return (f"{DESCRIPTION} Trainer subcommands: {', '.join(TRAINER_COMMANDS)} (each takes --config FILE.yaml). Also {extra}.")


UNACTIONABLE = {
    # Lightning's advertisement for its cloud logger, and its note that the command line's own summary is in use
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:", "Trainer already configured with model summary callbacks"),
    # DeepSpeed's import (transformers' save_pretrained imports it through accelerate wherever it is installed) on a
    # machine without a GPU: CPU is what such a machine has
    "DeepSpeed": ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",),
    # bitsandbytes' import (through peft, for any LoRA run) on a CPU with AVX512-BF16: the optional hub kernel for CPU
    # 4-bit matmuls cannot be fetched offline or from an unallowlisted publisher, and its own CPU kernels are used
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
"""Log lines every run printed that a lit_align user cannot act on, by logger: the beginnings of their messages."""


def _actionable(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(UNACTIONABLE.get(record.name, ()))


def quiet_unactionable_output() -> None:
    """Drop what every run printed that a lit_align user cannot act on: the log lines of :data:`UNACTIONABLE`, torch's
    deprecation warning about an ``isinstance`` check inside Lightning's own pytree helper, transformers' about
    ``is_gradient_checkpointing``, which peft reads when it wraps a model in LoRA, and Lightning's 15-line advice to
    keep pre-optimization states for manually optimized modules' checkpoints."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
    # every online objective (manual optimization) with checkpoint.every_n_train_steps: a checkpoint holds the weights
    # after the optimizer steps its global_step counts, which is what resuming continues from (tests/test_fsdp.py's
    # online resume reproduces the uninterrupted curve); Lightning's alternative needs a `layer` attribute we lack
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    for name in UNACTIONABLE:
        logger = logging.getLogger(name)
        if _actionable not in logger.filters:
            logger.addFilter(_actionable)


def run_trainer_command(argv: list[str] | None = None) -> int:
    """``lit_align fit|validate|test ...`` and root options other than a bare ``--help`` (``-c CONFIG``), reached
    through :func:`lit_align.commands.main`, the console entry point, which is also this module's ``main``:
    LitAlignCLI, with bad input found after parsing refused in one line and exit status 2 from the command line;
    called from Python, the exception propagates."""
    args = sys.argv[1:] if argv is None else list(argv)
    from lit_align.data_modules.sources import DataError
    from lit_align.models import ModelLoadError

    try:
        LitAlignCLI(args=argv)
    except (ModelLoadError, DataError, OutputDirectoryError, LightningOptionError, ResumeOptionError, ValueError,
            TypeError) as err:
        refusals = (ModelLoadError, DataError, OutputDirectoryError, LightningOptionError, ResumeOptionError)
        refused = err if isinstance(err, refusals) else argument_error(err)
        if argv is not None or refused is None:
            raise
        command = next((f"lit_align {a}" for a in args if a in TRAINER_COMMANDS), "lit_align")
        option = None if isinstance(refused, (LightningOptionError, ResumeOptionError)) else option_of(refused)
        print(f"{command}: error: {option + ': ' if option else ''}{refused}", file=sys.stderr)
        return 2
    return 0


def raised_in(exc: BaseException, root: Path) -> bool:
    """Whether ``exc`` was raised by code under the directory ``root`` (the innermost frame of its traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(root)


def argument_error(err: BaseException) -> BaseException | None:
    """The error a lit_align class raised over a bad argument while jsonargparse built it from the command line
    (``err`` is jsonargparse's, "Does not validate against any of the Union subtypes", and carries the class's own
    as its context), or a package missing for a class the config names (``--trainer.logger WandbLogger`` without
    wandb: an ImportError naming the class and the requirement), or None when ``err`` is something else, whose
    traceback must then be shown."""
    if not raised_in(err, Path(importlib.import_module("jsonargparse").__file__).parent.resolve()):
        return None
    package = Path(__file__).parent.resolve()
    outer, inner = [err], err.__cause__ or err.__context__
    while inner is not None:
        if isinstance(inner, (ValueError, TypeError)) and raised_in(inner, package):
            return inner
        if isinstance(inner, ImportError):  # a class the config names (a logger, say) needs a package not installed
            named = next((m.group(1) for e in outer if (m := re.search(r"class_path '([^']+)'", str(e)))), None)
            return ImportError(f"{named}: {inner}" if named else str(inner))
        outer.append(inner)
        inner = inner.__cause__ or inner.__context__
    return None


def option_of(err: BaseException) -> str | None:
    """The option a lit_align module's or DataModule's own check of its arguments refused, as its dotted name in a
    config (``model.init_args.beta``, ``data.init_args.batch_size``): the class is the one whose ``__init__`` raised
    ``err``, the option the first of that class's parameters the message names (``optimizer.lr`` stays whole). None
    where no such class raised it or the message names none of its parameters."""
    from lightning.pytorch import LightningModule

    owner = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(candidate, (LightningModule, LightningDataModule)):
            owner = candidate
            break
    if owner is None or "init_args" in str(err):
        return None
    group = "model" if isinstance(owner, LightningModule) else "data"
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = {name for cls in type(owner).__mro__ if "__init__" in vars(cls) and cls is not object
             for name, p in inspect.signature(vars(cls)["__init__"]).parameters.items()
             if name != "self" and p.kind not in skip}
    for token in re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", str(err)):
        if token.split(".")[0] in names:
            return f"{group}.init_args.{token}"
    return None


if __name__ == "__main__":
    sys.exit(main())
