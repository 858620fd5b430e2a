"""bf16 per objective (docs/scaling.md, "bf16 and LoRA, per objective"): the recommended adapter setting
``dtype: bfloat16`` + ``precision: bf16-mixed`` + ``lora`` trains every objective with a bf16 frozen base and fp32
trainable weights, gradients and AdamW moments, and its first loss is the fp32 model's to within bf16's precision.

On CPU Lightning's bf16-mixed is ``torch.autocast("cpu", torch.bfloat16)``: the same dtype bookkeeping as on a GPU,
not its kernels or speed.
"""

import math

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.data_modules.prompts import PromptSource, PromptsDataModule
from lit_align.data_modules.sft import SFTDataModule
from lit_align.data_modules.sources import DataSource
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO
from lit_align.modules.grpo import GRPO
from lit_align.modules.orpo import ORPO
from lit_align.modules.ppo import PPO
from lit_align.modules.raft import RAFT
from lit_align.modules.reward import RewardModel
from lit_align.modules.sft import SFT

OFFLINE = {"sft": SFT, "reward": RewardModel, "dpo": DPO, "orpo": ORPO}
ONLINE = {"ppo": PPO, "grpo": GRPO, "raft": RAFT}


class Dtypes(Callback):
    """The first training batch, and at every optimizer step the dtypes of the trainable weights and their gradients."""

    def __init__(self):
        self.batch, self.trained, self.grads, self.losses = None, set(), set(), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        self.trained |= {p.dtype for p in trainable}
        self.grads |= {p.grad.dtype for p in trainable if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _module(objective: str, dtype: str):
    lora, optimizer = LoRAConfig(r=4, dropout=0.0), OptimizerConfig(lr=1e-3)
    if objective in OFFLINE:
        return OFFLINE[objective](dtype=dtype, lora=lora, optimizer=optimizer)
    extra = {"raft": {"keep_fraction": 1.0}, "ppo": {"ppo_epochs": 1}}.get(objective, {})
    return ONLINE[objective](dtype=dtype, lora=lora, optimizer=optimizer, samples_per_prompt=2, max_new_tokens=8,
                             num_minibatches=1, execution_timeout_s=2.0, **extra)


def _data(objective: str):
    if objective == "sft":
        return SFTDataModule(train_sources=[DataSource(limit=4)], val_fraction=0.0, tokenizer="preset:tiny", batch_size=4)
    if objective in OFFLINE:
        return PreferenceDataModule(train_sources=[PreferenceSource(limit=4)], val_sources=[], val_fraction=0.0,
                                    max_pairs_per_problem=1, tokenizer="preset:tiny", batch_size=4)
    return PromptsDataModule(train_sources=[PromptSource(split="train", limit=2)], val_sources=[], tokenizer="preset:tiny",
                             batch_size=2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # the fp32 loss below is computed outside a trainer
@pytest.mark.parametrize("objective", [*OFFLINE, *ONLINE])
def test_bf16_base_with_fp32_adapters_trains_every_objective(objective):
    torch.manual_seed(0)  # the reward model's new score head: the same in both dtypes
    module = _module(objective, "bfloat16")
    record = Dtypes()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[record])
    trainer.fit(module, _data(objective))

    assert trainer.global_step == 1 and math.isfinite(record.losses[0])
    frozen = {p.dtype for p in module.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base as loaded
    assert record.trained == record.grads == {torch.float32}  # adapters (and heads): weights and gradients
    moments = {s["exp_avg"].dtype for s in trainer.optimizers[0].state.values()}
    assert moments == {torch.float32}
    if objective == "ppo":
        assert module.value_head.weight.dtype == torch.float32

    if objective == "dpo":  # the reference is the same network with its (zero) adapter off: log 2 exactly
        assert record.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    elif objective in ("ppo", "grpo"):  # the same for the KL to the reference at the first rollout
        assert float(trainer.callback_metrics["train/kl"]) == 0.0
    elif objective in OFFLINE:  # the first batch's loss in fp32 (weights and compute) is the same to bf16's precision
        torch.manual_seed(0)
        reference = _module(objective, "float32")
        reference.configure_model()
        with torch.no_grad():
            fp32_loss = float(reference.shared_step(record.batch, "val"))
        assert record.losses[0] == pytest.approx(fp32_loss, rel=4e-3)  # bf16 keeps 8 significant bits
