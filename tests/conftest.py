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


_TWO_PROCESS_GROUPS = pytest.StashKey[list]()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the tests that will run
def pytest_collection_modifyitems(config, items):
    """The 2-process groups the selected tests read (their ``two_process(group)`` marks), in launch order; DeepSpeed's
    only where it is installed (its tests are skipped otherwise)."""
    from importlib.util import find_spec

    from two_process_launches import GROUPS

    marked = {m.args[0] for item in items for m in item.iter_markers("two_process")}
    unknown = marked - set(GROUPS)
    if unknown:
        raise pytest.UsageError(f"two_process marks name unknown groups {sorted(unknown)}; the groups: {list(GROUPS)}")
    config.stash[_TWO_PROCESS_GROUPS] = [g for g in GROUPS if g in marked
                                         and (not g.startswith("deepspeed") or find_spec("deepspeed") is not None)]


@pytest.fixture(scope="session")
def two_process_runs(request, tmp_path_factory):
    """``two_process_runs(group, name)``: the directory holding the records of the 2-process run ``name`` of ``group``
    (tests/two_process_launches.py: "ddp", "fsdp", "deepspeed2", "deepspeed3"). The first call launches the runs of
    every group a selected test is marked with (``@pytest.mark.two_process(group)``). The launch stops at its first
    failing run: the tests of the runs it finished still pass, those of the runs it did not finish fail with its error
    (all of them fail when it failed after its last run)."""
    from two_process_launches import GROUPS, finished, launch_two_processes

    groups = request.config.stash.get(_TWO_PROCESS_GROUPS, [])
    launched = []

    def run(group: str, name: str):
        if group not in groups:
            pytest.fail(f"the test reads the 2-process group {group!r} but is not marked with it: add "
                        f"@pytest.mark.two_process({group!r}) (or parametrize with two_process_launches.on_two_processes)",
                        pytrace=False)
        if not launched:
            launched.append(launch_two_processes(groups, tmp_path_factory.mktemp("two_process")))
        root, error = launched[0]
        out = root / group / name
        if error is not None and (not finished(out) or all(finished(root / g / r.name) for g in groups for r in GROUPS[g])):
            pytest.fail(f"the 2-process run {group}/{name}: {error}", pytrace=False)
        return out
    return run
