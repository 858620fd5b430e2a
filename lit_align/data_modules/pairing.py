"""Preference triplets (prompt, chosen, rejected): pairing correct with incorrect programs, as in IotaCode.

IotaCode (section 2) pairs each correct CodeContests solution with an incorrect one chosen two ways, the
incorrect solution closest in Levenshtein distance and a random one, and mixes the two. Here the mix is a
ratio (``closest_ratio``) met exactly in counts per prompt, the choice is deterministic under a seed, pairs
per prompt are capped, duplicates and chosen == rejected pairs are dropped and counted. Sources: CodeContests
problems, the built-in task suite, and any local file (or hub id) with prompt/chosen/rejected columns.
Token-length filtering belongs to the DataModule, which passes its predicate to :func:`filter_triplets`.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # imported where used: `import lit_align` stays light
    import datasets

from lit_align.data_modules.chat import Prompt, completion_value, is_messages, prompt_value, split_pair
from lit_align.data_modules.code_contests import CodeContestsProblem, Language, parse_language, problem_prompt
from lit_align.data_modules.sources import missing_column
from lit_align.models import datasets_cache_only_without_hub, hub_retries_hint

__all__ = [
    "Triplet",
    "levenshtein",
    "pair_negatives",
    "triplets_from_code_contests",
    "triplets_from_task_suite",
    "triplets_from_file",
    "filter_triplets",
    "same_program",
]

@dataclass(frozen=True)
class Triplet:
    """One preference example: ``chosen`` is preferred over ``rejected`` as a completion of ``prompt``."""

    prompt: Prompt
    """Text, or chat messages (:data:`~lit_align.data_modules.chat.Conversation`) the data module renders."""
    chosen: str
    rejected: str
    source_id: str
    """Which problem/task/row it came from; triplets of one problem share it (split by it to avoid leakage)."""
    strategy: str
    """How ``rejected`` was picked: ``"closest"`` (Levenshtein), ``"random"``, or ``"given"`` (read from a file)."""


# --- edit distance -------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Exact Levenshtein distance (unit-cost insert, delete, substitute) between two strings, by characters.

    The common prefix and suffix are trimmed first; the rest runs the bit-parallel algorithm of Myers (1999)
    in Hyyro's (2003) formulation, with a Python int as the bit vector of one string's column of the DP table.
    That is the same dynamic program as the textbook O(len(a) * len(b)) one, computed a column of bits at a
    time, so it returns exactly the same number: two 3,000-character programs take milliseconds, not seconds.

    Args:
        a: first string.
        b: second string.
    """
    if a == b:
        return 0
    start = 0
    limit = min(len(a), len(b))
    while start < limit and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if not a or not b:
        return len(a) + len(b)
    # The loop runs once per character of the text and the bit vectors are as wide as the pattern; Python's
    # per-iteration cost dominates, so the shorter string is the text.
    pattern, text = (a, b) if len(a) >= len(b) else (b, a)
    return _myers(pattern, text)


def _myers(pattern: str, text: str) -> int:
    """Edit distance by bit-parallel columns: bit i of ``pv``/``mv`` says D[i+1][j] - D[i][j] is +1/-1."""
    m = len(pattern)
    peq: dict[str, int] = {}
    for i, ch in enumerate(pattern):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, score = mask, 0, m  # column 0: D[i][0] = i, so every vertical delta is +1
    for ch in text:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0: D[0][j] = j, so the horizontal delta entering the column is +1
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


_GRAM = 3


class _Profile:
    """Character and 3-gram counts of a program, for lower bounds on its edit distance to others."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.chars = Counter(text)
        self._grams: Counter[str] | None = None

    @property
    def grams(self) -> Counter[str]:
        if self._grams is None:
            self._grams = Counter(self.text[i : i + _GRAM] for i in range(len(self.text) - _GRAM + 1))
        return self._grams


def _surplus(a: Counter[str], b: Counter[str]) -> int:
    return max(sum((a - b).values()), sum((b - a).values()))


def _char_bound(a: _Profile, b: _Profile) -> int:
    """Lower bound on the distance: an edit fixes at most one surplus character on each side."""
    return _surplus(a.chars, b.chars)


def _gram_bound(a: _Profile, b: _Profile) -> int:
    """Lower bound on the distance (Ukkonen's q-gram bound): an edit removes at most q of one side's surplus q-grams."""
    return -(-_surplus(a.grams, b.grams) // _GRAM)


# --- pairing -------------------------------------------------------------------------------------------------


def same_program(a: str, b: str) -> bool:
    """Whether two programs count as identical for pairing: equal but for trailing whitespace at the end.

    Leading whitespace counts: in Python a body indented by two spaces instead of four is a different program.
    """
    return a.rstrip() == b.rstrip()


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class _Nearest:
    """Finds, for one chosen program, its nearest rejected programs, computing as few exact distances as it can.

    Candidates are visited in order of a cheap character-count bound and the search stops once that bound
    exceeds the best distance found; a tighter 3-gram bound skips most of the rest before the exact distance.
    """

    def __init__(self, chosen: str, rejected: Sequence[_Profile]) -> None:
        self.chosen = _Profile(chosen)
        self.rejected = rejected
        # Ties keep the input order, so the choice is deterministic.
        self.order = sorted((_char_bound(self.chosen, r), i) for i, r in enumerate(rejected))
        self.gram_bounds: dict[int, int] = {}
        self.exact: dict[int, int] = {}

    def best(self, excluded: set[int]) -> int:
        """Index of the rejected program nearest to the chosen one, skipping ``excluded``; first index wins ties."""
        best_index, best_distance = -1, None
        for bound, i in self.order:
            if i in excluded:
                continue
            if best_distance is not None:
                if bound > best_distance:
                    break  # every later candidate is at least this far
                if i not in self.exact:
                    if i not in self.gram_bounds:
                        self.gram_bounds[i] = _gram_bound(self.chosen, self.rejected[i])
                    if self.gram_bounds[i] > best_distance:
                        continue
            if i not in self.exact:
                self.exact[i] = levenshtein(self.chosen.text, self.rejected[i].text)
            d = self.exact[i]
            if best_distance is None or d < best_distance or (d == best_distance and i < best_index):
                best_index, best_distance = i, d
        return best_index


def _check_pairing_args(closest_ratio: float, max_pairs: int | None, cap_name: str) -> None:
    if not 0.0 <= closest_ratio <= 1.0:
        raise ValueError(f"closest_ratio must be in [0, 1], got {closest_ratio}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"{cap_name} must be >= 0 or None, got {max_pairs}")


def pair_negatives(
    chosen: list[str],
    rejected: list[str],
    *,
    closest_ratio: float = 0.5,
    max_pairs: int | None,
    rng: random.Random,
) -> list[tuple[str, str, str]]:
    """Pair correct programs with incorrect ones, some by nearest Levenshtein distance and the rest at random.

    Duplicates in either list are ignored. The number of pairs is ``max(len(chosen), len(rejected))``: each
    correct program gets a negative (IotaCode's "a wrong solution for each correct one"), and when there are
    more incorrect programs than correct ones the correct ones are reused so that every incorrect one can
    appear; then it is capped at ``max_pairs``. No (chosen, rejected) pair repeats. Of the ``n`` pairs,
    exactly ``round(closest_ratio * n)`` (halves round up) are "closest": the nearest incorrect program not
    yet paired with that correct one. The others are "random": a random incorrect program, preferring ones
    not yet used by any pair. Which correct programs are used (when capped) and which get which strategy is
    drawn from ``rng``. Callers drop rejected programs identical to a chosen one beforehand (see
    :func:`same_program`); this function does not look for them.

    Args:
        chosen: correct programs.
        rejected: incorrect programs.
        closest_ratio: fraction of pairs whose negative is the Levenshtein-nearest one, in [0, 1].
        max_pairs: most pairs to return; None for no cap.
        rng: the source of every random choice (seed it for reproducible pairs).

    Returns:
        ``(chosen, rejected, strategy)`` tuples, strategy ``"closest"`` or ``"random"``.
    """
    _check_pairing_args(closest_ratio, max_pairs, "max_pairs")
    chosen, rejected = _unique(chosen), _unique(rejected)
    if not chosen or not rejected:
        return []
    n = max(len(chosen), len(rejected))
    if max_pairs is not None:
        n = min(n, max_pairs)
    # Slots: a shuffled pass over the chosen programs, repeated while more pairs are needed.
    slots: list[int] = []
    while len(slots) < n:
        order = list(range(len(chosen)))
        rng.shuffle(order)
        slots.extend(order[: n - len(slots)])
    n_closest = int(closest_ratio * n + 0.5)
    strategies = ["closest"] * n_closest + ["random"] * (n - n_closest)
    rng.shuffle(strategies)

    nearest: dict[int, _Nearest] = {}
    profiles = [_Profile(r) for r in rejected] if n_closest else []
    paired: dict[int, set[int]] = {c: set() for c in range(len(chosen))}
    used: set[int] = set()
    pairs: list[tuple[str, str, str]] = []
    for c, strategy in zip(slots, strategies):
        if strategy == "closest":
            if c not in nearest:
                nearest[c] = _Nearest(chosen[c], profiles)
            r = nearest[c].best(paired[c])
        else:
            fresh = [i for i in range(len(rejected)) if i not in used and i not in paired[c]]
            pool = fresh or [i for i in range(len(rejected)) if i not in paired[c]]
            r = rng.choice(pool)
        paired[c].add(r)
        used.add(r)
        pairs.append((chosen[c], rejected[r], strategy))
    return pairs


def _seeded_rng(seed: int, *keys: object) -> random.Random:
    """A generator for one prompt, so its pairs depend on the seed and the prompt only, not on input order."""
    key = "\x1f".join(str(k) for k in (seed, *keys))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


class _Collector:
    """Accumulates triplets, dropping exact duplicates and counting what was dropped."""

    def __init__(self) -> None:
        self.triplets: list[Triplet] = []
        self.seen: set[tuple[str, str, str]] = set()
        self.counts: Counter[str] = Counter()

    def add(self, triplet: Triplet) -> None:
        key = (triplet.prompt, triplet.chosen, triplet.rejected)
        if key in self.seen:
            self.counts["duplicates"] += 1
            return
        self.seen.add(key)
        self.triplets.append(triplet)
        self.counts[triplet.strategy] += 1

    def pair(
        self,
        prompt: str,
        source_id: str,
        chosen: list[str],
        rejected: list[str],
        closest_ratio: float,
        max_pairs: int | None,
        rng: random.Random,
    ) -> None:
        """Clean one prompt's programs (duplicates, chosen == rejected), pair them and add the triplets."""
        unique_chosen, unique_rejected = _unique(chosen), _unique(rejected)
        repeated = (len(chosen) - len(unique_chosen)) + (len(rejected) - len(unique_rejected))
        self.counts["duplicate_solutions"] += repeated
        correct = {c.rstrip() for c in unique_chosen}  # same_program, as a set lookup
        negatives = [r for r in unique_rejected if r.rstrip() not in correct]
        self.counts["identical_pairs"] += len(unique_rejected) - len(negatives)
        if not unique_chosen:
            self.counts["problems_without_correct"] += 1
            return
        if not negatives:
            self.counts["problems_without_incorrect"] += 1
            return
        for c, r, strategy in pair_negatives(
            unique_chosen, negatives, closest_ratio=closest_ratio, max_pairs=max_pairs, rng=rng
        ):
            self.add(Triplet(prompt=prompt, chosen=c, rejected=r, source_id=source_id, strategy=strategy))

    def result(self, *keys: str) -> tuple[list[Triplet], dict[str, int]]:
        counts = {k: 0 for k in keys}
        counts.update(self.counts)
        counts["triplets"] = len(self.triplets)
        return self.triplets, counts


_COUNT_KEYS = (
    "problems",
    "problems_without_correct",
    "problems_without_incorrect",
    "identical_pairs",
    "duplicate_solutions",
    "duplicates",
    "closest",
    "random",
)


def triplets_from_code_contests(
    problems: Iterable[CodeContestsProblem],
    languages: Sequence[Language | str | int] = (Language.PYTHON3,),
    closest_ratio: float = 0.5,
    max_pairs_per_problem: int | None = 8,
    seed: int = 0,
) -> tuple[list[Triplet], dict[str, int]]:
    """Triplets from CodeContests: correct solutions chosen, incorrect ones rejected, within each language.

    A problem yields one prompt per language (:func:`problem_prompt`); chosen and rejected programs are both
    in that language. Counts are per (problem, language): ``problems``, ``problems_without_correct`` and
    ``problems_without_incorrect`` (skipped), ``identical_pairs`` (incorrect solutions equal to a correct one,
    dropped), ``duplicate_solutions`` (a solution repeated within a problem, kept once), ``duplicates``
    (triplets already produced, e.g. by a problem listed twice, dropped), ``closest``, ``random``, ``triplets``.

    Args:
        problems: loaded problems (:func:`lit_align.data_modules.code_contests.load_code_contests`).
        languages: languages to keep, as :class:`Language` or names such as ``"python3"``, ``"cpp"``.
        closest_ratio: fraction of each prompt's pairs whose negative is the Levenshtein-nearest one.
        max_pairs_per_problem: most triplets per problem and language; None for no cap.
        seed: seed for every random choice; the same seed gives the same triplets.
    """
    _check_pairing_args(closest_ratio, max_pairs_per_problem, "max_pairs_per_problem")
    langs = _unique_languages(languages)
    collector = _Collector()
    for problem in problems:
        for language in langs:
            collector.counts["problems"] += 1
            collector.pair(
                prompt=problem_prompt(problem, language),
                source_id=problem.name,
                chosen=problem.solutions_in(language),
                rejected=problem.incorrect_solutions_in(language),
                closest_ratio=closest_ratio,
                max_pairs=max_pairs_per_problem,
                rng=_seeded_rng(seed, problem.name, language.name),
            )
    return collector.result(*_COUNT_KEYS)


def _unique_languages(languages: Sequence[Language | str | int]) -> list[Language]:
    if isinstance(languages, (str, int)):
        languages = [languages]
    parsed = list(dict.fromkeys(parse_language(lang) for lang in languages))
    if not parsed:
        raise ValueError("languages is empty; name at least one, e.g. ['python3']")
    if Language.UNKNOWN in parsed:
        raise ValueError("languages may not include UNKNOWN: there is no language to ask the policy for")
    return parsed


def triplets_from_task_suite(
    tasks: Iterable[Any],
    closest_ratio: float = 0.5,
    max_pairs_per_problem: int | None = 8,
    seed: int = 0,
) -> tuple[list[Triplet], dict[str, int]]:
    """Triplets from the built-in task suite: the canonical solution chosen, each incorrect completion rejected.

    With one correct program per task, every incorrect completion is paired with it (up to the cap), the
    "closest" ones in order of distance. Counts as in :func:`triplets_from_code_contests`, per task.

    Args:
        tasks: ``CodeTask`` objects from ``lit_align.data_modules.task_suite.load_task_suite`` (anything with
            ``task_id``, ``prompt``, ``canonical_solution`` and ``incorrect_solutions`` as (kind, completion) pairs).
        closest_ratio: fraction of each task's pairs whose negative is the Levenshtein-nearest one.
        max_pairs_per_problem: most triplets per task; None for no cap.
        seed: seed for every random choice; the same seed gives the same triplets.
    """
    _check_pairing_args(closest_ratio, max_pairs_per_problem, "max_pairs_per_problem")
    collector = _Collector()
    for task in tasks:
        collector.counts["problems"] += 1
        collector.pair(
            prompt=task.prompt,
            source_id=task.task_id,
            chosen=[task.canonical_solution],
            rejected=[completion for _kind, completion in task.incorrect_solutions],
            closest_ratio=closest_ratio,
            max_pairs=max_pairs_per_problem,
            rng=_seeded_rng(seed, task.task_id),
        )
    return collector.result(*_COUNT_KEYS)


_FILE_BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_table(path_or_id: str, split: str) -> tuple[datasets.Dataset, str]:
    """Load a local file, a local directory, or a hub dataset; return it with a name for error messages."""
    import datasets

    path = Path(path_or_id).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"unsupported triplet file type {path.suffix!r} for {str(path)!r}; "
                f"expected one of {sorted(_FILE_BUILDERS)}"
            )
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split), str(path)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split), str(path)
    if (
        path_or_id.startswith((os.sep, ".", "~"))
        or path.suffix.lower() in _FILE_BUILDERS
        or path_or_id.count("/") > 1
    ):
        raise FileNotFoundError(f"triplet file {path_or_id!r} does not exist")
    try:
        with datasets_cache_only_without_hub():
            return datasets.load_dataset(path_or_id, split=split), f"hub dataset {path_or_id!r}"
    except Exception as err:  # network, offline mode, unknown id: all end here
        raise ConnectionError(
            f"could not load hub dataset {path_or_id!r} split {split!r} ({type(err).__name__}: {err}"
            f"{hub_retries_hint()}); "
            "when the hub is unreachable pass a local json/jsonl/parquet/csv file"
        ) from err


def triplets_from_file(
    path_or_id: str,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    split: str = "train",
    id_column: str | None = None,
) -> tuple[list[Triplet], dict[str, int]]:
    """Triplets read as given from a json/jsonl/parquet/csv file, a local dataset directory, or a hub dataset.

    Rows whose chosen equals their rejected (:func:`same_program`) are dropped and counted as
    ``identical_pairs``; rows with an empty or missing value as ``empty``; repeated rows as ``duplicates``.

    Args:
        path_or_id: a local file or directory, or a hub dataset id.
        prompt_column: column holding the prompt: text, or chat messages (rendered with the chat template). A file
            without it whose chosen and rejected columns hold whole conversations takes the messages they share
            before their final assistant replies as the prompt.
        chosen_column: column holding the preferred completion: text, or one assistant message.
        rejected_column: column holding the dispreferred completion: text, or one assistant message.
        split: split to read (a single local file is read whole under this name).
        id_column: column naming the source of each row; when None, rows with the same prompt share a
            ``source_id`` derived from the file name and a hash of the prompt.

    Raises:
        FileNotFoundError: a local-looking path does not exist.
        ValueError: a column is missing (the message names it, the file and its columns) or holds non-text values.
    """
    table, where = _load_table(path_or_id, split)
    columns = list(table.column_names)
    # conversational pairs without a prompt column: the prompt is the messages both conversations share
    implicit = (prompt_column not in columns and {chosen_column, rejected_column} <= set(columns) and len(table) > 0
                and is_messages(table[0][chosen_column]))
    needed = {"prompt_column": prompt_column, "chosen_column": chosen_column, "rejected_column": rejected_column}
    if id_column:
        needed["id_column"] = id_column
    for option, column in needed.items():
        if column not in columns and not (implicit and column == prompt_column):
            raise ValueError(missing_column(where, column, option, columns, list(needed.values())))
    stem = Path(path_or_id).stem or path_or_id
    collector = _Collector()
    for row_index, row in enumerate(table):
        if implicit:
            values = list(split_pair(row[chosen_column], row[rejected_column], f"{where}: row {row_index}"))
        else:
            values = [row[prompt_column], row[chosen_column], row[rejected_column]]
            for i, (column, value) in enumerate(zip((prompt_column, chosen_column, rejected_column), values)):
                if is_messages(value):  # conversational rows: the prompt's messages, the assistant's reply as text
                    cell = f"{where}: row {row_index} column {column!r}"
                    values[i] = prompt_value(value, cell) if i == 0 else completion_value(value, cell)
                elif value is not None and not isinstance(value, str):
                    raise ValueError(
                        f"{where}: row {row_index} column {column!r} holds {type(value).__name__}, expected text or "
                        "chat messages"
                    )
        prompt, chosen, rejected = values
        if not prompt or not chosen or not rejected:
            collector.counts["empty"] += 1
            continue
        if same_program(chosen, rejected):
            collector.counts["identical_pairs"] += 1
            continue
        if id_column:
            source_id = str(row[id_column])
        else:
            key = prompt if isinstance(prompt, str) else repr(prompt)  # text as before; a conversation by its repr
            source_id = f"{stem}:{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        collector.add(Triplet(prompt=prompt, chosen=chosen, rejected=rejected, source_id=source_id, strategy="given"))
    collector.counts["rows"] = len(table)
    return collector.result("rows", "empty", "identical_pairs", "duplicates", "given")


def filter_triplets(triplets: Iterable[Triplet], keep: Callable[[Triplet], bool]) -> tuple[list[Triplet], int]:
    """Keep the triplets ``keep`` accepts (a token-length check, say) and count the others.

    Args:
        triplets: triplets to filter.
        keep: predicate; True keeps the triplet.

    Returns:
        The kept triplets in their order, and how many were dropped.
    """
    kept: list[Triplet] = []
    dropped = 0
    for triplet in triplets:
        if keep(triplet):
            kept.append(triplet)
        else:
            dropped += 1
    return kept, dropped
