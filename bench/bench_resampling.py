"""Margin resampling vs uniform sampling: optimizer steps until DPO reaches a held-out reward accuracy.

    .venv/bin/python bench/bench_resampling.py [--model runs/quickstart/sft-model] [--steps 60] [--target 0.8]

Both runs train the same DPO (LoRA r=16, beta 0.1, lr 1e-3) on the same task-suite pairs with the same seed; one
adds MarginResampling (batch level, family groups, rescored every ``--every`` steps). Every ``--eval-every`` steps
the held-out pairs (canonical over each incorrect solution of the suite's held-out tasks) are scored; the table gives
the first step at which the held-out reward accuracy reaches ``--target``, and the held-out margin at the end.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

from lit_align.callbacks.margin_resampling import MarginResampling
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.iadpo import pair_margins
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO


class HeldoutCurve(L.Callback):
    """Held-out accuracy and mean margin every n optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.curve: list[dict] = []

    def _score(self, trainer, module) -> None:
        dm = trainer.datamodule
        m = pair_margins(module, dm, dm.val_items)
        self.curve.append({"step": trainer.global_step, "accuracy": float((m > 0).double().mean()),
                           "margin": float(m.mean())})

    def on_train_start(self, trainer, module) -> None:
        self._score(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._score(trainer, module)


def run(model: str, resample: bool, steps: int, every: int, eval_every: int, temperature: float, seed: int,
        train_limit: int, heldout_limit: int) -> dict:
    L.seed_everything(seed, verbose=False)
    data = PreferenceDataModule(train_sources=[PreferenceSource(split="train", limit=train_limit)],
                                val_sources=[PreferenceSource(split="heldout", limit=heldout_limit)],
                                max_pairs_per_problem=3, batch_size=8, eval_batch_size=64, tokenizer=model, seed=seed)
    module = DPO(model_name_or_path=model, beta=0.1, lora=LoRAConfig(r=16, alpha=32, dropout=0.0),
                 optimizer=OptimizerConfig(lr=1e-3, warmup_steps=5, schedule="constant"))
    curve = HeldoutCurve(eval_every)
    callbacks = [curve] + ([MarginResampling(temperature=temperature, every_n_steps=every, seed=seed)] if resample else [])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks, use_distributed_sampler=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"resample": resample, "curve": curve.curve, "seconds": time.perf_counter() - start,
            "train_pairs": len(data.train_items), "heldout_pairs": len(data.val_items)}


def first_step(curve: list[dict], target: float) -> int | None:
    return next((p["step"] for p in curve if p["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/quickstart/sft-model")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="rescore every n steps (resampling run)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-limit", type=int, default=60)
    parser.add_argument("--heldout-limit", type=int, default=40)
    parser.add_argument("--json", default=None, help="also write the curves here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        for resample in (False, True):
            r = run(args.model, resample, args.steps, args.every, args.eval_every, args.temperature, seed,
                    args.train_limit, args.heldout_limit)
            r["seed"] = seed
            r["first_step"] = first_step(r["curve"], args.target)
            results.append(r)
            print(f"seed {seed} {'margin resampling' if resample else 'uniform':>17}: accuracy >= {args.target} at step "
                  f"{r['first_step']}, final accuracy {r['curve'][-1]['accuracy']:.3f}, final margin "
                  f"{r['curve'][-1]['margin']:.4f} ({r['seconds']:.0f} s, {r['train_pairs']} train / "
                  f"{r['heldout_pairs']} held-out pairs)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
