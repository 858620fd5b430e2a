"""`make quickstart`: the offline CPU quickstart, run stage by stage through the same CLI and configs a user runs.

    python -m lit_align.quickstart [--output runs/quickstart] [--seed 0] [--max-steps N]

Each stage is ``lit_align fit --config configs/quickstart/<stage>.yaml``; its trained model is published to
``<output>/<stage>-model`` (a standard Hugging Face directory), which later stages start from. A stage whose model is
already there is skipped, so a rerun continues where the last one stopped and never overwrites a finished stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


@dataclass
class Stage:
    name: str
    config: str

    def model_dir(self, output: Path) -> Path:
        return output / f"{self.name}-model"


STAGES = [Stage("sft", "sft.yaml")]


def _config_path(name: str) -> Path:
    for candidate in (Path("configs/quickstart") / name, CONFIG_DIR / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"quickstart config {name} not found in ./configs/quickstart or {CONFIG_DIR}")


def run_stage(stage: Stage, output: Path, seed: int, max_steps: int | None) -> dict:
    """Fit one stage; returns its summary (held-out loss before/after, paths, wall time)."""
    from lit_align.callbacks.lora_merge import LoRAMerge
    from lit_align.cli import LitAlignCLI

    args = ["--config", str(_config_path(stage.config)), "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(output / "runs")]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max(1, max_steps // 2))]
    cli = LitAlignCLI(args=args, run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    start = time.time()
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    export = next((cb.exported_to for cb in trainer.callbacks if isinstance(cb, LoRAMerge)), None)
    if export is None:
        raise RuntimeError(f"the {stage.config} config has no LoRAMerge callback, so the stage exported no model")
    published = stage.model_dir(output)
    shutil.copytree(export, published)
    return {
        "stage": stage.name,
        "heldout_loss_untrained": before.get("val/loss"),
        "heldout_loss_trained": after.get("val/loss"),
        "heldout_perplexity_trained": after.get("val/perplexity"),
        "run_dir": trainer.log_dir,
        "checkpoint": trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None,
        "model": str(published),
        "wall_seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_align.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/quickstart", help="where stage models, runs and the summary go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--max-steps", type=int, default=None, help="override each stage's training steps (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny model is fastest on one)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summary_path = output / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"seed": args.seed, "stages": {}}
    for stage in STAGES:
        if stage.model_dir(output).exists():
            print(f"lit_align quickstart: stage {stage.name} already done ({stage.model_dir(output)}), skipping")
            continue
        print(f"lit_align quickstart: stage {stage.name} (configs/quickstart/{stage.config})")
        summary["stages"][stage.name] = run_stage(stage, output, args.seed, args.max_steps)
        summary_path.write_text(json.dumps(summary, indent=2))
    print("\nlit_align quickstart: done. Results:")
    for name, s in summary["stages"].items():
        print(f"  {name}: held-out loss {s['heldout_loss_untrained']:.3f} (untrained) -> {s['heldout_loss_trained']:.3f} "
              f"in {s['wall_seconds']:.0f} s")
        print(f"      model      {s['model']}\n      logs       {s['run_dir']}  (tensorboard --logdir {Path(s['run_dir']).parent})"
              f"\n      checkpoint {s['checkpoint']}")
    print(f"  summary    {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
