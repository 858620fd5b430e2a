"""GRPO: group advantages move the policy towards the better completion, loss normalisation, reference handling,
validation pass@1 from executed samples, and K < 2 refused."""

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_align.data_modules.prompts import PromptBatch, PromptSource, PromptsDataModule, load_prompt_items
from lit_align.generation import Completion
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.grpo import GRPO

BARE_PASS = "    pass\n"


def _trainer(max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks), **kw)


def _data(n=2, **kw):
    return PromptsDataModule(train_sources=[PromptSource(split="train", limit=n)], val_sources=[], tokenizer="preset:tiny",
                             batch_size=n, **kw)


class ScriptedGRPO(GRPO):
    """Completions are scripted: per prompt, sample k is canonical when k is even, a bare ``pass`` when odd."""

    def generate_rollouts(self, batch, train=True):
        params = self.sampling_params(train)
        tok = self.tokenizer
        groups = []
        for item in batch:
            texts = [item.problem.canonical_solution if k % 2 == 0 else BARE_PASS for k in range(params.n)]
            groups.append([Completion(t, tok(t, add_special_tokens=False)["input_ids"], None, "stop") for t in texts])
        self.scripted = self.build_rollouts(list(batch), groups, params)
        return self.scripted


def test_k_below_two_is_refused():
    with pytest.raises(ValueError, match="GRPO needs samples_per_prompt >= 2"):
        GRPO(samples_per_prompt=1)
    with pytest.raises(ValueError, match="loss_aggregation must be 'sequence' or 'token'"):
        GRPO(loss_aggregation="batch")


def test_updates_raise_the_passing_completion_over_the_bare_pass():
    torch.manual_seed(0)
    module = ScriptedGRPO(samples_per_prompt=2, beta=0.0, optimizer=OptimizerConfig(lr=1e-3), execution_timeout_s=2.0)
    logged, margins = {}, []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not margins:
                margins.append(self.margin(pl_module, pl_module.generate_rollouts(batch)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            margins.append(self.margin(pl_module, pl_module.scripted))

        @staticmethod
        def margin(pl_module, rollouts):  # log pi(canonical) - log pi(bare pass), per prompt
            logps = pl_module.rollout_statistics(rollouts)["old_logps"].sum(-1)
            return (logps[0::2] - logps[1::2]).tolist()

    _trainer(6, [Record()]).fit(module, _data())
    assert module.ref_model is None  # beta = 0: no reference at all
    # rewards: canonical +4, bare pass -1 (trivial body): advantages exactly +1 / -1 in each group of 2
    assert module.scripted.rewards.tolist() == [4.0, -1.0, 4.0, -1.0]
    assert logged["train/reward_mean"] == pytest.approx(1.5)
    assert logged["train/status/passed"] == pytest.approx(0.5) and logged["train/status/failed"] == pytest.approx(0.5)
    assert logged["train/zero_std_groups"] == 0.0
    first, last = margins[0], margins[-1]
    assert last[0] > first[0] + 5 and last[1] > first[1] + 5, margins


def test_loss_normalisation_is_the_configured_one():
    out = {"logps": torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]), "logits": torch.zeros(2, 3, 5)}
    batch = {"old_logps": None, "ref_logps": None, "mask": torch.tensor([[True, True, True], [True, False, False]]),
             "advantages": torch.tensor([[1.0] * 3, [-3.0] * 3])}
    # ratio = 1 everywhere: per-token loss = -A -> tokens [-1, -1, -1] and [3]
    per_sequence, _ = GRPO(loss_aggregation="sequence", beta=0.0).compute_loss(out, batch)
    per_token, _ = GRPO(loss_aggregation="token", beta=0.0).compute_loss(out, batch)
    assert per_sequence.item() == pytest.approx((-1 + 3) / 2)
    assert per_token.item() == pytest.approx((-3 + 3) / 4)


def test_kl_term_uses_k3_to_the_reference_and_lora_reference_is_the_disabled_adapter():
    module = GRPO(samples_per_prompt=2, beta=0.5, lora=LoRAConfig(r=4), max_new_tokens=8)
    module.configure_model()
    assert module.ref_model is None  # LoRA: the reference is the same network with the adapter disabled
    rollouts = module.generate_rollouts(PromptBatch(load_prompt_items(PromptSource(split="train", limit=2))))
    stats = module.rollout_statistics(rollouts, with_reference=True)
    assert torch.equal(stats["old_logps"], stats["ref_logps"])
    mask = rollouts.response_mask
    out = {"logps": stats["old_logps"] + 0.1 * mask, "logits": torch.zeros(*mask.shape, 3)}
    batch = {"old_logps": stats["old_logps"], "ref_logps": stats["ref_logps"], "mask": mask,
             "advantages": torch.zeros(mask.shape)}
    loss, figures = module.compute_loss(out, batch)
    k3 = torch.expm1(torch.tensor(-0.1)) + 0.1  # exp(-d) - 1 + d with d = 0.1 on every token
    assert figures["kl"].item() == pytest.approx(k3.item(), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * k3.item(), rel=1e-4)


def test_full_fine_tuning_with_beta_keeps_a_frozen_reference_copy():
    module = GRPO(samples_per_prompt=2, beta=0.1)
    module.configure_model()
    assert module.ref_model is not None and not any(p.requires_grad for p in module.ref_model.parameters())
    assert all(p.requires_grad for p in module.model.parameters())


def test_validation_and_test_log_pass_at_1_reward_and_compile_rate_from_executed_samples():
    module = ScriptedGRPO(samples_per_prompt=2, val_samples_per_prompt=2, execution_timeout_s=2.0)
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=2)],
                             val_sources=[PromptSource(split="heldout", limit=3)], tokenizer="preset:tiny",
                             batch_size=2, eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, data)
    # each held-out problem: one canonical (passes) and one bare pass (fails) -> pass@1 = 1/2, pass@2 = 1
    assert metrics["val/pass@1"] == pytest.approx(0.5)
    assert metrics["val/pass@2"] == pytest.approx(1.0)
    assert metrics["val/reward_mean"] == pytest.approx((4.0 - 1.0) / 2)
    assert metrics["val/compile_rate"] == pytest.approx(1.0)
    (tested,) = trainer.test(module, data, verbose=False)  # `lit_align test` scores the same way, logged as test/
    assert tested["test/pass@1"] == pytest.approx(0.5) and tested["test/reward_mean"] == pytest.approx(1.5)
    assert module.generated_tokens == 0  # the running count behind TokenThroughput is of training rollouts only


class LowercaseReward(GRPO):
    """A dense synthetic reward a random tiny model can learn fast: 1 when the first character is a lowercase letter."""

    def score(self, items, texts):
        return torch.tensor([float(t[:1].islower()) for t in texts]), [None] * len(texts)


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_of_a_learnable_reward():
    torch.manual_seed(0)
    module = LowercaseReward(max_new_tokens=2, samples_per_prompt=8, beta=0.0, optimizer=OptimizerConfig(lr=3e-3))
    rewards = []

    class Rewards(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    _trainer(30, [Rewards()]).fit(module, _data(n=4))
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.3, rewards
