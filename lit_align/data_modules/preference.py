"""Preference triplets (prompt, chosen, rejected) for reward models, DPO and ORPO, tokenized once and batched as pairs.

Triplets come from :mod:`lit_align.data_modules.pairing` (CodeContests, the task suite, local or hub files with
prompt/chosen/rejected columns); this module mixes sources, removes cross-source duplicates, tokenizes each distinct
prompt and completion once, filters by length with a logged count, and collates a batch of ``B`` pairs as one
``(2B, T)`` batch whose first ``B`` rows are the chosen sequences and last ``B`` rows the rejected ones, both padded to
the same length, so a module runs chosen and rejected through one forward pass.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lit_align.data_modules.base import ListDataset, TokenizedDataModule
from lit_align.data_modules.sampler import LengthGroupedBatchSampler
from lit_align.data_modules.code_contests import load_code_contests, parse_language
from lit_align.data_modules.pairing import (
    Triplet,
    triplets_from_code_contests,
    triplets_from_file,
    triplets_from_task_suite,
)
from lit_align.data_modules.sources import DataError, load_suite_tasks, mix
from lit_align.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

TASK_SUITE = "task_suite"
SourceKind = Literal["auto", "task_suite", "code_contests", "triplets"]


@dataclass
class PreferenceSource:
    """One source of preference triplets."""

    path: str = TASK_SUITE
    """"task_suite" (built-in), a CodeContests hub id or local parquet/jsonl file or directory, or a file/dir/hub id
    with prompt/chosen/rejected columns."""
    kind: SourceKind = "auto"
    """What ``path`` holds; auto: task_suite for "task_suite", code_contests when the path names code_contests,
    triplets otherwise."""
    split: str = "train"
    """Split to read: task suite "train"/"heldout"/"validation"; CodeContests "train"/"valid"/"test"; a split of a triplet dataset."""
    languages: list[str] = field(default_factory=lambda: ["python3"])
    """CodeContests only: languages to pair within (python3, cpp, java, python2, or codes 1-4)."""
    data_files: list[str] | None = None
    """CodeContests only: read just these files (relative to a local directory, or hub file patterns)."""
    limit: int | None = None
    """Read at most this many problems (CodeContests, task suite) or rows (triplet files)."""
    prompt_column: str = "prompt"
    """Triplet files: column holding the prompt."""
    chosen_column: str = "chosen"
    """Triplet files: column holding the preferred completion."""
    rejected_column: str = "rejected"
    """Triplet files: column holding the dispreferred completion."""
    id_column: str | None = None
    """Triplet files: column naming the problem of each row (used to split validation by problem)."""
    weight: float = 1.0
    """Relative share of this source in a mixture of several."""
    suite_seed: int = 0
    """Task suite only: seed of the generated problems."""
    problems_per_family: int | None = None
    """Task suite only: problems per family of the generated suite (null: the suite's default, 60; at most about
    105). Larger suites have more train problems; the held-out parameter values stay the same."""

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "task_suite", "code_contests", "triplets"):
            raise DataError(f"PreferenceSource.kind must be auto, task_suite, code_contests or triplets, got {self.kind!r}")
        if isinstance(self.languages, str):
            self.languages = [self.languages]
        for language in self.languages:
            try:
                parse_language(language)
            except ValueError as err:
                raise DataError(f"PreferenceSource.languages ({self.path}): {err}") from None
        if not self.languages:
            raise DataError(f"PreferenceSource.languages ({self.path}) is empty; name at least one, e.g. ['python3']")
        if not self.weight > 0:
            raise DataError(f"PreferenceSource.weight ({self.path}) must be > 0, got {self.weight}")
        if self.limit is not None and self.limit < 0:
            raise DataError(f"PreferenceSource.limit ({self.path}) must be >= 0 or null, got {self.limit}")

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        if self.path == TASK_SUITE:
            return "task_suite"
        return "code_contests" if "code_contests" in self.path.lower() else "triplets"


@dataclass(slots=True)
class EncodedTriplet:
    """A tokenized triplet. ``prompt_ids`` is shared (the same array object) by all triplets of one prompt."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    """Completion tokens followed by the end-of-sequence token."""
    rejected_ids: np.ndarray
    index: int
    """Position in its split (train or validation)."""
    key: int
    """64-bit content hash of the three token sequences: identifies the example whatever the batch order."""
    source_id: str

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def content_key(prompt_ids: np.ndarray, chosen_ids: np.ndarray, rejected_ids: np.ndarray) -> int:
    """A stable signed 64-bit hash of a tokenized triplet (blake2b; independent of Python's hash seed)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part.astype(np.int32, copy=False).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def collate_pairs(items: list[EncodedTriplet], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Stack B pairs into one right-padded (2B, T) batch: rows [0, B) chosen, rows [B, 2B) rejected.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (IGNORE_INDEX on prompt and padding), ``index`` and ``key``
    (B,), and ``completion_start``, the smallest prompt length in the batch (a Python int: every position before it is
    prompt, so a module need not compute logits there). The same pairs also come split at the prompt, for modules that
    run each prompt once: ``prompt_input_ids``/``prompt_attention_mask`` (B, P), left-padded so every prompt ends at
    the last column, and ``completion_input_ids``/``completion_attention_mask``/``completion_labels`` (2B, C),
    right-padded, chosen rows first.
    """
    b = len(items)
    rows = [(it.prompt_ids, it.chosen_ids) for it in items] + [(it.prompt_ids, it.rejected_ids) for it in items]
    longest = _round_up(max(len(p) + len(c) for p, c in rows), pad_to_multiple_of)
    input_ids = np.full((2 * b, longest), pad_token_id, dtype=np.int64)
    labels = np.full((2 * b, longest), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((2 * b, longest), dtype=np.int64)
    for i, (p, c) in enumerate(rows):
        lp, end = len(p), len(p) + len(c)
        input_ids[i, :lp] = p
        input_ids[i, lp:end] = c
        labels[i, lp:end] = c
        attention_mask[i, :end] = 1

    longest_prompt = _round_up(max(len(it.prompt_ids) for it in items), pad_to_multiple_of)
    prompt_ids = np.full((b, longest_prompt), pad_token_id, dtype=np.int64)
    prompt_mask = np.zeros((b, longest_prompt), dtype=np.int64)
    for i, it in enumerate(items):
        lp = len(it.prompt_ids)
        prompt_ids[i, longest_prompt - lp:] = it.prompt_ids
        prompt_mask[i, longest_prompt - lp:] = 1
    longest_completion = _round_up(max(len(c) for _, c in rows), pad_to_multiple_of)
    completion_ids = np.full((2 * b, longest_completion), pad_token_id, dtype=np.int64)
    completion_labels = np.full((2 * b, longest_completion), IGNORE_INDEX, dtype=np.int64)
    completion_mask = np.zeros((2 * b, longest_completion), dtype=np.int64)
    for i, (_, c) in enumerate(rows):
        completion_ids[i, :len(c)] = c
        completion_labels[i, :len(c)] = c
        completion_mask[i, :len(c)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "index": torch.tensor([it.index for it in items], dtype=torch.long),
        "key": torch.tensor([it.key for it in items], dtype=torch.long),
        "completion_start": min(len(it.prompt_ids) for it in items),
        "prompt_input_ids": torch.from_numpy(prompt_ids),
        "prompt_attention_mask": torch.from_numpy(prompt_mask),
        "completion_input_ids": torch.from_numpy(completion_ids),
        "completion_attention_mask": torch.from_numpy(completion_mask),
        "completion_labels": torch.from_numpy(completion_labels),
    }


def _round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


def load_triplets(source: PreferenceSource, closest_ratio: float, max_pairs_per_problem: int | None,
                  seed: int) -> tuple[list[Triplet], dict[str, int]]:
    """The triplets of one source and the pairing's counts (skipped problems, identical pairs, duplicates, ...)."""
    kind = source.resolved_kind
    if kind == "task_suite":
        tasks = load_suite_tasks(source.split, source.suite_seed, source.problems_per_family)
        if source.limit is not None:
            tasks = tasks[: source.limit]
        return triplets_from_task_suite(tasks, closest_ratio=closest_ratio, max_pairs_per_problem=max_pairs_per_problem,
                                        seed=seed)
    if kind == "code_contests":
        try:
            problems = load_code_contests(source.path, split=source.split, data_files=source.data_files,
                                          limit=source.limit)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise DataError(f"CodeContests source {source.path!r}: {err}") from err
        return triplets_from_code_contests(problems, languages=source.languages, closest_ratio=closest_ratio,
                                           max_pairs_per_problem=max_pairs_per_problem, seed=seed)
    try:
        triplets, counts = triplets_from_file(source.path, prompt_column=source.prompt_column,
                                              chosen_column=source.chosen_column,
                                              rejected_column=source.rejected_column, split=source.split,
                                              id_column=source.id_column)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(f"triplet source {source.path!r}: {err}") from err
    if source.limit is not None and len(triplets) > source.limit:
        triplets = list(triplets)
        random.Random(seed).shuffle(triplets)
        triplets = triplets[: source.limit]
    return triplets, counts


class PreferenceDataModule(TokenizedDataModule):
    """Preference triplets from one or more sources, paired, mixed, deduplicated, tokenized once and length-filtered.

    A batch is ``B`` pairs stacked as ``(2B, T)`` tensors, chosen rows first (see :func:`collate_pairs`). Counts of
    what was skipped or dropped (problems without incorrect solutions, chosen == rejected pairs, duplicates,
    over-long pairs) are logged and kept in ``self.stats[split]``.

    Args:
        train_sources: where training triplets come from; several are mixed by their ``weight``.
        val_sources: where validation triplets come from; empty holds out ``val_fraction`` of the training problems.
        val_fraction: share of training problems (whole problems, never single pairs) held out when no val_sources.
        closest_ratio: share of pairs whose rejected program is the Levenshtein-nearest incorrect one; the rest random.
        max_pairs_per_problem: most pairs per problem (and language); null for no cap.
        prompt_template: Python format string applied to each text prompt; must contain "{prompt}".
        chat_template: render each prompt with the tokenizer's chat template (as one user message, then the
            assistant's generation prompt); prompts given as chat messages in a file always are.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly shapes on GPUs).
    """

    batch_kind = "preference"

    def __init__(self, train_sources: list[PreferenceSource] | None = None,
                 val_sources: list[PreferenceSource] | None = None, val_fraction: float = 0.05,
                 closest_ratio: float = 0.5, max_pairs_per_problem: int | None = 8, prompt_template: str = "{prompt}",
                 chat_template: bool = False, pad_to_multiple_of: int | None = None, tokenizer: str | None = None,
                 max_length: int = 1024, batch_size: int = 8, eval_batch_size: int | None = None,
                 group_by_length: bool = True, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__(tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, group_by_length=group_by_length,
                         num_workers=num_workers, seed=seed, prompt_template=prompt_template,
                         chat_template=chat_template)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= closest_ratio <= 1.0:
            raise DataError(f"closest_ratio must be in [0, 1], got {closest_ratio}")
        if max_pairs_per_problem is not None and max_pairs_per_problem < 1:
            raise DataError(f"max_pairs_per_problem must be >= 1 or null, got {max_pairs_per_problem}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1 or null, got {pad_to_multiple_of}")
        self.train_sources = [_as_source(s) for s in train_sources] if train_sources is not None else [PreferenceSource()]
        if val_sources is not None:
            self.val_sources = [_as_source(s) for s in val_sources]
        else:
            self.val_sources = [PreferenceSource(split="heldout")] if train_sources is None else []
        if not self.train_sources:
            raise DataError("train_sources is empty: give at least one preference source")
        self.val_fraction = val_fraction
        self.closest_ratio = closest_ratio
        self.max_pairs_per_problem = max_pairs_per_problem
        self.pad_to_multiple_of = pad_to_multiple_of
        self.stats: dict[str, dict[str, int]] = {}

    # -- triplets ---------------------------------------------------------------------------------------------------
    def _triplets(self, sources: list[PreferenceSource], split: str) -> list[Triplet]:
        parts, totals = [], Counter()
        for s in sources:
            triplets, counts = load_triplets(s, self.closest_ratio, self.max_pairs_per_problem, self.seed)
            totals.update(counts)
            if not triplets:
                raise DataError(f"preference source {s.path!r} (split {s.split!r}) gave no triplets; "
                                f"pairing counts: {dict(counts)}")
            parts.append(triplets)
        mixed = mix(parts, [s.weight for s in sources], seed=self.seed)
        seen: set[tuple[str, str, str]] = set()
        unique = []
        for t in mixed:  # the same triplet from two sources (or one source listed twice) is kept once
            if (t.prompt, t.chosen, t.rejected) not in seen:
                seen.add((t.prompt, t.chosen, t.rejected))
                unique.append(t)
        totals["cross_source_duplicates"] = len(mixed) - len(unique)
        self.stats[split] = dict(totals)
        for name in ("problems_without_incorrect", "problems_without_correct", "identical_pairs", "duplicates",
                     "cross_source_duplicates", "empty"):
            if totals.get(name):
                log.warning("lit_align: %s preference data: skipped %d %s", split, totals[name], name.replace("_", " "))
        return unique

    def _split_by_problem(self, triplets: list[Triplet]) -> tuple[list[Triplet], list[Triplet]]:
        ids = sorted({t.source_id for t in triplets})
        random.Random(self.seed).shuffle(ids)
        n_val = int(round(len(ids) * self.val_fraction))
        held = set(ids[:n_val])
        return [t for t in triplets if t.source_id not in held], [t for t in triplets if t.source_id in held]

    # -- tokenization -----------------------------------------------------------------------------------------------
    def encode(self, triplets: list[Triplet]) -> list[EncodedTriplet]:
        """Tokenize each distinct prompt and each distinct completion once (batched); triplets share the arrays."""
        tok = self.resolve_tokenizer()
        formatted = {prompt: self.format_prompt(prompt) for prompt in dict.fromkeys(t.prompt for t in triplets)}
        prompts = list(dict.fromkeys(formatted.values()))
        prompt_ids = dict(zip(prompts, _encode_all(tok, prompts, add_special_tokens=True)))
        ends = {prompt: tuple(self.completion_end(prompt)) for prompt in formatted}  # EOS, or a chat reply's turn end
        completions = list(dict.fromkeys((c, ends[t.prompt]) for t in triplets for c in (t.chosen, t.rejected)))
        completion_ids = {}
        for end in dict.fromkeys(e for _, e in completions):
            texts = [c for c, e in completions if e == end]
            completion_ids.update(((c, end), ids) for c, ids in
                                  zip(texts, _encode_all(tok, texts, add_special_tokens=False, suffix=end)))
        items = []
        for i, t in enumerate(triplets):
            p, end = prompt_ids[formatted[t.prompt]], ends[t.prompt]
            c, r = completion_ids[t.chosen, end], completion_ids[t.rejected, end]
            items.append(EncodedTriplet(p, c, r, index=i, key=content_key(p, c, r), source_id=t.source_id))
        return items

    def _finish(self, items: list[EncodedTriplet], split: str) -> list[EncodedTriplet]:
        kept = self.filter_by_length(items, split)
        self.stats.setdefault(split, {})["too_long"] = self.dropped.get(split, 0)
        self.stats[split]["pairs"] = len(kept)
        for i, item in enumerate(kept):  # positions in the final split
            item.index = i
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.train_items or self.val_items:
            return
        train = self._triplets(self.train_sources, "train")
        if self.val_sources:
            val = self._triplets(self.val_sources, "validation")
        elif self.val_fraction > 0:
            train, val = self._split_by_problem(train)
        else:
            val = []
        self.train_items = self._finish(self.encode(train), "train")
        self.val_items = self._finish(self.encode(val), "validation") if val else []
        log.info("lit_align: %d training and %d validation preference pairs", len(self.train_items), len(self.val_items))

    # -- batching ---------------------------------------------------------------------------------------------------
    def length(self, item: EncodedTriplet) -> int:
        return len(item)

    def target_tokens(self, item: EncodedTriplet) -> int:
        """The chosen completion's tokens (end-of-sequence included): what ORPO's NLL and DPO's ``rpo_alpha`` term
        average over, so accumulated micro-batches weigh each of those tokens the same (see ``chosen_nll``)."""
        return len(item.chosen_ids)

    def collate(self, items: list[EncodedTriplet]) -> dict:
        return collate_pairs(items, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    # -- resampling hook (lit_align.callbacks.margin_resampling) ---------------------------------------------------
    def set_train_schedule(self, batches: list[list[int]] | None) -> None:
        """Train on these global batches (indices into ``train_items``) instead of the sampler's own order.

        Position ``i`` of the schedule replaces the ``i``-th batch of the epoch, from the next batch fetched on (each
        process takes its share of every global batch); None returns to the sampler's order.
        """
        self.train_schedule = [list(b) for b in batches] if batches is not None else None

    train_schedule: list[list[int]] | None = None

    def _batch_sampler(self, items: list, batch_size: int, shuffle: bool):
        sampler = super()._batch_sampler(items, batch_size, shuffle)
        return ScheduledBatchSampler(sampler, self) if shuffle else sampler

    def reference_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Every training and validation pair once, longest first, unshuffled: for precomputing reference log-probs."""
        items = sorted(self.train_items + self.val_items, key=len, reverse=True)
        size = batch_size or self.eval_batch_size
        batches = [list(range(s, min(s + size, len(items)))) for s in range(0, len(items), size)]
        return DataLoader(ListDataset(items), batch_sampler=batches, collate_fn=self.collate, num_workers=0)


class ScheduledBatchSampler(Sampler[list[int]]):
    """The training batch sampler, except where the DataModule holds a schedule (``set_train_schedule``)."""

    def __init__(self, base: LengthGroupedBatchSampler, datamodule: PreferenceDataModule) -> None:
        self.base = base
        self.datamodule = datamodule
        self._skip = 0

    @property
    def batch_size(self) -> int:
        """Pairs per process and step (Lightning's DeepSpeed strategy reads it for its micro-batch size)."""
        return self.base.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        own = self.base.global_batches()
        windows = self.base.windows()  # tagged for token-weighted accumulation: windows over the batches as trained
        skip, self._skip = self._skip, 0
        for i in range(skip, len(own)):
            schedule = self.datamodule.train_schedule  # read per batch: a new schedule applies at once
            batches = own if schedule is None else _Scheduled(schedule, own)
            yield self.base._rank_slice(batches[i]) if windows is None else self.base.tagged(batches, i, *windows)


class _Scheduled(Sequence):
    """The epoch's global batches with a schedule's batches in place of the first ``len(schedule)``."""

    def __init__(self, schedule: list[list[int]], own: list[list[int]]) -> None:
        self.schedule, self.own = schedule, own

    def __len__(self) -> int:
        return len(self.own)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.schedule[i] if i < len(self.schedule) else self.own[i]


def _as_source(source: PreferenceSource | dict) -> PreferenceSource:
    return PreferenceSource(**source) if isinstance(source, dict) else source


def _encode_all(tokenizer, texts: list[str], add_special_tokens: bool, suffix: list[int] = (),
                chunk: int = 4096) -> list[np.ndarray]:
    """Token ids of many texts, tokenized in batches (the fast tokenizer runs them in parallel), as int32 arrays."""
    out: list[np.ndarray] = []
    for s in range(0, len(texts), chunk):
        ids = tokenizer(texts[s:s + chunk], add_special_tokens=add_special_tokens)["input_ids"]
        out += [np.asarray(list(x) + list(suffix), dtype=np.int32) for x in ids]
    return out


__all__ = ["EncodedTriplet", "PreferenceDataModule", "PreferenceSource", "collate_pairs", "content_key", "load_triplets"]
