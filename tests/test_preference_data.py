"""Preference DataModule: sources, pairing counts, determinism, caps, duplicates, length filtering, paired batches."""

import json
import logging

import pytest
import torch

from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource, collate_pairs, content_key
from lit_align.data_modules.sources import DataError
from lit_align.losses import IGNORE_INDEX
from lit_align.models import load_tokenizer

PY3, CPP = 3, 2
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_OK_2 = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
SUM_NEAR = "a, b = map(int, input().split())\nprint(a - b)\n"
SUM_FAR = "print(0)\n"
SUM_FAR_2 = "print(input())\n"


def _solutions(pairs):
    return {"language": [lang for lang, _ in pairs], "solution": [text for _, text in pairs]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def code_contests_file(tmp_path):
    rows = [
        {"name": "1_A. Sum", "description": "Print a + b.",
         "solutions": _solutions([(PY3, SUM_OK), (PY3, SUM_OK_2), (CPP, "int main(){}\n")]),
         "incorrect_solutions": _solutions([(PY3, SUM_NEAR), (PY3, SUM_FAR), (PY3, SUM_FAR_2), (CPP, "int x;\n")])},
        {"name": "2_B. Echo", "description": "Echo the line.",
         "solutions": _solutions([(PY3, "print(input())\n")]), "incorrect_solutions": _solutions([])},
        {"name": "3_C. Max", "description": "Print the larger number.",
         "solutions": _solutions([(PY3, "print(max(map(int, input().split())))\n")]),
         "incorrect_solutions": _solutions([(PY3, "print(max(map(int, input().split())))\n  "),
                                            (PY3, "print(min(map(int, input().split())))\n")])},
    ]
    return _write_jsonl(tmp_path / "code_contests-train.jsonl", rows)


@pytest.fixture(scope="module")
def suite_dm():
    dm = PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_length=512)
    dm.setup()
    return dm


def test_task_suite_defaults_train_on_train_tasks_and_validate_on_heldout(suite_dm):
    train_ids = {it.source_id for it in suite_dm.train_items}
    val_ids = {it.source_id for it in suite_dm.val_items}
    assert len(suite_dm.train_items) == 971 and len(suite_dm.val_items) == 324
    assert train_ids.isdisjoint(val_ids)
    stats = suite_dm.stats["train"]
    assert stats["closest"] + stats["random"] == stats["triplets"] == 971
    assert stats["too_long"] == 0 and stats["pairs"] == 971


def test_chosen_and_rejected_share_one_tokenized_prompt(suite_dm):
    items = suite_dm.train_items
    same_prompt = [it for it in items if it.source_id == items[0].source_id]
    assert len(same_prompt) > 1 and all(it.prompt_ids is same_prompt[0].prompt_ids for it in same_prompt)
    batch = collate_pairs(items[:3], pad_token_id=0)
    b = 3
    assert batch["input_ids"].shape[0] == 2 * b
    for i, it in enumerate(items[:3]):
        lp = len(it.prompt_ids)
        chosen, rejected = batch["input_ids"][i], batch["input_ids"][b + i]
        assert torch.equal(chosen[:lp], rejected[:lp]) and chosen[:lp].tolist() == it.prompt_ids.tolist()
        assert (batch["labels"][i, :lp] == IGNORE_INDEX).all() and (batch["labels"][b + i, :lp] == IGNORE_INDEX).all()
        n_c, n_r = len(it.chosen_ids), len(it.rejected_ids)
        assert batch["labels"][i, lp:lp + n_c].tolist() == it.chosen_ids.tolist()
        assert batch["labels"][b + i, lp:lp + n_r].tolist() == it.rejected_ids.tolist()
        assert (batch["labels"][i, lp + n_c:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == lp + n_c and batch["attention_mask"][b + i].sum() == lp + n_r
    tok = load_tokenizer("preset:tiny")
    assert items[0].chosen_ids[-1] == tok.eos_token_id  # completions end with EOS, as in SFT
    assert batch["completion_start"] == min(len(it.prompt_ids) for it in items[:3])
    assert batch["key"].tolist() == [it.key for it in items[:3]]


def test_each_distinct_prompt_and_completion_is_tokenized_once():
    tok = load_tokenizer("preset:tiny")
    seen = []

    class Counting:
        eos_token_id = tok.eos_token_id
        pad_token_id = tok.pad_token_id

        def __call__(self, texts, **kw):
            seen.extend(texts)
            return tok(texts, **kw)

    dm = PreferenceDataModule(val_sources=[], val_fraction=0.0)
    dm.tokenizer = Counting()
    dm.setup()
    assert len(seen) == len(set(seen))
    prompts = {it.prompt_ids.tobytes() for it in dm.train_items}
    assert len(prompts) == 225  # one per training task


def test_pairs_are_deterministic_under_a_seed_and_change_with_it():
    def keys(seed):
        dm = PreferenceDataModule(tokenizer="preset:tiny", seed=seed, val_sources=[], val_fraction=0.0,
                                  closest_ratio=0.5, max_pairs_per_problem=3)
        dm.setup()
        return [it.key for it in dm.train_items]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


def test_code_contests_pairs_within_language_and_counts_skips(code_contests_file, caplog):
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=code_contests_file, languages=["python3"])],
                              val_sources=[], val_fraction=0.0, tokenizer="preset:tiny", closest_ratio=1.0,
                              max_pairs_per_problem=None)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    stats = dm.stats["train"]
    assert stats["problems"] == 3
    assert stats["problems_without_incorrect"] == 1  # 2_B has no incorrect Python 3 solution
    assert stats["identical_pairs"] == 1  # 3_C's first "incorrect" program equals its correct one
    assert stats["closest"] == stats["triplets"] == len(dm.train_items) == 3 + 1  # 1_A: max(2, 3) pairs; 3_C: 1
    assert "skipped 1 problems without incorrect" in caplog.text and "skipped 1 identical pairs" in caplog.text
    tok = dm.tokenizer
    texts = {(tok.decode(it.chosen_ids[:-1].tolist()), tok.decode(it.rejected_ids[:-1].tolist())) for it in dm.train_items}
    assert (SUM_OK, SUM_NEAR) in texts  # the Levenshtein-nearest incorrect program
    assert all("int main" not in c and "int x" not in r for c, r in texts)


def test_cap_per_problem_and_closest_random_mix(code_contests_file):
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=code_contests_file)], val_sources=[],
                              val_fraction=0.0, tokenizer="preset:tiny", closest_ratio=0.5, max_pairs_per_problem=2)
    dm.setup()
    per_problem = {}
    for it in dm.train_items:
        per_problem[it.source_id] = per_problem.get(it.source_id, 0) + 1
    assert per_problem == {"1_A. Sum": 2, "3_C. Max": 1}
    assert dm.stats["train"]["closest"] == 2 and dm.stats["train"]["random"] == 1  # 1 + 1 for 1_A, 1 (rounded up) for 3_C


def test_triplet_file_counts_identical_and_duplicate_rows(tmp_path):
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p1", "chosen": "good", "rejected": "bad"},  # repeated row
            {"prompt": "p2", "chosen": "same\n", "rejected": "same"},  # chosen equals rejected
            {"prompt": "p3", "chosen": "fine", "rejected": "wrong"}]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=path), PreferenceSource(path=path)],
                              val_sources=[], val_fraction=0.0, tokenizer="preset:tiny")
    dm.setup()
    assert len(dm.train_items) == 2
    stats = dm.stats["train"]
    assert stats["identical_pairs"] == 2 and stats["duplicates"] == 2  # counted once per source read
    assert stats["cross_source_duplicates"] == 2  # the second copy of the file adds nothing


def test_length_filtering_drops_and_logs_a_count(caplog):
    dm = PreferenceDataModule(tokenizer="preset:tiny", val_sources=[], val_fraction=0.0, max_length=90)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    dropped = dm.stats["train"]["too_long"]
    assert 0 < dropped < 971 and len(dm.train_items) == 971 - dropped
    assert all(len(it) <= 90 for it in dm.train_items)
    assert f"dropped {dropped} of 971 train examples longer than max_length=90" in caplog.text


def test_validation_holds_out_whole_problems(tmp_path):
    rows = [{"prompt": f"p{k}", "chosen": f"good {k} {j}", "rejected": f"bad {k}", "pid": f"problem{k}"}
            for k in range(20) for j in range(3)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=path, id_column="pid")], val_fraction=0.25,
                              tokenizer="preset:tiny")
    dm.setup()
    train_ids = {it.source_id for it in dm.train_items}
    val_ids = {it.source_id for it in dm.val_items}
    assert len(val_ids) == 5 and train_ids.isdisjoint(val_ids) and len(dm.val_items) == 15


def test_source_kind_is_inferred_from_the_path():
    assert PreferenceSource().resolved_kind == "task_suite"
    assert PreferenceSource(path="deepmind/code_contests").resolved_kind == "code_contests"
    assert PreferenceSource(path="data/pairs.jsonl").resolved_kind == "triplets"
    assert PreferenceSource(path="x.jsonl", kind="code_contests").resolved_kind == "code_contests"


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"PreferenceSource.languages .*'cobol' is not one of"):
        PreferenceSource(path="deepmind/code_contests", languages=["cobol"])
    with pytest.raises(DataError, match="language code 9"):
        PreferenceSource(path="deepmind/code_contests", languages=[9])
    with pytest.raises(DataError, match="closest_ratio"):
        PreferenceDataModule(closest_ratio=1.5)
    with pytest.raises(DataError, match="prompt_template"):
        PreferenceDataModule(prompt_template="no placeholder")
    only_identical = _write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=only_identical)], val_sources=[],
                              val_fraction=0.0, tokenizer="preset:tiny")
    with pytest.raises(DataError, match=r"gave no triplets.*'identical_pairs': 1"):
        dm.setup()
    bad_column = _write_jsonl(tmp_path / "cols.jsonl", [{"question": "p", "chosen": "x", "rejected": "y"}])
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=bad_column)], val_sources=[],
                              val_fraction=0.0, tokenizer="preset:tiny")
    with pytest.raises(DataError, match="has no column 'prompt'.*the source's prompt_column names"):
        dm.setup()
    dm = PreferenceDataModule(train_sources=[PreferenceSource(path=str(tmp_path / "none.jsonl"))],
                              tokenizer="preset:tiny")
    with pytest.raises(DataError, match="does not exist"):
        dm.setup()


def test_content_key_depends_on_every_part_and_on_boundaries():
    import numpy as np

    a = np.array([1, 2], dtype=np.int32)
    b = np.array([3], dtype=np.int32)
    assert content_key(a, b, b) == content_key(a.copy(), b.copy(), b.copy())
    assert content_key(a, b, b) != content_key(b, a, b)
    assert content_key(np.array([1], np.int32), np.array([2, 3], np.int32), b) != content_key(a, b, b)


def test_reference_dataloader_covers_train_and_validation_once(suite_dm):
    keys = torch.cat([batch["key"] for batch in suite_dm.reference_dataloader(batch_size=64)])
    expected = {it.key for it in suite_dm.train_items + suite_dm.val_items}
    assert len(keys) == len(suite_dm.train_items) + len(suite_dm.val_items) and set(keys.tolist()) == expected
