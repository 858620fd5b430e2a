"""SFT under DDP: 2 CPU processes (gloo) with batch B follow the loss curve of 1 process with batch 2B.

How the comparison is made equal by construction (docs/scaling.md, "Data parallel"):

- the batch sampler cuts each epoch into *global* batches of ``B * world_size`` examples and gives rank r the r-th
  slice of each, so step k of the 2-process run sees exactly the examples of step k of the 1-process run;
- DDP averages gradients over ranks; SFT scales each rank's token mean by its share of the global completion tokens
  (``SFT.global_token_mean``), so the averaged gradient is that of the token mean over the doubled batch. The data
  has completions of different lengths, so the two halves of a global batch hold different token counts (without the
  scaling the curves differ by up to 3.5e-3 here), and prompts of different lengths, so padding differs as well.

Tolerance: losses agree to 1e-5 (absolute, losses ~5.6). Step 0 differs only by float summation order; later steps
also carry the tiny parameter differences that order produces, amplified by lr=1e-3.

The 2-process runs are launched by tests/two_process_launches.py, whose worker calls :func:`run_sft` (Lightning's
``strategy="ddp"`` launcher re-executes ``sys.argv`` for rank 1, which works for a worker script but not from inside
pytest).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from two_process_launches import on_two_processes


B = 4  # micro-batch per process
STEPS = 4
TOLERANCE = 1e-5


def write_rows(path: Path, n: int = 40) -> Path:
    """Prompts and completions of varied length (the halves of a global batch hold different completion tokens)."""
    with open(path, "w") as f:
        for k in range(n):
            prompt = f'def add_{k}(x):\n    """Return x plus {k}.{" Really." * (k % 7)}"""\n'
            completion = f"    return x + {k:03d}{'  # add' * (k % 5)}\n"
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


class Recorder(L.Callback):
    """Per-batch loss and row fingerprints (sum of token ids) of this process, and the gradient norm of each optimizer
    step before clipping (the averaged gradient's: DDP's, or DeepSpeed's own global norm; not recorded under FSDP),
    written to ``out/rank{r}.json``."""

    def __init__(self, out: Path):
        self.out, self.losses, self.rows, self.tokens, self.grad_norms = out, [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().double() for p in pl_module.parameters() if p.grad is not None]
        if grads and trainer.strategy.__class__.__name__ != "CPUFSDPStrategy":  # whole gradients (DDP, one process)
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.rows.append([int(r.sum()) for r in batch["input_ids"]])
        self.tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        engine = getattr(trainer.strategy, "deepspeed_engine", None)  # DeepSpeed keeps gradients in its partitions
        if engine is not None and len(self.losses) % trainer.accumulate_grad_batches == 0:  # this batch ended a step
            self.grad_norms.append(float(engine.get_global_grad_norm()))

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        from deepspeed_cpu import zero3_gathered

        root = trainer.strategy.model  # under FSDP and ZeRO-3 the parameters are shards until gathered
        local_numel = sum(p.numel() for p in pl_module.parameters())  # this process's share (FSDP: its shard)
        with FullyShardedDataParallel.summon_full_params(root, writeback=False) \
                if isinstance(root, FullyShardedDataParallel) else zero3_gathered(list(pl_module.parameters())):
            param_sum = float(sum(p.detach().double().sum() for p in pl_module.parameters() if p.requires_grad))
        linear4bit = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                         for m in pl_module.modules())  # bitsandbytes' 4-bit layers (not peft's wrappers of them)
        masters = getattr(getattr(trainer.strategy, "deepspeed_engine", None), "optimizer", None)
        masters = getattr(masters, "fp32_partitioned_groups_flat", None) or []  # ZeRO-3's optimizer partitions
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"losses": self.losses, "rows": self.rows, "tokens": self.tokens, "grad_norms": self.grad_norms,
             "world_size": trainer.world_size,
             "param_sum": param_sum, "dtypes": sorted({str(p.dtype) for p in pl_module.parameters()}),
             "master_dtypes": sorted({str(t.dtype) for t in masters}),
             "fsdp_compute_dtype": str(getattr(getattr(root, "mixed_precision", None), "param_dtype", None)),
             "local_numel": local_numel, "linear4bit": linear4bit, "chunked_logps": pl_module.chunked_logps.ok,
             "head_numel": pl_module.model.get_output_embeddings().weight.numel()}))  # outside the forward: ZeRO-3's 0


CLIP = 0.5  # FSDP and DeepSpeed runs; binds at every step: the one-process gradient norms before clipping are 4-12


def run_sft(data_file: Path, out: Path, batch_size: int, devices: int, strategy: str = "ddp") -> None:
    """Train the tiny preset with SFT for STEPS steps on ``devices`` CPU processes. ``strategy`` "fsdp": the settings
    of configs/iotacode/multi_gpu/sft_fsdp.yaml (FSDP with one unit per decoder block when devices > 1, the model's
    own gradient checkpointing, norm clipping), on CPU through tests/fsdp_cpu.py; "deepspeed2"/"deepspeed3": those of
    sft_deepspeed_zero2/3.yaml (ZeRO stage 2 or 3, gradient checkpointing, clipping by DeepSpeed), on CPU through
    tests/deepspeed_cpu.py; a "-bf16" suffix: ``precision: bf16-mixed``, as those configs have; "-qlora": LoRA r=8 over
    a 4-bit base; "-accum": the processes' micro-batches are halved and accumulated over 2 (the same examples per
    optimizer step), batches unsorted by length (so the single process's batch is the window's micro-batches in
    order); "-chunked": ``logits_chunk_size: 16``. The single process (devices=1) runs the same settings without a
    strategy or accumulation."""
    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataSource
    from lit_align.models import LoRAConfig
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.sft import SFT

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    strategy, _, precision = strategy.partition("-")  # "deepspeed3-bf16" -> "deepspeed3", "bf16"
    sharded = strategy != "ddp"
    accumulate = 2 if precision == "accum" and devices > 1 else 1
    qlora = {"lora": LoRAConfig(r=8, dropout=0.0), "quantize_4bit": True} if precision == "qlora" else {}
    chunks = {"logits_chunk_size": 16} if precision == "chunked" else {}
    module = SFT(model_name_or_path="preset:tiny", optimizer=OptimizerConfig(lr=1e-2 if qlora else 1e-3,
                                                                             schedule="constant"),
                 gradient_checkpointing=sharded, **qlora, **chunks)
    chosen = strategy if devices > 1 else "auto"
    if strategy == "fsdp" and devices > 1:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from fsdp_cpu import CPUFSDPStrategy

        chosen = CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    elif strategy.startswith("deepspeed") and devices > 1:
        from deepspeed_cpu import CPUDeepSpeedStrategy

        chosen = CPUDeepSpeedStrategy(stage=int(strategy[-1]), partition_all=bool(chunks))  # the head: a partition
    data = SFTDataModule(train_sources=[DataSource(path=str(data_file))], val_fraction=0.0, max_length=256,
                         batch_size=batch_size // accumulate, tokenizer="preset:tiny", group_by_length=precision != "accum")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=chosen, gradient_clip_val=CLIP if sharded else None,
                        precision="bf16-mixed" if precision == "bf16" else "32-true",
                        accumulate_grad_batches=accumulate, use_distributed_sampler=False, max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Recorder(out)])
    trainer.fit(module, datamodule=data)


# ------------------------------------------------------------------------------------------------ the sampler
def test_ranks_take_halves_of_the_global_batch():
    from lit_align.data_modules.sampler import LengthGroupedBatchSampler

    lengths = [(i * 37) % 101 for i in range(103)]
    for group in (True, False):
        one = list(LengthGroupedBatchSampler(lengths, 2 * B, seed=5, group_by_length=group, drop_last=True))
        ranks = [list(LengthGroupedBatchSampler(lengths, B, seed=5, group_by_length=group, num_replicas=2, rank=r))
                 for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(one) == 103 // (2 * B)
        for k, batch in enumerate(one):
            assert ranks[0][k] + ranks[1][k] == batch
    # evaluation (no shuffling) loses no example: the short last global batch is split between the ranks
    evals = [list(LengthGroupedBatchSampler(lengths, B, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(i for e in evals for b in e for i in b) == list(range(103))
    assert [len(b) for b in evals[0]][-1] == 4 and [len(b) for b in evals[1]][-1] == 3


def test_sampler_refuses_lightnings_distributed_sampler_with_advice():
    from torch.utils.data import SequentialSampler

    from lit_align.data_modules.sampler import LengthGroupedBatchSampler

    with pytest.raises(TypeError, match="use_distributed_sampler false"):
        LengthGroupedBatchSampler(SequentialSampler(range(10)), batch_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        LengthGroupedBatchSampler([1, 2, 3], 2, num_replicas=2, rank=2)


# ------------------------------------------------------------------------------------------------ DDP vs doubled batch
BF16_TOLERANCE = 5e-3  # bf16 against autocast: 2e-3 (DeepSpeed's bf16 module), 2.6e-3 (FSDP's bf16 gathers) measured


@pytest.fixture(scope="module")
def sft_runs(two_process_runs):
    """The directory of a strategy's 2-process run and the rows it trained on: the run ``sft-<strategy>`` of the launch
    of its strategy in tests/two_process_launches.py, launched when first asked for."""
    def runs(strategy: str) -> tuple[Path, Path]:
        from two_process_launches import sft_rows

        out = two_process_runs(strategy.split("-")[0], f"sft-{strategy}")
        return out, sft_rows(out.parent)
    return runs


def _two_and_one(sft_runs, tmp_path: Path, strategy: str) -> tuple[list[dict], dict]:
    """The 2-process run's records (per rank), and those of one process with the doubled batch, run here."""
    ddp_out, data_file = sft_runs(strategy)
    single_out = tmp_path / "single"
    single_out.mkdir()
    run_sft(data_file, single_out, batch_size=2 * B, devices=1, strategy=strategy)
    ranks = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, json.loads((single_out / "rank0.json").read_text())


@pytest.mark.parametrize("strategy", on_two_processes("ddp", "ddp-chunked", "fsdp-bf16", "fsdp-qlora", "fsdp-chunked",
                                                      "deepspeed2", "deepspeed2-qlora", "deepspeed2-chunked",
                                                      "deepspeed3-bf16", "deepspeed3-chunked"))
def test_two_processes_match_one_process_with_the_doubled_batch(sft_runs, tmp_path, strategy):
    """DDP; FSDP full fine-tuning with the settings of configs/iotacode/multi_gpu/sft_fsdp.yaml (weights, gradients
    and optimizer state sharded per decoder block, gradient checkpointing, norm clipping over the shards); DeepSpeed
    ZeRO-2 (gradients and optimizer state partitioned) and ZeRO-3 (weights too) with sft_deepspeed_zero2/3.yaml's.
    FSDP and ZeRO-3 in those configs' bf16-mixed: FSDP gathers bf16 copies of its fp32 shards, DeepSpeed trains a
    bf16 module from fp32 master weights, the single process autocasts fp32 weights to bf16; they agree to bf16's
    precision only. (FSDP and ZeRO-3 in fp32, to 1e-5: DPO, ORPO and GRPO in tests/test_fsdp.py, test_deepspeed.py.)
    QLoRA (bitsandbytes' CPU path) under FSDP: the 4-bit base (its packed storage in the compute dtype, which FSDP
    can flatten) is sharded like any frozen weight, and the LoRA adapter trains; under ZeRO-2 every process keeps the
    whole 4-bit base. (ZeRO-3 refuses QLoRA: tests/test_deepspeed.py. Under DDP, the same worker's "ddp-qlora"
    matched to 3e-7 when run by hand; left out of the suite for time.) DDP, FSDP, ZeRO-2 and ZeRO-3 with the LM head
    in chunks of 16 tokens (``logits_chunk_size``): the chunks run inside the model's forward in place of the head
    module's, so FSDP and ZeRO-3 (every weight partitioned here, the tiny head too) hold the head's weight whole there
    and again for the backward, and the head's gradient from the chunks is reduced, reduce-scattered or partitioned
    as the model's own."""
    ranks, single = _two_and_one(sft_runs, tmp_path, strategy)
    assert ranks[0]["world_size"] == 2 and len(single["losses"]) == len(ranks[0]["losses"]) == STEPS
    for k in range(STEPS):  # the same examples each step, rank 0's half first
        assert ranks[0]["rows"][k] + ranks[1]["rows"][k] == single["rows"][k]
        assert ranks[0]["tokens"][k] + ranks[1]["tokens"][k] == single["tokens"][k]
    assert any(a != b for a, b in zip(ranks[0]["tokens"], ranks[1]["tokens"]))  # the halves weigh differently
    ddp_curve = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    bf16 = strategy.endswith("bf16")
    tolerance = BF16_TOLERANCE if bf16 else TOLERANCE
    assert max(abs(a - b) for a, b in zip(ddp_curve, single["losses"])) < tolerance, (ddp_curve, single["losses"])
    assert single["losses"][-1] < single["losses"][0] - 0.05  # it trains: the comparison is not of constants
    # both ranks end with the same weights (DDP keeps them in sync), and with the single process's
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    # (the trained weights' sum; QLoRA's adapter sums to ~7, where Adam's per-coordinate scaling of near-zero
    # gradients leaves summation-order differences of 6e-5 relative)
    qlora = strategy.endswith("qlora")
    rel = BF16_TOLERANCE if bf16 else 1e-4 if qlora else 1e-6
    assert ranks[0]["param_sum"] == pytest.approx(single["param_sum"], rel=rel)
    if strategy == "deepspeed3-bf16":  # DeepSpeed's bf16: a bf16 module, fp32 master weights in its optimizer
        assert ranks[0]["dtypes"] == ["torch.bfloat16"] and ranks[0]["master_dtypes"] == ["torch.float32"]
    if strategy == "fsdp-bf16":  # FSDP's: fp32 shards, gathered and computed in bf16
        assert ranks[0]["dtypes"] == ["torch.float32"] and ranks[0]["fsdp_compute_dtype"] == "torch.bfloat16"
    if bf16:
        assert single["dtypes"] == ["torch.float32"]
    if strategy.endswith("chunked"):  # the chunked head ran (its one-time check passed), on every process
        assert ranks[0]["chunked_logps"] is ranks[1]["chunked_logps"] is single["chunked_logps"] is True
    if strategy == "deepspeed3-chunked":  # the head's weight was a partition outside the engine's forward
        assert ranks[0]["head_numel"] == ranks[1]["head_numel"] == 0 < single["head_numel"]
    if qlora:  # every block linear of the tiny preset (4 layers x 7) is a 4-bit layer; FSDP shards them
        assert ranks[0]["linear4bit"] == ranks[1]["linear4bit"] == single["linear4bit"] == 28
        share = 2 if strategy.startswith("fsdp") else 1
        assert ranks[0]["local_numel"] == ranks[1]["local_numel"] == single["local_numel"] // share


@pytest.mark.parametrize("strategy", on_two_processes("ddp-accum", "deepspeed2-accum"))
def test_accumulated_micro_batches_on_two_processes_step_like_one_batch(sft_runs, tmp_path, strategy):
    """Each of 2 processes accumulates 2 micro-batches of B/2 per optimizer step, so step k trains on the same 2B
    examples as the single process's batch k. The step's gradient equals the single process's to 1e-5 (relative):
    SFTDataModule tags each micro-batch with its window's completion tokens over both processes, so every token of the
    step weighs the same (averaging the micro-batches' token means instead is 1-2% off on this data). Under DeepSpeed,
    whose engine divides the loss by the accumulation again after Lightning has, the gradient was also half of it."""
    ranks, single = _two_and_one(sft_runs, tmp_path, strategy)
    assert len(ranks[0]["rows"]) == 2 * STEPS and len(single["grad_norms"]) == len(ranks[0]["grad_norms"]) == STEPS
    for k in range(STEPS):  # the window's micro-batches, each rank 0's half first, are the single process's batch
        assert [row for m in (2 * k, 2 * k + 1) for r in (0, 1) for row in ranks[r]["rows"][m]] == single["rows"][k]
    assert len(set(ranks[0]["tokens"] + ranks[1]["tokens"])) > 2  # micro-batches of different token counts
    assert ranks[0]["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
    assert min(single["grad_norms"]) > 2 * CLIP or strategy == "ddp-accum"  # DeepSpeed's clipping binds
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    assert ranks[0]["param_sum"] == pytest.approx(single["param_sum"], rel=1e-6)
