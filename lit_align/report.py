"""Evaluate trained models by sampling and execution, and report them in the layout of IotaCode's Table 1.

Used by the quickstart pipeline; usable on its own for any set of HF model directories:

    from lit_align.report import evaluate_model, write_report

Several seeds' ``results.json`` files (one quickstart output directory per seed) become one table with the mean and
the seed-to-seed standard deviation of every column, and each method's pass@1 difference to SFT over seeds:

    python -m lit_align.report runs/qs-seed0 runs/qs-seed1 runs/qs-seed2 [--output table-3-seeds.md]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from lit_align.execution.metrics import pass_at_k
from lit_align.hints import HintingArgumentParser


def evaluate_model(model_path: str, problems, n_samples: int = 10, ks: Sequence[int] = (1, 10),
                   max_new_tokens: int = 96, temperature: float = 0.8, seed: int = 0, batch_size: int = 64) -> dict:
    """Sample ``n_samples`` completions per problem from a model directory (or preset), execute them, and summarise.

    Returns pass@k for ``ks``, ``solved`` (problems with a passing sample among the n), compile rate, status
    fractions, per-problem correct counts (for pass@k curves) and the wall time.
    """
    from lit_align.callbacks.pass_at_k import sample_and_score
    from lit_align.generation.base import SamplingParams
    from lit_align.generation.hf import HFBackend
    from lit_align.models import load_causal_lm, load_tokenizer

    start = time.time()
    model = load_causal_lm(model_path).eval()
    backend = HFBackend(model, load_tokenizer(model_path), batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n_samples, seed=seed)
    metrics, grouped = sample_and_score(backend, problems, params, [k for k in ks if k <= n_samples])
    metrics["correct_per_problem"] = [sum(r.passed for r in group) for group in grouped]
    metrics["n_samples"] = n_samples
    metrics["num_problems"] = len(problems)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    return metrics


def pass_at_k_curve(correct_per_problem: Sequence[int], n: int) -> list[float]:
    """Mean unbiased pass@k over problems for k = 1..n."""
    return [sum(pass_at_k(n, c, k) for c in correct_per_problem) / max(1, len(correct_per_problem)) for k in range(1, n + 1)]


def markdown_table(rows: dict[str, dict], n_samples: int, num_problems: int, baseline: str = "SFT") -> str:
    """Table 1's layout: method, solved problems at n samples, pass@1, pass@10, compile rate, wall time; and each
    method's pass@1 minus the baseline's (SFT), so an objective that does not help shows it in its own row."""
    lines = [f"| method | solved (of {num_problems}, {n_samples} sample{'s' * (n_samples != 1)}) | pass@1 | pass@10 | compile rate | train time (s) "
             f"| pass@1 - {baseline} |", "|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        p10 = f"{100 * r['pass@10']:.1f}" if "pass@10" in r else "-"
        delta = f"{100 * (r['pass@1'] - rows[baseline]['pass@1']):+.1f}" if baseline in rows and method != baseline else "-"
        lines.append(f"| {method} | {int(r['solved'])} | {100 * r['pass@1']:.1f} | {p10} | {100 * r['compile_rate']:.1f} "
                     f"| {r.get('train_seconds', 0):.0f} | {delta} |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(rows: dict[str, dict], path: Path) -> Path:
    """PNG of mean pass@k against k, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, r in rows.items():
        curve = pass_at_k_curve(r["correct_per_problem"], r["n_samples"])
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", markersize=3, label=method)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k on held-out problems (%)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "lightning", "peft", "numpy")
"""Packages whose release can move a run's numbers (kernels, initialisation, tokenization, training loop), recorded
in ``results.json`` beside the seed."""


def environment() -> dict:
    """Python's version, those of :data:`RESULT_PACKAGES` ("not installed" for one that is absent) and the CPU: the
    same seed gives the same table only with the same releases and the same CPU kernels. torch picks its kernels by
    the CPU's instruction sets (``kernels``: AVX2, AVX512, ...), and they round differently enough to move a trained
    model's pass@k; ``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine use the AVX2 ones."""
    import importlib.metadata as metadata
    import platform

    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(),
            "cpu": {"kernels": torch.backends.cpu.get_cpu_capability(), "model": cpu_model()},
            "packages": {name: version(name) for name in RESULT_PACKAGES}}


def cpu_model() -> str:
    """The CPU's model name as the operating system gives it (``/proc/cpuinfo`` on Linux), or ``platform``'s guess."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def write_report(rows: dict[str, dict], output: Path, seed: int, split: str = "heldout") -> dict[str, Path]:
    """Write ``table.md``, ``pass_at_k.png`` and ``results.json`` under ``output`` (``table-<split>.md``, ... for a
    split other than the reported held-out one); returns their paths. ``results.json`` holds the seed, the split, the
    :func:`environment` and every method's row."""
    output.mkdir(parents=True, exist_ok=True)
    any_row = next(iter(rows.values()))
    table = markdown_table(rows, any_row["n_samples"], any_row["num_problems"])
    suffix = "" if split == "heldout" else f"-{split}"
    paths = {"table": output / f"table{suffix}.md", "plot": output / f"pass_at_k{suffix}.png",
             "json": output / f"results{suffix}.json"}
    paths["table"].write_text(table)
    plot_pass_at_k(rows, paths["plot"])
    paths["json"].write_text(json.dumps({"seed": seed, "split": split, "environment": environment(), "methods": rows},
                                        indent=2))
    return paths


def _mean_sd(values: Sequence[float], signed: bool = False) -> str:
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.1f}"
    return f"{mean} ± {statistics.stdev(values):.1f}" if len(values) > 1 else mean


def seeds_table(results: Sequence[dict], baseline: str = "SFT") -> str:
    """Mean ± standard deviation over seeds of each Table 1 column, plus pass@1 minus the baseline's, per seed; with
    several seeds, :func:`per_seed_table` below it.

    ``results`` are ``results.json`` contents of runs with different seeds, the same methods and the same number of
    samples and problems. The last column is computed per seed (paired), so a method beats the baseline by more
    than the seed-to-seed spread when its mean difference exceeds that column's standard deviation.
    """
    if not results:
        raise ValueError("seeds_table needs at least one results.json")
    splits = {r.get("split", "heldout") for r in results}  # results.json written before splits were recorded: heldout
    if len(splits) > 1:
        raise ValueError(f"the results are evaluations on different splits ({', '.join(sorted(splits))}); combine one "
                         "split's results.json files (results-validation.json for the validation split)")
    methods = list(results[0]["methods"])
    for r in results[1:]:
        if list(r["methods"]) != methods:
            raise ValueError(f"seed {r['seed']} has methods {list(r['methods'])}, seed {results[0]['seed']} {methods}")
    first = results[0]["methods"][methods[0]]
    n, problems = first["n_samples"], first["num_problems"]
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"| method | solved (of {problems}, {n} samples) | pass@1 | pass@10 | compile rate | train time (s) "
             f"| pass@1 - {baseline} |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        rows = [r["methods"][method] for r in results]
        cells = [_mean_sd([row["solved"] for row in rows]), _mean_sd([100 * row["pass@1"] for row in rows]),
                 _mean_sd([100 * row["pass@10"] for row in rows]) if all("pass@10" in row for row in rows) else "-",
                 _mean_sd([100 * row["compile_rate"] for row in rows]),
                 _mean_sd([row.get("train_seconds", 0.0) for row in rows])]
        if baseline in results[0]["methods"] and method != baseline:
            cells.append(_mean_sd([100 * (r["methods"][method]["pass@1"] - r["methods"][baseline]["pass@1"])
                                   for r in results], signed=True))
        else:
            cells.append("-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    note = (f"Mean ± standard deviation over seeds {seeds}; pass@k, compile rate and the difference in percent, "
            "solved in problems, train time in seconds.")
    if mixed := mixed_environments(results):
        note += f" Runs made with different releases or CPUs, so seeds are not the only difference: {mixed}."
    per_seed = per_seed_table(results, baseline) if len(results) > 1 and baseline in methods else ""
    return "\n".join(lines) + (f"\n\n{per_seed}" if per_seed else "") + f"\n\n{note}\n"


def per_seed_table(results: Sequence[dict], baseline: str = "SFT") -> str:
    """The baseline's pass@1 per seed, each other method's difference to it per seed, and on how many seeds the
    method is above it: what a mean ± sd over a few seeds hides (one bad seed, or a gain carried by one)."""
    lines = [f"| pass@1 - {baseline} | " + " | ".join(f"seed {r['seed']}" for r in results) + f" | above {baseline} |",
             "|---" * (len(results) + 2) + "|",
             f"| {baseline} (pass@1) | " + " | ".join(f"{100 * r['methods'][baseline]['pass@1']:.1f}" for r in results)
             + " | - |"]
    for method in results[0]["methods"]:
        if method == baseline:
            continue
        diffs = [100 * (r["methods"][method]["pass@1"] - r["methods"][baseline]["pass@1"]) for r in results]
        lines.append(f"| {method} | " + " | ".join(f"{d:+.1f}" for d in diffs)
                     + f" | {sum(round(d, 1) > 0 for d in diffs)} of {len(diffs)} seeds |")
    return "\n".join(lines)


def mixed_environments(results: Sequence[dict]) -> str:
    """The packages (and Python, torch's CPU kernels and the CPU) whose recorded version differs between ``results``,
    each version with its seeds ("transformers 5.24.0 (seed 0), 5.25.0 (seeds 1, 2)"); "" when all agree. Results
    written before versions were recorded count as "unrecorded"."""
    def versions(result: dict) -> dict[str, str]:
        env = result.get("environment") or {}
        return {"python": env.get("python", "unrecorded"),
                "CPU kernels": (env.get("cpu") or {}).get("kernels", "unrecorded"),
                "CPU": (env.get("cpu") or {}).get("model", "unrecorded"),  # same kernels, other vendor's math library
                **{name: (env.get("packages") or {}).get(name, "unrecorded") for name in RESULT_PACKAGES}}

    recorded = [versions(r) for r in results]
    parts = []
    for name in recorded[0]:
        seeds_by_version: dict[str, list[str]] = {}
        for result, found in zip(results, recorded):
            seeds_by_version.setdefault(found[name], []).append(str(result["seed"]))
        if len(seeds_by_version) > 1:
            parts.append(f"{name} " + ", ".join(f"{v} (seed{'s' if len(k) > 1 else ''} {', '.join(k)})"
                                                for v, k in seeds_by_version.items()))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = HintingArgumentParser(prog="python -m lit_align.report",
                                   description="One Table 1 over several seeds' quickstart outputs (mean ± sd).")
    parser.add_argument("runs", nargs="+", help="quickstart output directories (or results.json files), one per seed")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        path = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            parser.error(f"{run}: no results.json there (run `python -m lit_align.quickstart --output {run}` first)")
        results.append(json.loads(path.read_text()))
    table = seeds_table(results)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
