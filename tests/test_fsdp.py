"""FSDP: 2 CPU processes under Lightning's FSDPStrategy follow the loss curve of 1 process with the doubled batch.

Lightning and torch refuse FSDP without a GPU only to pick a device; tests/fsdp_cpu.py lifts that, so these tests run
the real FSDP code paths on gloo: one FSDP unit per ``LlamaDecoderLayer`` (parameters sharded between the two
processes, gathered per block), activation checkpointing applied by the strategy (which turns DPO's prompt sharing
off: a cached forward cannot be recomputed), LoRA adapters trained inside units that also hold frozen base weights
(``use_orig_params``), gradient-norm clipping over the shards (``AlignmentModule.clip_gradient_norm``; Lightning's own
clipping refuses FSDP), and full and sharded checkpoints. The clip value binds at every step, so a norm taken per
shard would show. The comparison is built as in tests/test_ddp_objectives.py (same examples per step, same 1e-5
tolerance on the losses).

Online objectives (PPO, GRPO, RAFT) step the optimizer inside training_step, which Lightning would run inside the
root FSDP unit's forward; they wrap their networks in FSDP units themselves instead (tested here with GRPO; PPO and
RAFT in tests/test_online_ddp.py).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_ddp_objectives import STEPS, TOLERANCE, _compare, global_losses, run_single
from two_process_launches import FSDP_CLIP as CLIP

pytestmark = pytest.mark.two_process("fsdp")  # every test reads the "fsdp" group's runs


@pytest.fixture(scope="module")
def fsdp_runs(two_process_runs):
    """``fsdp_runs(name)``: the directory of a 2-process FSDP run (the "fsdp" launch of tests/two_process_launches.py:
    DPO, ORPO, GRPO, resumes)."""
    return partial(two_process_runs, "fsdp")


def test_dpo_lora_under_fsdp_matches_one_process_and_saves_the_adapter(fsdp_runs, tmp_path):
    ranks, single = _compare("dpo", fsdp_runs("dpo"), tmp_path, strategy="fsdp", clip=CLIP)
    assert min(single["grad_norms"]) > 2 * CLIP  # clipping binds at every step: the norm over all shards matters
    losses = [s["loss"] for s in single["steps"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.01
    # the full checkpoint holds the trained adapter under its unwrapped names, as a one-process run saves it
    from lit_align.models import LoRAConfig
    from lit_align.modules.dpo import DPO

    ckpt = torch.load(fsdp_runs("dpo") / "final.ckpt", weights_only=False)
    fresh = DPO(beta=0.1, lora=LoRAConfig(r=4, dropout=0.0))
    fresh.configure_model()
    assert ckpt["lit_align_trainable_only"] and set(ckpt["state_dict"]) == fresh._trainable_names()
    assert float(sum(v.double().sum() for v in ckpt["state_dict"].values())) == pytest.approx(ranks[0]["param_sum"])
    # LoRAMerge gathered the shards and exported base + adapter: its logits are the trained adapter model's
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    _assert_same_logits(fsdp_runs("dpo") / "merged", fresh.model)


def _assert_same_logits(merged_dir, model) -> None:
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_dpo_full_finetuning_with_a_sharded_or_replicated_frozen_reference_under_fsdp(fsdp_runs, tmp_path, placement):
    """No LoRA: every weight trains and the reference is a frozen copy of the initial policy. reference_placement
    shard: a submodule FSDP shards with one unit per block; replicate: a whole copy per process, untouched by FSDP."""
    name = "dpo-full" if placement == "shard" else "dpo-full-replicated"
    ranks, single = _compare(name, fsdp_runs(name), tmp_path, strategy="fsdp", clip=CLIP)
    losses = [s["loss"] for s in single["steps"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.01
    # the exported full fine-tuned policy is the trained one: its weights sum to what both processes hold
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(fsdp_runs(name) / "merged")
    assert float(sum(p.detach().double().sum() for p in merged.parameters())) == pytest.approx(ranks[0]["param_sum"])
    whole = single["reference"]["local_numel"]
    assert single["reference"]["fsdp_units"] == 0
    for rank in ranks:
        if placement == "shard":  # one FSDP unit per decoder layer (4), and each process holds about half of it
            assert rank["reference"]["fsdp_units"] == 4 and rank["reference"]["local_numel"] < 0.6 * whole
        else:
            assert rank["reference"] == {"fsdp_units": 0, "partitioned": False, "local_numel": whole}


def test_dpo_full_finetuning_with_the_head_in_chunks_under_fsdp(fsdp_runs, tmp_path):
    """logits_chunk_size 8 with every weight training: the chunks run inside each model's forward (the policy's and
    the sharded reference's), where FSDP holds the head's weight whole; the head's gradient from the chunks is
    reduce-scattered like the rest, so the curve is one process's, and the chunked head ran on every process."""
    ranks, single = _compare("dpo-full-chunked", fsdp_runs("dpo-full-chunked"), tmp_path, strategy="fsdp", clip=CLIP)
    assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is single["chunked_logps"] is True
    losses = [s["loss"] for s in single["steps"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("objective", ["dpo-chunked", "orpo-chunked"])
def test_lora_dpo_and_orpo_with_the_head_in_chunks_under_fsdp(fsdp_runs, tmp_path, objective):
    """logits_chunk_size 8 with a LoRA adapter: the head is frozen and sharded in the root unit, the chunks run inside
    the forward (for DPO also the reference's, the policy with its adapter off), and ORPO's NLL term is the chunked
    log-probabilities' token mean over both processes; the curve is one process's."""
    ranks, single = _compare(objective, fsdp_runs(objective), tmp_path, strategy="fsdp", clip=CLIP)
    assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is single["chunked_logps"] is True
    losses = [s["loss"] for s in single["steps"]]
    assert losses[-1] < losses[0] - 0.01


def test_orpo_under_fsdp_matches_one_process(fsdp_runs, tmp_path):
    """ORPO's NLL term is a token mean over both processes' chosen tokens (the halves hold different counts)."""
    ranks, single = _compare("orpo", fsdp_runs("orpo"), tmp_path, strategy="fsdp", clip=CLIP)
    assert any(a["tokens"] != b["tokens"] for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]))
    losses = [s["loss"] for s in single["steps"]]
    assert losses[-1] < losses[0] - 0.01


def test_a_run_resumed_from_a_sharded_checkpoint_continues_the_curve(fsdp_runs, tmp_path):
    """2 steps, a sharded checkpoint (a directory of per-process shards), then a 2-process resume to step 4: its
    steps 3-4 are those of an uninterrupted one-process run (weights, optimizer state and data position restored)."""
    first, resumed = fsdp_runs("dpo-first"), fsdp_runs("dpo-resumed")
    ckpt = first / "final.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per process
    one = [s["loss"] for s in run_single("dpo", tmp_path, "fsdp-sharded", CLIP)["steps"]]
    before, after = global_losses(first), global_losses(resumed)
    assert len(before) == 2 and len(after) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(before + after, one)) < TOLERANCE, (before + after, one)


def test_an_online_run_resumed_from_a_full_fsdp_checkpoint_continues_the_curve(fsdp_runs, tmp_path):
    """GRPO with LoRA, 2 steps, a full checkpoint (rank 0's file, the adapter only), then a 2-process resume to step 4:
    its steps are those of an uninterrupted one-process run. Lightning's FSDP strategy loads (and removes) the state
    dict before the module's on_load_checkpoint sees the checkpoint: the module checks the names saved beside it."""
    first, resumed = fsdp_runs("grpo-first"), fsdp_runs("grpo-resumed")
    ckpt = torch.load(first / "final.ckpt", weights_only=False)
    assert ckpt["lit_align_trainable_only"] and ckpt["lit_align_trainable_names"] == sorted(ckpt["state_dict"])
    one = [s["loss"] for s in run_single("grpo", tmp_path, "fsdp", CLIP)["steps"]]
    before, after = global_losses(first), global_losses(resumed)
    assert len(before) == 2 and len(after) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(before + after, one)) < TOLERANCE, (before + after, one)


@pytest.mark.parametrize("objective", ["grpo", "grpo-full", "grpo-full-replicated", "grpo-full-chunked"])
def test_grpo_under_fsdp_matches_one_process(fsdp_runs, tmp_path, objective):
    """Online objectives step inside training_step, so they wrap their networks in FSDP units themselves
    (OnlineModule.shard_with_fsdp: the policy, with LoRA or fully trained, and the frozen reference copy, each its own
    root; or with reference_placement replicate a whole reference per process, untouched by FSDP) and the step runs
    outside any FSDP forward. Clipping binds at every step: the norm is taken over every root's shards on both
    processes. With the LM head in chunks of 8 (``logits_chunk_size``): the head, in each network's root unit, is a
    shard outside that network's forward; the chunked head runs inside it (in place of the head module's forward),
    for the policy's passes and the sharded reference's, on every process."""
    ranks, single = _compare(objective, fsdp_runs(objective), tmp_path, strategy="fsdp", clip=CLIP)
    assert len({round(s["loss"], 6) for s in single["steps"]}) == len(single["steps"])
    assert min(single["grad_norms"]) > 2 * CLIP
    if objective == "grpo-full-chunked":
        assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is single["chunked_logps"] is True
        assert ranks[0]["reference"]["fsdp_units"] == 5
    if objective == "grpo-full-replicated":
        assert ranks[0]["reference"] == {"fsdp_units": 0, "partitioned": False, "local_numel": single["reference"]["local_numel"]}
    if objective == "grpo-full":  # the frozen reference is sharded too: one unit per decoder block and a root
        assert ranks[0]["reference"]["fsdp_units"] == 5
        assert ranks[0]["reference"]["local_numel"] < 0.6 * single["reference"]["local_numel"]
        # LoRAMerge gathered the policy's shards: the export holds the trained weights
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(fsdp_runs(objective) / "merged")
        assert float(sum(p.detach().double().sum() for p in merged.parameters())) == pytest.approx(ranks[0]["param_sum"])
    elif objective == "grpo":  # the full checkpoint holds the trained adapter under its unwrapped names
        ckpt = torch.load(fsdp_runs(objective) / "final.ckpt", weights_only=False)
        adapter = {k: v for k, v in ckpt["state_dict"].items() if "lora_" in k}
        assert ckpt["lit_align_trainable_only"] and adapter and set(adapter) == set(ckpt["state_dict"])
        assert float(sum(v.double().sum() for v in adapter.values())) == pytest.approx(ranks[0]["param_sum"])
