"""Reward model: scalar head on the LM backbone, Bradley-Terry training, score(), loading back for PPO."""

import json
import math

import lightning as L
import pytest
import torch

from lit_align import losses
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.models import LoRAConfig, load_tokenizer, materialize_preset
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.reward import RewardModel, load_reward_model, reward_batches

PROMPTS = ["def add_3(x):\n", "def is_even(n):\n", "def add_3(x):\n", "def f():\n    '''A longer prompt.'''\n"]
COMPLETIONS = ["    return x + 3\n", "    pass\n", "    return x - 3\n", "    return 1\n"]


def _trainer(root, max_steps, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, **kw)


def _data(**kw):
    return PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_pairs_per_problem=2, **kw)


def _perturb_head(module):
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA reward model after 3 steps, and its last checkpoint."""
    root = tmp_path_factory.mktemp("rm")
    L.seed_everything(0)
    module = RewardModel(lora=LoRAConfig(r=4), optimizer=OptimizerConfig(lr=1e-2))
    trainer = _trainer(root, 3, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(train_sources=[PreferenceSource(limit=20)], val_sources=[]))
    trainer.save_checkpoint(root / "rm.ckpt")
    return module, root / "rm.ckpt"


def test_lora_reward_model_trains_the_score_head_fully(trained):
    module, ckpt = trained
    assert module.lora_config.modules_to_save == ["score"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    head = [n for n in trainable if "score" in n]
    assert head and all("modules_to_save" in n for n in head)  # the full head, not an adapter on it
    assert any("lora_A" in n for n in trainable)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(saved) == trainable  # adapter + head only: the frozen backbone is rebuilt from its path


def test_user_modules_to_save_are_kept_beside_the_head():
    module = RewardModel(lora=LoRAConfig(r=4, modules_to_save=["embed_tokens"]))
    assert module.lora_config.modules_to_save == ["embed_tokens", "score"]


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    module = RewardModel()
    module.configure_model()
    module.eval()
    tok = module.tokenizer
    ids = tok("def f(x):\n    return x\n")["input_ids"]
    alone = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    padded_ids = torch.tensor([ids + [tok.pad_token_id] * 5])
    mask = torch.tensor([[1] * len(ids) + [0] * 5])
    with torch.no_grad():
        right = module(padded_ids, mask)
        left = module(torch.tensor([[tok.pad_token_id] * 5 + ids]), mask.flip(-1))
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)
    assert left.shape == (1,) and math.isfinite(left.item())


def test_training_step_is_bradley_terry_on_the_pair_rewards():
    module = RewardModel(margin=0.5)
    module.configure_model()
    dm = _data(train_sources=[PreferenceSource(limit=5)], val_sources=[])
    dm.setup()
    batch = dm.collate(dm.train_items[:4])
    module.log_metrics = lambda *a, **k: None
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        rewards = module(batch["input_ids"], batch["attention_mask"])
    expected = losses.bradley_terry_loss(rewards[:4], rewards[4:], margin=0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # the margin is Eq. 2's difference shifted: log(1 + exp(-(d - 0.5)))
    d = (rewards[:4] - rewards[4:]).double()
    assert expected.item() == pytest.approx(torch.log1p(torch.exp(-(d - 0.5))).mean().item(), abs=1e-6)


def _module_and_pairs(**kw):
    """A LoRA reward model in training mode with a perturbed adapter, and a batch of 6 pairs from different tasks."""
    module = RewardModel(lora=LoRAConfig(r=4, dropout=0.1), **kw)
    module.configure_model()
    _perturb_head(module)
    module.train()
    dm = _data(train_sources=[PreferenceSource(limit=40)], val_sources=[])
    dm.setup()
    return module, dm.collate(dm.train_items[::9][:6])


def test_shared_prompt_rewards_equal_full_sequence_rewards():
    module, batch = _module_and_pairs()
    backbone = module._scorer().model
    rows = []
    backbone.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
    shared = module.pair_rewards(batch)
    assert rows == [6, 12]  # 6 prompts once, then 12 completions on their cached keys/values
    module.hparams.share_prompt = False
    full = module.pair_rewards(batch)
    assert rows == [6, 12, 12]
    assert torch.allclose(shared, full, atol=1e-5)


def test_score_batches_by_length_without_grad_and_restores_the_mode(trained):
    module, _ = trained
    module.train()
    together = module.score(PROMPTS, COMPLETIONS, batch_size=3)
    assert together.shape == (4,) and together.dtype == torch.float32 and not together.requires_grad
    assert module.training  # restored
    one_by_one = torch.stack([module.score([p], [c], batch_size=1)[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert together[0] != together[2]  # different completions of the same prompt score differently
    # the pair is encoded as in training: prompt ids + completion ids + EOS
    tok = module.tokenizer
    ids = tok(PROMPTS[0])["input_ids"] + tok(COMPLETIONS[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        module.eval()
        direct = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert direct.item() == pytest.approx(together[0].item(), abs=1e-5)


def test_score_rejects_mismatched_inputs(trained):
    module, _ = trained
    with pytest.raises(ValueError, match="one completion per prompt, got 2 prompts and 1 completions"):
        module.score(["a", "b"], ["c"])
    assert module.score([], []).shape == (0,)


def test_load_reward_model_from_a_lightning_checkpoint(trained):
    module, ckpt = trained
    loaded = load_reward_model(ckpt)
    assert isinstance(loaded, RewardModel) and not loaded.training
    assert torch.allclose(loaded.score(PROMPTS, COMPLETIONS), module.score(PROMPTS, COMPLETIONS), atol=1e-5)
    # PPO checks the reward model's tokenizer against the policy's
    assert loaded.tokenizer.get_vocab() == load_tokenizer("preset:tiny").get_vocab()


def test_save_pretrained_and_load_back_from_the_directory(trained, tmp_path):
    module, _ = trained
    path = module.save_pretrained(tmp_path / "rm-hf")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert (path / "tokenizer.json").exists() and not (path / "adapter_config.json").exists()  # merged
    assert "local_files_only" not in json.loads((path / "tokenizer_config.json").read_text())  # a load option
    loaded = load_reward_model(path)
    assert torch.allclose(loaded.score(PROMPTS, COMPLETIONS), module.score(PROMPTS, COMPLETIONS), atol=1e-5)
    assert module.lora_config is not None and hasattr(module.model, "disable_adapter")  # the module kept its adapter


def test_loader_refuses_what_is_not_a_reward_model(tmp_path):
    with pytest.raises(ValueError, match="not a reward model directory"):
        load_reward_model(materialize_preset("preset:tiny"))  # a causal LM: train a RewardModel from it instead
    from lit_align.modules.dpo import DPO

    dpo = DPO()
    trainer = _trainer(tmp_path, 1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(dpo, datamodule=_data(train_sources=[PreferenceSource(limit=2)], val_sources=[]))
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    with pytest.raises(ValueError, match="not a RewardModel checkpoint"):
        load_reward_model(tmp_path / "dpo.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward_model(tmp_path / "missing.ckpt")


def test_starts_from_any_causal_lm_directory_with_a_new_head(tmp_path):
    module = RewardModel(model_name_or_path=materialize_preset("preset:tiny"))
    module.configure_model()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(materialize_preset("preset:tiny"))
    backbone = module.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(backbone, lm.model.layers[0].self_attn.q_proj.weight)  # same backbone weights
    assert module.model.score.weight.shape == (1, lm.config.hidden_size)


def test_training_logs_accuracy_and_margin_through_torchmetrics(tmp_path):
    module = RewardModel(lora=LoRAConfig(r=4))
    trainer = _trainer(tmp_path, 2, limit_val_batches=2, val_check_interval=2, enable_checkpointing=False)
    trainer.fit(module, datamodule=_data())
    m = trainer.callback_metrics
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert f"train/{name}" in m and f"val/{name}" in m, name
    assert "train/rewards/accuracies_epoch" in m
    assert m["val/rewards/margins"].item() == pytest.approx(
        (m["val/rewards/chosen"] - m["val/rewards/rejected"]).item(), abs=1e-5)
    assert 0.0 <= m["val/rewards/accuracies"].item() <= 1.0


@pytest.mark.slow
def test_reward_model_heldout_accuracy_beats_chance(tmp_path):
    # 120 steps at lr 2e-3 gave 0.63-0.80 on seeds 0-5 with both AVX2 and AVX-512 kernels; 60 steps at 5e-3 gave
    # 0.47-0.70, so the outcome turned on the CPU's rounding. 0.6 is 3.6 standard errors above a coin on 324 pairs.
    L.seed_everything(0)
    module = RewardModel(optimizer=OptimizerConfig(lr=2e-3, warmup_steps=5))
    data = PreferenceDataModule(tokenizer="preset:tiny", batch_size=8, eval_batch_size=64)
    _trainer(tmp_path, 120, limit_val_batches=0, enable_checkpointing=False).fit(module, datamodule=data)
    result = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       ).validate(module, datamodule=data, verbose=False)[0]
    assert len(data.val_items) == 324
    assert result["val/rewards/accuracies"] > 0.6
    heldout = data.val_items
    tok = module.tokenizer
    prompts = [tok.decode(it.prompt_ids.tolist()) for it in heldout]
    chosen = module.score(prompts, [tok.decode(it.chosen_ids[:-1].tolist()) for it in heldout])
    rejected = module.score(prompts, [tok.decode(it.rejected_ids[:-1].tolist()) for it in heldout])
    # score() (text in, re-tokenized, batched differently) ranks the held-out pairs as the validation step does: the
    # two accuracies differ by at most two near-tied pairs whose order rounding flips (one on torch 2.13)
    accuracy = float((chosen > rejected).float().mean())
    assert accuracy == pytest.approx(result["val/rewards/accuracies"], abs=2 / len(heldout) + 1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_under_checkpointing_pairs_are_packed_one_row_each_with_the_full_sequence_rewards_and_gradients(attention):
    """A training pass under gradient checkpointing cannot fill a cache: each pair runs as one packed row (prompt,
    chosen, rejected; the first packed pass checked against full rows once), with the full rows' rewards and
    gradients; packed_pairs: false runs the full rows."""
    torch.manual_seed(0)
    module, batch = _module_and_pairs(gradient_checkpointing=True, attn_implementation=attention)
    rows = backbone_rows(module)
    rewards, grads = {}, {}
    for packed in (True, False):
        module.hparams.packed_pairs = packed
        module.zero_grad()
        rewards[packed] = module.pair_rewards(batch)
        (rewards[packed][:6] - 2 * rewards[packed][6:]).sum().backward()
        grads[packed] = [p.grad.clone() for p in module.parameters() if p.requires_grad]
    assert rows == [6, 12, 6, 12]  # the check (packed, full, without gradient), packed rows; then full rows
    assert module.packing.ok and torch.allclose(rewards[True], rewards[False], atol=1e-5)
    for a, b in zip(grads[True], grads[False]):
        assert (a - b).abs().max() <= 3e-5 * b.abs().max()


def backbone_rows(module) -> list[int]:
    """Record the rows of every forward call of a RewardModel's backbone."""
    rows = []
    module._scorer().model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].size(0)),
                                                 with_kwargs=True)
    return rows


def test_pairs_are_batched_by_prompt_and_split_at_it_as_the_full_rows_are():
    tok = load_tokenizer(materialize_preset("preset:tiny"))
    prompts = ["def a(x):\n"] * 3 + ["def much_longer_name(x, y):\n"] * 2 + ["def a(x):\n", "def b(x):\n"]
    completions = ["    return 1\n", "    return x\n", "    pass\n", "    return x + y\n", "    return 0\n",
                   "    return 2 * x + 7\n", "    return -x\n"]
    batches = list(reward_batches(tok, prompts, completions, batch_size=3))
    order = [i for b in batches for i in b["rows"].tolist()]
    assert sorted(order) == list(range(7)) and [len(b["rows"]) for b in batches] == [3, 3, 1]
    # a prompt's pairs together, the group with the longest sequence first, a group split where a batch is full
    assert [prompts[i] for i in order] == [prompts[3]] * 2 + [prompts[0]] * 4 + [prompts[6]]
    for b in batches:
        assert b["prompt_input_ids"].size(0) == len({prompts[i] for i in b["rows"].tolist()})  # each prompt once
        for row, i in enumerate(b["rows"].tolist()):
            want = tok(prompts[i])["input_ids"] + tok(completions[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert b["input_ids"][row][b["attention_mask"][row].bool()].tolist() == want
            p = b["prompt_rows"][row]
            split = (b["prompt_input_ids"][p][b["prompt_attention_mask"][p].bool()].tolist()
                     + b["completion_input_ids"][row][b["completion_attention_mask"][row].bool()].tolist())
            assert split == want
            assert b["prompt_attention_mask"][p, -1] == 1  # left-padded: every prompt ends at the last column
    # a prompt without a single token cannot be run on its own: that batch has the full rows only
    empty_tok = lambda text, **kw: {"input_ids": []} if text == "" else tok(text, **kw)
    empty_tok.eos_token_id, empty_tok.pad_token_id = tok.eos_token_id, tok.pad_token_id
    (only,) = reward_batches(empty_tok, ["", "x"], ["a", "b"], batch_size=2)
    assert "prompt_input_ids" not in only and only["input_ids"].size(0) == 2


def test_score_runs_each_prompt_once_per_batch_and_matches_the_full_rows(trained):
    module, _ = trained
    _perturb_head(module)
    prompts = [p for p in PROMPTS[:2] for _ in range(3)] + [PROMPTS[3]]
    completions = [f"    return {k}\n" for k in range(7)]
    rows = backbone_rows(module)
    shared = module.score(prompts, completions, batch_size=4)
    # batches of 4, longest group first: (the long prompt x 1, is_even x 3) then (add_3 x 3): each batch's prompts
    # once, then its completions
    assert rows == [2, 4, 1, 3]
    module.hparams.share_prompt = False
    try:
        full = module.score(prompts, completions, batch_size=4)
    finally:
        module.hparams.share_prompt = True
    assert rows[4:] == [4, 3]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    assert len(set(shared.tolist())) == 7  # every pair scored on its own completion


def test_a_reward_network_without_a_usable_cache_scores_full_rows_from_then_on(trained, monkeypatch, caplog):
    from lit_align.modules import reward

    module, _ = trained
    network = reward.RewardNetwork(module.model).eval()
    (batch,) = reward_batches(module.tokenizer, PROMPTS, COMPLETIONS, batch_size=4)
    split = {k: v for k, v in batch.items() if k != "rows"}
    with torch.no_grad():
        shared = network(**split)
        calls = []

        def no_cache(scorer, batch):
            calls.append(1)
            raise NotImplementedError("the model returned no KV cache")

        monkeypatch.setattr(reward, "shared_prompt_rewards", no_cache)
        fallback = network(**split)
        again = network(**split)
    assert calls == [1] and not network.share_prompt  # tried once, then full rows only
    assert "prompt sharing is not supported by the reward model" in caplog.text
    torch.testing.assert_close(fallback, shared, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, fallback)
