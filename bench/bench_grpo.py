"""Rollout throughput and GRPO step time: lit_align's hf backend / GRPO module against TRL's GRPOTrainer.

Both sides use the same tiny model, the same prompts (task-suite training problems), K completions per prompt at
temperature 1, the same completion budget, no stop strings (both stop at end-of-sequence), the same unit-test reward
(lit_align's sandboxed executor), beta = 0.04 with a frozen reference copy, one optimizer step per generation batch,
sequence-level loss normalisation (lit_align ``loss_aggregation="sequence"`` = TRL ``loss_type="grpo"``), one torch
thread, CPU.

- generation: completions per second of one batch of prompts x K (median of ``--repeats`` timed calls after a
  warm-up): ``HFBackend.generate`` against ``GRPOTrainer._generate`` (TRL's own transformers ``generate`` path; a
  private method, the one its training step calls).
- step: seconds per full GRPO training step (generate, execute, reference and policy forward/backward, optimizer step),
  median over ``--steps`` steps after the first.

    python bench/bench_grpo.py --model runs/quickstart/sft-model --prompts 16 --k 4 --max-new-tokens 64

``--stop``: lit_align's generation alone, stopping at the stop strings GRPO trains with by default (``DEFAULT_STOP``,
looked for in each row's decoded text at every step), timed in one process with each of the two decode paths of that
check, alternating (the tokenizers library's ``decode`` called directly, as the backend does, and transformers'
``tokenizer.decode``); TRL's generate is not given stop strings here, so this is not a comparison with TRL.

``--kv-cache``: lit_align's generation alone, with each KV cache of the hf backend timed alternately in one process:
the reserved cache (:mod:`lit_align.generation.kv_cache`, ``reserve_cache=True``) and transformers' default cache;
both must return the same completions.

``--batch-rows``: lit_align's generation alone, with and without each of the hf backend's two row savings, timed
alternately in one process: each prompt prefilled once for its K samples (``share_prompt``) and rows that ended
dropped from the decoding batch (``drop_ended_rows``), both on by default; all four must return the same completions.

``--reward-scoring REWARD_MODEL``: a reward model's scoring of each prompt's K completions (its canonical solution
cut at K lengths) with ``share_prompt`` (each prompt once per batch) and without, timed alternately in one process.

``--no-share-prompt``: the lit_align GRPO step without any prompt sharing (the module's passes over rollouts and the
hf backend's prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def _prompt_items(n: int, stride: int = 1):
    """The first ``n`` task-suite training prompts, or with ``stride`` every stride-th one (``--prompt-stride``)."""
    from lit_align.data_modules.prompts import PromptSource, load_prompt_items

    if stride == 1:
        return load_prompt_items(PromptSource(split="train", limit=n))
    return load_prompt_items(PromptSource(split="train"))[::stride][:n]


def bench_lit_align_generation(model_path: str, items, k: int, max_new_tokens: int, repeats: int) -> dict:
    from lit_align.generation import HFBackend, SamplingParams
    from lit_align.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_path), load_tokenizer(model_path)
    backend = HFBackend(model, tok, batch_size=len(items) * k)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=k, stop=[], seed=0)
    prompts = [i.prompt for i in items]
    backend.generate(prompts, params)  # warm-up
    times, tokens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = backend.generate(prompts, params)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(c.token_ids) for group in out for c in group))
    t = statistics.median(times)
    return {"seconds": t, "completions_per_s": len(prompts) * k / t, "tokens_per_s": statistics.median(tokens) / t}


def bench_stop_check(model_path: str, items, k: int, max_new_tokens: int, repeats: int) -> dict:
    """Generation with GRPO's default stop strings, each decode path of the per-step stop check timed alternately
    in this process (``repeats`` rounds of 3 calls per path; medians)."""
    from lit_align.generation import DEFAULT_STOP, HFBackend, SamplingParams
    from lit_align.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_path), load_tokenizer(model_path)
    backend = HFBackend(model, tok, batch_size=len(items) * k)
    direct = backend._rust_decode
    assert direct is not None, "this tokenizer's decode is its own: there is no direct path to compare"
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=k, stop=list(DEFAULT_STOP), seed=0)
    prompts = [i.prompt for i in items]
    backend.generate(prompts, params)  # warm-up
    times: dict[str, list[float]] = {"tokenizers_decode": [], "transformers_decode": []}
    for _ in range(repeats):
        for path in times:
            backend._rust_decode = direct if path == "tokenizers_decode" else None
            for _ in range(3):
                t0 = time.perf_counter()
                out = backend.generate(prompts, params)
                times[path].append(time.perf_counter() - t0)
    tokens = sum(len(c.token_ids) for group in out for c in group)
    return {path: {"seconds": statistics.median(ts), "tokens": tokens} for path, ts in times.items()}


def _model_dir(model_path: str, dtype: str) -> str:
    """``model_path``, or for ``shape:NAME`` a random model of bench_gpu_scale.py's shapes saved to a temporary
    directory (it generates to the budget)."""
    if not model_path.startswith("shape:"):
        return model_path
    from bench_gpu_scale import build_model_dir

    target = Path(tempfile.mkdtemp()) / "model"
    build_model_dir(model_path.removeprefix("shape:"), target, dtype)
    return str(target)


def bench_prompt_sharing(model_path: str, items, k: int, repeats: int, micro_batch_size: int,
                         completion_tokens: int | None = None, gradient_checkpointing: bool = False,
                         logits_chunk_size: int | None = None) -> dict:
    """GRPO's passes over one batch of rollouts with ``share_prompt`` on and off, timed alternately in this process.

    Rollouts: each prompt with K completions, its canonical solution cut at K different lengths (k+1)/K, so
    completions of a group differ in length as sampled ones do; with ``completion_tokens``, random tokens instead,
    ``completion_tokens`` x (k+1)/K of them (longer completions than the task suite's short solutions). Passes, as a GRPO step with beta > 0 and several
    updates runs them: the statistics (old log-probs and the frozen reference copy's log-probs, without gradient)
    and one forward/backward pass over every rollout in micro-batches of ``micro_batch_size``. Medians over
    ``repeats`` rounds; the two settings' log-probs are compared too. With ``gradient_checkpointing`` the training
    pass cannot share through a cache and packs each prompt's rows into one row instead (``packed_groups``). With
    ``logits_chunk_size`` every pass runs the LM head that many response tokens at a time (the module's option).
    ``peak_rss_gib``: the process's peak resident memory after the passes (the model load included), to compare runs
    with and without ``logits_chunk_size``."""
    from bench_pairwise import _reset_peak_rss, _status_kib

    from lit_align.generation import Completion, SamplingParams
    from lit_align.modules.grpo import GRPO

    module = GRPO(model_name_or_path=_model_dir(model_path, "float32"), samples_per_prompt=k, beta=0.04,
                  micro_batch_size=micro_batch_size, gradient_checkpointing=gradient_checkpointing,
                  logits_chunk_size=logits_chunk_size)
    module.configure_model()
    module.train()
    tok = module.tokenizer
    groups = []
    rng = random.Random(0)
    for item in items:
        if completion_tokens:
            from bench_gpu_scale import random_text

            ids = [tok(random_text(rng, 8 * completion_tokens), add_special_tokens=False)["input_ids"]
                   [:max(1, round(completion_tokens * (j + 1) / k))] for j in range(k)]
            groups.append([Completion(tok.decode(i), i, None, "length") for i in ids])
            continue
        text = item.problem.canonical_solution
        cuts = [text[:max(1, round(len(text) * (j + 1) / k))] for j in range(k)]
        groups.append([Completion(c, tok(c, add_special_tokens=False)["input_ids"], None, "length") for c in cuts])
    rollouts = module.build_rollouts(items, groups, SamplingParams(n=k, stop=[]))
    every = torch.arange(len(rollouts))

    def statistics_pass():
        return module.rollout_statistics(rollouts, with_reference=True)

    def training_pass():
        module.zero_grad(set_to_none=True)
        for index in every.split(micro_batch_size):
            module.rollout_forward(rollouts.rows(index))["logps"].sum().backward()

    baseline_kib = _reset_peak_rss()
    times: dict[str, dict[str, list[float]]] = {m: {"statistics": [], "training": []} for m in ("shared", "full")}
    stats = {}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, timed in times.items():
            module.hparams.share_prompt = mode == "shared"
            t0 = time.perf_counter()
            stats[mode] = statistics_pass()
            t1 = time.perf_counter()
            training_pass()
            t2 = time.perf_counter()
            timed["statistics"].append(t1 - t0)
            timed["training"].append(t2 - t1)
    mask = rollouts.response_mask
    prompt_tokens = int(rollouts.attention_mask.sum()) - int(mask.sum())
    result = {"rollouts": len(rollouts), "prompt_tokens_per_row": prompt_tokens / len(rollouts),
              "response_tokens_per_row": float(mask.sum()) / len(rollouts),
              "max_abs_logp_difference": max(float((stats["shared"][key] - stats["full"][key]).abs().max())
                                             for key in ("old_logps", "ref_logps"))}
    for mode, timed in times.items():
        result[mode] = {name: statistics.median(ts[1:]) for name, ts in timed.items()}
    result["speedup"] = {name: result["full"][name] / result["shared"][name] for name in ("statistics", "training")}
    result["peak_rss_gib"] = _status_kib("VmHWM") / 2**20
    result["peak_rss_over_start_gib"] = (_status_kib("VmHWM") - baseline_kib) / 2**20
    result["logits_chunk_size"] = logits_chunk_size
    return result


def _canonical_cuts(items, k: int) -> tuple[list[str], list[str]]:
    """(prompts, completions): each prompt K times with its canonical solution cut at K lengths (k+1)/K."""
    prompts, completions = [], []
    for item in items:
        text = item.problem.canonical_solution
        for j in range(k):
            prompts.append(item.prompt)
            completions.append(text[:max(1, round(len(text) * (j + 1) / k))])
    return prompts, completions


def bench_reward_scoring(reward_model: str, items, k: int, repeats: int, batch_size: int) -> dict:
    """A reward model's scoring of every prompt's K completions (:func:`_canonical_cuts`), in batches of
    ``batch_size`` pairs, with ``share_prompt`` on and off, timed alternately in this process (``repeats`` rounds of 3
    calls per setting after a warm-up; medians); the two settings' rewards are compared."""
    from lit_align.modules.reward import load_reward_model

    rm = load_reward_model(reward_model)
    prompts, completions = _canonical_cuts(items, k)
    rm.score(prompts, completions, batch_size)  # warm-up
    times: dict[str, list[float]] = {"shared": [], "full": []}
    rewards = {}
    for _ in range(repeats):
        for mode, ts in times.items():
            rm.hparams.share_prompt = mode == "shared"
            for _ in range(3):
                t0 = time.perf_counter()
                rewards[mode] = rm.score(prompts, completions, batch_size)
                ts.append(time.perf_counter() - t0)
    result = {mode: {"seconds": statistics.median(ts)} for mode, ts in times.items()}
    result["pairs"] = len(prompts)
    result["speedup"] = result["full"]["seconds"] / result["shared"]["seconds"]
    result["max_abs_reward_difference"] = float((rewards["shared"] - rewards["full"]).abs().max())
    return result


def bench_generation_settings(model_path: str, items, k: int, max_new_tokens: int, repeats: int,
                              settings: dict[str, dict], device: str = "cpu", dtype: str = "float32") -> dict:
    """Generation with each of ``settings`` (name -> hf backend attributes), timed alternately in this process
    (``repeats`` rounds of 3 calls per setting; medians). Every call is seeded the same, so all must return the same
    completions; that is checked (exactly in float32; in half precision two settings may differ in the last bit of a
    logit, so only the token counts are reported there)."""
    from lit_align.generation import HFBackend, SamplingParams
    from lit_align.models import load_causal_lm, load_tokenizer

    model_path = _model_dir(model_path, dtype)
    model, tok = load_causal_lm(model_path, dtype=dtype).to(device), load_tokenizer(model_path)
    backend = HFBackend(model, tok, batch_size=len(items) * k)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=k, stop=[], seed=0)
    prompts = [i.prompt for i in items]
    backend.generate(prompts, params)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in settings}
    outputs = {}
    for _ in range(repeats):
        for name, attributes in settings.items():
            for attribute, value in attributes.items():
                setattr(backend, attribute, value)
            for _ in range(3):
                t0 = time.perf_counter()
                outputs[name] = backend.generate(prompts, params)
                if device != "cpu":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    ids = {name: [c.token_ids for group in out for c in group] for name, out in outputs.items()}
    if dtype == "float32":
        first = next(iter(ids.values()))
        assert all(i == first for i in ids.values()), f"the settings {list(settings)} decoded different tokens"
    result = {}
    for name, ts in times.items():
        tokens = sum(len(t) for t in ids[name])
        seconds = statistics.median(ts)
        result[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return result


def _trl_trainer(model_path: str, items, k: int, max_new_tokens: int, steps: int, out_dir: str, callbacks=()):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lit_align.execution.rewards import ExecutionReward
    from lit_align.execution.sandbox import Limits
    from lit_align.models import load_causal_lm, load_tokenizer

    problems = {i.task_id: i.problem for i in items}
    executor = ExecutionReward(limits=Limits(timeout_s=1.0))

    def unit_test_reward(prompts, completions, task_id, **kwargs):
        return executor([problems[t] for t in task_id], completions)

    data = Dataset.from_list([{"prompt": i.prompt, "task_id": i.task_id} for i in items])
    config = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=len(items) * k, gradient_accumulation_steps=1,
                        num_generations=k, max_completion_length=max_new_tokens, temperature=1.0, beta=0.04,
                        loss_type="grpo", learning_rate=1e-4, max_steps=steps, num_iterations=1, use_cpu=True,
                        report_to=[], logging_steps=1, save_strategy="no", bf16=False, dataloader_num_workers=0,
                        disable_tqdm=True, seed=0)
    tok = load_tokenizer(model_path, padding_side="left")
    return GRPOTrainer(model=load_causal_lm(model_path), reward_funcs=unit_test_reward, args=config, train_dataset=data,
                       processing_class=tok, callbacks=list(callbacks))


def bench_trl_generation(model_path: str, items, k: int, max_new_tokens: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = _trl_trainer(model_path, items, k, max_new_tokens, 1, out)
        prompts = [i.prompt for i in items for _ in range(k)]  # TRL's sampler repeats each prompt K times
        trainer.model.eval()
        trainer._generate(prompts)  # warm-up
        times, tokens = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = trainer._generate(prompts)
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(ids) for ids in result[1]))
    t = statistics.median(times)
    return {"seconds": t, "completions_per_s": len(prompts) / t, "tokens_per_s": statistics.median(tokens) / t}


def bench_trl_step(model_path: str, items, k: int, max_new_tokens: int, steps: int) -> dict:
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = _trl_trainer(model_path, items, k, max_new_tokens, steps, out, callbacks=[Stamp()])
        t0 = time.perf_counter()
        trainer.train()
    durations = [b - a for a, b in zip([t0] + stamps, stamps)][1:]
    return {"seconds_per_step": statistics.median(durations), "steps_timed": len(durations)}


def bench_lit_align_step(model_path: str, items, k: int, max_new_tokens: int, steps: int,
                         share_prompt: bool = True) -> dict:
    import lightning.pytorch as L

    from lit_align.data_modules.prompts import PromptSource, PromptsDataModule
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.grpo import GRPO

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())

    module = GRPO(model_name_or_path=model_path, samples_per_prompt=k, max_new_tokens=max_new_tokens, stop=[],
                  temperature=1.0, beta=0.04, loss_aggregation="sequence", micro_batch_size=len(items) * k,
                  generation_batch_size=len(items) * k, execution_timeout_s=1.0, share_prompt=share_prompt,
                  generation_kwargs={"share_prompt": share_prompt},
                  optimizer=OptimizerConfig(lr=1e-4, schedule="constant"))
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=len(items))], val_sources=[],
                             batch_size=len(items))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.fit(module, data)
    durations = [b - a for a, b in zip([t0] + stamps, stamps)][1:]
    return {"seconds_per_step": statistics.median(durations), "steps_timed": len(durations)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quickstart/sft-model", help="model directory or preset")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion budget")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation calls per side")
    parser.add_argument("--steps", type=int, default=4, help="training steps per side (the first is not timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--stop", action="store_true",
                        help="lit_align's generation with GRPO's default stop strings, by decode path of the stop check "
                             "(no TRL, no steps)")
    parser.add_argument("--kv-cache", action="store_true",
                        help="lit_align's generation by KV cache: reserved buffers against transformers' default "
                             "(no TRL, no steps); --model may be shape:NAME, a random model of bench_gpu_scale.py")
    parser.add_argument("--batch-rows", action="store_true",
                        help="lit_align's generation with and without the hf backend's share_prompt (each prompt "
                             "prefilled once for its K samples) and drop_ended_rows (no TRL, no steps); --model may be "
                             "shape:NAME")
    parser.add_argument("--prompt-sharing", action="store_true",
                        help="lit_align's GRPO passes over rollouts with share_prompt on and off (no generation, no "
                             "TRL); --model may be shape:NAME")
    parser.add_argument("--reward-scoring", metavar="REWARD_MODEL", default=None,
                        help="a reward model's scoring of the prompts' K completions (canonical solutions cut at K "
                             "lengths) with share_prompt on and off (no generation, no TRL)")
    parser.add_argument("--reward-batch-size", type=int, default=64, help="--reward-scoring only: pairs per pass")
    parser.add_argument("--prompt-stride", type=int, default=1,
                        help="generation-only modes (--stop, --kv-cache, --batch-rows): every N-th training problem "
                             "instead of the first ones (the first 16 are all one family, whose completions end "
                             "together; 14 spreads 16 prompts over every family)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="--prompt-sharing only: rows per pass")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="--prompt-sharing only: checkpointed blocks (the training pass packs each prompt's rows)")
    parser.add_argument("--completion-tokens", type=int, default=None,
                        help="--prompt-sharing only: random completions of up to this many tokens instead of the "
                             "task suite's solutions")
    parser.add_argument("--logits-chunk-size", type=int, default=None,
                        help="--prompt-sharing only: the module's logits_chunk_size (the LM head this many tokens at "
                             "a time)")
    parser.add_argument("--no-share-prompt", action="store_true",
                        help="the lit_align GRPO step with share_prompt off in the module and the hf backend (each "
                             "rollout's prompt run in full)")
    parser.add_argument("--device", default="cpu", help="--kv-cache and --batch-rows only: where the model runs "
                                                        "(cpu, cuda)")
    parser.add_argument("--dtype", default="float32", help="--kv-cache and --batch-rows only: the model's dtype")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.reward_scoring and not Path(args.model).exists() and not args.model.startswith(("preset:", "shape:")):
        print(f"model {args.model!r} not found; run the SFT quickstart first or pass --model", file=sys.stderr)
        return 2
    generation_only = args.stop or args.kv_cache or args.batch_rows or args.reward_scoring
    if args.prompt_stride < 1 or (args.prompt_stride > 1 and not generation_only):
        parser.error("--prompt-stride must be >= 1, and other than 1 only with --stop, --kv-cache, --batch-rows or "
                     "--reward-scoring")
    items = _prompt_items(args.prompts, args.prompt_stride)
    a = (args.model, items, args.k, args.max_new_tokens)
    setup = {"model": args.model, "prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
             "threads": args.threads, "torch": torch.__version__, "share_prompt": not args.no_share_prompt,
             "prompt_stride": args.prompt_stride}
    if args.stop:
        results = {"setup": setup, "stop_check": bench_stop_check(*a, args.repeats)}
    elif args.reward_scoring:
        setup.update(reward_model=args.reward_scoring, reward_batch_size=args.reward_batch_size)
        results = {"setup": setup, "reward_scoring": bench_reward_scoring(args.reward_scoring, items, args.k,
                                                                          args.repeats, args.reward_batch_size)}
    elif args.prompt_sharing:
        setup.update(micro_batch_size=args.micro_batch_size, completion_tokens=args.completion_tokens,
                     gradient_checkpointing=args.gradient_checkpointing, logits_chunk_size=args.logits_chunk_size)
        results = {"setup": setup, "prompt_sharing": bench_prompt_sharing(
            args.model, items, args.k, args.repeats, args.micro_batch_size, args.completion_tokens,
            args.gradient_checkpointing, args.logits_chunk_size)}
    elif args.kv_cache:
        setup.update(device=args.device, dtype=args.dtype)
        settings = {"reserved": {"reserve_cache": True}, "transformers_default": {"reserve_cache": False}}
        results = {"setup": setup,
                   "kv_cache": bench_generation_settings(*a, args.repeats, settings, args.device, args.dtype)}
    elif args.batch_rows:
        setup.update(device=args.device, dtype=args.dtype)
        settings = {f"share_prompt={share},drop_ended_rows={drop}": {"share_prompt": share, "drop_ended_rows": drop}
                    for share in (True, False) for drop in (True, False)}
        results = {"setup": setup,
                   "batch_rows": bench_generation_settings(*a, args.repeats, settings, args.device, args.dtype)}
    else:
        results = {
            "setup": setup,
            "generation": {"lit_align_hf": bench_lit_align_generation(*a, args.repeats),
                           "trl": bench_trl_generation(*a, args.repeats)},
            "grpo_step": {"lit_align": bench_lit_align_step(*a, args.steps, share_prompt=not args.no_share_prompt),
                          "trl": bench_trl_step(*a, args.steps)},
        }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
