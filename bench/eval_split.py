"""pass@1, pass@10, compile rate and solved problems of model directories on one task-suite split, as the quickstart
evaluates (10 samples per problem at temperature 0.8, 96 new tokens, sampling seeded by the run's seed).

    python bench/eval_split.py --split validation sft:0:runs/quickstart/sft-model grpo:0:runs/quickstart/grpo-model

Each model is NAME:SEED:PATH; one JSON line per model on stdout. Used for the validation-split table in BENCHMARKS.md
("Longer online stages"): the quickstart reports the 75 ``heldout`` problems, and settings are chosen on the 146
``validation`` ones (held-out parameter values that split does not use; docs/task_suite.md).
"""
import argparse
import json

import torch

from lit_align.execution.benchmarks import load_task_suite_problems
from lit_align.report import evaluate_model

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("models", nargs="+", help="NAME:SEED:PATH, e.g. grpo:1:runs/quickstart-seed1/grpo-model")
parser.add_argument("--split", default="validation", choices=["validation", "heldout", "train"])
parser.add_argument("--samples", type=int, default=10, help="samples per problem")
args = parser.parse_args()
torch.set_num_threads(1)
problems = load_task_suite_problems(args.split)
for spec in args.models:
    name, seed, path = spec.split(":", 2)
    result = evaluate_model(path, problems, n_samples=args.samples, seed=int(seed))
    print(json.dumps({"name": name, "seed": int(seed), "split": args.split, "problems": len(problems),
                      **{k: result[k] for k in ("pass@1", "pass@10", "compile_rate", "solved", "eval_seconds")
                         if k in result}}), flush=True)
