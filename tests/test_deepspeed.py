"""DeepSpeed ZeRO-2 and ZeRO-3: 2 CPU processes under Lightning's DeepSpeedStrategy follow the loss curve of 1 process
with the doubled batch.

tests/deepspeed_cpu.py lifts Lightning's CUDA-only device checks, so these tests run DeepSpeed's own ZeRO code on gloo:
stage 2 partitions gradients and optimizer state, stage 3 also the weights (every layer is partitioned as it is
created, inside ``deepspeed.zero.Init``, and gathered for each forward pass). Clipping is DeepSpeed's (its config's
``gradient_clipping``, from ``trainer.gradient_clip_val`` or an online objective's ``max_grad_norm``) and binds at every
step. The comparison is built as in tests/test_ddp_objectives.py (same examples per step, 1e-5 on the losses); LoRA's A
matrices are set to a fixed function of their names in both runs (``fix_lora_a``: ZeRO-3 changes which random draw
initialises them, not how). SFT under both stages: tests/test_ddp_sft.py; PPO and RAFT under ZeRO-2:
tests/test_online_ddp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as L
import pytest
from deepspeed_cpu import CPUDeepSpeedStrategy, needs_deepspeed
from test_ddp_objectives import REPO, STEPS, TOLERANCE, _compare, global_losses, run_single
from test_fsdp import _assert_same_logits
from transformers import AutoModelForCausalLM
from two_process_launches import DEEPSPEED_CLIP as CLIP, on_two_processes

pytestmark = needs_deepspeed


@pytest.mark.parametrize("strategy", on_two_processes("deepspeed2", "deepspeed3"))
def test_dpo_lora_under_zero_matches_one_process(two_process_runs, tmp_path, strategy):
    out = two_process_runs(strategy, "dpo")
    ranks, single = _compare("dpo", out, tmp_path, strategy=strategy, clip=CLIP)
    assert min(single["grad_norms"]) > 2 * CLIP  # DeepSpeed's clipping binds at every step
    losses = [s["loss"] for s in single["steps"]]
    # LoRA starts as the identity (under ZeRO-3 B's zeros are written while gathered: models._zero_partitioned_lora_b)
    assert losses[0] == pytest.approx(0.6931, abs=1e-4) and losses[-1] < losses[0] - 0.01
    assert ranks[0]["partitioned"] == (strategy == "deepspeed3")
    assert ranks[0]["parameters"] == single["parameters"]  # (trainable, total): whole sizes, also of partitions
    # DeepSpeed's checkpoint directory converts to one state dict (Lightning's utility), holding the trained adapter;
    # LoRAMerge gathered the partitions and exported base + adapter: its logits are that adapter model's
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from lit_align.models import LoRAConfig
    from lit_align.modules.dpo import DPO

    state = convert_zero_checkpoint_to_fp32_state_dict(out / "final.ckpt", tmp_path / "one.ckpt")["state_dict"]
    fresh = DPO(beta=0.1, lora=LoRAConfig(r=4, dropout=0.0))
    fresh.configure_model()
    adapter = {k: v for k, v in state.items() if "lora_" in k}
    assert set(adapter) == fresh._trainable_names()
    assert float(sum(v.detach().double().sum() for v in adapter.values())) == pytest.approx(ranks[0]["param_sum"])
    fresh.load_state_dict(state, strict=False)
    _assert_same_logits(out / "merged", fresh.model)


@pytest.mark.two_process("deepspeed3")
def test_dpo_full_finetuning_under_zero3_loads_a_partitioned_reference(two_process_runs, tmp_path):
    out = two_process_runs("deepspeed3", "dpo-full")
    ranks, single = _compare("dpo-full", out, tmp_path, strategy="deepspeed3", clip=CLIP)
    assert min(single["grad_norms"]) > 2 * CLIP
    assert [s["loss"] for s in single["steps"]][0] == pytest.approx(0.6931, abs=1e-4)  # reference == initial policy
    # the reference is a submodule ZeRO-3 partitioned (loaded again: a partitioned model cannot be deep-copied)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # LoRAMerge: the gathered policy
    assert float(sum(p.double().sum() for p in merged.parameters())) == pytest.approx(ranks[0]["param_sum"])
    assert ranks[0]["reference"]["partitioned"] and ranks[0]["reference"]["local_numel"] < 0.75 * single["reference"]["local_numel"]


@pytest.mark.two_process("deepspeed3")
def test_a_run_resumed_from_a_zero3_checkpoint_continues_the_curve(two_process_runs, tmp_path):
    """2 steps, DeepSpeed's checkpoint (a directory: each process's weight and optimizer partitions, frozen base
    included, with Lightning's loop state), then a 2-process resume to step 4: its steps 3-4 are those of an
    uninterrupted one-process run."""
    first, resumed = two_process_runs("deepspeed3", "dpo-first"), two_process_runs("deepspeed3", "dpo-resumed")
    ckpt = first / "final.ckpt"
    assert len(list((ckpt / "checkpoint").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one partition per process
    one = [s["loss"] for s in run_single("dpo", tmp_path, "deepspeed3", CLIP)["steps"]]
    before, after = global_losses(first), global_losses(resumed)
    assert len(before) == 2 and len(after) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(before + after, one)) < TOLERANCE, (before + after, one)


def test_what_zero3_cannot_build_is_refused_before_training(tmp_path):
    """Every model built during setup is partitioned under ZeRO-3, so a whole reference copy cannot be had there: DPO
    and GRPO say so before training. A 4-bit (QLoRA) model cannot be built there at all (transformers fails inside
    zero.Init): refused with the strategies that take it. One process under ZeRO-3 is enough to see it (its own
    interpreter: DeepSpeed starts a process group)."""
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from pathlib import Path\nfrom test_ddp_objectives import run\n"
              "for objective in ('dpo-full-replicated', 'grpo-full-replicated', 'dpo-qlora'):\n"
              "    try:\n"
              f"        run(objective, Path({str(tmp_path)!r}), batch_size=2, devices=1, strategy='deepspeed3', even_alone=True)\n"
              "    except ValueError as err:\n"
              "        print('REFUSED', objective, err)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert [line.split()[1] for line in refused] == ["dpo-full-replicated", "grpo-full-replicated", "dpo-qlora"], proc.stdout
    assert all("reference_placement='replicate' is not available under DeepSpeed ZeRO-3" in line for line in refused[:2])
    assert "quantize_4bit (QLoRA) is not supported under DeepSpeed ZeRO-3" in refused[2]
    assert "deepspeed_stage_2, FSDP (which shards the 4-bit base) or ddp" in refused[2]
    assert not list(tmp_path.glob("rank*.json"))  # nothing trained


@pytest.mark.two_process("deepspeed2")
def test_torch_compile_under_zero2_gives_the_eager_runs_losses(two_process_runs):
    """ZeRO-2 leaves every weight whole, so each process's compiled blocks run as on one device: the same losses per
    step and per process as the eager ZeRO-2 run, every block compiled. (FSDP and ZeRO-3 are refused:
    tests/test_compile.py.)"""
    import json

    compiled, eager = (two_process_runs("deepspeed2", name) for name in ("dpo-compiled", "dpo"))
    for rank in (0, 1):
        c, e = (json.loads((out / f"rank{rank}.json").read_text()) for out in (compiled, eager))
        assert c["compiled_blocks"] == 4 and e["compiled_blocks"] == 0  # the tiny preset's 4 decoder layers
        assert [s["rows"] for s in c["steps"]] == [s["rows"] for s in e["steps"]]
        assert [s["loss"] for s in c["steps"]] == pytest.approx([s["loss"] for s in e["steps"]], abs=1e-4)
        assert c["param_sum"] == pytest.approx(e["param_sum"], rel=5e-3)  # (Adam on float-noise gradients: see _compare)
    assert global_losses(compiled)[-1] < global_losses(compiled)[0] - 0.01


@pytest.mark.two_process("deepspeed3")
def test_orpo_under_zero3_matches_one_process(two_process_runs, tmp_path):
    ranks, single = _compare("orpo", two_process_runs("deepspeed3", "orpo"), tmp_path, strategy="deepspeed3")
    losses = [s["loss"] for s in single["steps"]]
    assert losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("strategy,objective", [pytest.param(s, o, marks=pytest.mark.two_process(s))
                                                for s, o in (("deepspeed2", "grpo"), ("deepspeed3", "grpo-full"))])
def test_grpo_under_zero_matches_one_process(two_process_runs, tmp_path, strategy, objective):
    """GRPO steps inside training_step over micro-batches: DeepSpeed is told which backward ends the accumulation
    (it refuses DDP's no_sync) and where each micro-step starts (ZeRO-3 would otherwise keep only the last
    micro-batch's gradient), and clips with the module's max_grad_norm. ZeRO-2 with LoRA (the recommended setting);
    ZeRO-3 with full fine-tuning, where the weights of the policy and of its frozen reference copy, both partitioned,
    are gathered at every forward pass inside the training step. (LoRA under ZeRO-3: the DPO test above.)"""
    ranks, single = _compare(objective, two_process_runs(strategy, objective), tmp_path, strategy=strategy, clip=CLIP)
    assert len({round(s["loss"], 6) for s in single["steps"]}) == len(single["steps"])
    assert min(single["grad_norms"]) > 2 * CLIP  # DeepSpeed's clipping binds at every step
    assert ranks[0]["partitioned"] == (strategy == "deepspeed3")
    if objective == "grpo-full":
        assert ranks[0]["reference"]["partitioned"]
        assert ranks[0]["reference"]["local_numel"] < 0.75 * single["reference"]["local_numel"]


@pytest.mark.parametrize("objective", [pytest.param(o, marks=pytest.mark.two_process("deepspeed3"))
                                       for o in ("dpo-full-chunked", "grpo-full-chunked")])
def test_the_head_in_chunks_under_zero3_matches_one_process(two_process_runs, tmp_path, objective):
    """Full fine-tuning with ``logits_chunk_size: 8`` under ZeRO-3 with every weight partitioned, the LM heads of the
    policy and of its frozen reference included: the chunks run inside each model's forward in place of the head
    module's, where ZeRO-3 has gathered the head's weight (and gathers it again for the backward). DPO (a step per
    batch) and GRPO (its optimizer steps and backward passes inside the training step) follow one process's curve, the
    chunked head used on every process."""
    ranks, single = _compare(objective, two_process_runs("deepspeed3", objective), tmp_path, strategy="deepspeed3",
                             clip=CLIP)
    assert min(single["grad_norms"]) > 2 * CLIP
    assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is single["chunked_logps"] is True
    assert ranks[0]["head_numel"] == ranks[1]["head_numel"] == 0 < single["head_numel"]  # partitions here
    assert ranks[0]["reference"]["partitioned"]


def test_online_objectives_refuse_a_conflicting_deepspeed_clip_before_building_the_model():
    from lit_align.modules.grpo import GRPO

    module = GRPO(max_new_tokens=8, max_grad_norm=1.0)
    strategy = CPUDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "gradient_clipping": 0.3})
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
    with pytest.raises(ValueError, match=r"gradient_clipping=0.3, but GRPO clips at model.max_grad_norm=1.0"):
        module.setup("fit")
    assert module.model is None
    for stage in (2, 3):
        strategy = CPUDeepSpeedStrategy(stage=stage)
        module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
        module.setup("fit")
        assert strategy.config["gradient_clipping"] == 1.0  # DeepSpeed clips with the module's value
