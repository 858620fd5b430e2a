"""Every 2-process run of the test suite, grouped by strategy, all run in one launch, and the worker script that runs it.

Starting a pair of processes costs about 10 s on this machine: each imports torch, Lightning, transformers, peft and
DeepSpeed. So the runs of every test file that trains on 2 processes (tests/test_ddp_objectives.py, test_fsdp.py,
test_deepspeed.py, test_ddp_sft.py, test_online_ddp.py) run one after another in one pair: later trainers find the
process group made, whatever their strategy. The launcher starts both processes at once with LOCAL_RANK set (as
torchrun would), so Lightning joins them rather than starting process 1 only once process 0 reaches its first fit,
and the two import side by side. The launch starts when a test first asks for a run (the session fixture
``two_process_runs`` in conftest.py) and holds the groups of every selected test (each test is marked
``two_process(group)``), so a run of one test file starts only its groups' runs. Each run writes its records to
``<launch root>/<group>/<run name>``, each process its output to ``<launch root>/worker<rank>.log``.

The worker: ``python tests/two_process_launches.py --plan PLAN.json`` (a list of :class:`Launch` fields).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE_STEPS = 4  # optimizer steps of tests/test_ddp_objectives.py's runs (its STEPS)
FSDP_CLIP = DEEPSPEED_CLIP = 0.05  # gradient-norm clips that bind at every step of the DPO/ORPO/GRPO runs
REWARD_CLIP = 0.01  # and of the reward model's
LAUNCH_TIMEOUT = 1200  # seconds a launch may take before its tests fail


@dataclass(frozen=True)
class Launch:
    """One 2-process run of a group, written to ``<launch root>/<group>/<name>``.

    ``objective``: one of tests/test_ddp_objectives.py's (dpo, dpo-full, orpo, reward, grpo, ...), trained with its
    batch per process for ``steps`` steps, resumed from the final checkpoint of the group's earlier run ``resume``
    when given, with gradient-norm clipping ``clip``; "sft": tests/test_ddp_sft.py's SFT run, ``strategy`` carrying
    its variant suffix (-bf16, -qlora, -accum, -chunked); "online-ppo"/"online-raft": tests/test_online_ddp.py's run (PPO
    scoring with a reward model the launcher writes into the run's directory first)."""

    name: str
    objective: str
    strategy: str
    clip: float | None = None
    steps: int = OBJECTIVE_STEPS
    resume: str | None = None


def _sft(strategy: str) -> Launch:
    return Launch(f"sft-{strategy}", "sft", strategy)


def _online(objective: str, strategy: str) -> Launch:
    return Launch(f"online-{objective}", f"online-{objective}", strategy)


GROUPS: dict[str, list[Launch]] = {
    "ddp": [Launch(o, o, "ddp") for o in ("dpo", "orpo", "reward", "grpo")]
    + [_sft("ddp"), _sft("ddp-accum"), _sft("ddp-chunked"), _online("ppo", "ddp"), _online("raft", "ddp")],
    "fsdp": [Launch(o, o, "fsdp", FSDP_CLIP) for o in ("dpo", "dpo-chunked", "dpo-full", "dpo-full-replicated",
                                                       "dpo-full-chunked", "orpo", "orpo-chunked", "grpo", "grpo-full",
                                                       "grpo-full-replicated", "grpo-full-chunked")] + [
        Launch("dpo-first", "dpo", "fsdp-sharded", FSDP_CLIP, steps=2),  # sharded checkpoint, then a resume from it
        Launch("dpo-resumed", "dpo", "fsdp-sharded", FSDP_CLIP, resume="dpo-first"),
        Launch("grpo-first", "grpo", "fsdp", FSDP_CLIP, steps=2),  # an online objective's full checkpoint, then a resume
        Launch("grpo-resumed", "grpo", "fsdp", FSDP_CLIP, resume="grpo-first"),
        Launch("reward", "reward", "fsdp", REWARD_CLIP),
        _sft("fsdp-bf16"), _sft("fsdp-qlora"), _sft("fsdp-chunked"), _online("ppo", "fsdp"), _online("raft", "fsdp")],
    "deepspeed2": [Launch("dpo", "dpo", "deepspeed2", DEEPSPEED_CLIP), Launch("grpo", "grpo", "deepspeed2", DEEPSPEED_CLIP),
                   Launch("dpo-compiled", "dpo-compiled", "deepspeed2", DEEPSPEED_CLIP),  # torch_compile under ZeRO-2
                   _sft("deepspeed2"), _sft("deepspeed2-qlora"), _sft("deepspeed2-accum"), _sft("deepspeed2-chunked"),
                   _online("raft", "deepspeed2")],
    "deepspeed3": [Launch(o, o, "deepspeed3", DEEPSPEED_CLIP) for o in ("dpo", "dpo-full", "dpo-full-chunked", "grpo-full",
                                                                        "grpo-full-chunked")] + [
        Launch("orpo", "orpo", "deepspeed3"),
        Launch("dpo-first", "dpo", "deepspeed3", DEEPSPEED_CLIP, steps=2),  # a ZeRO-3 checkpoint, then a resume from it
        Launch("dpo-resumed", "dpo", "deepspeed3", DEEPSPEED_CLIP, resume="dpo-first"),
        Launch("reward", "reward", "deepspeed3", REWARD_CLIP),
        _sft("deepspeed3-bf16"), _sft("deepspeed3-chunked"), _online("ppo", "deepspeed3"), _online("raft", "deepspeed3")],
}
"""The runs by group (strategy), in launch order (DeepSpeed's last): every test that compares a 2-process run finds it
here by group and name."""


def sft_rows(root: Path) -> Path:
    """The rows SFT's runs of a group train on (written by the launcher)."""
    return root / "sft-rows.jsonl"


def reward_model_of(root: Path, strategy: str) -> str:
    """The reward model the online PPO run of a group scores with: a saved directory replicated under DDP or sharded
    under FSDP, a Lightning checkpoint of one on another architecture (Qwen2) read into ZeRO-3 partitions."""
    return str(root / ("reward.ckpt" if strategy == "deepspeed3" else "reward-model"))


def finished(out: Path) -> bool:
    """Whether a run wrote its records (every kind of run writes them per rank when its fit ends)."""
    return any(out.glob("*rank0.json")) and any(out.glob("*rank1.json"))


def launch_two_processes(groups: list[str], root: Path) -> tuple[Path, str | None]:
    """Run every run of ``groups`` (keys of :data:`GROUPS`, in that order) one after another in one pair of processes,
    this file being the worker, which stops at the first failing run; a group's runs write to ``root/<group>/<name>``.
    Returns ``root`` and None, or the launch's error: the processes' exit statuses or the timeout, the runs finished
    and the end of each process's output."""
    for group in groups:  # what the runs read, written here before the processes start
        (root / group).mkdir(parents=True, exist_ok=True)
        for r in GROUPS[group]:
            if r.objective == "sft" and not sft_rows(root / group).exists():
                from test_ddp_sft import write_rows

                write_rows(sft_rows(root / group))
            if r.objective == "online-ppo":
                from test_online_ddp import write_reward_model

                write_reward_model(Path(reward_model_of(root / group, r.strategy)))
    runs = [(group, r) for group in groups for r in GROUPS[group]]
    (root / "plan.json").write_text(json.dumps([dict(asdict(r), group=group) for group, r in runs]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0")
    env.pop("WORLD_SIZE", None)
    procs = []
    for rank in (0, 1):  # LOCAL_RANK set: Lightning joins the processes started here instead of starting its own
        log = (root / f"worker{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, __file__, "--plan", str(root / "plan.json")], cwd=REPO,
                                      env=dict(env, LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    status = _wait(procs)
    if status is None:
        return root, None
    done = [f"{group}/{r.name}" for group, r in runs if finished(root / group / r.name)]
    tails = "\n".join(f"--- process {rank}: {(root / f'worker{rank}.log').read_text(errors='replace')[-2500:]}"
                      for rank in (0, 1))
    return root, f"{status} (runs done: {done}):\n{tails}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen]) -> str | None:
    """Wait for both processes of a launch: None when both exit with status 0, else what went wrong. One that fails
    leaves the other waiting in a collective, so it is stopped after a short grace period."""
    deadline, failed_at = time.monotonic() + LAUNCH_TIMEOUT, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 20):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if failed_at is None:
                return f"timed out after {LAUNCH_TIMEOUT} s"
            break
        time.sleep(0.2)
    if all(p.returncode == 0 for p in procs):
        return None
    return ", ".join(f"process {rank}: exit status {p.returncode}" for rank, p in enumerate(procs))


def run_plan(plan: Path) -> None:
    """The worker: every run of ``plan`` (written by :func:`launch_two_processes`) on 2 processes, in order."""
    for entry in json.loads(plan.read_text()):
        root = plan.parent / entry.pop("group")  # the group's runs, and what they read
        r = Launch(**entry)
        out = root / r.name
        out.mkdir(exist_ok=True)
        if r.objective == "sft":
            from test_ddp_sft import B, run_sft

            run_sft(sft_rows(root), out, batch_size=B, devices=2, strategy=r.strategy)
        elif r.objective.startswith("online-"):
            from test_online_ddp import run_objective

            objective = r.objective.removeprefix("online-")
            run_objective(out, objective, r.strategy, reward_model_of(root, r.strategy) if objective == "ppo" else "none")
        else:
            from test_ddp_objectives import B, run

            run(r.objective, out, batch_size=B, devices=2, strategy=r.strategy, clip=r.clip, steps=r.steps,
                ckpt_path=str(root / r.resume / "final.ckpt") if r.resume else None)


def on_two_processes(*strategies: str) -> list:
    """pytest parameters for a test parametrized over ``strategies`` (a group, or a group and a variant such as
    "fsdp-bf16"), each marked with the group whose runs it reads (``two_process``, see tests/conftest.py) and skipped
    without DeepSpeed where it needs it."""
    import pytest

    from deepspeed_cpu import needs_deepspeed

    return [pytest.param(s, marks=[pytest.mark.two_process(s.split("-")[0])]
                         + ([needs_deepspeed] if s.startswith("deepspeed") else [])) for s in strategies]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plan":
        run_plan(Path(sys.argv[2]))
        from worker_exit import leave_worker

        leave_worker()
    else:
        sys.exit("usage: python tests/two_process_launches.py --plan PLAN.json (the worker of the 2-process tests; a "
                 "list of Launch fields, see GROUPS)")
