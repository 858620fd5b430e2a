"""`make quickstart`'s pipeline on a tiny budget: artefacts, their schema, and reruns that skip finished work."""

import json

import torch
from transformers import AutoModelForCausalLM

from lit_align.quickstart import main


def test_quickstart_sft_stage_publishes_a_model_reports_and_skips_finished_work(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["--output", str(out), "--stages", "sft", "--max-steps", "12", "--samples", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sft = summary["stages"]["sft"]
    assert summary["seed"] == 0
    assert set(sft) >= {"validation_before", "validation_after", "run_dir", "checkpoint", "model", "wall_seconds"}
    assert sft["validation_before"]["val/loss"] > 5.0  # random byte-level model: about log(260) nats per token
    assert sft["validation_after"]["val/loss"] < sft["validation_before"]["val/loss"] - 1.0
    assert AutoModelForCausalLM.from_pretrained(sft["model"]).config.model_type == "llama"
    assert torch.load(sft["checkpoint"], weights_only=True)["global_step"] == 12

    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 0 and set(results["methods"]) == {"untrained (preset:tiny)", "SFT"}
    for row in results["methods"].values():
        assert row["n_samples"] == 2 and row["num_problems"] == 75 and len(row["correct_per_problem"]) == 75
        assert 0.0 <= row["pass@1"] <= 1.0 and row["solved"] == sum(c > 0 for c in row["correct_per_problem"])
        assert abs(sum(v for k, v in row.items() if k.startswith("status/")) - 1.0) < 1e-9
    table = (out / "table.md").read_text()
    assert table.startswith("| method | solved (of 75, 2 samples) | pass@1 | pass@10 | compile rate |")
    assert "| SFT |" in table and "| untrained (preset:tiny) |" in table
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert str(out / "table.md") in printed and str(out / "pass_at_k.png") in printed

    before = (out / "sft-model" / "model.safetensors").read_bytes()
    assert main(["--output", str(out), "--stages", "sft", "--max-steps", "12", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "stage sft already done" in printed and "evaluating" not in printed
    assert (out / "sft-model" / "model.safetensors").read_bytes() == before
