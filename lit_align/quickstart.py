"""`make quickstart`: IotaCode's Table 1 in miniature, offline on CPU, through the same CLI and configs a user runs.

    python -m lit_align.quickstart [--output runs/quickstart] [--seed 0] [--stages sft dpo ...] [--samples 10]
                                   [--max-steps N --val-limit N --eval-limit N]   # smoke runs
                                   [--set STAGE OPTION VALUE ...]   # e.g. --set grpo trainer.max_steps 240
                                   [--eval-split validation]        # choosing settings: not the reported split

Each stage is ``lit_align fit --config configs/quickstart/<stage>.yaml``: SFT on the task suite, then from the SFT
model the reward model, DPO, ORPO, PPO with the reward model's reward, PPO and GRPO with the unit-test reward, and RAFT.
Each trained model is published to ``<output>/<stage>-model`` (a standard Hugging Face directory), which later stages
start from. Then every policy (and the untrained model) is sampled n times per held-out problem and its samples are
run against the hidden tests: ``table.md`` (Table 1's layout), ``pass_at_k.png`` and ``results.json`` are written
under ``<output>``. A stage whose model is already there, and a model already evaluated, are skipped, so a rerun
continues where the last one stopped and never overwrites a finished stage; a stage stopped part way resumes from its
run's ``last.ckpt`` (into a new version directory, as ``lit_align fit --ckpt_path`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Sequence
from unittest import mock
from pathlib import Path

import yaml

from lit_align.hints import HintingArgumentParser

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


@dataclass
class Stage:
    name: str
    config: str

    def model_dir(self, output: Path) -> Path:
        return output / f"{self.name}-model"


STAGES = [
    Stage("sft", "sft.yaml"),
    Stage("reward", "reward.yaml"),
    Stage("dpo", "dpo.yaml"),
    Stage("orpo", "orpo.yaml"),
    Stage("ppo_rm", "ppo_rm.yaml"),
    Stage("ppo", "ppo.yaml"),
    Stage("grpo", "grpo.yaml"),
    Stage("raft", "raft.yaml"),
]
NOT_POLICIES = {"reward"}  # stages whose model is not a policy to evaluate
METHOD_NAMES = {"untrained": "untrained (preset:tiny)", "sft": "SFT", "dpo": "SFT + DPO", "orpo": "SFT + ORPO",
                "ppo_rm": "SFT + PPO (reward model)", "ppo": "SFT + PPO (unit tests)", "grpo": "SFT + GRPO (unit tests)",
                "raft": "SFT + RAFT (unit tests)"}


def _config_path(name: str) -> Path:
    for candidate in (Path("configs/quickstart") / name, CONFIG_DIR / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"quickstart config {name} not found in ./configs/quickstart or {CONFIG_DIR}")


def interrupted_checkpoint(stage: Stage, output: Path, args: Sequence[str] = ()) -> Path | None:
    """The ``last.ckpt`` a stopped run of ``stage`` left under ``<output>/runs``: the newest one in a run directory that
    exported no model (a run that exported one finished; its model is published, or it was made by hand). The run's
    name is the config's logger name, or the last ``--trainer.logger.init_args.name`` among the stage's ``args``."""
    logger = yaml.safe_load(_config_path(stage.config).read_text())["trainer"]["logger"]["init_args"]["name"]
    names = [value for option, value in zip(args, args[1:]) if option == "--trainer.logger.init_args.name"]
    logger = names[-1] if names else logger
    stopped = [last for last in (output / "runs" / logger).glob("version_*/checkpoints/last.ckpt")
               if not (last.parents[1] / "model").exists()]
    return max(stopped, key=lambda p: p.stat().st_mtime, default=None)


def stage_args(stage: Stage, output: Path, seed: int, max_steps: int | None = None, val_limit: int | None = None,
               overrides: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The stage's ``lit_align fit`` arguments: its config, the pipeline's seed and paths, the smoke-run bounds, then
    the user's ``--set`` overrides (``(option, value)`` pairs), which win over everything before them."""
    # the seed moves everything a run draws: initialisation of new weights, sampling, and the DataModule's data order
    args = ["--config", str(_config_path(stage.config)), "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
            "--trainer.logger.init_args.save_dir", str(output / "runs")]
    if stage.name != "sft":  # every later stage starts from this run's SFT model (and PPO-RM from its reward model)
        args += ["--model.init_args.model_name_or_path", str(output / "sft-model")]
    if stage.name == "ppo_rm":
        args += ["--model.init_args.reward_model", str(output / "reward-model")]
    if max_steps is not None:
        # smoke runs: bounded in batches too (an online stage whose rollouts all fail takes no optimizer step)
        args += ["--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", str(max_steps), "--trainer.val_check_interval", str(max(1, max_steps // 2))]
    if val_limit is not None:  # every stage's DataModule validates on task-suite held-out sources with a limit
        args += ["--data.init_args.val_sources", f"[{{path: task_suite, split: heldout, limit: {val_limit}}}]"]
    for option, value in overrides:
        args += [f"--{option.removeprefix('--')}", value]
    return args


def check_stage_args(args: list[str]) -> str | None:
    """Parse a stage's arguments as its ``lit_align fit`` would, building nothing: the parser's error (with its
    nearest-option hint) when they do not parse, else None. Run for the stages given ``--set`` overrides before the
    first stage trains."""
    import contextlib
    import io

    from lit_align.cli import LitAlignCLI

    errors = io.StringIO()
    try:
        with (mock.patch.object(sys, "argv", ["lit_align"]), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(errors)):  # (the parser's messages name the program lit_align)
            LitAlignCLI(args=args + ["--print_config"], run=False)
    except SystemExit as exit_:
        if exit_.code:
            message = errors.getvalue()
            return message[message.find("error: ") + len("error: "):].strip() if "error: " in message else message
    return None


def run_stage(stage: Stage, output: Path, args: list[str], resume: Path | None = None) -> dict:
    """Fit one stage with its ``lit_align fit`` arguments (:func:`stage_args`), from the checkpoint ``resume`` when
    given; returns its summary (held-out loss before/after, paths, wall time of this fit)."""
    from lit_align.callbacks.lora_merge import LoRAMerge
    from lit_align.cli import LitAlignCLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the stage's args are these, not the pipeline's own
        cli = LitAlignCLI(args=args, run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    for callback in trainer.callbacks:  # the pipeline publishes a copy under <output> itself, not the configs' link
        if isinstance(callback, LoRAMerge):
            callback.link = None
    start = time.time()
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    export = next((cb.exported_to for cb in trainer.callbacks if isinstance(cb, LoRAMerge)), None)
    if export is None:
        raise RuntimeError(f"the {stage.config} config has no LoRAMerge callback, so the stage exported no model")
    published = stage.model_dir(output)
    shutil.copytree(export, published)
    return {
        "stage": stage.name,
        "validation_before": {k: float(v) for k, v in before.items()},
        "validation_after": {k: float(v) for k, v in after.items()},
        "run_dir": trainer.log_dir,
        "checkpoint": trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None,
        "model": str(published),
        "wall_seconds": round(time.time() - start, 1),
        "resumed_from": str(resume) if resume else None,
        "args": args,
    }


def parse_args(argv: list[str] | None = None):
    """The pipeline's options, each refused in one line naming it: counts below one, and ``--set`` overrides naming an
    unknown stage, a stage not run, or an option the stage's ``lit_align fit`` refuses. Adds ``stage_args``, each
    stage's ``lit_align fit`` arguments."""
    parser = HintingArgumentParser(prog="python -m lit_align.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/quickstart", help="where stage models, runs and the summary go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--max-steps", type=int, default=None, help="override each stage's training steps (smoke runs)")
    parser.add_argument("--val-limit", type=int, default=None,
                        help="held-out problems each stage validates on during training (smoke runs; the final "
                             "evaluation always uses all of them)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate every policy on the first N problems of the split only (smoke runs; default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny model is fastest on one)")
    parser.add_argument("--stages", nargs="+", default=[s.name for s in STAGES], choices=[s.name for s in STAGES],
                        help="stages to run (sft is needed by all others)")
    parser.add_argument("--samples", type=int, default=10, help="samples per problem in the evaluation")
    parser.add_argument("--eval-split", default="heldout", choices=["heldout", "validation"],
                        help="task-suite split the policies are evaluated on: heldout (the reported 75 problems) or "
                             "validation (146 others, for choosing settings; written to table-validation.md, ...)")
    parser.add_argument("--set", nargs=3, action="append", default=[], metavar=("STAGE", "OPTION", "VALUE"),
                        help="override one option of a stage's config, as on its lit_align fit command line, e.g. "
                             "--set grpo trainer.max_steps 240 (repeatable; checked before any stage trains)")
    args = parser.parse_args(argv)
    for option in ("max_steps", "val_limit", "eval_limit", "samples", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    names = [s.name for s in STAGES]
    for stage_name, option, value in args.set:
        if stage_name not in names:
            parser.error(f"--set {stage_name} {option} {value}: no stage {stage_name!r}; the stages are "
                         + ", ".join(names))
        if stage_name not in args.stages:
            parser.error(f"--set {stage_name} {option} {value}: stage {stage_name} is not among --stages "
                         + " ".join(args.stages))
    args.stage_args = {}
    for stage in [s for s in STAGES if s.name in args.stages]:
        overrides = [(option, value) for name, option, value in args.set if name == stage.name]
        args.stage_args[stage.name] = stage_args(stage, Path(args.output), args.seed, args.max_steps, args.val_limit,
                                                 overrides)
        if overrides and (error := check_stage_args(args.stage_args[stage.name])):
            parser.error(f"stage {stage.name} with --set {' '.join(f'{o} {v}' for o, v in overrides)}: {error}")
    return args


def made_with(seed: int) -> str:
    """What the table depends on beside the code, for a reader comparing it with README's: the seed, torch and the
    CPU kernels it ran (``report.environment``)."""
    from lit_align.report import environment

    env = environment()
    return (f"Seed {seed}, torch {env['packages']['torch']} on its {env['cpu']['kernels']} CPU kernels "
            f"({env['cpu']['model']}): another seed or another CPU moves these numbers by several points (README.md, "
            "\"The quickstart\"); compare methods over seeds with python -m lit_align.report.\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    # transformers' "Loading weights" / "Writing model shards" bars: dozens per pipeline, each done in milliseconds for
    # the tiny model; Lightning's progress bars and the lines below say what the pipeline is doing
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return run_pipeline(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def run_pipeline(args) -> int:
    """The stages ``args.stages`` not yet done, then the evaluation of every policy there is; prints where it all is."""
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summary_path = output / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"seed": args.seed, "stages": {}}
    for stage in [s for s in STAGES if s.name in args.stages]:
        if stage.model_dir(output).exists():
            ignored = " ".join(f"--set {stage.name} {option} {value}" for name, option, value in args.set
                               if name == stage.name)
            print(f"lit_align quickstart: stage {stage.name} already done ({stage.model_dir(output)}), skipping"
                  + (f"; {ignored} not applied (another --output trains it again)" if ignored else ""))
            continue
        if stage.model_dir(output).is_symlink():  # a link (LoRAMerge's `link` of a run by hand) to a model now gone
            print(f"lit_align quickstart: {stage.model_dir(output)} links to {os.readlink(stage.model_dir(output))}, "
                  "which no longer exists: the stage trains again and its model replaces the link")
            stage.model_dir(output).unlink()
        resume = interrupted_checkpoint(stage, output, args.stage_args[stage.name])
        print(f"lit_align quickstart: stage {stage.name} (configs/quickstart/{stage.config})"
              + (f", resuming the stopped run from {resume}" if resume else ""))
        summary["stages"][stage.name] = run_stage(stage, output, args.stage_args[stage.name], resume)
        summary_path.write_text(json.dumps(summary, indent=2))
    paths = evaluate_policies(summary, output, args)
    summary_path.write_text(json.dumps(summary, indent=2))
    print("\nlit_align quickstart: done.")
    for name, s in summary["stages"].items():
        print(f"  {name:<7} model {s['model']}  logs {s['run_dir']}  ({s['wall_seconds']:.0f} s)")
    print("\n" + paths["table"].read_text())
    print(made_with(args.seed))
    for what, path in paths.items():
        print(f"  {what:<6} {path}")
    print(f"  stages {summary_path}")
    return 0


def evaluate_policies(summary: dict, output: Path, args) -> dict[str, Path]:
    """Sample and execute every available policy on the task suite's ``args.eval_split`` problems; write the table, the
    plot and the JSON (``table.md``, ... for the held-out split; ``table-validation.md``, ... for the validation one,
    so that choosing settings never overwrites the reported results)."""
    from lit_align.execution.benchmarks import load_task_suite_problems
    from lit_align.report import evaluate_model, write_report

    split = args.eval_split
    problems = load_task_suite_problems(split)[:args.eval_limit]
    evals = summary.setdefault("evaluations" if split == "heldout" else f"evaluations_{split}", {})
    policies = {"untrained": "preset:tiny"} | {
        s.name: str(s.model_dir(output)) for s in STAGES if s.name not in NOT_POLICIES and s.model_dir(output).exists()}
    for name, path in policies.items():
        if name in evals and (evals[name]["n_samples"], evals[name]["num_problems"]) == (args.samples, len(problems)):
            continue
        print(f"lit_align quickstart: evaluating {name} ({args.samples} sample{'s' * (args.samples != 1)} x "
              f"{len(problems)} {'held-out' if split == 'heldout' else split} problems)")
        evals[name] = evaluate_model(path, problems, n_samples=args.samples, seed=args.seed)
        evals[name]["train_seconds"] = summary["stages"].get(name, {}).get("wall_seconds", 0.0)
    rows = {METHOD_NAMES[name]: evals[name] for name in policies}
    return write_report(rows, output, args.seed, split=split)


if __name__ == "__main__":
    sys.exit(main())
