"""SFT and DPO at scale: tokens/s, MFU and peak memory of lit_align against TRL's SFTTrainer and DPOTrainer.

    python bench/bench_gpu_scale.py --json bench/results/gpu_scale.json        # on a GPU: the issue's measurement
    python bench/bench_gpu_scale.py --runs lit_align:dpo trl:dpo --steps 50   # some of the runs
    python bench/bench_gpu_scale.py --lora                                    # LoRA instead of full fine-tuning
    python bench/bench_gpu_scale.py --shape tiny --seq-len 256 --steps 4 --warmup 1 --device cpu   # CPU smoke test

Needs TRL (bench/requirements-bench.txt); lit_align itself never depends on it. Run from the repository root or
anywhere else; every measurement runs in a fresh worker process (this file, started with ``--worker``).

Model: a randomly initialised ``LlamaForCausalLM`` of DeepSeek-Coder 1.3B's shape (hidden 2048, 24 layers, 16 heads,
intermediate 5504, vocab 32256, max_position_embeddings 16384, rope_theta 100000; the released checkpoint's linear
RoPE scaling changes no FLOPs and is left out), ``--shape tiny`` (2 layers, hidden 128, same vocabulary) for a
CPU smoke test, or ``--shape small`` (8 layers, hidden 512) for CPU measurements where the blocks outweigh the LM head. It is saved once, in bf16 on a GPU and fp32 on CPU, with lit_align's byte-level tokenizer
(``build_byte_tokenizer``: one token per byte of text; the model's vocabulary is larger, which both libraries accept).

Data: random text of letters, digits, spaces and newlines, so N characters are exactly N tokens. SFT rows are
prompt + completion + end-of-sequence = ``--seq-len`` tokens; DPO rows share a prompt and prompt + chosen + eos and
prompt + rejected + eos are each ``--seq-len`` tokens. The prompt is ``--prompt-fraction`` of the sequence. Each file
(``sft.jsonl``, ``dpo.jsonl``) holds steps x batch rows, one epoch; both libraries read the same files.

The same for both libraries:

- the model directory, the data, ``--batch-size`` sequences (SFT) or pairs (DPO) per optimizer step, no gradient
  accumulation, ``--steps`` optimizer steps;
- AdamW at lr 1e-5, constant schedule, no weight decay, gradient clipping at norm 1.0;
- precision: ``bf16-mixed`` on a GPU (lit_align ``precision="bf16-mixed"``, TRL ``bf16=True``) with the weights
  loaded in fp32 for full fine-tuning and in bf16 under LoRA, as docs/scaling.md recommends; ``--precision bf16-true``
  loads bf16 weights on both sides (lit_align ``precision="bf16-true"``, which also casts a LoRA adapter to bf16);
  fp32 on CPU;
- gradient checkpointing (non-reentrant) on for both unless ``--no-gradient-checkpointing``; ``--attn`` (sdpa);
- full fine-tuning, or with ``--lora`` the paper's adapter (r=32, alpha=64, dropout 0.05, every linear layer of the
  blocks);
- DPO: sigmoid loss, beta 0.1, dropout disabled; the reference is a frozen copy of the initial policy (full
  fine-tuning) or the policy with its adapter disabled (LoRA), evaluated every step.

Each library's own default, left as it is: the optimizer implementation (both torch's fused AdamW on CUDA: lit_align's
``optimizer.fused`` default, TRL's ``optim="adamw_torch_fused"``; the table's settings record what ran), how log-probabilities are computed (lit_align: logits then
a float32 cross-entropy, DPO only over completion positions, or with ``--logits-chunk-size K`` its LM head and
log-softmax K completion tokens at a time, the modules' ``logits_chunk_size``; TRL: its fused, chunked LM-head), batch order, TRL's
per-step metrics and logging every 10 steps. lit_align's ``share_prompt`` is on: without checkpointing each
prompt runs once through a KV cache in the policy's and the reference's passes; under gradient checkpointing or with
``--compile`` the reference (a frozen copy, not compiled) still does, and the policy packs each pair into one row,
prompt | chosen | rejected, with a 4D attention mask (``packed_pairs``; ``--no-packed-pairs``: its full sequences).

What is measured, per run:

- tokens/s: training tokens (every non-padding token of every sequence, prompts included; a DPO pair is two
  sequences) of the steps after ``--warmup`` warm-up steps, over the wall-clock time of those steps, optimizer steps
  included, with ``torch.cuda.synchronize()`` before reading the clock. Tokens are counted from each batch the
  library's own collator builds (its ``attention_mask``), so the table shows what each side actually trained on.
- MFU: model FLOPs per second over ``--peak-tflops`` (default: from the GPU's name, bf16 dense: H100 SXM 989,
  H100 NVL 835, H100 PCIe 756, H200 989, A100 312; otherwise Lightning's table; n/a on CPU unless given). FLOPs are
  lit_align's accounting (``lit_align.callbacks.throughput.training_flops_per_token``, used by ``TokenThroughput``)
  for both libraries: 6N + 12·L·d·s per token for full fine-tuning (N = matmul weights incl. the LM head), the LoRA
  variant under ``--lora``, and for DPO one extra forward pass (2N + 4·L·d·s) for the reference. Gradient
  checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs). Where lit_align's prompt sharing
  runs a DPO prompt once (above), tokens and FLOPs are still counted per sequence (the work a pair stands for), so
  its DPO MFU then overstates what the device executed.
- peak memory: ``torch.cuda.max_memory_allocated`` over the whole worker (model load to last step) on a GPU; on
  CPU the peak resident set size minus the RSS after imports (VmHWM, as bench/bench_pairwise.py measures it).
- the device name and the library versions, in the table header and the ``--json`` file;
- for lit_align's runs, ``lit_align plan-memory``'s per-device peak for the same settings ("planned"), beside the
  measured one: the planner's check on the device (on CPU the measured peak is RSS-based, not comparable).

Targets (the issue): lit_align SFT at 45% MFU or more; lit_align DPO at least 1.3x TRL DPO's tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # bench/ is not a package; its sibling scripts import as top-level modules
    sys.path.insert(0, str(HERE))

from bench_pairwise import _reset_peak_rss, _status_kib  # noqa: E402  (peak-RSS measurement on CPU, shared)

RUNS = ["lit_align:sft", "trl:sft", "lit_align:dpo", "trl:dpo"]
SHAPES: dict[str, dict[str, int]] = {
    "deepseek-1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=16),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    # CPU-sized, with the blocks (25M matmul weights) outweighing the 32k-vocabulary LM head (16.5M), as on a 1.3B model
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8),
}
COMMON_SHAPE = dict(vocab_size=32256, max_position_embeddings=16384, rope_theta=100000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)
# bf16 dense peak TFLOP/s by GPU name, most specific first (NVIDIA datasheets; the sparse figures are twice these).
PEAK_TFLOPS: list[tuple[str, float]] = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                                        ("A100", 312.0)]
LR = 1e-5
BETA = 0.1
LORA = dict(r=32, alpha=64, dropout=0.05)
SFT_MFU_TARGET = 0.45
DPO_SPEEDUP_TARGET = 1.3
RESULT_TAG = "BENCH_RESULT "
TEXT_ALPHABET = string.ascii_letters + string.digits + " " * 12 + "\n" * 2  # no '<': never spells a special token


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Precision:
    """How one precision choice is expressed in each library."""

    name: str
    load_dtype: str  # dtype the weights are loaded in (lit_align ``dtype``, TRL ``from_pretrained(dtype=...)``)
    lightning: str  # lit_align's Trainer(precision=...)
    trl_bf16: bool  # TRL's bf16=...


def resolve_precision(name: str, device: str, lora: bool) -> Precision:
    """``auto`` is bf16-mixed on a GPU and fp32 on CPU; bf16-mixed keeps fp32 weights unless a LoRA base is frozen."""
    if name == "auto":
        name = "bf16-mixed" if device == "cuda" else "fp32"
    if name == "bf16-mixed":
        return Precision(name, "bfloat16" if lora else "float32", "bf16-mixed", True)
    if name == "bf16-true":
        return Precision(name, "bfloat16", "bf16-true", True)
    return Precision("fp32", "float32", "32-true", False)


@dataclass
class Spec:
    """Everything a worker needs, written once by the driver as JSON."""

    model_dir: str
    sft_data: str
    dpo_data: str
    seq_len: int
    steps: int
    warmup: int
    batch_size: int
    device: str
    precision: dict[str, Any]
    lora: bool
    gradient_checkpointing: bool
    attn: str
    threads: int | None
    compile: bool = False
    packed_pairs: bool = True
    logits_chunk_size: int | None = None


# ---------------------------------------------------------------------------------------------------- model and data
def build_model_dir(shape: str, target: Path, dtype: str) -> None:
    """A randomly initialised Llama of ``shape`` and lit_align's byte-level tokenizer, saved to ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.models import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.model_max_length = COMMON_SHAPE["max_position_embeddings"]
    config = LlamaConfig(**COMMON_SHAPE, **SHAPES[shape], pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(TEXT_ALPHABET, k=n))


def split_lengths(seq_len: int, prompt_fraction: float) -> tuple[int, int]:
    """(prompt, completion) characters such that prompt + completion + eos = seq_len tokens."""
    prompt = max(1, round(seq_len * prompt_fraction))
    completion = seq_len - prompt - 1
    if completion < 1:
        raise SystemExit(f"--seq-len {seq_len} with --prompt-fraction {prompt_fraction} leaves no completion tokens")
    return prompt, completion


def write_data(work: Path, rows: int, seq_len: int, prompt_fraction: float) -> tuple[Path, Path]:
    """sft.jsonl (prompt/completion) and dpo.jsonl (prompt/chosen/rejected), ``rows`` rows each."""
    rng = random.Random(0)
    prompt_len, completion_len = split_lengths(seq_len, prompt_fraction)
    sft, dpo = work / "sft.jsonl", work / "dpo.jsonl"
    with sft.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": random_text(rng, prompt_len),
                                "completion": random_text(rng, completion_len)}) + "\n")
    with dpo.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": random_text(rng, prompt_len), "chosen": random_text(rng, completion_len),
                                "rejected": random_text(rng, completion_len)}) + "\n")
    return sft, dpo


def check_token_lengths(model_dir: Path, sft: Path, seq_len: int) -> None:
    """Fail early unless the first SFT row tokenizes to exactly ``seq_len`` tokens, as both libraries build it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    row = json.loads(sft.open().readline())
    n = len(tok(row["prompt"])["input_ids"]) + len(tok(row["completion"] + tok.eos_token,
                                                       add_special_tokens=False)["input_ids"])
    if n != seq_len:
        raise SystemExit(f"synthetic row tokenizes to {n} tokens, expected {seq_len}: the tokenizer is not byte-level")


# ---------------------------------------------------------------------------------------------------- measurement
class BatchLog:
    """(tokens, longest sequence) of every batch a collator builds, in order, counted on the CPU before transfer."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def wrap(self, collate: Callable) -> Callable:
        def counting(items):
            batch = collate(items)
            mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            self.batches.append((int(mask.sum()) if mask is not None else ids.numel(), int(ids.size(1))))
            return batch
        return counting

    def window(self, start: int, end: int) -> list[tuple[int, int]]:
        """Batches ``start`` .. ``end - 1`` (the i-th batch is trained on in optimizer step i; no accumulation)."""
        if len(self.batches) < end:
            raise RuntimeError(f"only {len(self.batches)} batches were collated, expected at least {end}")
        return self.batches[start:end]


class StepClock:
    """Wall-clock time from the start of step ``warmup`` to the end of step ``steps``, GPU work included."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        if "start" not in self.times:
            self.times["start"] = self._now()

    def stop(self) -> None:
        self.times["end"] = self._now()

    @property
    def elapsed(self) -> float:
        if "start" not in self.times or "end" not in self.times:
            raise RuntimeError(f"the timed window was not reached (clock: {self.times})")
        return self.times["end"] - self.times["start"]


class MemoryProbe:
    """Peak memory from construction on: CUDA max_memory_allocated, or the CPU peak RSS over the RSS at construction."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline_kib = _reset_peak_rss()

    def read(self) -> dict[str, Any]:
        if self.cuda:
            import torch

            return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                    "peak_mem_kind": "torch.cuda.max_memory_allocated"}
        return {"peak_mem_gib": (_status_kib("VmHWM") - self.baseline_kib) / 2**20,
                "peak_mem_kind": "peak RSS minus RSS after imports"}


def flops_per_token_fn(policy: nn.Module, extra_forward_passes: int) -> Callable[[int], float]:
    """Model FLOPs per trained token at a given sequence length, by lit_align's accounting (TokenThroughput's rule
    for which weights are trainable matmuls and which are LoRA adapters)."""
    from lit_align.callbacks.throughput import training_flops_per_token
    from lit_align.memory import ModelShape

    shape = ModelShape.from_hf_config(policy.config)
    trainable_matmul = lora = 0
    for name, p in policy.named_parameters():
        if p.requires_grad and "lora_" in name:
            lora += p.numel()
        elif p.requires_grad and p.ndim == 2 and "embed" not in name:
            trainable_matmul += p.numel()
    return lambda seq_len: training_flops_per_token(shape, seq_len, trainable_matmul, lora, extra_forward_passes)


def summarize(spec: Spec, objective: str, policy: nn.Module, log: BatchLog, clock: StepClock, memory: MemoryProbe,
              settings: dict[str, Any]) -> dict[str, Any]:
    """The worker's result: rates over the timed steps, FLOPs by lit_align's formula, memory, device, settings."""
    import torch

    from lit_align.report import cpu_model

    timed = log.window(spec.warmup, spec.steps)
    per_token = flops_per_token_fn(policy, extra_forward_passes=1 if objective == "dpo" else 0)
    tokens = sum(t for t, _ in timed)
    flops = sum(t * per_token(seq) for t, seq in timed)
    elapsed = clock.elapsed
    n_steps = spec.steps - spec.warmup
    cuda = spec.device == "cuda"
    return {
        "tokens_per_s": tokens / elapsed, "s_per_step": elapsed / n_steps, "tokens_per_step": tokens / n_steps,
        "longest_sequence": max(seq for _, seq in timed), "model_flops_per_s": flops / elapsed,
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        **memory.read(),
        "device_name": torch.cuda.get_device_name() if cuda else cpu_model(),
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "settings": settings,
    }


def describe_optimizer(optimizer: Any) -> str:
    """Class and kernel choice of an optimizer (unwrapping accelerate's wrapper); foreach=None is torch's default."""
    inner = getattr(optimizer, "optimizer", optimizer)
    flags = {k: inner.defaults.get(k) for k in ("fused", "foreach")}
    return f"{type(inner).__module__}.{type(inner).__name__}(fused={flags['fused']}, foreach={flags['foreach']})"


# ---------------------------------------------------------------------------------------------------- workers
def run_lit_align(objective: str, spec: Spec) -> dict[str, Any]:
    import lightning as L
    import peft  # noqa: F401  (imported before the memory baseline, as in the TRL worker)
    import transformers  # noqa: F401

    from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataSource
    from lit_align.models import LoRAConfig
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.dpo import DPO
    from lit_align.modules.sft import SFT

    cuda = spec.device == "cuda"
    memory, clock, log = MemoryProbe(cuda), StepClock(cuda), BatchLog()
    precision = Precision(**spec.precision)

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == spec.warmup:
                clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == spec.steps:
                clock.stop()

    L.seed_everything(0, verbose=False)
    module_args = dict(model_name_or_path=spec.model_dir, dtype=precision.load_dtype, attn_implementation=spec.attn,
                       gradient_checkpointing=spec.gradient_checkpointing, torch_compile=spec.compile,
                       lora=LoRAConfig(**LORA) if spec.lora else None,
                       optimizer=OptimizerConfig(lr=LR, weight_decay=0.0, schedule="constant"))
    data_args = dict(val_sources=[], val_fraction=0.0, tokenizer=spec.model_dir, max_length=spec.seq_len,
                     batch_size=spec.batch_size)
    module_args["logits_chunk_size"] = spec.logits_chunk_size
    if objective == "sft":
        module = SFT(**module_args)
        data = SFTDataModule(train_sources=[DataSource(path=spec.sft_data)], **data_args)
    else:
        module = DPO(beta=BETA, packed_pairs=spec.packed_pairs, **module_args)
        data = PreferenceDataModule(train_sources=[PreferenceSource(path=spec.dpo_data, kind="triplets")], **data_args)
    data.collate = log.wrap(data.collate)  # the loaders read self.collate
    trainer = L.Trainer(max_steps=spec.steps, accelerator="cuda" if cuda else "cpu", devices=1,
                        precision=precision.lightning, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Window()])
    trainer.fit(module, datamodule=data)
    settings = {"precision": precision.lightning, "dtype": precision.load_dtype,
                "gradient_checkpointing": spec.gradient_checkpointing, "attn": spec.attn,
                "torch_compile": "each decoder block" if spec.compile else False,
                "logits_chunk_size": spec.logits_chunk_size, "chunked_logps_checked": module.chunked_logps.ok,
                "optimizer": describe_optimizer(trainer.optimizers[0])}
    if objective == "dpo":
        settings.update(reference=module.reference_mode, share_prompt=module.hparams.share_prompt,
                        prompt_sharing_used=module._use_prompt_sharing({"prompt_input_ids": None}),
                        packed_pairs=module.hparams.packed_pairs, packed_pairs_checked=module.packing.ok)
    return {**summarize(spec, objective, module.model, log, clock, memory, settings),
            **planned_peak(objective, spec, precision)}


def planned_peak(objective: str, spec: Spec, precision: Precision) -> dict[str, Any]:
    """What ``lit_align plan-memory`` plans per device for this run's settings (the same config a user would write),
    to set beside the measured peak: the planner's validation on this device."""
    from lit_align.memory.config import inputs_from_config
    from lit_align.memory.estimate import estimate

    model_args = {"model_name_or_path": spec.model_dir, "dtype": precision.load_dtype, "attn_implementation": spec.attn,
                  "gradient_checkpointing": spec.gradient_checkpointing, "logits_chunk_size": spec.logits_chunk_size,
                  "lora": dict(LORA) if spec.lora else None}
    config = {"model": {"class_path": f"lit_align.modules.{objective}.{objective.upper()}", "init_args": model_args},
              "data": {"init_args": {"batch_size": spec.batch_size, "max_length": spec.seq_len}},
              "trainer": {"accelerator": "gpu" if spec.device == "cuda" else "cpu", "devices": 1,
                          "precision": precision.lightning, "strategy": "auto"}}
    try:  # a planner failure must not cost the run's measurement (one GPU session, no second try)
        plan = estimate(inputs_from_config(config))
    except Exception as err:  # noqa: BLE001
        print(f"plan-memory failed for lit_align:{objective}: {type(err).__name__}: {err}", flush=True)
        return {}
    return {"planned_peak_gib": plan.peak_bytes / 2**30, "planned_peak_phase": plan.peak_phase}


def run_trl(objective: str, spec: Spec) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    cuda = spec.device == "cuda"
    memory, clock, log = MemoryProbe(cuda), StepClock(cuda), BatchLog()
    precision = Precision(**spec.precision)

    class Window(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == spec.warmup:
                clock.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == spec.steps:
                clock.stop()

    transformers.set_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec.model_dir, attn_implementation=spec.attn,
                                                              dtype=getattr(torch, precision.load_dtype))
    dataset = datasets.load_dataset("json", data_files=spec.sft_data if objective == "sft" else spec.dpo_data,
                                    split="train")
    output_dir = Path(spec.model_dir).parent / "trl-output"  # save_strategy="no": nothing is written there
    config_args = dict(output_dir=str(output_dir), per_device_train_batch_size=spec.batch_size,
                       gradient_accumulation_steps=1, max_steps=spec.steps, learning_rate=LR,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       max_length=spec.seq_len, bf16=precision.trl_bf16,
                       gradient_checkpointing=spec.gradient_checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
                       use_cpu=not cuda, report_to="none", save_strategy="no", disable_tqdm=True,
                       torch_compile=spec.compile,
                       dataloader_num_workers=0, seed=0)
    peft_config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules="all-linear", task_type="CAUSAL_LM") if spec.lora else None
    if objective == "sft":
        config = trl.SFTConfig(**config_args)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[Window()])
    else:
        config = trl.DPOConfig(beta=BETA, **config_args)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[Window()])
    trainer.data_collator = log.wrap(trainer.data_collator)  # read when train() builds its loader
    trainer.train()
    settings = {"bf16": config.bf16, "dtype": precision.load_dtype,
                "gradient_checkpointing": config.gradient_checkpointing, "attn": spec.attn,
                "torch_compile": "whole model" if config.torch_compile else False,
                "optimizer": describe_optimizer(trainer.optimizer), "trl": trl.__version__}
    if objective == "dpo":
        settings.update(reference="ref_model" if trainer.ref_model is not None else "adapter_disabled",
                        precompute_ref_log_probs=config.precompute_ref_log_probs)
    return summarize(spec, objective, trainer.model, log, clock, memory, settings)


def worker(run: str, spec_path: str) -> None:
    import torch

    spec = Spec(**json.loads(Path(spec_path).read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    library, objective = run.split(":")
    result = (run_lit_align if library == "lit_align" else run_trl)(objective, spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- driver
def worker_env(device: str, threads: int | None) -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": python_path}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: TRL's Trainer would wrap several in DataParallel
    return env


def measure(run: str, spec_path: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """One run in a fresh process, its output kept in ``logs``; a failed run (an OOM, say) is reported, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--spec", str(spec_path)]
    log_file = logs / f"{run.replace(':', '-')}.log"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.device, args.threads), cwd=REPO,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as err:
        log_file.write_text(f"{err.stdout or ''}\n{err.stderr or ''}")
        return {"run": run, "error": f"timed out after {args.timeout} s (log: {log_file})"}
    log_file.write_text(proc.stdout + "\n" + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"run": run, "error": f"exit {proc.returncode} (log: {log_file})\n{tail}"}
    return {"run": run, **json.loads(line[len(RESULT_TAG):])}


def peak_flops(device_name: str | None, override_tflops: float | None, device: str) -> tuple[float | None, str]:
    """Peak bf16 FLOP/s of the device and where the figure comes from; (None, reason) when unknown."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device != "cuda" or not device_name:
        return None, "no peak for CPUs; pass --peak-tflops"
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"table: {key}"
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(torch.device("cuda"), torch.bfloat16)
    if flops:
        return float(flops), "Lightning's table"
    return None, f"{device_name!r} is in no table; pass --peak-tflops"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("torch", "transformers", "lightning", "peft", "datasets", "trl", "lit_align"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        versions["lit_align_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                                   capture_output=True).stdout.strip() or None
    except OSError:
        versions["lit_align_git"] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def pinned_trl_version() -> str | None:
    for line in (HERE / "requirements-bench.txt").read_text().splitlines():
        if line.strip().startswith("trl=="):
            return line.split("==")[1].split()[0]
    return None


def require_trl(runs: list[str]) -> None:
    """Exit with instructions if a TRL run is asked for and TRL is missing; note a version other than the pinned one."""
    trl_runs = [r for r in runs if r.startswith("trl:")]
    if not trl_runs:
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(f"TRL is not installed, and the runs {', '.join(trl_runs)} need it: install the pinned "
                         f"version with\n    {sys.executable} -m pip install -r {HERE / 'requirements-bench.txt'}\n"
                         "or measure lit_align alone with --runs lit_align:sft lit_align:dpo")
    installed, pinned = importlib.metadata.version("trl"), pinned_trl_version()
    if pinned and installed != pinned:
        print(f"note: TRL {installed} is installed; bench/requirements-bench.txt pins {pinned}", flush=True)


def times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'run':14s} {'tokens/s':>10s} {'ms/step':>9s} {'tok/step':>9s} {'seq':>6s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'peak mem':>10s} {'planned':>10s} {'trainable':>11s}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['run']:14s} FAILED: {r['error'].splitlines()[0]}")
            continue
        print(f"{r['run']:14s} {r['tokens_per_s']:10.1f} {r['s_per_step'] * 1000:9.1f} {r['tokens_per_step']:9.0f} "
              f"{r['longest_sequence']:6d} {r['model_flops_per_s'] / 1e12:8.3f} "
              f"{percent(r['mfu']):>6s} "
              f"{r['peak_mem_gib']:6.2f} GiB "
              + (f"{r['planned_peak_gib']:6.2f} GiB" if "planned_peak_gib" in r else f"{'-':>10s}")
              + f" {r['trainable_params'] / 1e6:10.2f}M")


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, and the same comparisons for the other objective, from the results that exist."""
    ok = {r["run"]: r for r in results if "error" not in r}

    def ratio(a: str, b: str) -> float | None:
        return ok[a]["tokens_per_s"] / ok[b]["tokens_per_s"] if a in ok and b in ok else None

    sft_mfu = ok["lit_align:sft"]["mfu"] if "lit_align:sft" in ok else None
    dpo_ratio = ratio("lit_align:dpo", "trl:dpo")
    return {
        "lit_align_sft_mfu": sft_mfu, "sft_mfu_target": SFT_MFU_TARGET,
        "sft_mfu_met": None if sft_mfu is None else sft_mfu >= SFT_MFU_TARGET,
        "dpo_speedup_vs_trl": dpo_ratio, "dpo_speedup_target": DPO_SPEEDUP_TARGET,
        "dpo_speedup_met": None if dpo_ratio is None else dpo_ratio >= DPO_SPEEDUP_TARGET,
        "sft_speedup_vs_trl": ratio("lit_align:sft", "trl:sft"),
        "trl_sft_mfu": ok["trl:sft"]["mfu"] if "trl:sft" in ok else None,
    }


def print_targets(t: dict[str, Any], peak_source: str) -> None:
    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("met" if met else "NOT met")

    mfu = t["lit_align_sft_mfu"]
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else f"n/a ({peak_source})"
    print(f"lit_align SFT MFU: {mfu_text} (target >= {100 * SFT_MFU_TARGET:.0f}%): "
          f"{verdict(t['sft_mfu_met']) if mfu is not None else 'not measured'}")
    print(f"lit_align DPO / TRL DPO tokens/s: {times(t['dpo_speedup_vs_trl'])} "
          f"(target >= {DPO_SPEEDUP_TARGET}x): {verdict(t['dpo_speedup_met'])}")
    print(f"lit_align SFT / TRL SFT tokens/s: {times(t['sft_speedup_vs_trl'])} (no target)")


def print_plans(results: list[dict[str, Any]]) -> None:
    """lit_align's runs: the memory planner's per-device peak against the measured one (issue 8: the planner is
    validated on a GPU when one is lent; DPO is planned over full rows, so packed pairs or a shared prompt hold less)."""
    for r in results:
        if "planned_peak_gib" in r and "error" not in r:
            off = r["planned_peak_gib"] / r["peak_mem_gib"] - 1 if r["peak_mem_gib"] > 0 else float("nan")
            print(f"plan-memory for {r['run']}: {r['planned_peak_gib']:.2f} GiB planned ({r['planned_peak_phase']}), "
                  f"{r['peak_mem_gib']:.2f} GiB measured ({r['peak_mem_kind']}): {100 * off:+.1f}%")


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """The model directory and the two data files under ``work`` (reused when already there)."""
    weights = "bfloat16" if args.device == "cuda" else "float32"
    model_dir = work / f"model-{args.shape}-{weights}"
    if not (model_dir / "config.json").exists():
        print(f"building a random {args.shape} model in {model_dir} ({weights}) ...", flush=True)
        build_model_dir(args.shape, model_dir, weights)
    data_dir = work / f"data-{args.seq_len}-{args.steps * args.batch_size}-{args.prompt_fraction}"
    data_dir.mkdir(parents=True, exist_ok=True)
    sft, dpo = write_data(data_dir, args.steps * args.batch_size, args.seq_len, args.prompt_fraction)
    check_token_lengths(model_dir, sft, args.seq_len)
    return model_dir, sft, dpo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deepseek-1.3b", help="model shape")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS, help="library:objective runs, in order")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (prompt + completion + eos)")
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="share of each sequence that is prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="SFT sequences / DPO pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=32) instead of every weight")
    parser.add_argument("--precision", choices=["auto", "bf16-mixed", "bf16-true", "fp32"], default="auto",
                        help="auto: bf16-mixed on a GPU, fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in the backward pass (both libraries)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile: lit_align's torch_compile (each decoder block), TRL's torch_compile "
                             "training argument (the whole model); the warm-up steps must cover the compilation")
    parser.add_argument("--packed-pairs", action=argparse.BooleanOptionalAction, default=True,
                        help="lit_align DPO: where the policy's pass cannot reuse a prompt's cache (checkpointing, "
                             "--compile), pack each pair into one row (the module's packed_pairs)")
    parser.add_argument("--logits-chunk-size", type=int, default=None,
                        help="lit_align: the LM head and log-softmax this many tokens at a time (the modules' "
                             "logits_chunk_size); unset: all logits at once")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                        help="attention implementation (both libraries)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if available")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOP/s of the device for MFU; unset: by GPU name, none on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; unset: 1 on CPU, torch's own choice on a GPU")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the model, data and worker logs here and reuse them; unset: a temporary "
                             "directory, removed at the end")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker and not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if not args.worker and not 0.0 < args.prompt_fraction < 1.0:
        parser.error("--prompt-fraction must be in (0, 1)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args.worker, args.spec)
    require_trl(args.runs)
    sys.path.insert(0, str(REPO))
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        model_dir, sft, dpo = prepare_inputs(args, work)
        precision = resolve_precision(args.precision, args.device, args.lora)
        spec = Spec(model_dir=str(model_dir), sft_data=str(sft), dpo_data=str(dpo), seq_len=args.seq_len,
                    steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=args.device,
                    precision=asdict(precision), lora=args.lora, gradient_checkpointing=args.gradient_checkpointing,
                    attn=args.attn, threads=args.threads, compile=args.compile, packed_pairs=args.packed_pairs,
                    logits_chunk_size=args.logits_chunk_size)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(asdict(spec), indent=2))
        for run in args.runs:
            print(f"measuring {run} ...", flush=True)
            results.append(measure(run, spec_path, args, logs))
        report(args, spec, results)
    finally:
        failed = any("error" in r for r in results)
        if args.work_dir is None and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif args.work_dir is None:
            print(f"\nkept {work} for its worker logs (a run failed); remove it when done", flush=True)


def report(args: argparse.Namespace, spec: Spec, results: list[dict[str, Any]]) -> None:
    device_name = next((r["device_name"] for r in results if "device_name" in r), None)  # None: every run failed
    peak, peak_source = peak_flops(device_name, args.peak_tflops, args.device)
    for r in results:
        if "error" not in r:
            r["mfu"] = r["model_flops_per_s"] / peak if peak else None
    versions = library_versions()
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
            "device_name": device_name, "peak_flops": peak, "peak_flops_source": peak_source,
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}", "versions": versions,
            "shape": args.shape,
            **{k: v for k, v in asdict(spec).items() if k not in ("model_dir", "sft_data", "dpo_data")}}
    print()
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a"
    print(f"device: {device_name} ({args.device}); peak for MFU: {peak_text} ({peak_source})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"shape {args.shape}, {args.seq_len} tokens/sequence, batch {args.batch_size}, "
          f"{'LoRA r=32' if args.lora else 'full fine-tuning'}, precision {spec.precision['name']}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, attn {args.attn}, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    kind = next((r["peak_mem_kind"] for r in results if "peak_mem_kind" in r), None)
    print(f"peak mem: {kind or 'n/a'}\n")
    print_table(results)
    print()
    t = targets(results)
    print_targets(t, peak_source)
    print_plans(results)
    for r in results:
        if "error" in r:
            print(f"\n{r['run']} failed: {r['error']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "targets": t}, indent=2))


if __name__ == "__main__":
    main()
