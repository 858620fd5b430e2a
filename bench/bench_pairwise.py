"""Pairwise objectives' throughput and peak memory: lit_align's DPO, ORPO and reward-model modules against TRL's
DPOTrainer, ORPOTrainer (trl.experimental.orpo) and RewardTrainer, same model, data and machine.

    python bench/bench_pairwise.py                              # DPO: both libraries, both settings, a table on stdout
    python bench/bench_pairwise.py --objective reward --repeats 3 --json bench/results/reward.json
    python bench/bench_pairwise.py --objective orpo --runs trl:recommended   # one measurement

Needs TRL (bench/requirements-bench.txt); lit_align itself never depends on it.

Both libraries train the same LoRA adapter (r=8, alpha=16, dropout 0.05, every linear layer of the transformer
blocks; the reward model's new score head is trained fully) on the same model directory
(``materialize_preset("preset:tiny")``) and the same preference pairs (the task suite's training split, paired by
``lit_align.data_modules.pairing``, written once to a jsonl file that both read), batch 8 pairs, AdamW at a constant
lr 1e-4. The objectives (``--objective``):

- ``dpo``: sigmoid DPO, beta 0.1, reference = the policy with its adapter disabled (lit_align ``DPO``, TRL
  ``DPOTrainer``).
- ``orpo``: ORPO, lambda (TRL's ``beta``) 0.1, no reference (lit_align ``ORPO``, TRL ``ORPOTrainer``).
- ``reward``: a Bradley-Terry reward model, a one-output head on the last token, no margin (lit_align
  ``RewardModel``, TRL ``RewardTrainer``; the backbone loaded as ``AutoModelForSequenceClassification``).

Settings:

- ``equal``: both fp32, no gradient checkpointing, random batches (lit_align ``group_by_length=False``), so the
  figure compares the implementations and not their defaults. ``equal-noshare`` (lit_align only) also turns off
  ``share_prompt`` (each prompt computed once for its two completions), to show what that part contributes.
- ``ckpt``: ``equal`` with gradient checkpointing on, for both. lit_align's policy pass cannot share the prompt
  through a KV cache then (the backward re-runs the blocks) and packs each pair into one row instead
  (``lit_align.modules.packed_pairs``); ``ckpt-nopack`` (lit_align only) runs the policy's 2B full sequences as
  before packing existed (the reference still shares through its cache), ``ckpt-noshare`` shares nothing.
- ``recommended``: each library's own defaults for this job. lit_align: the module and ``PreferenceDataModule`` as
  they come (length-grouped batches, fp32, no gradient checkpointing). TRL: the trainer's config as it comes
  (``gradient_checkpointing=True``, ``bf16=True`` for all three), only the values above set.

Each measurement runs in a fresh process. Throughput: preference pairs per second over the steps after ``--warmup``
warm-up steps, optimizer steps included, both per wall-clock second and per second of the process's CPU time (with one
torch thread the CPU figure is the compute cost, and it is far less disturbed by other load on a shared machine).
``--repeats`` interleaves repeated measurements; compare medians. Memory: peak resident set size during model loading, data
preparation and training (VmHWM after resetting it through /proc/self/clear_refs once imports are done), minus the
RSS at that point. On CPU this is the figure that matters (torch's CPU allocator has no max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = ["lit_align:equal", "trl:equal", "lit_align:recommended", "trl:recommended", "lit_align:equal-noshare"]
LORA = dict(r=8, alpha=16, dropout=0.05)
BETA = 0.1
LR = 1e-4
MAX_LENGTH = 512


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def write_pairs(path: Path) -> int:
    """The task suite's training pairs (closest/random mix, seed 0, at most 8 per task) as prompt/chosen/rejected jsonl."""
    from lit_align.data_modules.pairing import triplets_from_task_suite
    from lit_align.data_modules.task_suite import load_task_suite

    triplets, _ = triplets_from_task_suite(load_task_suite(split="train"), closest_ratio=0.5, max_pairs_per_problem=8,
                                           seed=0)
    with path.open("w") as f:
        for t in triplets:
            f.write(json.dumps({"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected}) + "\n")
    return len(triplets)


# ---------------------------------------------------------------------------------------------------- workers
def run_lit_align(objective: str, settings: str, model_dir: str, pairs: str, steps: int, warmup: int,
                  batch_size: int) -> dict:
    import datasets  # noqa: F401  (imported before the baseline, as in the TRL worker)
    import lightning as L
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
    from lit_align.models import LoRAConfig
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.dpo import DPO
    from lit_align.modules.orpo import ORPO
    from lit_align.modules.reward import RewardModel

    baseline = _reset_peak_rss()
    times: dict[str, float] = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and "start" not in times:
                times["start"], times["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == steps:
                times["end"], times["cpu_end"] = time.perf_counter(), time.process_time()

    L.seed_everything(0, verbose=False)
    checkpointing = settings.startswith("ckpt")
    common = dict(model_name_or_path=model_dir, lora=LoRAConfig(**LORA),
                  optimizer=OptimizerConfig(lr=LR, schedule="constant"), gradient_checkpointing=checkpointing,
                  share_prompt=settings not in ("equal-noshare", "ckpt-noshare"))
    packing = {"packed_pairs": settings != "ckpt-nopack"}
    if objective == "dpo":
        module = DPO(beta=BETA, **common, **packing)
    elif objective == "orpo":
        module = ORPO(orpo_lambda=BETA, **common, **packing)
    else:
        module = RewardModel(**common, **packing)
    data = PreferenceDataModule(train_sources=[PreferenceSource(path=pairs, kind="triplets")], val_sources=[],
                                val_fraction=0.0, tokenizer=model_dir, max_length=MAX_LENGTH, batch_size=batch_size,
                                group_by_length=settings == "recommended")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(module, datamodule=data)
    return _result(times, steps, warmup, batch_size, baseline,
                   {"group_by_length": settings == "recommended", "precision": "32-true",
                    "gradient_checkpointing": checkpointing, "reference": getattr(module, "reference_mode", None),
                    "share_prompt": module.hparams.share_prompt, "packed_pairs": module.hparams.get("packed_pairs")})


def run_trl(objective: str, settings: str, model_dir: str, pairs: str, steps: int, warmup: int,
            batch_size: int) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    baseline = _reset_peak_rss()
    times: dict[str, float] = {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and "start" not in times:
                times["start"], times["cpu_start"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                times["end"], times["cpu_end"] = time.perf_counter(), time.process_time()

    transformers.set_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.load_dataset("json", data_files=pairs, split="train")
    overrides = {} if settings == "recommended" else {"gradient_checkpointing": settings == "ckpt", "bf16": False}
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=batch_size,
                  max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", max_length=MAX_LENGTH, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
                  seed=0, **overrides)
    lora = dict(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear")
    if objective == "reward":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1,
                                                                                dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        config = RewardConfig(**common)
        # the score head is new: trained fully, as lit_align's RewardModel does (and TRL's docs recommend)
        peft_config = LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora)
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=peft_config, callbacks=[Timer()])
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
        config_cls, trainer_cls = (DPOConfig, DPOTrainer) if objective == "dpo" else (ORPOConfig, ORPOTrainer)
        config = config_cls(beta=BETA, **common)
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return _result(times, steps, warmup, batch_size, baseline,
                   {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
                    "precompute_ref_log_probs": getattr(config, "precompute_ref_log_probs", None),
                    "trl": __import__("trl").__version__})


def _result(times: dict, steps: int, warmup: int, batch_size: int, baseline_kib: int, settings: dict) -> dict:
    elapsed = times["end"] - times["start"]
    cpu = times["cpu_end"] - times["cpu_start"]
    return {"pairs_per_s": (steps - warmup) * batch_size / elapsed, "s_per_step": elapsed / (steps - warmup),
            "pairs_per_cpu_s": (steps - warmup) * batch_size / cpu, "cpu_s_per_step": cpu / (steps - warmup),
            "peak_rss_delta_mib": (_status_kib("VmHWM") - baseline_kib) / 1024, "settings": settings}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    library, settings = args.worker.split(":")
    fn = run_lit_align if library == "lit_align" else run_trl
    out = fn(args.objective, settings, args.model_dir, args.pairs, args.steps, args.warmup, args.batch_size)
    print("BENCH_RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------- driver
def measure(run: str, model_dir: str, pairs: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, __file__, "--worker", run, "--objective", args.objective, "--model-dir", model_dir,
           "--pairs", pairs,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{run} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"run": run, **json.loads(line[len("BENCH_RESULT "):])}


def print_medians(results: list[dict]) -> None:
    """Each run's medians over its repeats, and lit_align / TRL at equal and at recommended settings."""
    import statistics

    keys = ("pairs_per_s", "pairs_per_cpu_s", "s_per_step", "peak_rss_delta_mib")
    medians = {run: {k: statistics.median(r[k] for r in results if r["run"] == run) for k in keys}
               for run in dict.fromkeys(r["run"] for r in results)}
    print("medians: run, pairs/s (wall), pairs/CPU-s, ms/step, peak RSS delta MiB")
    for run, m in medians.items():
        print(f"  {run:24s} {m['pairs_per_s']:7.2f} {m['pairs_per_cpu_s']:7.2f} {m['s_per_step'] * 1000:7.1f} "
              f"{m['peak_rss_delta_mib']:7.1f}")
    for ours, theirs in (("lit_align:recommended", "trl:recommended"), ("lit_align:equal", "trl:equal"),
                         ("lit_align:equal-noshare", "trl:equal"), ("lit_align:ckpt", "trl:ckpt"),
                         ("lit_align:ckpt-nopack", "trl:ckpt"), ("lit_align:ckpt-noshare", "trl:ckpt"),
                         ("lit_align:ckpt", "lit_align:ckpt-nopack")):
        if ours in medians and theirs in medians:
            a, b = medians[ours], medians[theirs]
            print(f"  {ours} / {theirs}: throughput {a['pairs_per_s'] / b['pairs_per_s']:.2f}x wall, "
                  f"{a['pairs_per_cpu_s'] / b['pairs_per_cpu_s']:.2f}x CPU; peak memory "
                  f"{a['peak_rss_delta_mib'] / b['peak_rss_delta_mib']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objective", default="dpo", choices=["dpo", "orpo", "reward"],
                        help="the pairwise objective to compare")
    parser.add_argument("--runs", nargs="+", default=RUNS, help="library:settings pairs to measure, in order")
    parser.add_argument("--repeats", type=int, default=1, help="measure every run this many times (interleaved)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the throughput")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(REPO))
    from lit_align.models import materialize_preset

    model_dir = materialize_preset("preset:tiny")
    pairs = Path(tempfile.mkdtemp(prefix="pairwise-bench-")) / "pairs.jsonl"
    n_pairs = write_pairs(pairs)
    results = []
    for repeat in range(args.repeats):
        for run in args.runs:
            r = measure(run, model_dir, str(pairs), args)
            r["repeat"] = repeat
            results.append(r)
            print(f"{run:24s} {r['pairs_per_s']:7.2f} pairs/s wall  {r['pairs_per_cpu_s']:7.2f} pairs/CPU-s  "
                  f"{r['s_per_step'] * 1000:7.1f} ms/step  peak RSS delta {r['peak_rss_delta_mib']:6.1f} MiB", flush=True)
    print_medians(results)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "objective": args.objective,
            "pairs_in_dataset": n_pairs,
            "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "loadavg_at_end": os.getloadavg()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
