"""The lit_align command: config files, dotted overrides, --print_config, versioned runs, resume, bad options."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lit_align.cli import OutputDirectoryError, ResumeOptionError, main

CONFIG = "configs/quickstart/sft.yaml"
REPO = Path(__file__).resolve().parents[1]


def _fit_args(tmp_path, pairs_file, *extra):
    return ["fit", "--config", CONFIG, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.init_args.train_sources", f"[{{path: {pairs_file}}}]", "--data.init_args.val_sources", "[]",
            "--data.init_args.val_fraction", "0.25", "--data.init_args.batch_size", "4",
            "--trainer.callbacks.init_args.link", str(tmp_path / "linked-model"), *extra]  # not ./runs/quickstart


def test_print_config_shows_dotted_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, "--trainer.max_steps", "50", "--model.init_args.lora.r", "8", "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_steps"] == 50
    assert config["model"]["class_path"] == "lit_align.modules.sft.SFT"
    assert config["model"]["init_args"]["lora"]["r"] == 8
    assert config["model"]["init_args"]["lora"]["target_modules"] == "all-linear"
    assert config["data"]["init_args"]["max_length"] == 512


def test_unknown_option_is_rejected_before_training(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, "--model.init_args.lora.rank", "8"])
    assert exit_.value.code != 0
    assert "lora.rank" in capsys.readouterr().err


def test_a_wrong_typed_override_names_its_key_under_a_short_usage_line(capsys):
    """jsonargparse prints the usage line before every parsing error; lit_align's names the option groups instead of
    listing the ~80 options, so the error naming the key stays on the screen."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, "--data.init_args.batch_size", "abc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: ") and "fit [-h] [-c CONFIG]" in err[0]
    usage = err[:next(i for i, line in enumerate(err) if line.startswith(("tip: ", "error: ")))]
    assert len(usage) == 5 and "--trainer.OPTION VALUE" in usage[1]
    # one line naming the option as a config names it, not jsonargparse's union-of-subtypes report
    assert err[-1] == "error: data.init_args.batch_size: Expected a <class 'int'>. Got value: abc"


@pytest.mark.parametrize("args, config, line", [
    (["--model.init_args.lora.r", "abc"], None, "model.init_args.lora.r: Expected a <class 'int'>. Got value: abc"),
    (["--model.init_args.dtype", "float61"], None, "model.init_args.dtype: Expected one of float32, bfloat16, float16, "
                                                   "auto. Got value: float61; did you mean float16?"),
    (["--model.init_args.dtype", "zzz"], None,
     "model.init_args.dtype: Expected one of float32, bfloat16, float16, auto. Got value: zzz"),
    ([], "model:\n  class_path: SFT\n  init_args:\n    lora:\n      r: abc\n",
     "model.init_args.lora.r: Expected a <class 'int'>. Got value: abc"),  # a config file's key, two classes deep
    # an option that may also be null: its alternatives in one line
    (["--model.init_args.logits_chunk_size", "abc"], None,
     "model.init_args.logits_chunk_size: Expected a <class 'int'> or null. Got value: abc"),
    (["--data.init_args.eval_batch_size", "1.5"], None,
     "data.init_args.eval_batch_size: Expected a <class 'int'> or null. Got value: 1.5"),
    ([], "model:\n  class_path: SFT\n  init_args:\n    logits_chunk_size: abc\n",
     "model.init_args.logits_chunk_size: Expected a <class 'int'> or null. Got value: abc"),
    (["--model.init_args.lora", "abc"], None,  # not "lit_align's modules: ...": the class exists, its option's value not
     "model.init_args.lora: Expected a LoRAConfig (its fields as options, e.g. --model.init_args.lora.r) or null. "
     "Got value: abc"),
    (["--data.init_args.train_sources", "abc"], None,
     "data.init_args.train_sources: Expected a list[DataSource] or null. Got value: abc"),
    # the trainer's and the other top-level options too
    (["--trainer.max_steps", "abc"], None, "trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    (["--checkpoint.every_n_train_steps", "x"], None,
     "checkpoint.every_n_train_steps: Expected a <class 'int'> or null. Got value: x"),
])
def test_a_wrongly_typed_value_is_one_line_naming_its_option(tmp_path, capsys, args, config, line):
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        args = ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {line}"


def test_a_value_no_alternative_of_a_trainer_option_takes_is_one_line_listing_them(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, "--trainer.precision", "bf17"])
    line = capsys.readouterr().err.splitlines()[-1]
    # Lightning's three Literal groups (ints, names, the ints as strings) as one list of the values a user types
    assert line == ("error: trainer.precision: Expected one of 64, 32, 16, transformer-engine, transformer-engine-float16, "
                    "16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16, or null. Got value: bf17; did you "
                    "mean bf16?")


@pytest.mark.parametrize("option, hint", [
    ("--model.init_args.lr", "did you mean --model.init_args.optimizer.lr?"),  # a dataclass option's field
    ("--model.init_args.lora.rank", "did you mean --model.init_args.lora.r?"),  # inside the dataclass
    ("--data.init_args.batchsize", "did you mean --data.init_args.batch_size?"),  # not also eval_batch_size: farther
    ("--model.init_args.zzz", None),
])
def test_an_unknown_module_or_data_option_gets_the_nearest_real_ones(capsys, option, hint):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, option, "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    key, _, name = option[2:].partition(".init_args.")
    cls = "SFT" if key == "model" else "SFTDataModule"
    # one line naming the option and the class, instead of jsonargparse's lines about union subtypes
    line = next(line for line in err.splitlines() if line.startswith("error: "))  # (the program is pytest's here)
    assert line.startswith(f"error: {option[2:]}: {cls} has no such option ('")
    assert line.endswith(f" fit --{key}.help {cls}' lists them)")
    assert "Union subtypes" not in err and "NestedArg" not in err
    assert (err.splitlines()[-1] == f"  hint: {hint}") if hint else "hint:" not in err


@pytest.mark.parametrize("option, hint", [
    ("--trainer.precission", "did you mean --trainer.precision?"),
    ("--trainr.max_steps", "did you mean --trainer.max_steps?"),  # not also min_steps or max_epochs: farther
    ("--max_steps", "did you mean --trainer.max_steps?"),  # the group left out
    ("--checkpoint.save_topk", "did you mean --checkpoint.save_top_k?"),
    ("--trainer.max_step", "did you mean --trainer.max_steps?"),  # a prefix is refused, not taken for the option
    ("--zzz", None),
])
def test_an_unknown_trainer_or_callback_option_gets_the_nearest_real_ones(capsys, option, hint):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, option, "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert f"error: unrecognized arguments: {option} 4" in err
    assert (err[-1] == f"  hint: {hint}") if hint else not any("hint:" in line for line in err)


MODULES = "lit_align's modules: DPO, GRPO, ORPO, PPO, RAFT, RewardModel, SFT"


@pytest.mark.parametrize("args, config, hint", [
    (["--model", "SFTT"], None, f"did you mean SFT? ({MODULES})"),
    (["--model", "lit_align.modules.sft.SFTT"], None, f"did you mean SFT? ({MODULES})"),
    (["--model", "Zebra"], None, MODULES),
    (["--data", "SFTDataModul"], None,
     "did you mean SFTDataModule? (lit_align's DataModules: PreferenceDataModule, PromptsDataModule, SFTDataModule)"),
    ([], "model:\n  class_path: SFTT\n", f"did you mean SFT? ({MODULES})"),
    # a config file's key inside a dataclass option: the keys descended through make the dotted option
    ([], "model:\n  class_path: SFT\n  init_args:\n    lora:\n      rr: 3\n", "did you mean --model.init_args.lora.r?"),
])
def test_an_unknown_class_or_nested_config_key_gets_a_hint(tmp_path, capsys, args, config, hint):
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        args = ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"  hint: {hint}"


@pytest.mark.parametrize("args, line, hint", [
    (["--model", "SFTT"], "model.class_path: SFTT is neither a class lit_align knows by name nor an import path "
     "(module.Class)", f"did you mean SFT? ({MODULES})"),
    (["--model", "lit_align.modules.dppo.DPO"], "model.class_path: cannot import lit_align.modules.dppo.DPO (module "
     "'lit_align.modules' has no attribute 'dppo')", f"did you mean DPO? ({MODULES})"),
    (["--model.class_path", "my_objectives.IPO"], "model.class_path: cannot import my_objectives.IPO (No module named "
     "'my_objectives')", "a class of your own is imported from its module's file in the directory lit_align runs from "
     "({cwd}) or from a folder on PYTHONPATH"),
    (["--data", "json.Decoder"], "data.class_path: cannot import json.Decoder (module 'json' has no attribute "
     "'Decoder')", None),
    (["--trainer.logger", "my_loggers.Board"], "trainer.logger.class_path: cannot import my_loggers.Board (No module "
     "named 'my_loggers')", "a class of your own is imported from its module's file in the directory lit_align runs "
     "from ({cwd}) or from a folder on PYTHONPATH"),
])
def test_a_class_that_cannot_be_imported_is_one_line(capsys, args, line, hint):
    """jsonargparse's report (a dozen lines about union subtypes) becomes the key, the path and why it failed."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2 if hint else -1] == f"error: {line}"
    assert (err[-1] == f"  hint: {hint.format(cwd=Path.cwd())}") if hint else "hint" not in err[-2]


def test_the_console_script_imports_a_class_from_the_working_directory(tmp_path):
    """docs/objectives.md's IPO in ``my_objectives.py`` beside the user, named on the command line: the console script
    (whose sys.path holds its own folder, not the working directory) imports it as ``python -m`` would."""
    docs = (REPO / "docs" / "objectives.md").read_text()
    (tmp_path / "my_objectives.py").write_text(re.search(r"```python\n(.*?)```", docs, re.S).group(1))
    script = Path(sys.executable).parent / "lit_align"
    assert script.exists(), "the package's console script is installed beside this interpreter"
    out = subprocess.run([str(script), "fit", "--config", str(REPO / "configs/quickstart/dpo.yaml"), "--model.class_path",
                          "my_objectives.IPO", "--model.init_args.beta", "0.5", "--print_config"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = yaml.safe_load(out.stdout)["model"]
    assert model["class_path"] == "my_objectives.IPO" and model["init_args"]["beta"] == 0.5


def test_nearest_options_ranks_by_last_name_then_by_spelling():
    from lit_align.hints import nearest_options

    options = ["optimizer.lr", "lora.r", "trainer.max_steps", "trainer.min_steps", "trainer.max_epochs"]
    assert nearest_options("lr", options) == ["optimizer.lr"]
    assert nearest_options("trainr.max_steps", options) == ["trainer.max_steps"]
    assert nearest_options("zzz", options) == [] and nearest_options("lr", []) == []


def test_an_unknown_key_in_a_config_file_gets_the_nearest_real_option(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_step: 3\ncheckpoint:\n  every_n_train_step: 2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, "--config", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == ["error: Subcommand 'fit' does not accept option 'trainer.max_step'",
                        "  hint: did you mean --trainer.max_steps?"]


def test_an_option_lightning_refuses_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Lightning's own checks of trainer and callback options (a top-k checkpoint with nothing to monitor, a strategy
    name that does not exist) reach the command line as Lightning's message with exit status 2, not a traceback."""
    from lit_align.cli import LightningOptionError

    monkeypatch.chdir(tmp_path)
    for option, message in ((["--checkpoint.save_top_k", "2"], "ModelCheckpoint(save_top_k=2, monitor=None) is not a "
                             "valid configuration"),
                            (["--trainer.strategy", "deepspeed_stage_9"], "You selected an invalid strategy name: "
                             "`strategy='deepspeed_stage_9'`")):
        args = ["fit", "--config", str(REPO / CONFIG), *option]
        monkeypatch.setattr(sys, "argv", ["lit_align", *args])
        assert main() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"lit_align fit: error: {message}") and not any("Traceback" in line for line in err)
        assert err[-1].endswith("(a --trainer or callback option; 'lit_align fit --help' lists them)")
        with pytest.raises(LightningOptionError):  # from Python the exception propagates
            main(args)
    assert not any(tmp_path.iterdir())


def test_an_objective_given_another_objectives_data_is_refused_not_misread(tmp_path, pairs_file, monkeypatch, capsys):
    """DPO on SFT batches took the first half of each batch's rows as chosen completions and the second half as
    rejected, and SFT on preference batches fitted the rejected completions too, both silently: now refused in one
    line naming the DataModule to use, before the run directory is made; from Python, in the module's setup."""
    import lightning.pytorch as L

    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataSource
    from lit_align.modules.dpo import DPO

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = [(["--config", str(REPO / CONFIG), "--model", "DPO"], "DPO trains on preference batches, but "
              "SFTDataModule gives sft batches, which it would misread; use --data PreferenceDataModule"),
             (["--config", str(REPO / "configs/quickstart/dpo.yaml"), "--model", "SFT"], "SFT trains on sft batches, "
              "but PreferenceDataModule gives preference batches, which it would misread; use --data SFTDataModule"),
             (["--config", str(REPO / "configs/quickstart/grpo.yaml"), "--model", "RewardModel"], "RewardModel trains "
              "on preference batches, but PromptsDataModule gives prompts batches, which it would misread; use --data "
              "PreferenceDataModule")]
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["lit_align", "fit", *args, "--model.init_args.model_name_or_path",
                                          "preset:tiny"])
        assert main() == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"lit_align fit: error: data: {message}"
    assert not any(work.iterdir())
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = SFTDataModule(train_sources=[DataSource(path=pairs_file)], tokenizer="preset:tiny")
    with pytest.raises(ValueError, match="DPO trains on preference batches, but SFTDataModule gives sft batches"):
        trainer.fit(DPO(), datamodule=data)


def test_the_vllm_backend_without_vllm_is_refused_before_the_run_directory_is_made(tmp_path, monkeypatch, capsys):
    """An online objective with generation_backend vllm where vLLM is not installed failed at its first rollout, with
    a traceback, after the run directory was made: refused up front, naming the option and the install."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: nothing to refuse")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit_align", "fit", "--config", str(REPO / "configs/quickstart/grpo.yaml"),
                                      "--model.init_args.model_name_or_path", "preset:tiny",
                                      "--model.init_args.generation_backend", "vllm"])
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lit_align fit: error: model.init_args.generation_backend: the vllm backend needs vLLM: pip install "
        "lit_align[vllm] (Linux with a CUDA GPU); or use hf (the live policy) or openai (a server)")
    assert not any(tmp_path.iterdir())


def test_an_accelerator_or_logger_this_machine_cannot_use_is_one_line(tmp_path, monkeypatch, capsys):
    """``--trainer.accelerator gpu`` (the iotacode configs' setting) on a machine where torch finds no GPU says so and
    how to run on the CPU, instead of Lightning's "No supported gpu backend found!"; an accelerator or logger whose
    package is not installed is Lightning's requirement line, led by the class that needs it, not a 70-line
    traceback. Nothing is written."""
    import importlib.util

    import torch

    monkeypatch.chdir(tmp_path)
    cases = []
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        cases.append((["--trainer.accelerator", "gpu"], "lit_align fit: error: trainer.accelerator: gpu, but torch finds "
                      f"no GPU here (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); "
                      "--trainer.accelerator cpu --trainer.devices 1 runs on the CPU"))
    if importlib.util.find_spec("torch_xla") is None:
        cases.append((["--trainer.accelerator", "tpu"], "lit_align fit: error: Requirement 'torch_xla>="))
    if importlib.util.find_spec("wandb") is None:
        cases.append((["--trainer.logger", "WandbLogger"], "lit_align fit: error: "
                      "lightning.pytorch.loggers.WandbLogger: Requirement 'wandb>="))
    assert cases, "this machine has a GPU, torch_xla and wandb: nothing here to refuse"
    for option, message in cases:
        monkeypatch.setattr(sys, "argv", ["lit_align", "fit", "--config", str(REPO / CONFIG), *option])
        assert main() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message) and not any("Traceback" in line for line in err), err[-3:]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option, message", [
    (["--model.init_args.lora.r", "0"], "lora.r must be a positive rank, got 0"),
    (["--model.init_args.lora.dropout", "1.5"], "lora.dropout must be in [0, 1), got 1.5"),
    (["--model.init_args.optimizer.lr", "-1"], "optimizer.lr must be >= 0, got -1.0"),
    (["--model.init_args.optimizer.betas", "[0.9, 1.2]"], "optimizer.betas must be in [0, 1), got (0.9, 1.2)"),
    (["--model.init_args.optimizer.min_lr_ratio", "2"], "optimizer.min_lr_ratio must be in [0, 1], got 2.0"),
    (["--model.init_args.lora.target_modules", "[q_proj, wq]"],
     "lora.target_modules ['wq'] match no linear layer of the model; the transformer blocks have: "
     "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
])
def test_lora_and_optimizer_settings_are_checked_before_a_run_directory_is_made(tmp_path, monkeypatch, capsys,
                                                                                option, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit_align", "fit", "--config", str(REPO / CONFIG), *option])
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lit_align fit: error: {message}"
    assert not any(tmp_path.iterdir())


def test_fit_writes_versioned_runs_with_config_and_resumes_and_validates(tmp_path, pairs_file, capsys, caplog):
    main(_fit_args(tmp_path, pairs_file, "--model.init_args.lora.r", "4"))
    run0 = tmp_path / "runs" / "quickstart-sft" / "version_0"
    saved = yaml.safe_load((run0 / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lora"]["r"] == 4 and saved["trainer"]["max_steps"] == 3
    last = run0 / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and all("lora_" in k for k in ckpt["state_dict"])

    # a second run never overwrites the first: it gets the next version
    main(_fit_args(tmp_path, pairs_file))
    assert (tmp_path / "runs" / "quickstart-sft" / "version_1" / "checkpoints" / "last.ckpt").exists()
    assert torch.load(last, weights_only=True)["global_step"] == 3

    # resume the first run to 5 steps: it continues in a new version directory, the old one stays as it was, and the
    # run says so (instead of Lightning's warning that the checkpoint's directory "has changed")
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(_fit_args(tmp_path, pairs_file, "--model.init_args.lora.r", "4", "--trainer.max_steps", "5", "--ckpt_path",
                       str(last)))
    resumed = tmp_path / "runs" / "quickstart-sft" / "version_2" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 5
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert (f"lit_align: this run writes its checkpoints to {resumed.parent}; those of the run it resumes stay in "
            f"{last.parent}") in caplog.text
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]

    # LightningCLI resumes with the checkpoint's module options: one given otherwise is refused, not dropped silently
    with pytest.raises(ResumeOptionError, match=(
            rf"--ckpt_path {re.escape(str(last))} resumes with the module options it was trained with, and "
            r"model.init_args.lora.r is 8 here but 4 there, model.init_args.optimizer.lr is 0.5 here but 0.003 there: "
            r"drop the override")):
        main(_fit_args(tmp_path, pairs_file, "--model.init_args.lora.r", "8", "--model.init_args.optimizer.lr", "0.5",
                       "--trainer.max_steps", "5", "--ckpt_path", str(last)))
    assert not (tmp_path / "runs" / "quickstart-sft" / "version_3").exists()

    # ... except options that change how the model runs, not what it computes: they follow the command line
    capsys.readouterr()
    main(_fit_args(tmp_path, pairs_file, "--model.init_args.lora.r", "4", "--model.init_args.gradient_checkpointing",
                   "true", "--trainer.max_steps", "5", "--ckpt_path", str(last)))
    run3 = tmp_path / "runs" / "quickstart-sft" / "version_3"
    assert yaml.safe_load((run3 / "config.yaml").read_text())["model"]["init_args"]["gradient_checkpointing"] is True
    assert torch.load(run3 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert (f"lit_align: the run resumes with model.init_args.gradient_checkpointing True (False in {last}): it changes "
            "how the model runs, not what it computes") in capsys.readouterr().err

    # a config value (not an override) that differs is replaced with the checkpoint's, and the run says so
    capsys.readouterr()
    main(["validate", "--config", CONFIG, "--ckpt_path", str(resumed),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
          "--data.init_args.train_sources", f"[{{path: {pairs_file}}}]", "--data.init_args.val_sources", "[]",
          "--data.init_args.val_fraction", "0.25"])
    assert (f"lit_align: model.init_args.lora is {{'r': 4, 'alpha': 64, 'dropout': 0.05, 'target_modules': 'all-linear', "
            f"'modules_to_save': None}} in {resumed}, which the run resumes with (the config says None)") in \
        capsys.readouterr().err


def test_a_fit_that_stops_part_way_names_the_checkpoint_that_resumes_it(tmp_path, pairs_file, monkeypatch, caplog):
    from lit_align.modules.base import AlignmentModule

    step = AlignmentModule.training_step

    def stops_at(last):
        def training_step(self, batch, batch_idx):
            if self.global_step == last:
                self.trainer.save_checkpoint(tmp_path / "own.ckpt")  # a user's own save: not the one to resume from
                raise RuntimeError("the machine went away")
            return step(self, batch, batch_idx)
        return training_step

    monkeypatch.setattr(AlignmentModule, "training_step", stops_at(3))
    with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="went away"):
        main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2"))
    last = tmp_path / "runs" / "quickstart-sft" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert (f"lit_align: the run stopped at step 3; its newest checkpoint is {last} (step 2): the same command with "
            f"--ckpt_path {last} resumes from there") in caplog.text

    caplog.clear()
    monkeypatch.setattr(AlignmentModule, "training_step", stops_at(1))
    with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="went away"):
        main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2"))
    assert ("lit_align: the run stopped at step 1 before writing a checkpoint (--checkpoint.every_n_train_steps N "
            "writes one every N steps)") in caplog.text

    # the state of the checkpoint callback is still ModelCheckpoint's, so checkpoints resume across either class
    assert any(key.startswith("ModelCheckpoint{") for key in torch.load(last, weights_only=False)["callbacks"])
    monkeypatch.setattr(AlignmentModule, "training_step", step)
    main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "5", "--ckpt_path", str(last)))
    resumed = tmp_path / "runs" / "quickstart-sft" / "version_2" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 5


def test_the_model_summary_has_no_column_of_zero_flops_and_can_be_turned_off(tmp_path, pairs_file, capsys):
    """Lightning counts FLOPs only from an example_input_array (lit_align's modules have none) and printed zeros; the
    summary's depth is an option (--model_summary.max_depth), and --trainer.enable_model_summary false drops it
    (Lightning refuses the flag beside a summary callback, so the command line leaves its own out)."""
    main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "1", "--model_summary.max_depth", "2"))
    out = capsys.readouterr().out
    assert "Total params" in out and "model.lm_head" in out and "FLOPs" not in out
    main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "1", "--trainer.enable_model_summary", "false"))
    assert "Total params" not in capsys.readouterr().out

    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_summary import summarize

    from lit_align.callbacks.summary import ModelSummary

    summary = summarize(LightningModule(), max_depth=1)
    ModelSummary().summarize(summary._get_summary_data(), 10, 4, 0.1, {"train": 1, "eval": 0}, total_flops=2048)
    assert "Total FLOPs: 2.0 K" in capsys.readouterr().out  # counted: Lightning's table as it is


def test_fresh_run_into_a_directory_holding_checkpoints_is_refused(tmp_path, pairs_file):
    main(_fit_args(tmp_path, pairs_file, "--checkpoint.dirpath", str(tmp_path / "ck")))
    before = (tmp_path / "ck" / "last.ckpt").read_bytes()
    with pytest.raises(OutputDirectoryError, match="already holds checkpoints"):
        main(_fit_args(tmp_path, pairs_file, "--checkpoint.dirpath", str(tmp_path / "ck")))
    assert (tmp_path / "ck" / "last.ckpt").read_bytes() == before


def test_a_run_without_a_logger_trains_and_a_second_one_never_replaces_its_config(tmp_path, pairs_file, monkeypatch,
                                                                                   capsys):
    """--trainer.logger false drops the default learning-rate monitor (Lightning refuses one with no logger) and the run
    saves its config.yaml into --trainer.default_root_dir; a second such run there is refused in one line, exit
    status 2, before anything is written, and the first run's config stays as it was."""
    root = tmp_path / "root"
    args = [*_fit_args(tmp_path, pairs_file, "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
                       "--trainer.callbacks=[]", "--trainer.max_steps", "2"), "--checkpoint.dirpath"]
    main([*args, str(tmp_path / "ck1")])
    assert (tmp_path / "ck1" / "last.ckpt").is_file() and not (tmp_path / "runs").exists()
    before = (root / "config.yaml").read_text()
    monkeypatch.setattr(sys, "argv", ["lit_align", *args, str(tmp_path / "ck2")])
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lit_align fit: error: {root / 'config.yaml'} holds an earlier run's config, and this run would save its own "
        "there (--trainer.default_root_dir, the working directory unless set): run from another directory or give "
        "another --trainer.default_root_dir, or keep a logger (each run a new version)")
    assert (root / "config.yaml").read_text() == before and not (tmp_path / "ck2").exists()


def test_an_export_directory_that_holds_something_is_refused_before_the_run_directory_is_made(
        tmp_path, pairs_file, monkeypatch, capsys):
    """LoRAMerge's output_dir (here a finished stage's export) is checked with the other outputs, before the logger
    makes a run directory: one line naming the option, exit status 2, the export untouched."""
    export = tmp_path / "sft-model"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights of an earlier run")
    args = _fit_args(tmp_path, pairs_file, "--trainer.callbacks.init_args.output_dir", str(export))
    monkeypatch.setattr(sys, "argv", ["lit_align", *args])
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lit_align fit: error: LoRAMerge output_dir {export} already exists and is not empty (exports never "
        "overwrite): remove it, or export elsewhere with --trainer.callbacks.init_args.output_dir DIR (when LoRAMerge "
        "is the last of trainer.callbacks; otherwise in the config)")
    assert not (tmp_path / "runs").exists()
    assert (export / "model.safetensors").read_bytes() == b"weights of an earlier run"
    with pytest.raises(OutputDirectoryError, match="LoRAMerge output_dir"):
        main(args)
    main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "1", "--trainer.callbacks.init_args.output_dir",
                   str(tmp_path / "elsewhere"), "--trainer.callbacks.init_args.link", str(tmp_path / "elsewhere")))
    assert (tmp_path / "elsewhere" / "config.json").exists()  # the override the message names exports there
    assert "is not a link" not in capsys.readouterr().err  # a link named as output_dir itself: nothing to point


def test_missing_model_and_data_paths_are_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """configs/quickstart/dpo.yaml before its SFT stage: the command line gets the option and the model directory at
    fault and what to do, in one line with exit status 2, no traceback. From Python the exception propagates. A
    missing reward model and a mistyped data file are refused the same way, and nothing is written."""
    from lit_align.data_modules.sources import DataError
    from lit_align.models import ModelLoadError

    monkeypatch.chdir(tmp_path)  # runs/quickstart/sft-model, relative, does not exist here
    args = ["fit", "--config", str(REPO / "configs/quickstart/dpo.yaml"), "--trainer.enable_progress_bar", "false"]
    monkeypatch.setattr(sys, "argv", ["lit_align", *args])
    assert main() == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lit_align fit: error: model.init_args.model_name_or_path: 'runs/quickstart/sft-model' does not "
                   "exist (train and export the stage that writes it first, or point at an existing model)")
    assert not any(tmp_path.iterdir())  # refused before the logger made a run directory
    with pytest.raises(ModelLoadError, match="model_name_or_path: 'runs/quickstart/sft-model' does not exist"):
        main(args)
    ppo = ["fit", "--config", str(REPO / "configs/quickstart/ppo_rm.yaml"), "--model.init_args.model_name_or_path",
           "preset:tiny"]  # the policy given: the reward model, also written by an earlier stage, is missing
    with pytest.raises(ModelLoadError, match="model.init_args.reward_model: 'runs/quickstart/reward-model' does not"):
        main(ppo)
    sft = ["fit", "--config", str(REPO / CONFIG), "--data.init_args.train_sources", "[{path: task_suite}, {path: "
           "data/train.jsonl}]"]  # a data file mistyped: refused before the DataModule reads anything
    with pytest.raises(DataError, match=r"data.init_args.train_sources\[1\].path: 'data/train.jsonl' does not exist"):
        main(sft)
    assert not any(tmp_path.iterdir())


def test_a_bad_module_argument_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A module's or DataModule's own check of its arguments (here GRPO's group size, a mistyped generation_kwargs key,
    a batch size of 0) reaches the command line as its one message, led by the option at fault as a config names it,
    with exit status 2, not as jsonargparse's 70-line traceback around it; nothing is written. Errors that did not
    come from a lit_align class's arguments keep their traceback."""
    from lit_align.cli import argument_error, option_of

    monkeypatch.chdir(tmp_path)
    grpo = ["fit", "--config", str(REPO / "configs/quickstart/grpo.yaml"), "--model.init_args.model_name_or_path",
            "preset:tiny"]
    for option, message in ((["--model.init_args.samples_per_prompt", "0"],
                             "model.init_args.samples_per_prompt: GRPO needs samples_per_prompt >= 2"),
                            (["--model.init_args.generation_kwargs", "{reserve_cach: true}"],
                             "model.init_args.generation_kwargs: generation_kwargs has 'reserve_cach', which the hf "
                             "backend does not take; it takes: "),
                            (["--model.init_args.beta", "-1"], "model.init_args.beta: beta must be >= 0, got -1.0"),
                            (["--data.init_args.batch_size", "0"],
                             "data.init_args.batch_size: batch_size must be >= 1, got 0")):
        monkeypatch.setattr(sys, "argv", ["lit_align", *grpo, *option])
        assert main() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"lit_align fit: error: {message}") and not any("Traceback" in line for line in err)
        with pytest.raises(ValueError, match="Does not validate"):  # from Python: jsonargparse's error propagates
            main([*grpo, *option])
    sft = ["lit_align", "fit", "--config", str(REPO / CONFIG), "--data.init_args.val_fraction", "2"]
    monkeypatch.setattr(sys, "argv", sft)  # a DataError from the DataModule's __init__ is led by its option too
    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lit_align fit: error: data.init_args.val_fraction: val_fraction must be in [0, 1), got 2.0")
    assert not any(tmp_path.iterdir())
    try:
        raise ValueError("not a command-line argument")
    except ValueError as err:
        assert argument_error(err) is None and option_of(err) is None  # no module's __init__ raised it


def test_data_that_cannot_be_trained_on_is_refused_before_the_run_directory_is_made(tmp_path, pairs_file, monkeypatch):
    """The data is read before Lightning's setup hook starts the logger: a missing column and a max_length every
    example exceeds are refused with no runs/<name>/version_N left behind; good data is read once, not twice."""
    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataError

    runs = tmp_path / "runs"
    with pytest.raises(DataError, match="has no column 'solution'"):
        main(_fit_args(tmp_path, pairs_file, "--data.init_args.train_sources",
                       f"[{{path: {pairs_file}, completion_column: solution}}]"))
    with pytest.raises(DataError, match="all 36 examples are longer than max_length=4 tokens"):
        main(_fit_args(tmp_path, pairs_file, "--data.init_args.max_length", "4"))
    assert not runs.exists()

    calls = []
    read = SFTDataModule._pairs
    monkeypatch.setattr(SFTDataModule, "_pairs", lambda self, sources: calls.append(1) or read(self, sources))
    main(_fit_args(tmp_path, pairs_file, "--trainer.max_steps", "1"))
    assert len(calls) == 1 and (runs / "quickstart-sft" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lit_align.commands", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    from lit_align.commands import EXTRA_COMMANDS, TRAINER_COMMANDS

    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    commands = [*TRAINER_COMMANDS, *EXTRA_COMMANDS]
    assert listed[:len(commands)] == commands and listed[len(commands)] == "-h,"  # every command, one line each


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``lit_align --help | head -1``: the rest of the output is dropped, exit status 141, no BrokenPipeError
    traceback (the reader here closes the pipe before anything is written)."""
    proc = subprocess.Popen([sys.executable, "-m", "lit_align.commands", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_commands_that_train_nothing_answer_without_importing_lightning():
    """The console script (pyproject's lit_align = lit_align.commands:main) runs evaluate and sample, answers --help
    and refuses a mistyped command before anything imports Lightning (seconds of torch's compiler stack and
    torchmetrics)."""
    script = ("import sys\nfrom lit_align.commands import main\n"
              "for argv in (['evaluate', '--help'], ['sample', '--help'], ['evalute'], ['--help']):\n"
              "    try:\n        print('EXIT', main(argv))\n    except SystemExit as exit_:\n        print('EXIT', exit_.code)\n"
              "print(sorted(m for m in ('lightning', 'lightning.pytorch', 'torchmetrics') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line for line in lines if line.startswith("EXIT")] == ["EXIT 0", "EXIT 0", "EXIT 2", "EXIT 0"]
    assert lines[-1] == "[]"
    assert "usage: lit_align evaluate" in out.stdout and "hint: did you mean 'evaluate'?" in out.stderr


def test_seed_everything_reaches_the_data_module_unless_it_has_its_own_seed(monkeypatch):
    from lit_align.cli import LitAlignCLI

    monkeypatch.setattr(sys, "argv", ["lit_align"])
    cli = LitAlignCLI(args=["--config", CONFIG, "--seed_everything", "5"], run=False)
    assert cli.datamodule.seed == 5
    cli = LitAlignCLI(args=["--config", CONFIG, "--seed_everything", "5", "--data.init_args.seed", "2"], run=False)
    assert cli.datamodule.seed == 2


def test_progress_bar_counts_batches_not_optimizer_steps_when_max_steps_bounds_the_run(tmp_path):
    """Lightning's bar took the optimizer steps left for the batches left ("6/3" with 2 micro-batches per step) and
    read "Epoch 0/-2" under max_epochs=-1; the command line's bar counts the batches the run will take."""
    from types import SimpleNamespace

    import lightning.pytorch as L

    from lit_align.callbacks.progress import ProgressBar
    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataSource
    from lit_align.modules.sft import SFT

    seen = {}

    class Look(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            bar = trainer.progress_bar_callback
            seen.update(total=bar.total_train_batches, description=bar._get_train_description(0).strip())

        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback
            task = bar.progress.tasks[bar.train_progress_bar_id]
            seen.update(end=(task.completed, task.total))

    def fit(max_steps, ckpt_path=None):
        trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[ProgressBar(), Look()])
        data = SFTDataModule(train_sources=[DataSource(split="train", limit=40)], val_fraction=0.0,
                             tokenizer="preset:tiny", batch_size=2)
        trainer.fit(SFT(), datamodule=data, ckpt_path=ckpt_path)
        return trainer

    trainer = fit(3)
    assert seen == {"total": 6, "description": "Epoch 0", "end": (6, 6)}
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 6
    # resumed up to step 5: Lightning's counter goes on from the 6 batches its epoch ran; the total counts them too
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    trainer = fit(5, ckpt_path=str(tmp_path / "step3.ckpt"))
    assert seen["end"] == (10, 10) and trainer.global_step == 5
    bar = ProgressBar()
    # an online objective: 4 optimizer steps per batch, 10 steps left -> 3 batches (the last one ends past max_steps)
    online = SimpleNamespace(automatic_optimization=False, optimizer_steps_per_batch=lambda: 4)
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=12, global_step=2, num_training_batches=50,
                                   accumulate_grad_batches=1, lightning_module=online)
    assert bar.total_train_batches == 3
    bar._trainer.max_epochs = 3  # bounded by epochs: the epoch's batches, as Lightning counts them
    assert bar.total_train_batches == 50 and bar._get_train_description(1).startswith("Epoch 1/2")


def test_progress_bar_shows_the_run_version_as_a_whole_number():
    """The rich bar formats every number with three decimals: Lightning's "v_num" read "v_num: 0.000"."""
    from types import SimpleNamespace

    from lit_align.callbacks.progress import ProgressBar

    trainer = SimpleNamespace(loggers=[SimpleNamespace(version=3)], progress_bar_metrics={"loss": torch.tensor(0.25)})
    metrics = ProgressBar().get_metrics(trainer, None)
    assert metrics == {"v_num": "3", "loss": 0.25}
    trainer.loggers = [SimpleNamespace(version="nightly-run")]  # a named version keeps Lightning's last four characters
    assert ProgressBar().get_metrics(trainer, None)["v_num"] == "-run"


def test_lightning_cloud_tip_deepspeed_cpu_note_and_pytree_deprecation_are_not_printed():
    """Every run printed Lightning's advertisement for its cloud logger, DeepSpeed's note that a machine without a GPU
    runs on its CPU (at every export), bitsandbytes' failure to fetch an optional CPU kernel (every LoRA run), deprecation warnings raised inside Lightning (torch's) and peft
    (transformers'), and, in every online run, advice on checkpointing pre-optimization states; the command line drops
    those and nothing else."""
    import logging
    import warnings

    from lit_align.cli import quiet_unactionable_output

    quiet_unactionable_output()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging and experiment tracking, try installing ..."))
    assert not logger.filter(record("Trainer already configured with model summary callbacks: [<class 'lit_align."
                                    "callbacks.summary.ModelSummary'>]. Skipping setting a default `ModelSummary` callback."))
    assert logger.filter(record("GPU available: False, used: False"))
    deepspeed = logging.getLogger("DeepSpeed")
    assert not deepspeed.filter(deepspeed.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to "
                                                     "CPU. If you have GPU or other accelerator, we were unable to "
                                                     "detect it.", (), None))
    assert deepspeed.filter(deepspeed.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "another warning", (), None))
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")  # peft's import of bitsandbytes on an AVX512-BF16 CPU
    assert not bnb.filter(bnb.makeRecord(bnb.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward "
                                         "from kernels-community: %s. Please make sure ...", ("untrusted",), None))
    assert bnb.filter(bnb.makeRecord(bnb.name, logging.WARNING, __file__, 1, "another warning", (), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_unactionable_output()  # the filter goes first again
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
                      FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
                      "state was saved. The checkpoint will contain the model state AFTER optimization.", UserWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["another deprecation"]


@pytest.mark.parametrize("argv, error, hint", [
    ([], "lit_align: error: no command given", None),
    (["evalute", "--samples", "s.jsonl"], "lit_align: error: unknown command 'evalute'", "did you mean 'evaluate'?"),
    (["fitt", "--config", "x.yaml"], "lit_align: error: unknown command 'fitt'", "did you mean 'fit'?"),
    (["zzz"], "lit_align: error: unknown command 'zzz'", None),
])
def test_a_missing_or_unknown_command_lists_every_command(capsys, argv, error, hint):
    """LightningCLI's own message named only its trainer subcommands, so 'lit_align evalute' was told to choose
    among fit, validate, test and predict."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    commands = "{fit,validate,test,sample,evaluate,plan-memory,merge-lora,iadpo}"
    assert lines[0] == f"usage: lit_align [-h] [-c CONFIG] {commands} ..." and lines[1] == error
    assert lines[2:-1] == ([f"  hint: {hint}"] if hint else [])
    assert lines[-1].startswith("  commands: fit, validate, test (training runs, each with --config FILE.yaml) "
                                "and sample, evaluate, plan-memory, merge-lora, iadpo;")


def test_predict_is_refused_with_what_draws_completions_instead(capsys):
    """No lit_align module has a prediction step: LightningCLI's predict subcommand ended in Lightning's traceback
    "`predict_dataloader` must be implemented". It is refused in one line pointing at lit_align sample, before
    Lightning is imported, and LitAlignCLI's parser does not offer it."""
    from lit_align.cli import LitAlignCLI

    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", CONFIG])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lit_align: error: lit_align has no predict command (no module has a prediction step): draw completions from "
        "a trained model with 'lit_align sample --model DIR --benchmark NAME --output samples.jsonl', score them with "
        "'lit_align evaluate', or add the PassAtK callback to a fit"]
    assert list(LitAlignCLI.subcommands()) == ["fit", "validate", "test"]


def test_help_names_every_command_and_subcommand_usage_stays_short(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit_align"])  # the program name argparse shows
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: lit_align [-h] [-c CONFIG] {fit,validate,test,sample,")
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert capsys.readouterr().out.startswith("usage: lit_align [options] fit [-h] [-c CONFIG] [--print_config")


@pytest.mark.parametrize("key, cls", [("model", f"modules.{c}") for c in (
    "sft.SFT", "reward.RewardModel", "dpo.DPO", "orpo.ORPO", "ppo.PPO", "grpo.GRPO", "raft.RAFT")] + [
    ("data", f"data_modules.{c}") for c in ("sft.SFTDataModule", "preference.PreferenceDataModule",
                                            "prompts.PromptsDataModule")])
def test_every_module_option_has_its_description_in_the_help(capsys, key, cls):
    """``lit_align fit --model.help CLASS`` (and ``--data.help``) describes every option (read from the docstrings'
    Args sections: a class docstring with a line that starts with a Sphinx role was read as reStructuredText, and
    SFT's option went blank)."""
    with pytest.raises(SystemExit):
        main(["fit", f"--{key}.help", f"lit_align.{cls}"])
    out = capsys.readouterr().out
    entries = re.findall(rf"^  (--{key}\.\S+(?: [A-Z_]+)?(?:, --{key}\.\S+(?: [A-Z_]+)?)?)(.*?)(?=^  --|\Z)", out,
                         re.MULTILINE | re.DOTALL)
    assert len(entries) > 10
    blank = [option for option, text in entries if " ".join(text.split()).startswith("(type:")]
    assert not blank, blank


def test_version_names_the_releases_and_cpu_results_json_records(capsys):
    """``lit_align --version`` (and ``-V``): lit_align's version, then one line per release and the CPU, the same
    values ``results.json`` records, so two machines' outputs can be compared line by line."""
    import importlib.metadata

    import torch

    import lit_align
    from lit_align.report import environment

    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as exit_:
            main([flag])
        assert exit_.value.code == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0] == f"lit_align {lit_align.__version__}" == f"lit_align {importlib.metadata.version('lit_align')}"
        assert f"torch {torch.__version__}" in lines and f"lightning {importlib.metadata.version('lightning')}" in lines
        env = environment()
        assert lines[-1] == f"cpu {env['cpu']['model']} (torch kernels {env['cpu']['kernels']})"
        assert len(lines) == 2 + len(env["packages"]) + 1
