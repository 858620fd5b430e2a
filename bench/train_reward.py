"""Mean unit-test reward and pass rate of model directories on the task suite's 225 default training problems.

    python bench/train_reward.py runs/qs-seed0/sft-model runs/qs-seed0/ppo-model runs/qs-seed0/grpo-model

4 samples per problem at temperature 1, up to 64 new tokens (what the online quickstart stages sample), scored in the
sandbox with the default unit-test reward scale (the one the quickstart's PPO and GRPO train on). Used for the
"mean reward on the training problems" table in BENCHMARKS.md.
"""
import sys

import torch
torch.set_num_threads(1)
from lit_align.data_modules.prompts import PromptSource, load_prompt_items
from lit_align.execution.rewards import ExecutionReward
from lit_align.generation.base import SamplingParams
from lit_align.generation.hf import HFBackend
from lit_align.models import load_causal_lm, load_tokenizer
items = load_prompt_items(PromptSource(split="train"))
out = {}
for path in sys.argv[1:]:
    model = load_causal_lm(path).eval()
    backend = HFBackend(model, load_tokenizer(path), batch_size=64)
    comps = backend.generate([i.prompt for i in items], SamplingParams(max_new_tokens=64, temperature=1.0, n=4, seed=0))
    probs = [i.problem for i, g in zip(items, comps) for _ in g]
    texts = [c.text for g in comps for c in g]
    rewards, results = ExecutionReward().score(probs, texts)
    out[path] = {"reward": sum(rewards) / len(rewards), "pass": sum(r.passed for r in results) / len(results)}
    print(path, out[path], flush=True)
