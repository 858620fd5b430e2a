"""`make quickstart`'s pipeline on a tiny budget: artefacts, their schema, learning, and reruns that skip finished stages."""

import json

import torch
from transformers import AutoModelForCausalLM

from lit_align.quickstart import main


def test_quickstart_pipeline_publishes_a_model_and_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["--output", str(out), "--max-steps", "12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sft = summary["stages"]["sft"]
    assert summary["seed"] == 0
    assert set(sft) >= {"heldout_loss_untrained", "heldout_loss_trained", "run_dir", "checkpoint", "model", "wall_seconds"}
    assert sft["heldout_loss_untrained"] > 5.0  # random byte-level model: about log(260) nats per token
    assert sft["heldout_loss_trained"] < sft["heldout_loss_untrained"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(sft["model"])
    assert model.config.model_type == "llama"
    assert torch.load(sft["checkpoint"], weights_only=True)["global_step"] == 12
    printed = capsys.readouterr().out
    assert str(out / "sft-model") in printed and "summary" in printed

    before = (out / "sft-model" / "model.safetensors").read_bytes()
    assert main(["--output", str(out), "--max-steps", "12"]) == 0
    assert "stage sft already done" in capsys.readouterr().out
    assert (out / "sft-model" / "model.safetensors").read_bytes() == before
