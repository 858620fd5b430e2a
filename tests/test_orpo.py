"""ORPO module: NLL of the chosen completion plus lambda times the odds-ratio term, one forward pass, no reference."""

import math

import lightning as L
import pytest
import torch

from lit_align import losses
from lit_align.data_modules.preference import PreferenceDataModule
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.orpo import ORPO


@pytest.fixture(scope="module")
def dm():
    data = PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_pairs_per_problem=2)
    data.setup()
    return data


@pytest.fixture
def batch(dm):
    return dm.collate(dm.train_items[::97][:5])


def _built(**kw):
    module = ORPO(**kw)
    module.configure_model()
    module.log_metrics = lambda *a, **k: None  # steps called directly, without a Trainer
    return module.train()


@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_negative_lambda_is_refused(value):
    with pytest.raises(ValueError, match="orpo_lambda must be >= 0"):
        ORPO(orpo_lambda=value)


def test_loss_is_chosen_nll_plus_lambda_times_the_odds_ratio_term(batch):
    module = _built(orpo_lambda=0.25)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        b = batch["input_ids"].size(0) // 2
        logits = module(batch["input_ids"], batch["attention_mask"])
        nll = losses.sft_loss(logits[:b], batch["labels"][:b])  # chosen rows, completion tokens, token-weighted
        token_logps, mask = losses.token_logps(logits, batch["labels"])
        means = losses.sequence_logps(token_logps, mask, average=True)
        p_w, p_l = means[:b].double().exp(), means[b:].double().exp()
        log_ratio = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))  # Eq. 6 directly, float64
        expected = nll + 0.25 * torch.nn.functional.softplus(-log_ratio).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert loss.requires_grad


def test_with_lambda_zero_only_the_chosen_completion_tokens_count(batch):
    module = _built(orpo_lambda=0.0)
    loss = module.training_step(batch, 0)
    b = batch["input_ids"].size(0) // 2
    other = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    rejected_completion = other["labels"][b:] != losses.IGNORE_INDEX
    other["input_ids"][b:][rejected_completion] = 7  # rewrite every rejected completion token, in both layouts
    other["completion_input_ids"][b:][other["completion_labels"][b:] != losses.IGNORE_INDEX] = 7
    assert module.training_step(other, 0).item() == pytest.approx(loss.item(), abs=1e-6)
    with torch.no_grad():
        nll = losses.sft_loss(module(batch["input_ids"][:b], batch["attention_mask"][:b]), batch["labels"][:b])
    assert loss.item() == pytest.approx(nll.item(), abs=1e-5)


@pytest.mark.parametrize("share_prompt,rows", [(True, [5, 10]), (False, [10])])
def test_one_pass_of_the_policy_and_no_reference_model(batch, share_prompt, rows):
    module = _built(lora=LoRAConfig(r=4), share_prompt=share_prompt)
    seen = []
    module.model.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].size(0)), with_kwargs=True)
    module.training_step(batch, 0).backward()
    assert seen == rows  # 5 prompts then 10 completions on their cache, or 10 full sequences
    assert not hasattr(module, "reference_model")


def test_training_logs_nll_log_odds_ratio_and_rewards(tmp_path, dm):
    module = ORPO(orpo_lambda=0.5)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, datamodule=PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_pairs_per_problem=2))
    m = trainer.callback_metrics
    for stage in ("train", "val"):
        for name in ("loss", "nll", "or_loss", "log_odds_ratio", "rewards/chosen", "rewards/rejected",
                     "rewards/margins", "rewards/accuracies"):
            assert f"{stage}/{name}" in m, f"{stage}/{name}"
    assert m["val/loss"].item() == pytest.approx(m["val/nll"].item() + 0.5 * m["val/or_loss"].item(), abs=1e-4)
    assert m["val/or_loss"].item() > 0 and math.isfinite(m["val/log_odds_ratio"].item())


@pytest.mark.slow
def test_orpo_raises_heldout_accuracy_well_above_chance(tmp_path):
    L.seed_everything(0)
    module = ORPO(orpo_lambda=1.0, optimizer=OptimizerConfig(lr=5e-3, warmup_steps=5))
    data = PreferenceDataModule(tokenizer="preset:tiny", batch_size=8, eval_batch_size=64)
    L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
              limit_val_batches=0).fit(module, datamodule=data)
    result = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       ).validate(module, datamodule=data, verbose=False)[0]
    assert len(data.val_items) == 324
    assert result["val/rewards/accuracies"] > 0.65
    assert result["val/log_odds_ratio"] > 0


@pytest.mark.parametrize("objective", ["orpo", "dpo-rpo"])
def test_accumulated_micro_batches_weigh_every_chosen_token_of_the_step_the_same(tmp_path, objective):
    """2 micro-batches of 2 pairs per step: the NLL term (ORPO's, DPO's rpo_alpha one) is the token mean over the
    step's chosen tokens (each micro-batch carries its window's count), so the step's gradient is that of one batch of
    those 4 pairs; the pair terms are pair means either way. The logged loss is the micro-batch's, not the rescaled
    term."""
    from lightning.pytorch.callbacks import Callback

    from lit_align.modules.dpo import DPO

    seen, grads, logged = [], [], []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            window = batch.get("window_tokens")
            b = batch["index"].numel()
            seen.append((None if window is None else int(window),
                         int((batch["completion_labels"][:b] != losses.IGNORE_INDEX).sum())))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            pair_term = 0.5 * float(m["train/or_loss"]) if objective == "orpo" else _dpo_term(pl_module, batch)
            logged.append((float(m["train/loss"]), float(m["train/nll"]), pair_term))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]).clone())

    def fit(root, batch_size, accumulate):
        torch.manual_seed(0)
        optimizer = OptimizerConfig(lr=0.0, schedule="constant")
        module = (ORPO(orpo_lambda=0.5, optimizer=optimizer) if objective == "orpo"
                  else DPO(rpo_alpha=0.5, beta=0.1, optimizer=optimizer))
        data = PreferenceDataModule(tokenizer="preset:tiny", batch_size=batch_size, group_by_length=False,
                                    max_pairs_per_problem=2, seed=1)
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
                  accumulate_grad_batches=accumulate, callbacks=[Watch()]).fit(module, datamodule=data)

    fit(tmp_path / "accumulated", 2, 2)
    (w0, t0), (w1, t1) = seen
    assert w0 == w1 == t0 + t1 and t0 != t1 and len(grads) == 1
    for loss, nll, pair_term in logged:
        assert loss == pytest.approx(pair_term + (1.0 if objective == "orpo" else 0.5) * nll, abs=1e-5)
    seen.clear()
    fit(tmp_path / "whole", 4, 1)
    assert seen == [(None, t0 + t1)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _dpo_term(module, batch) -> float:
    """The DPO (sigmoid) loss of ``batch`` at the module's weights, recomputed."""
    with torch.no_grad():
        ref_chosen, ref_rejected = module.reference_logps(batch)
        policy = module.concatenated_logps(batch)
        per_example, _, _ = module.compute_loss(policy["chosen_logps"], policy["rejected_logps"], ref_chosen,
                                                ref_rejected)
    return float(per_example.mean())
