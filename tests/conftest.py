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


@pytest.fixture(autouse=True)
def _no_global_seed_between_tests(monkeypatch):
    """``seed_everything`` exports PL_GLOBAL_SEED, which DataModules with ``seed: null`` read; one test's seed must
    not become the next test's (or the next module's fixtures') data order."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
    """The directory of a group's 2-process runs (tests/two_process_launches.py: "ddp", "fsdp", "deepspeed2",
    "deepspeed3"), the group launched when a test first asks for it; a run's records are in ``<directory>/<name>``."""
    from two_process_launches import GROUPS, launch_two_processes

    launched = {}

    def runs(group: str):
        if group not in launched:
            launched[group] = launch_two_processes(GROUPS[group], tmp_path_factory.mktemp(group))
        return launched[group]
    return runs
