"""Margin resampling vs uniform sampling: optimizer steps until DPO reaches a held-out reward accuracy.

    .venv/bin/python bench/bench_resampling.py --model runs/quickstart/sft-model --seeds 0 1 2 --json OUT.json
    .venv/bin/python bench/bench_resampling.py --level example --no-uniform --seeds 0 1 2     # example-level draws
    .venv/bin/python bench/bench_resampling.py --grouping family --temperatures 0.2 0.5 1     # fixed family batches

Every run trains the DPO of configs/quickstart/dpo.yaml (LoRA r=16, beta 0.5, lr 2e-4 cosine after 20 warm-up steps,
batch 8, the suite's 400 training problems with up to 8 pairs each: 1727 pairs) from the same SFT model; a seed sets
the data order and the adapter's initialisation, identical between the uniform run and the resampling runs of that
seed. Resampling runs add MarginResampling (rescored every ``--every`` steps, ``--level``/``--grouping``, one run per
``--temperatures`` value). Every ``--eval-every`` steps the held-out pairs (the 75 held-out tasks' canonical solution
over each of their incorrect ones: 540 pairs, as the config validates on) are scored; a run reports the first step at
which the held-out reward accuracy (share of pairs with margin > 0) reaches each ``--targets`` value, the accuracy per
kind of incorrect solution (off_by_one, syntax_error, ...), and the effective sample size of each draw.
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

    def __init__(self, every: int, items: list | None = None, verbose: bool = False,
                 problems_per_family: int = 105) -> None:
        self.every = every
        self.problems_per_family = problems_per_family
        self.items = items  # held-out pairs to score (default: the DataModule's validation pairs)
        self.verbose = verbose
        self.curve: list[dict] = []
        self.start = time.perf_counter()

    def _score(self, trainer, module) -> None:
        dm = trainer.datamodule
        items = self.items if self.items is not None else dm.val_items
        m = pair_margins(module, dm, items)
        point = {"step": trainer.global_step, "accuracy": float((m > 0).double().mean()), "margin": float(m.mean())}
        kinds = incorrect_kinds(dm, items, self.problems_per_family)
        for kind in sorted(set(kinds)):
            mask = torch.tensor([k == kind for k in kinds])
            point[f"accuracy/{kind}"] = float((m[mask] > 0).double().mean())
        self.curve.append(point)
        if self.verbose:
            p = self.curve[-1]
            by_kind = " ".join(f"{k[9:]} {v:.2f}" for k, v in p.items() if k.startswith("accuracy/"))
            print(f"  step {p['step']}: accuracy {p['accuracy']:.3f}, margin {p['margin']:.3f} ({by_kind}) "
                  f"({time.perf_counter() - self.start:.0f} s)", flush=True)

    def on_train_start(self, trainer, module) -> None:
        self._score(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._score(trainer, module)


_KINDS: dict[tuple[str, str], str] = {}


def incorrect_kinds(dm, items, problems_per_family: int = 105) -> list[str]:
    """The task suite's name for each pair's rejected solution (off_by_one, syntax_error, ...), "other" if unknown."""
    from lit_align.data_modules.task_suite import generate_task_suite

    if not _KINDS:
        for task in generate_task_suite(problems_per_family=problems_per_family):
            for kind, code in task.incorrect_solutions:
                _KINDS[(task.task_id, code)] = kind
    tok = dm.tokenizer
    out = []
    for it in items:
        text = tok.decode([int(t) for t in it.rejected_ids if int(t) != tok.eos_token_id])
        out.append(_KINDS.get((it.source_id, text), "other"))
    return out


def run(args, temperature: float | None, seed: int) -> dict:
    """One DPO run; ``temperature`` None is uniform sampling."""
    L.seed_everything(seed, verbose=False)
    source = dict(path="task_suite", problems_per_family=args.problems_per_family)
    data = PreferenceDataModule(train_sources=[PreferenceSource(split="train", limit=args.train_limit, **source)],
                                val_sources=[PreferenceSource(split="heldout", **source)],
                                closest_ratio=args.closest_ratio, max_pairs_per_problem=args.max_pairs,
                                max_length=512, batch_size=8, eval_batch_size=64, tokenizer=args.model, seed=seed)
    heldout = None
    if args.heldout_closest_ratio is not None:  # held-out pairs built with their own share of closest incorrect ones
        other = PreferenceDataModule(train_sources=[PreferenceSource(split="heldout", **source)], val_sources=[],
                                     val_fraction=0.0, closest_ratio=args.heldout_closest_ratio,
                                     max_pairs_per_problem=args.max_pairs, max_length=512, tokenizer=args.model,
                                     seed=seed)
        other.setup("fit")
        heldout = other.train_items
    module = DPO(model_name_or_path=args.model, beta=args.beta, lora=LoRAConfig(r=16, alpha=32, dropout=0.0),
                 optimizer=OptimizerConfig(lr=args.lr, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1))
    curve = HeldoutCurve(args.eval_every, heldout, verbose=args.verbose,
                         problems_per_family=args.problems_per_family or 60)
    callbacks = [curve]
    if temperature is not None:
        callbacks.append(MarginResampling(temperature=temperature, level=args.level, grouping=args.grouping,
                                          every_n_steps=args.every, seed=seed))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks,
                        use_distributed_sampler=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"temperature": temperature, "seed": seed, "curve": curve.curve, "seconds": time.perf_counter() - start,
            "train_pairs": len(data.train_items), "heldout_pairs": len(heldout if heldout is not None else data.val_items),
            "ess": [h["resampling/ess_fraction"] for h in callbacks[-1].history] if temperature is not None else []}


def first_step(curve: list[dict], target: float) -> int | None:
    return next((p["step"] for p in curve if p["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/quickstart/sft-model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="rescore every n steps (resampling runs)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0],
                        help="one resampling run per temperature, besides the uniform run")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.85, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--problems-per-family", type=int, default=105)
    parser.add_argument("--closest-ratio", type=float, default=0.5,
                        help="share of pairs against the closest incorrect solution (training, and held-out by default)")
    parser.add_argument("--heldout-closest-ratio", type=float, default=None,
                        help="build the held-out pairs with this share instead (1: only near-miss pairs)")
    parser.add_argument("--level", choices=["batch", "example"], default="batch", help="MarginResampling level")
    parser.add_argument("--grouping", choices=["family", "sampler", "margin"], default="margin",
                        help="MarginResampling grouping (level batch)")
    parser.add_argument("--max-pairs", type=int, default=8)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform run (e.g. when already measured)")
    parser.add_argument("--verbose", action="store_true", help="print every held-out evaluation as it happens")
    parser.add_argument("--json", default=None, help="also write the curves here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    arms = ([] if args.no_uniform else [None]) + list(args.temperatures)
    for seed in args.seeds:
        for temperature in arms:
            r = run(args, temperature, seed)
            r["first_step"] = {str(t): first_step(r["curve"], t) for t in args.targets}
            results.append(r)
            name = "uniform" if temperature is None else \
                f"{args.level if args.level == 'example' else args.grouping} T={temperature:g}"
            reached = ", ".join(f">={t:g} at {r['first_step'][str(t)]}" for t in args.targets)
            last = r["curve"][-1]
            print(f"seed {seed} {name:>18}: {reached}; final accuracy {last['accuracy']:.3f}, margin "
                  f"{last['margin']:.3f} ({r['seconds']:.0f} s, {r['train_pairs']} train / {r['heldout_pairs']} "
                  f"held-out pairs)", flush=True)
            print("   curve: " + " ".join(f"{p['step']}:{p['accuracy']:.3f}" for p in r["curve"]), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
