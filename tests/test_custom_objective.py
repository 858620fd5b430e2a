"""A new objective made by overriding one method: IPO on top of DPO (the worked example of docs/objectives.md)."""

import lightning as L
import pytest
import torch
from torch import Tensor

from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO


class IPO(DPO):
    """Identity Preference Optimization (Azar et al., 2023): regress the log-ratio gap onto 1 / (2 beta)."""

    def compute_loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                     reference_chosen_logps: Tensor, reference_rejected_logps: Tensor):
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        beta = self.hparams.beta
        per_example = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
        return per_example, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _data():
    return PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_pairs_per_problem=2,
                                train_sources=[PreferenceSource(limit=30)],
                                val_sources=[PreferenceSource(split="heldout", limit=10)])


def test_the_subclass_is_a_complete_objective(tmp_path):
    L.seed_everything(0)
    module = IPO(beta=0.5, lora=LoRAConfig(r=4), optimizer=OptimizerConfig(lr=1e-2))
    data = _data()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    data.setup()
    batch = data.collate(data.val_items[:6])
    module.configure_model()
    # at step 0 the policy is its reference: h = 0 and the loss is (1 / (2 beta))^2 = 1
    with torch.no_grad():
        policy = module.concatenated_logps(batch)
        before = module.compute_loss(policy["chosen_logps"], policy["rejected_logps"], *module.reference_logps(batch))[0]
    assert before.tolist() == pytest.approx([1.0] * 6, abs=1e-6)

    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["train/loss"].item() < 1.0  # trained on its own loss
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert f"train/{name}" in trainer.callback_metrics  # metrics, reference handling: all inherited

    module.eval()
    with torch.no_grad():
        policy = module.concatenated_logps(batch)
        rc, rr = module.reference_logps(batch)
        h = (policy["chosen_logps"] - rc) - (policy["rejected_logps"] - rr)
        loss = module.compute_loss(policy["chosen_logps"], policy["rejected_logps"], rc, rr)[0]
    assert torch.allclose(loss, (h - 1.0) ** 2, atol=1e-5)
    assert torch.allclose(module.example_margins(batch), 0.5 * h, atol=1e-5)  # margins use the subclass's rewards
