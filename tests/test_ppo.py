"""PPO: KL to the reference is 0 before the first update, manual optimization plumbing, value head in checkpoints,
reward-model rewards, and clear errors before training."""

import dataclasses
import json
import math

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_align import losses
from lit_align.callbacks.throughput import TokenThroughput
from lit_align.data_modules.prompts import PromptBatch, PromptSource, PromptsDataModule, load_prompt_items
from lit_align.memory import ModelShape
from lit_align.models import LoRAConfig, load_tokenizer
from lit_align.modules.base import OptimizerConfig, warmup_decay
from lit_align.modules.online import RewardSetupError
from lit_align.modules.ppo import PPO
from lit_align.modules.reward import RewardModel, load_reward_model, reward_batches


def _trainer(max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks), **kw)


def _data(n=4, **kw):
    return PromptsDataModule(train_sources=[PromptSource(split="train", limit=n)], val_sources=[], tokenizer="preset:tiny",
                             batch_size=n, **kw)


def _ppo(**kw):
    defaults = dict(max_new_tokens=12, ppo_epochs=2, num_minibatches=2, micro_batch_size=2, execution_timeout_s=1.0,
                    optimizer=OptimizerConfig(lr=1e-2))
    return PPO(**{**defaults, **kw})


class Keep(Callback):
    """Records the rollouts of every update and the gradient norm seen at each optimizer step."""

    def __init__(self):
        self.grad_norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).norm()))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kl_to_the_reference_is_zero_before_the_first_update_and_not_after(lora):
    module = _ppo(lora=LoRAConfig(r=4, dropout=0.1) if lora else None)
    module.configure_model()
    assert (module.ref_model is None) == lora  # LoRA: the adapter-disabled policy is the reference
    items = load_prompt_items(PromptSource(split="train", limit=4))
    rollouts = module.generate_rollouts(PromptBatch(items))
    rollouts.rewards = torch.zeros(len(rollouts))
    stats = module.rollout_statistics(rollouts, with_values=True, with_reference=True)
    assert torch.equal(stats["old_logps"], stats["ref_logps"])  # exactly: dropout is off, LoRA B starts at 0
    shaped = module.advantages(rollouts, stats)
    assert shaped["sequence_kl"].tolist() == [0.0] * 4 and shaped["non_score_reward"].abs().max() == 0

    _trainer(4).fit(module, _data())
    after = module.rollout_statistics(rollouts, with_values=True, with_reference=True)
    mask = rollouts.response_mask
    kl = (losses.kl_penalty(after["old_logps"], after["ref_logps"], "k3") * mask).sum()
    assert kl > 1e-4


def test_optimizer_steps_clipping_and_schedule_are_run_by_the_module():
    module = _ppo(max_grad_norm=1e-3, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="cosine"))
    keep = Keep()
    trainer = _trainer(8, [keep])
    trainer.fit(module, _data())
    # 2 batches x (2 epochs x 2 minibatches): global_step counts optimizer steps
    assert trainer.global_step == 8 and len(keep.grad_norms) == 8
    assert max(keep.grad_norms) <= 1e-3 * (1 + 1e-4)
    scheduler = module.lr_schedulers()
    assert scheduler.last_epoch == 8
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_decay(8, 2, 8, "cosine", 0.0))


def test_logged_figures_are_the_documented_ones():
    module = _ppo()
    trainer = _trainer(4)
    trainer.fit(module, _data())
    logged = trainer.callback_metrics
    for name in ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss",
                 "explained_variance", "response_length", "status/syntax_error", "status/passed", "approx_kl"):
        assert f"train/{name}" in logged, name
    fractions = sum(float(logged[f"train/status/{s}"]) for s in
                    ("passed", "failed", "runtime_error", "syntax_error", "timeout", "memory_limit"))
    assert fractions == pytest.approx(1.0)
    assert 1 <= float(logged["train/response_length"]) <= 13  # 12 new tokens, plus end-of-sequence


def test_value_head_and_adaptive_kl_coefficient_are_saved_and_restored(tmp_path):
    module = _ppo(lora=LoRAConfig(r=4), adaptive_kl=True, kl_target=0.01, kl_horizon=10, kl_coef=0.2)
    trainer = _trainer(4)
    trainer.fit(module, _data())
    assert module.value_head.weight.abs().sum() > 0  # trained away from its zero initialisation
    assert module.kl_coef != 0.2
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert "value_head.weight" in state and "value_head.bias" in state
    assert not any(k.startswith("model.base_model.model.model.layers.0.self_attn.q_proj.base_layer") for k in state)
    restored = PPO.load_from_checkpoint(path, strict=False)  # see report: base strict_loading is set too late
    torch.testing.assert_close(restored.value_head.weight, module.value_head.weight)
    assert restored.kl_coef == module.kl_coef


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_the_reward_model_scores_each_prompt_once_for_its_completions(reward_dir, placement):
    items = [i for i in load_prompt_items(PromptSource(split="train", limit=3)) for _ in range(3)]
    texts = [f"    return x + {k}\n" for k in range(len(items))]
    module = _ppo(reward="reward_model", reward_model=reward_dir, reward_placement=placement,
                  reward_model_batch_size=6)
    module.configure_model()
    module.setup_reward()
    scorer = module.reward_model._scorer() if placement == "replicate" else module.reward_network.model
    rows = []
    scorer.model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
    shared, _ = module.score(items, texts)
    assert rows == [2, 6, 1, 3]  # 9 pairs in batches of 6: each batch's prompts once, then its completions
    module.hparams.share_prompt = False  # the run's option governs the reward model too
    full, _ = module.score(items, texts)
    assert rows[4:] == [6, 3]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, load_reward_model(reward_dir).score([i.prompt for i in items], texts),
                               atol=1e-5, rtol=0)


def test_full_fine_tuning_checkpoint_omits_the_frozen_reference(tmp_path):
    module = _ppo()
    trainer = _trainer(4)
    trainer.fit(module, _data())
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("model.") for k in state) and not any(k.startswith("ref_model.") for k in state)
    restored = PPO.load_from_checkpoint(path, strict=False)  # see report: base strict_loading is set too late
    torch.testing.assert_close(restored.model.lm_head.weight, module.model.lm_head.weight)
    # the reference is rebuilt from the starting model, not from the trained policy
    assert not torch.equal(restored.ref_model.lm_head.weight, module.model.lm_head.weight)


def test_prompts_without_tests_are_refused_before_training_with_an_execution_reward(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n"}) + "\n" for i in range(4)))
    data = PromptsDataModule(train_sources=[PromptSource(path=str(path))], val_sources=[], tokenizer="preset:tiny",
                             batch_size=4)
    trainer = _trainer(4)
    with pytest.raises(RewardSetupError, match="reward='execution' needs tests.*4 of 4 training prompts.*'prompts.jsonl/0'"):
        trainer.fit(_ppo(), data)
    assert trainer.global_step == 0


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    rm = RewardModel(model_name_or_path="preset:tiny-base")  # the policy's tokenizer, other shapes than the policy's
    rm.configure_model()
    return str(rm.save_pretrained(tmp_path_factory.mktemp("rm") / "rm"))


class RecordingPPO(PPO):
    def update(self, rollouts):
        self.seen = rollouts
        return super().update(rollouts)


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_reward_model_scores_the_rollouts_of_prompts_without_tests(tmp_path, reward_dir, placement):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n"}) + "\n" for i in range(4)))
    data = PromptsDataModule(train_sources=[PromptSource(path=str(path))], val_sources=[], tokenizer="preset:tiny",
                             batch_size=4)
    # batches of 3 pairs: the four rollouts are scored in two passes
    module = RecordingPPO(**{**dict(max_new_tokens=8, ppo_epochs=1, num_minibatches=1), "reward": "reward_model",
                             "reward_model": reward_dir, "reward_placement": placement, "reward_model_batch_size": 3})
    monitor = TokenThroughput(peak_flops=1e9)
    trainer = _trainer(1, callbacks=[monitor])
    trainer.fit(module, data)
    rollouts = module.seen
    expected = load_reward_model(reward_dir).score([i.prompt for i in rollouts.items], rollouts.texts)
    torch.testing.assert_close(rollouts.rewards, expected)
    # the scoring passes count in the step's FLOPs at the reward model's shapes: 2 N_blocks + 4 L q_dim width per token
    masks = [b["attention_mask"] for b in reward_batches(module.tokenizer, [i.prompt for i in rollouts.items],
                                                          rollouts.texts, 3)]
    step = module.step_tokens
    assert len(masks) == 2 and step.scored == sum(int(m.sum()) for m in masks)
    assert step.scored_span == sum(int(m.sum()) * m.size(1) for m in masks)
    rm = ModelShape.from_hf_config(module.reward_model_config())
    assert (rm.hidden_size, rm.num_layers) == (256, 6)  # tiny-base's, not the tiny policy's
    scoring = sum(int(m.sum()) * (2 * rm.num_layers * rm.block_linear_params() + 4 * rm.num_layers * rm.q_dim * m.size(1))
                  for m in masks)
    without_scoring = monitor.flops_per_step(dataclasses.replace(step, scored=0, scored_span=0))[0]
    assert monitor.flops_per_step(step)[0] - without_scoring == pytest.approx(scoring, rel=1e-9)
    # replicate: a whole copy outside the module; shard: a frozen submodule, which checkpoints leave out
    assert (module.reward_network is None) == (placement == "replicate")
    assert (module.reward_model is None) == (placement == "shard")
    reward_weights = sum(p.numel() for p in load_reward_model(reward_dir).parameters())
    assert sum(p.numel() for p in module.parameters()) == (
        sum(p.numel() for p in module.model.parameters()) + sum(p.numel() for p in module.ref_model.parameters())
        + sum(p.numel() for p in module.value_head.parameters()) + (reward_weights if placement == "shard" else 0))
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    saved = torch.load(tmp_path / "ppo.ckpt", weights_only=True)["state_dict"]
    assert saved and not any(k.startswith("reward_network.") for k in saved)
    assert rollouts.results == [None] * 4
    assert float(trainer.callback_metrics["train/reward_mean"]) == pytest.approx(float(expected.mean()), abs=1e-5)
    assert "train/status/passed" not in trainer.callback_metrics


def test_a_sharded_reward_models_architecture_is_among_the_models_built_in_configure_model(tmp_path, reward_dir):
    # (their classes are imported before DeepSpeed ZeRO-3's zero.Init: tests/test_online_ddp.py, a Qwen2 reward model)
    ckpt = tmp_path / "rm.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name_or_path": "preset:tiny-base"}}, ckpt)
    assert _ppo(reward="reward_model", reward_model=str(ckpt), reward_placement="shard").model_sources() == [
        "preset:tiny", "preset:tiny-base"]
    assert _ppo(reward="reward_model", reward_model=reward_dir, reward_placement="shard").model_sources() == [
        "preset:tiny", reward_dir]
    # a replicated one is loaded later, outside zero.Init; an unreadable one is left to the load, which names it
    assert _ppo(reward="reward_model", reward_model=reward_dir).model_sources() == ["preset:tiny"]
    import argparse

    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    torch.save({"hyper_parameters": argparse.Namespace(model_name_or_path="preset:tiny-base")}, tmp_path / "pickled.ckpt")
    for missing in (tmp_path / "broken.ckpt", tmp_path / "pickled.ckpt", tmp_path / "absent.ckpt"):
        assert _ppo(reward="reward_model", reward_model=str(missing), reward_placement="shard").model_sources() == [
            "preset:tiny"]


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_reward_model_with_another_tokenizer_is_refused_before_training(tmp_path, reward_dir, placement):
    import shutil

    other = tmp_path / "rm-other-tokenizer"
    shutil.copytree(reward_dir, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    module = _ppo(reward="reward_model", reward_model=str(other), reward_placement=placement)
    trainer = _trainer(4)
    with pytest.raises(RewardSetupError, match="different tokenizer from the policy 'preset:tiny': vocabulary sizes 261 vs 260"):
        trainer.fit(module, _data())
    assert trainer.global_step == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="reward='reward_model' needs `reward_model`"):
        PPO(reward="reward_model")
    with pytest.raises(ValueError, match="ppo_epochs must be a positive integer"):
        PPO(ppo_epochs=0)
    with pytest.raises(ValueError, match="reward_placement='shard' places a reward model, but reward='execution'"):
        PPO(reward_placement="shard")
    with pytest.raises(ValueError, match="reward_placement must be replicate or shard, got 'everywhere'"):
        PPO(reward="reward_model", reward_model="some/rm", reward_placement="everywhere")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        PPO(kl_estimator="k4")
    with pytest.raises(ValueError, match="samples_per_prompt must be a positive integer"):
        PPO(samples_per_prompt=0)
    # a mistyped backend option is named when the module is built, not at the first generation mid-run
    with pytest.raises(ValueError, match=r"generation_kwargs has 'reserve_cach', which the hf backend does not take; "
                                         r"it takes: batch_size, .*reserve_cache"):
        PPO(generation_kwargs={"reserve_cach": True})
    with pytest.raises(ValueError, match="generation_kwargs has 'batch', which the openai backend does not take"):
        PPO(generation_backend="openai", generation_kwargs={"batch": 4})
    module = PPO(generation_kwargs={"reserve_cache": True, "batch_size": 2})
    module.configure_model()
    assert module.generator.reserve_cache and module.generator.batch_size == 2


class FirstByteReward(PPO):
    """A dense synthetic reward a random tiny model can learn fast: 1 when the first character is a lowercase letter."""

    def score(self, items, texts):
        return torch.tensor([float(t[:1].islower()) for t in texts]), [None] * len(texts)


@pytest.mark.slow
def test_ppo_raises_the_mean_reward_of_a_learnable_reward():
    torch.manual_seed(0)
    module = FirstByteReward(max_new_tokens=2, samples_per_prompt=4, ppo_epochs=2, num_minibatches=2, micro_batch_size=16,
                             kl_coef=0.0, optimizer=OptimizerConfig(lr=3e-3))
    rewards = []

    class Rewards(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    _trainer(4 * 15, [Rewards()]).fit(module, _data(n=8))  # reward ~0.15 over the first 5 batches, ~0.85 over 11-15
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.3, rewards
    assert math.isfinite(last)


@pytest.mark.parametrize("shared", [False, True], ids=["detached", "shared"])
def test_value_loss_reaches_the_policy_only_with_a_shared_critic(shared):
    module = _ppo(shared_critic=shared)
    module.configure_model()
    torch.nn.init.normal_(module.value_head.weight, std=0.1)  # a trained head: gradients can flow through it
    rollouts = module.generate_rollouts(PromptBatch(load_prompt_items(PromptSource(split="train", limit=2))))
    rows = rollouts.rows(torch.arange(len(rollouts)))
    out = module.rollout_forward(rows, with_values=True)
    mask = rows["response_mask"]
    value_loss, _ = losses.ppo_value_loss(out["values"], torch.zeros_like(out["values"]), torch.ones_like(out["values"]),
                                          mask, clip_range=None)
    value_loss.backward()
    assert module.value_head.weight.grad.abs().sum() > 0
    trunk = module.model.model.layers[0].self_attn.q_proj.weight.grad
    assert (trunk is not None and trunk.abs().sum() > 0) == shared


def test_value_lr_gives_the_head_its_own_learning_rate_on_the_same_schedule():
    module = _ppo(value_lr=5e-2, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=4, fused=True))
    trainer = _trainer(4)
    trainer.fit(module, _data())
    optimizer = module.optimizers().optimizer
    assert optimizer.defaults["fused"] and all(g["fused"] for g in optimizer.param_groups)  # kept when regrouped
    head = {id(p) for p in module.value_head.parameters()}
    head_groups = [g for g in optimizer.param_groups if any(id(p) in head for p in g["params"])]
    assert len(head_groups) == 1 and len(head_groups[0]["params"]) == 2
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(module.trainable_parameters())
    factor = warmup_decay(4, 4, 4, "cosine", 0.0)  # the schedule's multiplier after 4 steps
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx((5e-2 if g is head_groups[0] else 1e-3) * factor)
