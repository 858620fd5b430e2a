"""Shared test setup: everything offline, small thread counts, tiny data files."""

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


from data_helpers import add_const_rows, write_jsonl  # noqa: E402


@pytest.fixture
def pairs_file(tmp_path):
    return str(write_jsonl(tmp_path / "pairs.jsonl", add_const_rows(48)))
