"""The seed table: mean ± standard deviation over seeds, and the paired difference to SFT."""

import json
import os

import pytest

from lit_align.report import main, seeds_table


def _results(seed, sft_pass, ppo_pass):
    row = lambda p: {"pass@1": p, "pass@10": min(1.0, 2 * p), "solved": round(75 * 2 * p), "compile_rate": 0.9,  # noqa: E731
                     "n_samples": 10, "num_problems": 75, "train_seconds": 100.0 + seed}
    return {"seed": seed, "methods": {"SFT": row(sft_pass), "SFT + PPO (unit tests)": row(ppo_pass)}}


def test_seed_table_reports_mean_sd_and_the_paired_difference_to_sft(tmp_path, capsys):
    runs = [_results(0, 0.20, 0.30), _results(1, 0.30, 0.42), _results(2, 0.25, 0.33)]
    table = seeds_table(runs).splitlines()
    assert table[0] == ("| method | solved (of 75, 10 samples) | pass@1 | pass@10 | compile rate | train time (s) "
                        "| pass@1 - SFT |")
    # SFT pass@1 25.0 ± 5.0; PPO 35.0 ± 6.2; per-seed differences 10, 12, 8 -> 10.0 ± 2.0 (the spread of the
    # difference is smaller than either method's own spread: seeds move both together)
    assert table[2] == "| SFT | 37.7 ± 7.5 | 25.0 ± 5.0 | 50.0 ± 10.0 | 90.0 ± 0.0 | 101.0 ± 1.0 | - |"
    assert table[3].startswith("| SFT + PPO (unit tests) | 52.7 ± 9.3 | 35.0 ± 6.2 |")
    assert table[3].endswith("| +10.0 ± 2.0 |")
    assert "seeds 0, 1, 2" in table[-1]
    # below it, each seed's difference and the seeds on which the method is above SFT
    assert table[5:9] == ["| pass@1 - SFT | seed 0 | seed 1 | seed 2 | above SFT |", "|---|---|---|---|---|",
                          "| SFT (pass@1) | 20.0 | 30.0 | 25.0 | - |",
                          "| SFT + PPO (unit tests) | +10.0 | +12.0 | +8.0 | 3 of 3 seeds |"]
    mixed = [_results(0, 0.20, 0.30), _results(1, 0.30, 0.30), _results(2, 0.25, 0.24)]
    assert seeds_table(mixed).splitlines()[8] == "| SFT + PPO (unit tests) | +10.0 | +0.0 | -1.0 | 1 of 3 seeds |"
    assert "seed 0 |" not in seeds_table(runs[:1])  # one seed: the main table says it all

    for k, r in enumerate(runs):
        (tmp_path / f"s{k}").mkdir()
        (tmp_path / f"s{k}" / "results.json").write_text(json.dumps(r))
    assert main([str(tmp_path / f"s{k}") for k in range(3)] + ["--output", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == seeds_table(runs)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "no results.json there" in capsys.readouterr().err


def test_results_record_the_releases_and_the_seed_table_names_those_that_differ(tmp_path):
    """The same seed gives the same table only with the same releases and CPU kernels: results.json records them, and
    a table over runs made with different ones says which, with the seeds of each version."""
    from lit_align.report import RESULT_PACKAGES, environment, write_report

    runs = [_results(0, 0.20, 0.30), _results(1, 0.30, 0.42), _results(2, 0.25, 0.33)]
    rows = {name: {**row, "correct_per_problem": [3] * 25 + [0] * 50} for name, row in runs[0]["methods"].items()}
    write_report(rows, tmp_path, seed=0)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["seed"] == 0 and written["methods"] == rows
    assert written["environment"] == environment() and list(written["environment"]["packages"]) == list(RESULT_PACKAGES)
    import torch

    assert written["environment"]["packages"]["torch"] == torch.__version__
    assert written["environment"]["cpu"]["kernels"] == torch.backends.cpu.get_cpu_capability()
    assert written["environment"]["cpu"]["model"]

    for r in runs:
        r["environment"] = json.loads(json.dumps(written["environment"]))
    assert "different releases" not in seeds_table(runs)
    for r in runs[1:]:
        r["environment"]["packages"]["transformers"] = "5.25.0"
    runs[0]["environment"]["packages"]["transformers"] = "5.24.0"
    del runs[2]["environment"]["python"]
    runs[1]["environment"]["cpu"]["kernels"] = "ZZZ"  # an AVX2 machine's seed beside AVX-512 ones, say
    del runs[2]["environment"]["cpu"]  # written before the CPU was recorded
    note = seeds_table(runs).splitlines()[-1]
    kernels, model = environment()["cpu"]["kernels"], environment()["cpu"]["model"]
    assert note.endswith(f" Runs made with different releases or CPUs, so seeds are not the only difference: "
                         f"python {environment()['python']} (seeds 0, 1), unrecorded (seed 2); CPU kernels {kernels} "
                         f"(seed 0), ZZZ (seed 1), unrecorded (seed 2); CPU {model} (seeds 0, 1), unrecorded (seed 2); "
                         "transformers 5.24.0 (seed 0), 5.25.0 (seeds 1, 2).")


def test_the_recorded_cpu_kernels_follow_aten_cpu_capability():
    """A run forced onto another kernel set (``ATEN_CPU_CAPABILITY``, read when torch loads) records that set."""
    import subprocess
    import sys

    code = "from lit_align.report import environment; print(environment()['cpu']['kernels'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "DEFAULT"


def test_seed_table_refuses_runs_with_different_methods_or_splits():
    other = _results(1, 0.3, 0.3)
    other["methods"].pop("SFT")
    with pytest.raises(ValueError, match="seed 1 has methods"):
        seeds_table([_results(0, 0.2, 0.3), other])
    validation = {**_results(1, 0.3, 0.3), "split": "validation"}
    with pytest.raises(ValueError, match=r"different splits \(heldout, validation\)"):
        seeds_table([_results(0, 0.2, 0.3), validation])


def test_single_seed_table_says_how_each_method_compares_with_sft():
    from lit_align.report import markdown_table

    r = _results(0, 0.20, 0.18)["methods"]
    lines = markdown_table(r, 10, 75).splitlines()
    assert lines[0].endswith("| train time (s) | pass@1 - SFT |")
    assert lines[2] == "| SFT | 30 | 20.0 | 40.0 | 90.0 | 100 | - |"
    assert lines[3].endswith("| 100 | -2.0 |")  # worse than SFT: the row says so
