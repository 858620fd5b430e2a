"""Measure the peak memory of lit_align SFT training steps on CPU and compare it with `lit_align plan-memory`.

    python bench/bench_memory.py                      # every configuration, a table on stdout
    python bench/bench_memory.py --configs tiny-full-b8-s512 --json bench/memory_results.json

Two measurements per configuration, each in a fresh process (``--worker``), both over the first three optimizer
steps of a real ``Trainer.fit`` of the ``SFT`` module (from the second step on, AdamW state and the previous step's
gradients exist, as in steady-state training):

- tensor peak: the largest number of bytes held by live torch tensors on CPU. When the first step starts, the live
  tensors are enumerated exactly (parameters and buffers, deduplicated by storage); from there the torch profiler's
  allocation events (``profile_memory=True``: every allocation and free of torch's CPU allocator) are summed in time
  order and their running maximum is added. (Profiling starts before any gradient or optimizer state exists because
  the profiler cannot subtract frees of blocks allocated before it started.) This is the CPU analogue of
  ``torch.cuda.max_memory_allocated`` and is what the planner estimates.
- RSS delta: peak resident set size (VmHWM, reset through /proc/self/clear_refs once the baseline is taken) minus the
  RSS measured after imports (torch, lightning, transformers, peft, bitsandbytes, lit_align) and a warm-up step of a
  throwaway one-layer model (with a LoRA adapter when the case has one), which faults in library code and kernel
  caches. It includes the model load, the tokenizer, Lightning's objects, glibc's allocator slack and any code paged
  in later, so it is an upper bound; the worker runs with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors are
  returned to the system instead of staying in the heap.

Batches are synthetic: ``batch_size`` rows of ``seq_len`` random tokens, the first row ending in 8 padding tokens
when there are several rows (so the attention mask is real, as in padded training data), and the first 16 tokens of
every row masked as prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class MemoryCase:
    """One measured configuration of the SFT module."""

    name: str
    model: str = "preset:tiny-base"
    batch_size: int = 4
    seq_len: int = 256
    lora_r: int | None = None
    lora_dropout: float = 0.05
    dtype: str = "float32"
    precision: str = "32-true"
    gradient_checkpointing: bool = False
    quantize_4bit: bool = False
    logits_chunk_size: int | None = None
    note: str = ""

    def model_path(self) -> str:
        """``model``, with ``bench-shape:NAME`` built once (bench_gpu_scale.py's random Llama of shape NAME with
        DeepSeek-Coder's 32k vocabulary, fp32) under the temporary directory."""
        if not self.model.startswith("bench-shape:"):
            return self.model
        shape = self.model.split(":", 1)[1]
        target = Path(tempfile.gettempdir()) / "lit_align-bench-models" / f"{shape}-float32"
        if not (target / "config.json").exists():
            sys.path.insert(0, str(REPO / "bench"))
            from bench_gpu_scale import build_model_dir

            target.parent.mkdir(parents=True, exist_ok=True)
            build_model_dir(shape, target, "float32")
        return str(target)

    def model_args(self) -> dict:
        args = {"model_name_or_path": self.model_path(), "dtype": self.dtype, "gradient_checkpointing": self.gradient_checkpointing,
                "quantize_4bit": self.quantize_4bit, "optimizer": {"lr": 1e-4}}
        if self.logits_chunk_size:
            args["logits_chunk_size"] = self.logits_chunk_size
        if self.lora_r:
            args["lora"] = {"r": self.lora_r, "alpha": 2 * self.lora_r, "dropout": self.lora_dropout,
                            "target_modules": "all-linear"}
        return args

    def fit_config(self) -> dict:
        """The same settings as a parsed `lit_align fit` config, for the planner."""
        return {"model": {"class_path": "lit_align.modules.sft.SFT", "init_args": self.model_args()},
                "data": {"init_args": {"batch_size": self.batch_size, "max_length": self.seq_len}},
                "trainer": {"accelerator": "cpu", "devices": 1, "precision": self.precision, "strategy": "auto"}}


CASES = [
    MemoryCase("tiny-base-full-b2-s128", batch_size=2, seq_len=128, note="weights/optimizer dominated"),
    MemoryCase("tiny-base-lora-r8-b4-s256", lora_r=8, note="frozen base, LoRA on all linears"),
    MemoryCase("tiny-full-b8-s512", model="preset:tiny", batch_size=8, seq_len=512, note="activation dominated"),
    MemoryCase("tiny-base-full-bf16mixed-b4-s256", precision="bf16-mixed", note="autocast, fp32 weights"),
    MemoryCase("tiny-full-gc-b8-s512", model="preset:tiny", batch_size=8, seq_len=512, gradient_checkpointing=True,
               note="fp32, gradient checkpointing"),
    MemoryCase("tiny-base-qlora-r8-b4-s256", lora_r=8, quantize_4bit=True, note="QLoRA (bitsandbytes CPU path)"),
    MemoryCase("tiny-base-qlora-r8-b1-s64", lora_r=8, quantize_4bit=True, batch_size=1, seq_len=64,
               note="QLoRA, weights dominated"),
    MemoryCase("tiny-base-lora-r16-bf16-gc-b4-s512", lora_r=16, dtype="bfloat16", gradient_checkpointing=True,
               seq_len=512, note="bf16 weights, gradient checkpointing"),
]
# DeepSeek-Coder's 32k vocabulary on a 2-layer, hidden-128 Llama: the logits dominate, with and without logits_chunk_size
VOCAB32K = "bench-shape:tiny"
CASES += [
    MemoryCase("tiny32k-full-b4-s256", model=VOCAB32K, note="32k-vocabulary logits dominated"),
    MemoryCase("tiny32k-full-b4-s256-chunk256", model=VOCAB32K, logits_chunk_size=256, note="the LM head in chunks of 256"),
    MemoryCase("tiny32k-full-gc-b4-s256-chunk64", model=VOCAB32K, logits_chunk_size=64, gradient_checkpointing=True,
               note="chunks of 64, gradient checkpointing"),
    MemoryCase("tiny32k-lora-r8-b4-s256-chunk256", model=VOCAB32K, lora_r=8, logits_chunk_size=256,
               note="LoRA (frozen head), chunks of 256"),
    MemoryCase("tiny32k-bf16mixed-b4-s256-chunk128", model=VOCAB32K, precision="bf16-mixed", logits_chunk_size=128,
               note="autocast, chunks of 128"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


# ------------------------------------------------------------------------------------------------ measurement (worker)
def synthetic_batches(case: MemoryCase, vocab_size: int, pad_id: int, n: int = 3) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (case.batch_size, case.seq_len), generator=g)
        mask = torch.ones_like(ids)
        if case.batch_size > 1:  # a batch of one is never padded
            ids[0, -8:], mask[0, -8:] = pad_id, 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :16] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def live_tensor_bytes(module, optimizers) -> int:
    """Bytes of the distinct storages behind parameters, buffers, 4-bit quantization state, gradients and optimizer state."""
    import torch

    storages: dict[int, int] = {}
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    for p in module.parameters():  # bitsandbytes 4-bit weights keep their absmax/codebook outside the parameter
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    for t in tensors:
        st = t.untyped_storage()
        if t.device.type == "cpu" and st.data_ptr():
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure(case: MemoryCase, mode: str = "tensor") -> dict:
    """Run 3 SFT steps of ``case`` in this process; mode "tensor" (profiler) or "rss" (peak RSS is read by the caller)."""
    import gc

    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader

    from lit_align.modules.sft import SFT

    torch.set_num_threads(1)
    module = SFT(**case.model_args())
    module.configure_model()
    vocab = module.model.config.vocab_size if not hasattr(module.model, "peft_config") else module.model.get_base_model().config.vocab_size
    batches = synthetic_batches(case, vocab, module.tokenizer.pad_token_id)

    class Batches(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)

    result: dict = {}

    class Probe(L.Callback):
        prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and mode == "tensor":
                # Collect garbage now and not during the window: the profiler subtracts frees of blocks whose size it
                # knows, including blocks from an earlier profiling session, which would lower the running sum.
                gc.collect()
                gc.disable()
                result["live_at_start"] = live_tensor_bytes(pl_module, trainer.optimizers)
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            result.setdefault("losses", []).append(float(outputs["loss"]))
            if batch_idx == 2 and self.prof is not None:
                self.prof.__exit__(None, None, None)
                events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
                events.sort(key=lambda e: e.start_ns())
                current = peak = 0
                for e in events:
                    current += e.nbytes()
                    peak = max(peak, current)
                result["profiled_peak_delta"] = peak
                result["tensor_peak"] = result["live_at_start"] + peak
                self.prof = None
                gc.enable()

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, precision=case.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Probe()])
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=Batches())
    finally:
        gc.enable()
    result["seconds"] = time.perf_counter() - start
    result["params"] = sum(p.numel() for p in module.parameters())
    return result


def _warm_up(case: MemoryCase) -> None:
    """One forward/backward/AdamW step of a throwaway one-layer model, so code pages and kernels are resident."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    if case.lora_r:
        from lit_align.models import LoRAConfig, apply_lora

        model = apply_lora(model, LoRAConfig(r=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 260, (2, 32))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision != "32-true"):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    opt.step()
    del model, opt, loss


def worker(case: MemoryCase, mode: str) -> dict:
    import gc

    import bitsandbytes  # noqa: F401  (imports are part of the baseline)
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    import torch

    import lit_align.modules.sft  # noqa: F401

    torch.set_num_threads(1)
    out: dict = {"mode": mode}
    if mode == "rss":
        _warm_up(case)
        gc.collect()
        out["baseline_rss"] = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter to the current RSS
        res = measure(case, mode)
        out["rss_delta"] = _status("VmHWM") - out["baseline_rss"]
    else:
        res = measure(case, mode)
    out.update(res)
    return out


# ------------------------------------------------------------------------------------------------ orchestration
def run_worker(case: MemoryCase, mode: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(case)), "--mode", mode],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {case.name} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned(case: MemoryCase):
    from lit_align.memory import estimate, inputs_from_config

    return estimate(inputs_from_config(case.fit_config()))


@dataclass
class CaseResult:
    case: MemoryCase
    estimate: float
    tensor_peak: float | None = None
    rss_delta: float | None = None
    rows: dict = field(default_factory=dict)

    def error(self, measured: float | None) -> float | None:
        return None if measured is None else (self.estimate - measured) / measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=None, help=f"cases to run (default all): {list(CASES_BY_NAME)}")
    parser.add_argument("--modes", nargs="*", default=["tensor", "rss"], choices=["tensor", "rss"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="tensor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(MemoryCase(**json.loads(args.worker)), args.mode)))
        return 0
    names = args.configs or list(CASES_BY_NAME)
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CASES_BY_NAME)}")
    results = []
    for name in names:
        case = CASES_BY_NAME[name]
        plan = planned(case)
        res = CaseResult(case, plan.peak_bytes, rows={r.component: r.bytes for r in plan.rows})
        for mode in args.modes:
            out = run_worker(case, mode)
            if mode == "tensor":
                res.tensor_peak = out["tensor_peak"]
            else:
                res.rss_delta = out["rss_delta"]
        results.append(res)
        mib = 1024**2
        t_err, r_err = res.error(res.tensor_peak), res.error(res.rss_delta)
        print(f"{name:38s} estimate {res.estimate / mib:8.1f} MiB | tensor peak "
              f"{(res.tensor_peak or 0) / mib:8.1f} MiB ({'' if t_err is None else f'{100 * t_err:+.1f}%'}) | RSS delta "
              f"{(res.rss_delta or 0) / mib:8.1f} MiB ({'' if r_err is None else f'{100 * r_err:+.1f}%'})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([{"case": asdict(r.case), "estimate": r.estimate, "tensor_peak": r.tensor_peak,
                                                "rss_delta": r.rss_delta, "rows": r.rows} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
