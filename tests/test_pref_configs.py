"""Every config under configs/ parses offline; the IotaCode ones hold the paper's settings; the preference quickstarts run."""

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lit_align.cli import main

ROOT = Path(__file__).resolve().parents[1]
DRIVER_CONFIGS = {ROOT / "configs" / "quickstart" / "iadpo.yaml"}  # configs of lit_align.iadpo's rounds, not of `fit`
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - DRIVER_CONFIGS)


def _printed(capsys, config, *extra):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), *extra, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_config_parses_with_print_config(config, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # parsing must never need the network
    printed = _printed(capsys, config)
    assert printed["model"]["class_path"].startswith("lit_align.modules.")
    assert printed["data"]["class_path"].startswith("lit_align.data_modules.")


def test_iadpo_config_parses_with_its_driver():
    from lit_align.iadpo import load_config

    config = load_config(ROOT / "configs" / "quickstart" / "iadpo.yaml")
    assert config.rounds == 3 and config.oracle.kind == "task_suite"


def _iotacode(capsys, name):
    return _printed(capsys, ROOT / "configs" / "iotacode" / f"{name}.yaml")


def _effective_batch(cfg):
    t = cfg["trainer"]
    return t["devices"] * t["accumulate_grad_batches"] * cfg["data"]["init_args"]["batch_size"]


def test_iotacode_configs_hold_the_paper_settings(capsys):
    for name in ("sft", "reward", "dpo", "orpo"):
        cfg = _iotacode(capsys, name)
        assert cfg["trainer"]["accelerator"] == "gpu" and cfg["trainer"]["precision"] == "bf16-mixed", name
        assert cfg["data"]["init_args"]["max_length"] == 4000, name

    sft = _iotacode(capsys, "sft")
    model = sft["model"]["init_args"]
    assert model["model_name_or_path"] == "deepseek-ai/deepseek-coder-1.3b-base"
    assert model["optimizer"]["lr"] == 1e-4 and model["optimizer"]["warmup_steps"] == 5000
    assert model["optimizer"]["schedule"] == "cosine"
    assert sft["data"]["init_args"]["batch_size"] == 1 and sft["trainer"]["accumulate_grad_batches"] == 4
    assert _effective_batch(sft) == 8

    dpo = _iotacode(capsys, "dpo")
    model = dpo["model"]["init_args"]
    assert model["lora"]["r"] == 32 and model["lora"]["target_modules"] == "all-linear"
    assert model["optimizer"]["lr"] == 1e-6 and model["beta"] == 1.0
    assert model["reference"] == "adapter_disabled" and _effective_batch(dpo) == 64

    orpo = _iotacode(capsys, "orpo")
    model = orpo["model"]["init_args"]
    assert model["orpo_lambda"] == 0.1 and model["lora"]["r"] == 32 and model["optimizer"]["lr"] == 1e-6
    assert _effective_batch(orpo) == 64

    reward = _iotacode(capsys, "reward")
    model = reward["model"]["init_args"]
    assert model["optimizer"]["lr"] == 1.4e-5 and reward["trainer"]["max_epochs"] == 1
    assert model["model_name_or_path"] == "runs/iotacode/sft-model"  # after domain adaptation on contest code


def test_iotacode_stages_export_where_the_next_stage_loads(capsys):
    """Each IotaCode stage links runs/iotacode/<stage>-model to its export, and every model path a stage loads from
    runs/ is the link of another stage: the chain runs with no copying between stages."""
    configs = sorted((ROOT / "configs" / "iotacode").rglob("*.yaml"))
    exports, loads = set(), []
    for config in configs:
        cfg = _printed(capsys, config)
        stage = cfg["model"]["class_path"].rsplit(".", 1)[-1].lower().removesuffix("model")  # RewardModel: reward
        merges = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("LoRAMerge")]
        assert len(merges) == 1, config
        exports.add(merges[0]["init_args"]["link"])
        assert merges[0]["init_args"]["link"] == f"runs/iotacode/{stage}-model", config
        assert merges[0]["init_args"]["output_dir"] is None, config  # <run dir>/model: never in the way of a rerun
        init = cfg["model"]["init_args"]
        loads += [(config, init[key]) for key in ("model_name_or_path", "reward_model")
                  if str(init.get(key, "")).startswith("runs/")]
    assert {path for _, path in loads} == {"runs/iotacode/sft-model", "runs/iotacode/reward-model"}
    assert all(path in exports for _, path in loads), loads


def test_quickstart_stages_link_their_model_where_the_next_stage_loads(capsys):
    """Run by hand, each quickstart stage links runs/quickstart/<stage>-model to its export, and every model path a
    stage loads from runs/ is such a link: SFT then DPO (or any other) with no copying in between."""
    links, loads = set(), []
    for config in sorted(set((ROOT / "configs" / "quickstart").glob("*.yaml")) - DRIVER_CONFIGS):
        cfg = _printed(capsys, config)
        merges = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("LoRAMerge")]
        assert len(merges) == 1 and merges[0]["init_args"]["output_dir"] is None, config  # <run dir>/model
        assert merges[0]["init_args"]["link"] == f"runs/quickstart/{config.stem}-model", config
        links.add(merges[0]["init_args"]["link"])
        init = cfg["model"]["init_args"]
        loads += [init[key] for key in ("model_name_or_path", "reward_model") if str(init.get(key, "")).startswith("runs/")]
    assert set(loads) == {"runs/quickstart/sft-model", "runs/quickstart/reward-model"} and set(loads) <= links


def _quick_fit(stage, *extra):
    main(["fit", "--config", str(ROOT / "configs" / "quickstart" / f"{stage}.yaml"), "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
          "false", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
          "--data.init_args.train_sources", "[{path: task_suite, limit: 8}]",
          "--data.init_args.val_sources", "[{path: task_suite, split: heldout, limit: 4}]", *extra])


def test_hand_run_stages_chain_through_the_links_and_never_replace_a_real_directory(tmp_path, monkeypatch, capsys):
    """As the configs' comments say: `lit_align fit --config configs/quickstart/sft.yaml`, then dpo.yaml, in a fresh
    directory. A second SFT run re-points the link (the first run's model stays in its run directory); a real
    directory where a link goes (make quickstart's published copy) is left as it is, and the run says so."""
    monkeypatch.chdir(tmp_path)
    _quick_fit("sft")
    link = Path("runs/quickstart/sft-model")
    first = tmp_path / "runs" / "quickstart-sft" / "version_0" / "model"
    assert link.is_symlink() and link.resolve() == first.resolve()
    assert not Path(os.readlink(link)).is_absolute()  # moving runs/ keeps it working
    _quick_fit("sft")
    second = tmp_path / "runs" / "quickstart-sft" / "version_1" / "model"
    assert link.resolve() == second.resolve() and (first / "model.safetensors").exists()
    assert f"{link} now points at {second.relative_to(tmp_path)} (it pointed at ../quickstart-sft/version_0/model)" in \
        capsys.readouterr().out
    published = Path("runs/quickstart/dpo-model")
    published.mkdir()
    (published / "config.json").write_text("{}")
    _quick_fit("dpo", "--data.init_args.max_pairs_per_problem", "1")  # model_name_or_path: the link, unchanged
    dpo = tmp_path / "runs" / "quickstart-dpo" / "version_0"
    assert torch.load(dpo / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert yaml.safe_load((dpo / "config.yaml").read_text())["model"]["init_args"]["model_name_or_path"] == str(link)
    err = capsys.readouterr().err
    assert f"lit_align: {published} is not a link (a model `make quickstart` published, or one copied there), so it will be left as it is" in err
    assert f"{published} is not a link, so it was left as it is: it does not hold this run's model" in err
    assert not published.is_symlink() and (published / "config.json").read_text() == "{}"
    assert (dpo / "model" / "model.safetensors").exists()

    # the DPO checkpoint names the model the link pointed at, which the next SFT run's re-pointing does not change:
    # merge-lora and a --ckpt_path resume (LightningCLI reads the checkpoint's hyperparameters) use that base
    trained_from = str(second.relative_to(tmp_path))
    last = dpo / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["model_name_or_path"] == trained_from
    _quick_fit("sft")
    assert link.resolve() == (tmp_path / "runs" / "quickstart-sft" / "version_2" / "model").resolve()
    assert main(["merge-lora", "--ckpt_path", str(last), "--output_dir", "merged"]) == 0
    probe = torch.tensor([[5, 104, 105, 106, 36, 40, 50, 60]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d).eval()(input_ids=probe).logits for d in ("merged", dpo / "model")]
    assert torch.allclose(*logits, atol=1e-5)  # the adapter merged onto version_1, as at the end of its run
    capsys.readouterr()
    _quick_fit("dpo", "--data.init_args.max_pairs_per_problem", "1", "--trainer.max_steps", "3", "--ckpt_path", str(last))
    out, err = capsys.readouterr()
    assert f"DPO on {trained_from}:" in out
    assert (f"lit_align: {link} (model.init_args.model_name_or_path) now points at "
            f"{(tmp_path / 'runs' / 'quickstart-sft' / 'version_2' / 'model').resolve()}; the run resumes on "
            f"{trained_from}, the model {last} was trained from") in err
    resumed = tmp_path / "runs" / "quickstart-dpo" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 3


def test_a_lora_checkpoint_loaded_onto_another_base_is_warned_about(tmp_path):
    """From Python, a module can be given another model_name_or_path than its checkpoint was trained on."""
    from lit_align.modules.dpo import DPO

    module = DPO(model_name_or_path="preset:tiny", lora={"r": 4})
    with pytest.warns(UserWarning, match="adapter was trained on 'runs/quickstart-sft/version_0/model', and it is "
                                         "loaded onto 'preset:tiny'"):
        module.on_load_checkpoint({"hyper_parameters": {"model_name_or_path": "runs/quickstart-sft/version_0/model"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_load_checkpoint({"hyper_parameters": {"model_name_or_path": "preset:tiny"}})


@pytest.mark.parametrize("stage", ["reward", "dpo", "orpo"])
def test_preference_quickstarts_run_from_an_sft_model(stage, tmp_path, capsys, monkeypatch):
    config = ROOT / "configs" / "quickstart" / f"{stage}.yaml"
    start = _printed(capsys, config)
    assert start["model"]["init_args"]["model_name_or_path"] == "runs/quickstart/sft-model"
    assert start["trainer"]["accelerator"] == "cpu"
    monkeypatch.chdir(tmp_path)  # the runs/ and the link of a user's working directory
    _quick_fit(stage, "--model.init_args.model_name_or_path", "preset:tiny", "--data.init_args.max_pairs_per_problem", "1")
    run = tmp_path / "runs" / f"quickstart-{stage}" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (run / "model" / "config.json").exists()  # exported for the next stage, and linked where it looks
    assert (tmp_path / "runs" / "quickstart" / f"{stage}-model").resolve() == (run / "model").resolve()
    if stage == "reward":  # what PPO loads: the CLI's checkpoint and the exported directory score alike
        from lit_align.modules.reward import load_reward_model

        args = (["def f(x):\n", "def g():\n"], ["    return x\n", "    pass\n"])
        from_ckpt = load_reward_model(run / "checkpoints" / "last.ckpt").score(*args)
        from_dir = load_reward_model(run / "model").score(*args)
        assert torch.allclose(from_ckpt, from_dir, atol=1e-5)


def test_a_linked_reward_model_is_recorded_as_the_directory_it_points_at(tmp_path):
    from lit_align.modules.ppo import PPO

    (tmp_path / "reward-v0").mkdir()
    (tmp_path / "reward-model").symlink_to("reward-v0")
    module = PPO(reward="reward_model", reward_model=str(tmp_path / "reward-model"))
    assert module.hparams.reward_model == str(tmp_path / "reward-v0")
    assert PPO(reward="reward_model", reward_model=str(tmp_path / "reward-v0")).hparams.reward_model == str(tmp_path / "reward-v0")
