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
    """``two_process_runs(group, name)``: the directory holding the records of the 2-process run ``name`` of ``group``
    (tests/two_process_launches.py: "ddp", "fsdp", "deepspeed2", "deepspeed3"), the group launched when a test first
    asks for it. A launch stops at its first failing run: the tests of the runs it finished still pass, those of the
    runs it did not finish fail with the launch's error (all of them fail when it failed after its last run)."""
    from two_process_launches import GROUPS, finished, launch_two_processes

    launched = {}

    def run(group: str, name: str):
        if group not in launched:
            launched[group] = launch_two_processes(GROUPS[group], tmp_path_factory.mktemp(group))
        root, error = launched[group]
        out = root / name
        if error is not None and (not finished(out) or all(finished(root / r.name) for r in GROUPS[group])):
            pytest.fail(f"the 2-process run {group}/{name}: {error}", pytrace=False)
        return out
    return run
