"""Shared test setup: everything offline, small thread counts, tiny data files."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Tiny models on a small shared machine: one intra-op thread is far faster than contending for cores.
torch.set_num_threads(1)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def add_const_rows(n: int, prompt_key: str = "prompt", completion_key: str = "completion"):
    """Short add-a-constant problems: prompt/completion rows a tiny model can learn."""
    return [{prompt_key: f'def add_{k}(x):\n    """Return x plus {k}."""\n', completion_key: f"    return x + {k}\n"}
            for k in range(n)]


@pytest.fixture
def pairs_file(tmp_path):
    return str(write_jsonl(tmp_path / "pairs.jsonl", add_const_rows(48)))
