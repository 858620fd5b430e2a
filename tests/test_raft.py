"""RAFT: which samples are kept (top k%, passing only, threshold, duplicates), and the SFT loss on exactly those."""

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_align import losses
from lit_align.data_modules.prompts import PromptSource, PromptsDataModule
from lit_align.generation import Completion
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.raft import RAFT

# per prompt: a correct body, a wrong one (fails a test), a bare pass (trivial: -1), a syntax error (-1), duplicated
SCRIPT = ["canonical", "    return 0\n", "    pass\n", "    return (\n", "canonical", "    return 0\n"]


def _trainer(max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks), **kw)


def _data(n=2):
    return PromptsDataModule(train_sources=[PromptSource(split="train", limit=n)], val_sources=[], tokenizer="preset:tiny",
                             batch_size=n)


class ScriptedRAFT(RAFT):
    def generate_rollouts(self, batch, train=True):
        params = self.sampling_params(train)
        tok = self.tokenizer
        groups = []
        for item in batch:
            texts = [item.problem.canonical_solution if s == "canonical" else s for s in SCRIPT[:params.n]]
            groups.append([Completion(t, tok(t, add_special_tokens=False)["input_ids"], None, "stop") for t in texts])
        self.scripted = self.build_rollouts(list(batch), groups, params)
        return self.scripted


def _scored(**kw):
    """One training batch of scripted, executed rollouts (2 prompts x 6 samples) and the module that made them."""
    module = ScriptedRAFT(samples_per_prompt=6, execution_timeout_s=2.0, **kw)
    module.configure_model()
    data = _data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return module, module.score_rollouts(module.generate_rollouts(batch))


def test_selection_keeps_the_top_fraction_per_prompt_without_duplicates():
    module, rollouts = _scored(keep_fraction=0.34)  # ceil(0.34 * 6) = 3 per prompt
    assert rollouts.rewards.tolist() == pytest.approx([4.0, -0.3, -1.0, -1.0, 4.0, -0.3] * 2)
    kept = module.select(rollouts).tolist()
    # per prompt: the canonical (its duplicate at 4 is dropped), the wrong answer (-0.3), then one of the two -1s
    assert len(kept) == 6 and {0, 1, 6, 7} <= set(kept)
    assert not {4, 5, 10, 11} & set(kept)
    assert len({2, 3} & set(kept)) == 1 and len({8, 9} & set(kept)) == 1


def test_selection_filters_passing_threshold_and_batch_ranking():
    module, rollouts = _scored(keep_fraction=1.0, only_passing=True)
    assert module.select(rollouts).tolist() == [0, 6]
    module, rollouts = _scored(keep_fraction=1.0, min_reward=-0.5, deduplicate=False)
    assert module.select(rollouts).tolist() == [0, 1, 4, 5, 6, 7, 10, 11]
    module, rollouts = _scored(keep_fraction=2 / 12, rank_within="batch")
    assert module.select(rollouts).tolist() == [0, 6]


def test_update_trains_on_the_kept_samples_with_the_sft_loss():
    torch.manual_seed(0)
    module = ScriptedRAFT(samples_per_prompt=6, keep_fraction=1 / 6, execution_timeout_s=2.0,
                          optimizer=OptimizerConfig(lr=1e-3))
    seen = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rollouts = pl_module.score_rollouts(pl_module.generate_rollouts(batch))
            kept = pl_module.select(rollouts)
            rows = rollouts.rows(kept)
            labels = torch.full_like(rows["input_ids"], losses.IGNORE_INDEX)
            labels[:, rollouts.prompt_width:] = rows["response_ids"].masked_fill(~rows["response_mask"], -100)
            with torch.no_grad():
                logits = pl_module(rows["input_ids"], rows["attention_mask"], rows["position_ids"])
            seen["expected_loss"] = float(losses.sft_loss(logits, labels))
            seen["kept"] = kept.tolist()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    _trainer(1, [Record()]).fit(module, _data())
    assert seen["kept"] == [0, 6]  # the canonical solution of each prompt
    assert seen["train/kept"] == 2 and seen["train/kept_fraction"] == pytest.approx(2 / 12)
    assert seen["train/kept_reward_mean"] == pytest.approx(4.0)
    assert seen["train/loss"] == pytest.approx(seen["expected_loss"], rel=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="keep_fraction must be in \\(0, 1\\]"):
        RAFT(keep_fraction=0.0)
    with pytest.raises(ValueError, match="only_passing=True needs reward='execution'"):
        RAFT(only_passing=True, reward="reward_model", reward_model="some/rm")
    with pytest.raises(ValueError, match="rank_within must be 'prompt' or 'batch'"):
        RAFT(rank_within="epoch")
