"""SFT data: sources, mixing, masking, length filtering, grouping and the errors users see."""

import pytest

from data_helpers import add_const_rows, write_jsonl
from lit_align.data_modules.sampler import LengthGroupedBatchSampler
from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataError, DataSource, load_prompt_completions, mix
from lit_align.losses import IGNORE_INDEX


def _dm(*sources, **kw):
    kw.setdefault("tokenizer", "preset:tiny")
    return SFTDataModule(train_sources=list(sources), **kw)


def test_prompt_tokens_are_masked_and_eos_is_learned(pairs_file):
    dm = _dm(DataSource(path=pairs_file), val_fraction=0.0)
    dm.setup("fit")
    tok = dm.tokenizer
    item = dm.train_items[0]
    n_prompt = sum(1 for x in item["labels"] if x == IGNORE_INDEX)
    prompt = tok.decode(item["input_ids"][:n_prompt])
    assert prompt.startswith("def add_") and prompt.endswith('"""\n')
    assert tok.decode(item["labels"][n_prompt:-1]).startswith("    return x + ")
    assert item["labels"][-1] == tok.eos_token_id


def test_column_names_and_template(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", add_const_rows(10, "question", "answer"))
    dm = _dm(DataSource(path=str(path), prompt_column="question", completion_column="answer"),
             prompt_template="# Solve:\n{prompt}", val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_items) == 8 and len(dm.val_items) == 2
    assert dm.tokenizer.decode(dm.train_items[0]["input_ids"]).startswith("# Solve:\ndef add_")


def test_missing_column_names_column_file_and_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", add_const_rows(4, "question", "answer"))
    with pytest.raises(DataError, match=r"has no column 'prompt' \(it has: \['question', 'answer'\]\); the source's prompt_column names the column "
                                      r"to read \(e.g. \{path: ..., prompt_column: question\}\)"):
        _dm(DataSource(path=str(path))).setup("fit")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nope.jsonl' does not exist"):
        _dm(DataSource(path=str(tmp_path / "nope.jsonl"))).setup("fit")


def test_empty_after_length_filtering_is_an_error_and_drops_are_counted(pairs_file):
    with pytest.raises(DataError, match="empty after length filtering.*max_length=10"):
        _dm(DataSource(path=pairs_file), max_length=10).setup("fit")
    dm = _dm(DataSource(path=pairs_file), max_length=60, val_fraction=0.0)
    dm.setup("fit")
    # k < 10 gives 59-token examples (one byte per token, plus eos); k >= 10 writes k twice, one byte longer each: 62
    assert dm.dropped["train"] == 38 and len(dm.train_items) == 10


def test_bad_template_and_fraction_are_refused():
    with pytest.raises(DataError, match="prompt_template must contain"):
        SFTDataModule(prompt_template="no placeholder")
    with pytest.raises(DataError, match="val_fraction"):
        SFTDataModule(val_fraction=1.5)


def test_mixing_keeps_the_ratio_without_repeating_rows():
    a = [{"src": "a", "i": i} for i in range(100)]
    b = [{"src": "b", "i": i} for i in range(30)]
    mixed = mix([a, b], [1.0, 1.0], seed=0)
    assert sum(r["src"] == "a" for r in mixed) == 30 and sum(r["src"] == "b" for r in mixed) == 30
    mixed = mix([a, b], [3.0, 1.0], seed=0)
    assert sum(r["src"] == "a" for r in mixed) == 90 and sum(r["src"] == "b" for r in mixed) == 30
    assert len({(r["src"], r["i"]) for r in mixed}) == len(mixed)
    assert mix([a, b], [3.0, 1.0], seed=0) == mixed and mix([a, b], [3.0, 1.0], seed=1) != mixed


def test_two_sources_mix_in_the_data_module(tmp_path):
    p1 = write_jsonl(tmp_path / "a.jsonl", add_const_rows(40))
    p2 = write_jsonl(tmp_path / "b.parquet.jsonl", [{"prompt": "p%d" % i, "completion": "c"} for i in range(10)])
    dm = _dm(DataSource(path=str(p1)), DataSource(path=str(p2)), val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_items) == 20  # 10 of each, 1:1


def test_task_suite_is_the_default_source():
    rows = load_prompt_completions(DataSource(split="heldout"))
    assert len(rows) == 75 and all(r["completion"].startswith("    ") for r in rows)
    dm = SFTDataModule(tokenizer="preset:tiny")
    dm.setup("fit")
    assert len(dm.train_items) == 225 and len(dm.val_items) == 75


def test_length_grouped_sampler_is_seeded_complete_and_sharded():
    lengths = [(i * 37) % 101 for i in range(103)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_window=4)
    first = list(s)
    assert sorted(i for b in first for i in b) == list(range(103)) and len(first) == len(s) == 13
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    # within a batch lengths are close: padding stays small compared with random batching
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 40
    ranks = [list(LengthGroupedBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    s.set_epoch(0)
    s.skip_batches(5)
    assert list(s) == first[5:] and list(s) == first  # the skip applies to one iteration only


def test_batches_are_tagged_with_their_accumulation_windows_tokens_over_every_rank():
    """window_tokens: the target tokens of the batch's window of 3 global batches (both ranks' shares), windows
    from the epoch's first batch; the last window ends with the epoch, or where limit_train_batches cuts it."""
    import pickle

    from lit_align.data_modules.sampler import TaggedBatch

    lengths = [(i * 37) % 101 for i in range(103)]
    targets = [1 + i % 5 for i in range(103)]
    plan = [(3, None)]

    def ranks():
        return [list(LengthGroupedBatchSampler(lengths, 4, seed=3, num_replicas=2, rank=r, target_tokens=targets,
                                               accumulation=lambda: plan[0])) for r in (0, 1)]

    r0, r1 = ranks()
    assert len(r0) == 12 and all(isinstance(b, TaggedBatch) for b in r0 + r1)
    per_step = [sum(targets[i] for i in a + b) for a, b in zip(r0, r1)]
    expected = [sum(per_step[s:s + 3]) for s in range(0, 12, 3) for _ in range(3)]
    assert [b.window_tokens for b in r0] == [b.window_tokens for b in r1] == expected
    plan[0] = (5, 7)  # 5 per step, the epoch cut to 7 batches: windows [0, 5) and [5, 7)
    r0, _ = ranks()
    assert [b.window_tokens for b in r0[:7]] == [sum(per_step[:5])] * 5 + [sum(per_step[5:7])] * 2
    assert pickle.loads(pickle.dumps(r0[6])).window_tokens == r0[6].window_tokens  # to DataLoader workers
    untagged = list(LengthGroupedBatchSampler(lengths, 4, seed=3, num_replicas=2, rank=0))
    assert untagged == [list(b) for b in r0] and not any(isinstance(b, TaggedBatch) for b in untagged)
    plan[0] = (1, None)  # one micro-batch per step: no tags (the module's all-reduce weighs the processes)
    assert not any(isinstance(b, TaggedBatch) for b in ranks()[0])
    counted = []
    lazy = LengthGroupedBatchSampler(lengths, 4, target_tokens=lambda: counted.append(1) or targets,
                                     accumulation=lambda: (2, None))
    assert not counted and isinstance(next(iter(lazy)), TaggedBatch) and counted == [1]
    list(lazy)
    assert counted == [1]  # counted once
    with pytest.raises(ValueError, match="target_tokens has 2 entries for 103 examples"):
        LengthGroupedBatchSampler(lengths, 4, target_tokens=[1, 2])


def test_sft_training_batches_carry_window_tokens_through_dataloader_workers(pairs_file):
    """With 2 micro-batches per step, a training batch's tag is its own and its window partner's completion tokens
    (counted as SFT's shifted loss counts them), also through a DataLoader worker; validation batches, and training
    batches without accumulation, carry none."""
    dm = _dm(DataSource(path=pairs_file), val_fraction=0.2, batch_size=3, num_workers=1)
    dm.setup("fit")
    assert all("window_tokens" not in b for b in dm.train_dataloader())  # no trainer: one micro-batch per step
    dm._accumulation = lambda: (2, None)  # what a trainer with accumulate_grad_batches=2 gives
    batches = list(dm.train_dataloader())
    own = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    assert len(batches) >= 4 and len(set(own)) > 1
    assert [int(b["window_tokens"]) for b in batches[:4]] == [own[0] + own[1]] * 2 + [own[2] + own[3]] * 2
    assert all("window_tokens" not in b for b in dm.val_dataloader())


def test_task_suite_mixed_quality_replaces_the_given_share_with_incorrect_solutions():
    from lit_align.data_modules.task_suite import load_task_suite

    tasks = load_task_suite(split="train")
    rows = load_prompt_completions(DataSource(split="train", incorrect_fraction=0.2))
    wrong = [r for r, t in zip(rows, tasks) if r["completion"] != t.canonical_solution]
    assert len(wrong) == round(0.2 * len(tasks)) == 45
    incorrect = {c for t in tasks for _, c in t.incorrect_solutions}
    assert all(r["completion"] in incorrect for r in wrong)
    assert load_prompt_completions(DataSource(split="train", incorrect_fraction=0.2)) == rows
    with pytest.raises(DataError, match="incorrect_fraction"):
        load_prompt_completions(DataSource(incorrect_fraction=1.5))


def test_larger_task_suite_adds_train_problems_and_never_a_heldout_one():
    from lit_align.data_modules.preference import PreferenceSource, load_triplets
    from lit_align.data_modules.prompts import PromptSource, load_prompt_items
    from lit_align.data_modules.task_suite import load_task_suite

    heldout = {t.prompt for t in load_task_suite(split="heldout")}
    big = load_prompt_completions(DataSource(split="train", problems_per_family=105))
    assert len(big) == 400 and not heldout & {r["prompt"] for r in big}
    default = {r["prompt"] for r in load_prompt_completions(DataSource(split="train"))}
    assert default < {r["prompt"] for r in big}  # the default suite's train problems are all still there
    items = load_prompt_items(PromptSource(split="train", problems_per_family=105))
    assert {i.prompt for i in items} == {r["prompt"] for r in big}
    triplets, _ = load_triplets(PreferenceSource(problems_per_family=105), closest_ratio=0.5, max_pairs_per_problem=1,
                                seed=0)
    assert len({t.prompt for t in triplets}) == 400
    for bad in (DataSource(problems_per_family=500), PromptSource(problems_per_family=500)):
        with pytest.raises(DataError, match="problems_per_family=500"):
            (load_prompt_completions if isinstance(bad, DataSource) else load_prompt_items)(bad)


def test_data_seed_defaults_to_the_runs_seed_and_an_explicit_seed_wins(monkeypatch):
    import lightning.pytorch as L

    def order(**kw):
        dm = SFTDataModule(tokenizer="preset:tiny", batch_size=4, **kw)
        dm.setup("fit")
        return [tuple(dm.train_items[i]["input_ids"]) for b in dm._batch_sampler(dm.train_items, 4, True) for i in b]

    assert SFTDataModule(tokenizer="preset:tiny").seed == 0  # no seed_everything: 0, as before
    unseeded = order()
    L.seed_everything(7, verbose=False)
    assert SFTDataModule(tokenizer="preset:tiny").seed == 7
    assert order() == order(seed=7) != unseeded  # --seed_everything 7 alone now changes the data order
    assert SFTDataModule(tokenizer="preset:tiny", seed=3).seed == 3
    assert order(seed=0) == unseeded
    with pytest.raises(DataError, match="data seed must be an integer"):
        SFTDataModule(tokenizer="preset:tiny", seed="1")
