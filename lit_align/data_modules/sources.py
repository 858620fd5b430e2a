"""Where prompt/completion examples come from: `datasets.load_dataset` (hub id or local files) or the task suite."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lit_align.models import datasets_cache_only_without_hub, hub_retries_hint

log = logging.getLogger(__name__)

TASK_SUITE = "task_suite"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """Bad training data: the message names the source, file or column at fault."""


@dataclass
class DataSource:
    """One source of prompt/completion examples."""

    path: str = TASK_SUITE
    """A Hugging Face dataset id, a local json/jsonl/parquet/csv file or directory, or "task_suite" (built-in)."""
    split: str = "train"
    """Split to read; for the task suite "train", "heldout" or "validation"."""
    name: str | None = None
    """Dataset configuration name (hub datasets with several configs)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (problem statement)."""
    completion_column: str = "completion"
    """Column holding the completion (solution); for the task suite the canonical solution."""
    messages_column: str | None = None
    """Column holding whole conversations (chat messages) instead of a prompt and a completion column: the final
    message, the assistant's, is the completion and the messages before it the prompt (rendered with the tokenizer's
    chat template)."""
    assistant_turns: Literal["last", "all"] = "last"
    """With ``messages_column``: train on the final reply only (``last``; earlier replies are context), or on every
    assistant reply (``all``: the whole conversation as one sequence with each reply a target, so its context is
    computed once; where the chat template does not allow that, one example per reply with the conversation up to it
    as the prompt. A conversation longer than ``max_length`` keeps the replies that fit)."""
    weight: float = 1.0
    """Relative share of this source in a mixture (the paper mixes CodeContests and a dump about 1:1)."""
    limit: int | None = None
    """Read at most this many rows (after a seeded shuffle)."""
    seed: int = 0
    """Seed of the task suite's problems, and of which completions are replaced (task_suite only)."""
    incorrect_fraction: float = 0.0
    """Task suite only: this share of completions is one of the task's incorrect solutions instead of the reference,
    mixed-quality data as scraped code is (0 = reference solutions only)."""
    problems_per_family: int | None = None
    """Task suite only: problems per family of the generated suite (null: the suite's default, 60; at most about
    105). Larger suites have more train problems; the held-out parameter values stay the same."""


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in FILE_BUILDERS


def missing_local_path(path: str) -> bool:
    """Whether ``path`` can only name a local file or directory (it starts with ".", "/" or "~", or ends in a data
    file's extension) and none exists there: every source loader refuses such a path."""
    return _looks_like_path(path) and not Path(path).expanduser().exists()


def missing_column(where: str, column: str, option: str, columns: list[str], read: list[str]) -> str:
    """The error for a data file without ``column``, naming the source's ``option`` that chooses the column read, with
    one of the file's ``columns`` that no other option reads (``read``) as the example."""
    example = next((c for c in columns if c not in read), "COLUMN")
    return (f"{where} has no column {column!r} (it has: {columns}); the source's {option} names the column to read "
            f"(e.g. {{path: ..., {option}: {example}}})")


def load_rows(source: DataSource, columns: tuple[str, ...]) -> list[dict]:
    """Rows of ``source`` as dicts holding at least ``columns``; clear errors for missing files and columns."""
    import datasets

    path = Path(source.path).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"data file {source.path}: unsupported extension {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), name=source.name, split=source.split)
        elif _looks_like_path(source.path):
            raise DataError(f"data file {source.path!r} does not exist")
        else:
            with datasets_cache_only_without_hub():
                ds = datasets.load_dataset(source.path, name=source.name, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreachable hubs and bad files
        hint = "" if path.exists() else hub_retries_hint()
        raise DataError(f"cannot load dataset {source.path!r} (split {source.split!r}): {type(err).__name__}: "
                        f"{err}{hint}") from err
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        option = next(name for name in ("prompt_column", "completion_column", "messages_column")
                      if getattr(source, name) == missing[0])
        raise DataError(missing_column(f"dataset {source.path!r}", missing[0], option, ds.column_names, list(columns)))
    rows = ds.select_columns(list(columns)).to_list()
    if source.limit is not None and len(rows) > source.limit:
        random.Random(source.seed).shuffle(rows)
        rows = rows[: source.limit]
    return rows


def load_suite_tasks(split: str, seed: int, problems_per_family: int | None) -> list:
    """The task suite's ``split`` as a data source reads it; a size the templates cannot fill is a DataError."""
    from lit_align.data_modules.task_suite import load_task_suite

    try:
        return load_task_suite(split=split, seed=seed, problems_per_family=problems_per_family)
    except ValueError as err:
        raise DataError(f"task suite source: {err}") from None


def load_prompt_completions(source: DataSource) -> list[dict]:
    """``[{"prompt", "completion"}]`` from one source; with ``assistant_turns: all``, ``[{"conversation"}]`` (whole
    conversations, each reply a target)."""
    if source.path == TASK_SUITE:
        if not 0.0 <= source.incorrect_fraction <= 1.0:
            raise DataError(f"incorrect_fraction must be in [0, 1], got {source.incorrect_fraction}")
        tasks = load_suite_tasks(source.split, source.seed, source.problems_per_family)
        rng = random.Random(source.seed)
        noisy = set(rng.sample(range(len(tasks)), round(source.incorrect_fraction * len(tasks))))
        rows = [{"prompt": t.prompt,
                 "completion": rng.choice(t.incorrect_solutions)[1] if i in noisy else t.canonical_solution}
                for i, t in enumerate(tasks)]
        return rows[: source.limit] if source.limit is not None else rows
    from lit_align.data_modules.chat import assistant_turns, completion_value, prompt_value, split_conversation

    if source.assistant_turns not in ("last", "all"):
        raise DataError(f"assistant_turns must be 'last' or 'all', got {source.assistant_turns!r}")
    if source.messages_column is not None:
        rows = load_rows(source, (source.messages_column,))
        cells = [(r[source.messages_column], _cell(source, i, source.messages_column)) for i, r in enumerate(rows)]
        if source.assistant_turns == "all":
            return [{"conversation": assistant_turns(value, where)} for value, where in cells]
        pairs = [split_conversation(value, where) for value, where in cells]
        return [{"prompt": prompt, "completion": completion} for prompt, completion in pairs]
    rows = load_rows(source, (source.prompt_column, source.completion_column))
    return [{"prompt": prompt_value(r[source.prompt_column], _cell(source, i, source.prompt_column)),
             "completion": completion_value(r[source.completion_column], _cell(source, i, source.completion_column))}
            for i, r in enumerate(rows)]


def _cell(source: DataSource, row: int, column: str) -> str:
    """Where a value sits, for error messages."""
    at = "" if source.limit is not None else f" row {row}"  # with a limit the rows were sampled: no file position
    return f"dataset {source.path!r}{at} column {column!r}"


def mix(parts: list[list[dict]], weights: list[float], seed: int = 0) -> list[dict]:
    """Mix sources in the ratio of ``weights`` without repeating a row: the largest mixture the sources allow.

    With sizes n_i and normalized weights w_i the mixture holds N = min_i n_i / w_i rows, round(w_i * N) from source i,
    each a seeded random subset; the result is shuffled.
    """
    if any(w <= 0 for w in weights):
        raise DataError(f"source weights must be > 0, got {weights}")
    if len(parts) == 1:
        return list(parts[0])
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    n = min(len(p) / s for p, s in zip(parts, shares))
    rng = random.Random(seed)
    mixed = []
    for part, share in zip(parts, shares):
        take = min(len(part), round(share * n))
        mixed += rng.sample(part, take)
    rng.shuffle(mixed)
    return mixed
