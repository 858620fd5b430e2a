"""`make quickstart`'s pipeline on a tiny budget: artefacts, their schema, and reruns that skip finished work."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lit_align.quickstart import main


def test_quickstart_sft_stage_publishes_a_model_reports_and_skips_finished_work(tmp_path, capsys):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "sft-model").symlink_to(tmp_path / "deleted-run" / "model")  # a hand run's link, its run since deleted
    assert main(["--output", str(out), "--stages", "sft", "--max-steps", "12", "--samples", "2"]) == 0
    captured = capsys.readouterr()
    assert (f"{out / 'sft-model'} links to {tmp_path / 'deleted-run' / 'model'}, which no longer exists: the stage "
            "trains again") in captured.out
    assert not (out / "sft-model").is_symlink() and (out / "sft-model" / "model.safetensors").exists()
    import torch

    assert (f"Seed 0, torch {torch.__version__} on its {torch.backends.cpu.get_cpu_capability()} CPU kernels ("
            in captured.out)  # what the table depends on beside the code
    # transformers' per-load progress bars are off for the tiny model's pipeline, and back on afterwards
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
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
    assert str(out / "table.md") in captured.out and str(out / "pass_at_k.png") in captured.out

    before = (out / "sft-model" / "model.safetensors").read_bytes()
    assert main(["--output", str(out), "--stages", "sft", "--max-steps", "12", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "stage sft already done" in printed and "evaluating" not in printed
    assert (out / "sft-model" / "model.safetensors").read_bytes() == before

    # fewer problems than the stored evaluations: both policies evaluated again, on the first 3
    assert main(["--output", str(out), "--stages", "sft", "--samples", "2", "--eval-limit", "3"]) == 0
    assert capsys.readouterr().out.count("(2 samples x 3 held-out problems)") == 2
    results = json.loads((out / "results.json").read_text())
    assert [row["num_problems"] for row in results["methods"].values()] == [3, 3]
    assert (out / "table.md").read_text().startswith("| method | solved (of 3, 2 samples) |")


def test_a_stage_stopped_part_way_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        tmp_path, monkeypatch, capsys):
    from lit_align.modules.base import AlignmentModule
    from lit_align.quickstart import CONFIG_DIR

    # ./configs/quickstart comes first: the SFT config, checkpointing every 2 steps
    (tmp_path / "configs" / "quickstart").mkdir(parents=True)
    config = yaml.safe_load((CONFIG_DIR / "sft.yaml").read_text())
    config["checkpoint"]["every_n_train_steps"] = 2
    (tmp_path / "configs" / "quickstart" / "sft.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    args = ["--stages", "sft", "--max-steps", "4", "--val-limit", "2", "--eval-limit", "2", "--samples", "1"]
    assert main(["--output", "whole"] + args) == 0

    step = AlignmentModule.training_step

    def stopped_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("the machine went away")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(AlignmentModule, "training_step", stopped_at_step_3)
        with pytest.raises(RuntimeError, match="went away"):
            main(["--output", "stopped"] + args)
    stopped_run = Path("stopped/runs/quickstart-sft/version_0")
    assert torch.load(stopped_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not Path("stopped/sft-model").exists()
    capsys.readouterr()

    assert main(["--output", "stopped"] + args) == 0
    assert f"resuming the stopped run from {stopped_run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    record = json.loads(Path("stopped/summary.json").read_text())["stages"]["sft"]
    assert record["resumed_from"] == str(stopped_run / "checkpoints" / "last.ckpt")
    assert Path(record["run_dir"]) == Path("stopped/runs/quickstart-sft/version_1")  # the stopped run's logs kept
    assert torch.load(record["checkpoint"], weights_only=True)["global_step"] == 4
    whole = AutoModelForCausalLM.from_pretrained("whole/sft-model").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained("stopped/sft-model").state_dict()
    assert whole.keys() == resumed.keys()
    for name in whole:  # steps 3 and 4 from the checkpoint are the uninterrupted run's steps 3 and 4
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_set_overrides_a_stage_option_and_a_wrong_one_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "qs"
    refused = {("--set", "grpx", "trainer.max_steps", "1"): "no stage 'grpx'; the stages are sft, reward, dpo",
               ("--set", "grpo", "trainer.max_steps", "1"): "stage grpo is not among --stages sft",
               ("--set", "sft", "trainer.max_stepz", "1"): "stage sft with --set trainer.max_stepz 1: unrecognized "
                                                           "arguments: --trainer.max_stepz 1\n  hint: did you mean "
                                                           "--trainer.max_steps?"}
    for args, message in refused.items():
        with pytest.raises(SystemExit) as exit_:
            main(["--output", str(out), "--stages", "sft", *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()

    # the override comes after the pipeline's own arguments, so it wins over --max-steps
    assert main(["--output", str(out), "--stages", "sft", "--max-steps", "4", "--set", "sft", "trainer.max_steps", "2",
                 "--val-limit", "2", "--eval-limit", "2", "--samples", "1"]) == 0
    record = json.loads((out / "summary.json").read_text())["stages"]["sft"]
    assert torch.load(record["checkpoint"], weights_only=True)["global_step"] == 2
    assert record["args"][-2:] == ["--trainer.max_steps", "2"]
    capsys.readouterr()
    assert main(["--output", str(out), "--stages", "sft", "--set", "sft", "trainer.max_steps", "3", "--eval-limit", "2",
                 "--samples", "1"]) == 0  # a finished stage is not trained again, and says its override is unused
    assert ("stage sft already done" in (printed := capsys.readouterr().out)
            and "--set sft trainer.max_steps 3 not applied (another --output trains it again)" in printed)

    # the validation split has its own files and evaluations: the reported ones stay as they were
    reported = {name: (out / name).read_bytes() for name in ("table.md", "results.json", "pass_at_k.png")}
    assert main(["--output", str(out), "--stages", "sft", "--eval-split", "validation", "--eval-limit", "3",
                 "--samples", "1"]) == 0
    assert capsys.readouterr().out.count("(1 sample x 3 validation problems)") == 2
    validation = json.loads((out / "results-validation.json").read_text())
    assert validation["split"] == "validation" and validation["methods"]["SFT"]["num_problems"] == 3
    assert (out / "table-validation.md").read_text().startswith("| method | solved (of 3, 1 sample) |")
    assert {name: (out / name).read_bytes() for name in reported} == reported
    assert json.loads(reported["results.json"])["split"] == "heldout"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations_validation"]["sft"]["num_problems"] == 3 and summary["evaluations"]["sft"]["num_problems"] == 2


@pytest.mark.parametrize("option", ["--samples", "--eval-limit", "--max-steps"])
def test_quickstart_refuses_a_count_below_one_before_anything_runs(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["--output", str(tmp_path / "qs"), option, "0"])
    assert exit_.value.code == 2
    assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


@pytest.mark.slow
def test_whole_pipeline_on_a_tiny_budget_writes_every_artefact(tmp_path, capsys):
    from lit_align.quickstart import METHOD_NAMES, NOT_POLICIES, STAGES

    out = tmp_path / "qs"
    assert main(["--output", str(out), "--max-steps", "2", "--val-limit", "3", "--samples", "1", "--seed", "3",
                 "--eval-limit", "12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and list(summary["stages"]) == [s.name for s in STAGES]
    for stage in STAGES:
        record = summary["stages"][stage.name]
        assert record["model"] == str(out / f"{stage.name}-model")
        config = json.loads((out / f"{stage.name}-model" / "config.json").read_text())
        assert config["model_type"] == "llama"
        # the reward model is a sequence classifier with one score, every other stage a causal LM
        assert config["architectures"] == (["LlamaForSequenceClassification"] if stage.name == "reward"
                                           else ["LlamaForCausalLM"])
        steps = torch.load(record["checkpoint"], weights_only=True)["global_step"]
        if stage.name in ("sft", "reward", "dpo", "orpo"):
            assert steps == 2
        else:  # online stages step in whole rollout batches (PPO: 2 epochs x 2 minibatches; RAFT: none if none kept)
            assert steps <= 8 and (steps > 0 or stage.name == "raft"), (stage.name, steps)
        assert record["validation_before"] and record["validation_after"] and record["wall_seconds"] > 0
        run_config = yaml.safe_load((Path(record["run_dir"]) / "config.yaml").read_text())
        assert run_config["seed_everything"] == 3 and run_config["data"]["init_args"]["seed"] == 3  # data order too

    results = json.loads((out / "results.json").read_text())
    policies = ["untrained"] + [s.name for s in STAGES if s.name not in NOT_POLICIES]
    assert results["seed"] == 3 and list(results["methods"]) == [METHOD_NAMES[p] for p in policies]
    for name, row in zip(policies, results["methods"].values()):
        assert row["n_samples"] == 1 and row["num_problems"] == 12 and len(row["correct_per_problem"]) == 12
        assert row["pass@1"] == pytest.approx(sum(row["correct_per_problem"]) / 12)
        assert 0.0 <= row["compile_rate"] <= 1.0 and row["eval_seconds"] > 0
        assert row["train_seconds"] == (0.0 if name == "untrained" else summary["stages"][name]["wall_seconds"])
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | solved (of 12, 1 sample) |")
    assert len(table) == 2 + len(policies) and all(f"| {METHOD_NAMES[p]} |" in t for p, t in zip(policies, table[2:]))
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in ("table.md", "pass_at_k.png", "results.json", "summary.json"))


def test_a_stopped_run_is_found_under_the_logger_name_a_set_override_gives(tmp_path):
    from lit_align.quickstart import STAGES, interrupted_checkpoint

    sft = STAGES[0]
    for name, version, exported in (("quickstart-sft", 0, True), ("quickstart-sft", 1, False), ("mine", 0, False)):
        run = tmp_path / "runs" / name / f"version_{version}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        if exported:
            (run / "model").mkdir()  # a finished run: its model was exported
    assert interrupted_checkpoint(sft, tmp_path) == tmp_path / "runs/quickstart-sft/version_1/checkpoints/last.ckpt"
    renamed = ["--config", "sft.yaml", "--trainer.logger.init_args.name", "mine"]
    assert interrupted_checkpoint(sft, tmp_path, renamed) == tmp_path / "runs/mine/version_0/checkpoints/last.ckpt"
    assert interrupted_checkpoint(STAGES[1], tmp_path) is None
