"""Prompts-with-tests DataModule: sources, tests carried alongside, per-process shards, clear errors."""

import json
from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities import move_data_to_device

from lit_align.data_modules.prompts import PromptBatch, PromptItem, PromptSource, PromptsDataModule, load_prompt_items
from lit_align.data_modules.sources import DataError
from lit_align.execution.problems import FunctionProblem, StdioProblem


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_task_suite_prompts_carry_their_humaneval_problem():
    train = load_prompt_items(PromptSource(split="train"))
    heldout = load_prompt_items(PromptSource(split="heldout"))
    assert (len(train), len(heldout)) == (225, 75)
    assert not {i.task_id for i in train} & {i.task_id for i in heldout}
    item = train[0]
    assert item.has_tests and isinstance(item.problem, FunctionProblem)
    assert item.problem.prompt == item.prompt and item.problem.test.startswith("def check(candidate):")
    assert item.problem.entry_point in item.prompt and item.problem.canonical_solution


def test_humaneval_file_and_prompts_only_file(tmp_path):
    rows = [{"task_id": "t/0", "prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n",
             "entry_point": "f"}]
    items = load_prompt_items(PromptSource(path=_jsonl(tmp_path / "he.jsonl", rows)))
    assert items == [PromptItem("t/0", "def f(x):\n", FunctionProblem("t/0", "def f(x):\n", rows[0]["test"], "f"))]
    bare = load_prompt_items(PromptSource(path=_jsonl(tmp_path / "p.jsonl", [{"text": "Write f."}]), prompt_column="text"))
    assert [(i.task_id, i.prompt, i.has_tests) for i in bare] == [("p.jsonl/0", "Write f.", False)]
    with pytest.raises(DataError, match="has no column 'prompt'.*'text'"):
        load_prompt_items(PromptSource(path=str(tmp_path / "p.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_items(PromptSource(path=str(tmp_path / "missing.parquet")))


def test_humaneval_row_with_a_bad_field_names_it(tmp_path):
    rows = [{"task_id": "t/0", "prompt": "def f(x):\n", "test": 3, "entry_point": "f"}]
    with pytest.raises(DataError, match="row 0.*'test' must be a string"):
        load_prompt_items(PromptSource(path=_jsonl(tmp_path / "he.jsonl", rows)))


def test_bundled_humaneval_is_read_offline():
    items = load_prompt_items(PromptSource(path="humaneval", limit=3))
    assert [i.task_id for i in items] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(i.has_tests for i in items)


def test_code_contests_rows_become_stdio_problems_with_the_language_prompt(tmp_path):
    record = {"name": "1_A. Sum", "description": "Print a + b.",
              "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
              "private_tests": {"input": ["5 7\n"], "output": ["12\n"]},
              "generated_tests": {"input": [], "output": []},
              "solutions": {"language": [3], "solution": ["print(sum(map(int, input().split())))\n"]},
              "incorrect_solutions": {"language": [], "solution": []}}
    items = load_prompt_items(PromptSource(path=_jsonl(tmp_path / "cc.jsonl", [record]), language="cpp"))
    (item,) = items
    assert isinstance(item.problem, StdioProblem) and item.language == "cpp"
    assert item.prompt.startswith("Print a + b.") and "C++" in item.prompt
    assert [t.input for t in item.problem.tests] == ["1 2\n", "5 7\n"]


def test_batches_are_prompt_batches_that_lightning_moves_unchanged():
    dm = PromptsDataModule(tokenizer="preset:tiny", batch_size=4, prompt_template="# solve\n{prompt}")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PromptBatch) and len(batch) == 4
    assert all(p.startswith("# solve\ndef ") for p in batch.prompts)
    assert all(i.problem is not None for i in batch)
    assert move_data_to_device(batch, "cpu") is batch
    assert len(dm.val_items) == 75  # default: the task suite's held-out split


def test_each_process_gets_different_full_batches_and_its_share_of_validation():
    shards, val = [], []
    for rank in (0, 1):
        dm = PromptsDataModule(train_sources=[PromptSource(split="heldout")], val_sources=[PromptSource(split="heldout")],
                               tokenizer="preset:tiny", batch_size=8, eval_batch_size=16)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, lightning_module=None,
                                     fit_loop=SimpleNamespace(restarting=False))
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert all(len(b) == 8 for b in batches) and len(batches) == 75 // 8 // 2
        shards.append({t for b in batches for t in b.task_ids})
        val.append([t for b in dm.val_dataloader() for t in b.task_ids])
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    # validation: every held-out prompt exactly once over the two processes (38 + 37), none dropped
    assert (len(val[0]), len(val[1])) == (38, 37)
    assert sorted(val[0] + val[1]) == sorted(i.task_id for i in load_prompt_items(PromptSource(split="heldout")))


def test_every_process_runs_as_many_validation_steps():
    """3 held-out prompts, one per batch, on 2 processes: 2 and 1, plus an empty batch on the second (every forward
    pass is collective under FSDP and ZeRO-3, so a process must not stop validating before the others)."""
    batches = []
    for rank in (0, 1):
        dm = PromptsDataModule(train_sources=[PromptSource(split="train", limit=8)],
                               val_sources=[PromptSource(split="heldout", limit=3)], tokenizer="preset:tiny",
                               batch_size=2, eval_batch_size=1)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, lightning_module=None,
                                     fit_loop=SimpleNamespace(restarting=False))
        dm.setup("fit")
        loader = dm.val_dataloader()
        batches.append([len(b) for b in loader])
        assert len(loader) == 2
    assert batches == [[1, 1], [1, 0]]


def test_too_few_prompts_and_long_prompts_are_clear_errors(tmp_path):
    rows = [{"prompt": "x" * 50}]
    dm = PromptsDataModule(train_sources=[PromptSource(path=_jsonl(tmp_path / "p.jsonl", rows))], tokenizer="preset:tiny",
                           batch_size=2)
    dm.setup("fit")
    with pytest.raises(DataError, match="1 training prompts cannot fill one batch of 2"):
        dm.train_dataloader()
    short = PromptsDataModule(train_sources=[PromptSource(path=str(tmp_path / "p.jsonl"))], tokenizer="preset:tiny",
                              max_length=10)
    with pytest.raises(DataError, match="longer than max_length=10"):
        short.setup("fit")
    with pytest.raises(DataError, match="must contain '\\{prompt\\}'"):
        PromptsDataModule(prompt_template="no placeholder")
