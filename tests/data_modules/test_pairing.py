"""Preference triplets: edit distance, negative pairing, the three sources, counts and filtering."""

from __future__ import annotations

import json
import random
import time
from functools import lru_cache

import pytest
from code_contests_fixture import (
    SUM_BAD_FAR,
    SUM_BAD_NEAR,
    SUM_CPP_BAD,
    SUM_CPP_OK,
    SUM_OK,
    fake_records,
    write_parquet,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_align.data_modules.code_contests import CodeContestsProblem, Language, load_code_contests
from lit_align.data_modules.pairing import (
    Triplet,
    filter_triplets,
    levenshtein,
    pair_negatives,
    triplets_from_code_contests,
    triplets_from_file,
    triplets_from_task_suite,
)


def reference_distance(a: str, b: str) -> int:
    """The textbook recursion, memoized: only for short strings."""

    @lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def row_dp_distance(a: str, b: str) -> int:
    """The O(len(a) * len(b)) table, one row at a time."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def problems():
    return [CodeContestsProblem.from_record(r) for r in fake_records()]


# --- levenshtein ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("intention", "execution", 5),
        ("saturday", "sunday", 3),
        ("café", "cafe", 1),
        ("ab", "ba", 2),
        ("x" * 100 + "a" + "y" * 100, "x" * 100 + "b" + "y" * 100, 1),
        ("a" * 70, "b" * 70, 70),
        (SUM_OK, SUM_BAD_NEAR, 1),
    ],
)
def test_levenshtein_known_values(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab c\n", max_size=14), st.text(alphabet="ab c\n", max_size=14))
def test_levenshtein_matches_the_recursive_definition(a, b):
    assert levenshtein(a, b) == reference_distance(a, b)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_levenshtein_matches_the_table_on_any_unicode(a, b):
    assert levenshtein(a, b) == row_dp_distance(a, b)


def _program(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghijklmnop (){}=+-*;\n0123456789") for _ in range(length))


def _mutate(rng: random.Random, text: str, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        i = rng.randrange(len(chars))
        op = rng.randrange(3)
        if op == 0:
            chars[i] = rng.choice("XYZ")
        elif op == 1:
            chars.insert(i, rng.choice("XYZ"))
        else:
            del chars[i]
    return "".join(chars)


def test_levenshtein_is_exact_on_program_sized_strings_and_fast():
    rng = random.Random(1)
    a = _program(rng, 400)
    b = _mutate(rng, a, 60)
    assert levenshtein(a, b) == row_dp_distance(a, b)
    # Two 3,000-character programs: the plain table takes seconds in Python; this must take well under one.
    big_a = _program(rng, 3000)
    big_b = _mutate(rng, big_a, 400)
    start = time.perf_counter()
    distance = levenshtein(big_a, big_b)
    elapsed = time.perf_counter() - start
    assert 0 < distance <= 400
    assert elapsed < 0.5, f"levenshtein on 3000-char strings took {elapsed:.3f}s"


# --- pair_negatives ------------------------------------------------------------------------------------------


def test_closest_pairs_pick_the_true_nearest_incorrect_program():
    rng = random.Random(0)
    chosen = [_program(rng, 60) for _ in range(6)]
    rejected = [_mutate(rng, c, rng.randint(1, 20)) for c in chosen] + [_program(rng, 60) for _ in range(4)]
    rng_pairs = random.Random(3)
    pairs = pair_negatives(chosen, rejected, closest_ratio=1.0, max_pairs=6, rng=rng_pairs)
    assert len(pairs) == 6
    for c, r, strategy in pairs:
        assert strategy == "closest"
        distances = [levenshtein(c, x) for x in rejected]
        assert levenshtein(c, r) == min(distances)
        assert r == rejected[distances.index(min(distances))]  # ties go to the first listed


@settings(max_examples=150, deadline=None)
@given(
    st.text(alphabet="abc(); ", max_size=12),
    st.lists(st.text(alphabet="abc(); ", max_size=12), min_size=1, max_size=8, unique=True),
)
def test_closest_equals_brute_force_argmin(chosen, rejected):
    pairs = pair_negatives([chosen], rejected, closest_ratio=1.0, max_pairs=1, rng=random.Random(0))
    distances = [reference_distance(chosen, r) for r in rejected]
    assert pairs == [(chosen, rejected[distances.index(min(distances))], "closest")]


def test_one_chosen_is_paired_with_every_rejected_closest_first():
    chosen = ["abcdef"]
    rejected = ["zzzzzz", "abcdxx", "abcdex", "abzzzz"]  # distances 6, 2, 1, 4
    pairs = pair_negatives(chosen, rejected, closest_ratio=1.0, max_pairs=None, rng=random.Random(0))
    assert [r for _, r, _ in pairs] == ["abcdex", "abcdxx", "abzzzz", "zzzzzz"]
    capped = pair_negatives(chosen, rejected, closest_ratio=1.0, max_pairs=2, rng=random.Random(0))
    assert [r for _, r, _ in capped] == ["abcdex", "abcdxx"]
    # a tie (both at distance 2) goes to the first listed, though "ba" has the smaller character-count bound
    tie = pair_negatives(["ab"], ["cd", "ba"], closest_ratio=1.0, max_pairs=1, rng=random.Random(0))
    assert tie == [("ab", "cd", "closest")]


@pytest.mark.parametrize(
    ("ratio", "max_pairs", "closest", "random_"),
    [(0.5, 8, 4, 4), (0.25, 8, 2, 6), (0.3, None, 3, 7), (0.0, None, 0, 10), (1.0, 5, 5, 0), (0.5, 7, 4, 3)],
)
def test_closest_and_random_counts_match_the_ratio(ratio, max_pairs, closest, random_):
    chosen = [f"print({k} * n)" for k in range(10)]
    rejected = [f"print({k} + n)" for k in range(10)]
    pairs = pair_negatives(chosen, rejected, closest_ratio=ratio, max_pairs=max_pairs, rng=random.Random(0))
    strategies = [s for _, _, s in pairs]
    assert strategies.count("closest") == closest
    assert strategies.count("random") == random_
    assert len({(c, r) for c, r, _ in pairs}) == len(pairs)  # no pair twice


def test_random_negatives_spread_over_the_incorrect_programs():
    chosen = ["a", "b"]
    rejected = [f"wrong {k}" for k in range(6)]
    pairs = pair_negatives(chosen, rejected, closest_ratio=0.0, max_pairs=None, rng=random.Random(0))
    assert len(pairs) == 6  # more incorrect than correct: every incorrect one appears
    assert sorted(r for _, r, _ in pairs) == rejected
    assert sorted(c for c, _, _ in pairs) == ["a", "a", "a", "b", "b", "b"]


def test_pairing_is_deterministic_under_a_seed_and_varies_across_seeds():
    chosen = [f"solution {k}" for k in range(20)]
    rejected = [f"wrong {k}" for k in range(20)]

    def run(seed):
        return pair_negatives(chosen, rejected, closest_ratio=0.5, max_pairs=8, rng=random.Random(seed))

    assert run(0) == run(0)
    assert run(0) != run(1)
    many = problems()
    first = triplets_from_code_contests(many, seed=5)
    assert first == triplets_from_code_contests(many, seed=5)
    assert first[0] != triplets_from_code_contests(many, seed=6)[0]
    # a problem's triplets do not depend on which other problems are in the list
    alone = triplets_from_code_contests([many[3]], seed=5)[0]
    assert alone == [t for t in first[0] if t.source_id == "4_D. Scale"]


def test_pair_negatives_validates_its_arguments():
    with pytest.raises(ValueError, match="closest_ratio must be in \\[0, 1\\], got 1.5"):
        pair_negatives(["a"], ["b"], closest_ratio=1.5, max_pairs=None, rng=random.Random(0))
    with pytest.raises(ValueError, match="max_pairs must be >= 0"):
        pair_negatives(["a"], ["b"], max_pairs=-1, rng=random.Random(0))
    assert pair_negatives([], ["b"], max_pairs=None, rng=random.Random(0)) == []
    assert pair_negatives(["a"], [], max_pairs=None, rng=random.Random(0)) == []


# --- CodeContests ----------------------------------------------------------------------------------------------


def test_code_contests_triplets_and_counts():
    triplets, counts = triplets_from_code_contests(problems(), closest_ratio=0.5, max_pairs_per_problem=8, seed=0)
    assert counts == {
        "problems": 4,
        "problems_without_correct": 0,
        "problems_without_incorrect": 1,  # 2_B. Echo has only a Java incorrect solution
        "identical_pairs": 1,  # 3_C. Max lists its correct program (plus spaces) as incorrect
        "duplicate_solutions": 0,
        "duplicates": 0,
        "closest": 6,
        "random": 5,
        "triplets": 11,
    }
    by_problem = {}
    for t in triplets:
        by_problem.setdefault(t.source_id, []).append(t)
    assert sorted(by_problem) == ["1_A. Sum", "3_C. Max", "4_D. Scale"]
    assert len(by_problem["4_D. Scale"]) == 8  # capped
    assert [t.rejected for t in by_problem["3_C. Max"]] == ["print(min(map(int, input().split())))\n"]
    instruction = "Write a Python 3 program that reads from standard input and writes to standard output.\n"
    for t in triplets:
        assert t.chosen != t.rejected
        assert t.prompt.endswith(instruction)
    sum_closest = [t for t in by_problem["1_A. Sum"] if t.strategy == "closest"]
    assert len(sum_closest) == 1
    nearest = min((SUM_BAD_NEAR, SUM_BAD_FAR), key=lambda r: levenshtein(sum_closest[0].chosen, r))
    assert sum_closest[0].rejected == nearest


def test_cap_per_problem():
    scale = problems()[3]
    assert len(triplets_from_code_contests([scale], max_pairs_per_problem=3)[0]) == 3
    assert len(triplets_from_code_contests([scale], max_pairs_per_problem=None)[0]) == 10
    assert triplets_from_code_contests([scale], max_pairs_per_problem=0)[0] == []


def test_duplicates_are_removed_and_counted():
    scale = problems()[3]
    once, _ = triplets_from_code_contests([scale], max_pairs_per_problem=4)
    twice, counts = triplets_from_code_contests([scale, scale], max_pairs_per_problem=4)
    assert twice == once
    assert counts["duplicates"] == 4 and counts["triplets"] == 4

    record = fake_records()[0]
    record["solutions"]["language"].append(3)
    record["solutions"]["solution"].append(SUM_OK)
    record["incorrect_solutions"]["language"].append(3)
    record["incorrect_solutions"]["solution"].append(SUM_BAD_FAR)
    doubled = CodeContestsProblem.from_record(record)
    triplets, counts = triplets_from_code_contests([doubled], max_pairs_per_problem=None)
    assert counts["duplicate_solutions"] == 2
    assert len(triplets) == len(set(triplets)) == 2


def test_language_filtering_pairs_within_one_language():
    triplets, counts = triplets_from_code_contests(problems(), languages=["cpp"], closest_ratio=1.0)
    assert [(t.source_id, t.chosen, t.rejected) for t in triplets] == [("1_A. Sum", SUM_CPP_OK, SUM_CPP_BAD)]
    assert "Write a C++ program" in triplets[0].prompt
    assert counts["problems_without_correct"] == 3

    languages = ("python3", Language.CPP)
    both, counts = triplets_from_code_contests(problems(), languages=languages, max_pairs_per_problem=None)
    assert counts["problems"] == 8
    cpp = {SUM_CPP_OK, SUM_CPP_BAD}
    for t in both:
        assert (t.chosen in cpp) == (t.rejected in cpp) == ("C++" in t.prompt)
    assert len(both) == 2 + 1 + 10 + 1


def test_bad_languages_are_clear_errors():
    with pytest.raises(ValueError, match="'rust' is not one of UNKNOWN=0, PYTHON2=1, CPP=2, PYTHON3=3, JAVA=4"):
        triplets_from_code_contests(problems(), languages=["rust"])
    with pytest.raises(ValueError, match="UNKNOWN"):
        triplets_from_code_contests(problems(), languages=[0])
    with pytest.raises(ValueError, match="max_pairs_per_problem must be >= 0 or None, got -2"):
        triplets_from_code_contests([], max_pairs_per_problem=-2)
    with pytest.raises(ValueError, match="closest_ratio must be in"):
        triplets_from_task_suite([], closest_ratio=-0.1)
    with pytest.raises(ValueError, match="languages is empty"):
        triplets_from_code_contests(problems(), languages=[])


def test_loaded_parquet_gives_the_same_triplets_as_records(tmp_path):
    loaded = load_code_contests(str(write_parquet(tmp_path / "cc.parquet")))
    assert triplets_from_code_contests(loaded, seed=3) == triplets_from_code_contests(problems(), seed=3)


# --- task suite ----------------------------------------------------------------------------------------------


def test_task_suite_triplets_pair_the_canonical_solution_with_its_incorrect_completions():
    from lit_align.data_modules.task_suite import load_task_suite

    tasks = load_task_suite(split="train", seed=0)
    triplets, counts = triplets_from_task_suite(tasks, closest_ratio=0.5, max_pairs_per_problem=8, seed=0)
    assert counts["problems"] == len(tasks)
    by_task = {t.task_id: t for t in tasks}
    expected = 0
    for task in tasks:
        negatives = {c for _, c in task.incorrect_solutions if c.rstrip() != task.canonical_solution.rstrip()}
        expected += min(len(negatives), 8)
    assert counts["triplets"] == len(triplets) == expected > 0
    for t in triplets:
        task = by_task[t.source_id]
        assert t.prompt == task.prompt
        assert t.chosen == task.canonical_solution
        assert t.rejected in {c for _, c in task.incorrect_solutions}
    assert counts["closest"] + counts["random"] == len(triplets)
    # a body indented by two spaces instead of four is a different (broken) Python program, not a duplicate
    assert counts["identical_pairs"] == 0
    assert any(t.rejected.lstrip() == t.chosen.lstrip() for t in triplets)
    assert triplets_from_task_suite(tasks, seed=0) == (triplets, counts)


# --- local files -----------------------------------------------------------------------------------------------

ROWS = [
    {"q": "p1", "good": "print(1)", "bad": "print(2)", "id": "a"},
    {"q": "p1", "good": "print(1)", "bad": "print(2)", "id": "a"},  # duplicate row
    {"q": "p2", "good": "x = 1\n", "bad": "x = 1", "id": "b"},  # chosen == rejected up to trailing whitespace
    {"q": "p3", "good": "return 3", "bad": "", "id": "c"},  # empty rejected
    {"q": "p4", "good": "return 4", "bad": "return 5", "id": "d"},
]


def _write_rows(tmp_path, fmt):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_triplets_from_file_with_custom_columns(tmp_path, fmt):
    path = _write_rows(tmp_path, fmt)
    triplets, counts = triplets_from_file(
        str(path), prompt_column="q", chosen_column="good", rejected_column="bad", id_column="id"
    )
    assert triplets == [
        Triplet("p1", "print(1)", "print(2)", "a", "given"),
        Triplet("p4", "return 4", "return 5", "d", "given"),
    ]
    assert counts == {"rows": 5, "empty": 1, "identical_pairs": 1, "duplicates": 1, "given": 2, "triplets": 2}


def test_triplets_from_file_source_id_groups_rows_by_prompt(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    triplets, _ = triplets_from_file(str(path))
    assert triplets[0].source_id == triplets[1].source_id != triplets[2].source_id
    assert triplets[0].source_id.startswith("t:")


def test_triplets_from_file_errors(tmp_path):
    path = _write_rows(tmp_path, "jsonl")
    with pytest.raises(ValueError) as info:
        triplets_from_file(str(path))
    message = str(info.value)
    assert f"{path} has no column 'prompt' (it has: ['q', 'good', 'bad', 'id']); the source's prompt_column names the " \
        "column to read (e.g. {path: ..., prompt_column: q})" == message
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match=f"{missing}"):
        triplets_from_file(str(missing))
    odd = tmp_path / "pairs.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match="unsupported triplet file type '.txt'"):
        triplets_from_file(str(odd))
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}) + "\n")
    with pytest.raises(ValueError, match="row 0 column 'chosen': message 0 needs a text 'role' and a text 'content'"):
        triplets_from_file(str(nested))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"prompt": "p", "chosen": [1, 2], "rejected": "r"}) + "\n")
    with pytest.raises(ValueError, match="row 0 column 'chosen' holds list, expected text or chat messages"):
        triplets_from_file(str(numbers))


# --- filtering -------------------------------------------------------------------------------------------------


def test_filter_triplets_keeps_what_the_predicate_accepts_and_counts_the_rest():
    triplets, _ = triplets_from_code_contests(problems(), max_pairs_per_problem=None)

    def short(t: Triplet) -> bool:  # stands in for the DataModule's token-length check
        return max(len(t.chosen), len(t.rejected)) <= 32

    kept, dropped = filter_triplets(triplets, short)
    assert kept == [t for t in triplets if t.source_id == "4_D. Scale"]  # its programs are the short ones
    assert (len(kept), dropped) == (10, 3)
    assert filter_triplets(triplets, lambda t: True) == (triplets, 0)
    assert filter_triplets(triplets, lambda t: False) == ([], len(triplets))


def test_triplets_from_file_with_an_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ConnectionError, match="lit-align-tests/no-such.*local json/jsonl/parquet/csv file"):
        triplets_from_file("lit-align-tests/no-such")
