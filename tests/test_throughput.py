"""TokenThroughput: FLOP formulas, batch and online-step counting, logged rates checked against a fake clock."""

from dataclasses import replace

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lit_align.callbacks.throughput import (
    TokenThroughput,
    batch_counts,
    generation_flops_per_token,
    training_flops_per_token,
)
from lit_align.data_modules.prompts import PromptSource, PromptsDataModule
from lit_align.generation import Completion
from lit_align.memory import ModelShape, preset_config
from lit_align.modules.grpo import GRPO
from lit_align.modules.online import StepTokens
from lit_align.modules.raft import RAFT
from lit_align.modules.sft import SFT

TINY = ModelShape.from_hf_config(preset_config("tiny"))  # h=128, i=384, 4 layers, vocab 260, untied head


def test_flops_per_token_follow_the_6n_convention():
    n = TINY.matmul_params
    assert n == 4 * (4 * 128 * 128 + 3 * 128 * 384) + 260 * 128 == 885_248
    attention = 12 * 4 * 128 * 64
    # full fine-tuning: 6N + 12 L h s
    assert training_flops_per_token(TINY, 64, trainable_matmul_params=n) == 6 * n + attention
    # LoRA: no weight-gradient matmuls for the frozen base, 6 FLOPs per adapter weight
    assert training_flops_per_token(TINY, 64, trainable_matmul_params=0, lora_params=1000) == 4 * n + 6000 + attention
    # a reference forward on the same tokens adds 2N plus the forward attention term
    assert (training_flops_per_token(TINY, 64, n, extra_forward_passes=1)
            == 6 * n + attention + 2 * n + 4 * 4 * 128 * 64)
    assert generation_flops_per_token(TINY) == 2 * n


def test_batch_counts_reads_masks_pairs_and_packing():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_counts({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}) == (2, 5, 4)
    assert batch_counts({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask},
                        count_padding=True) == (2, 8, 4)
    pairs = {"chosen_input_ids": torch.zeros(3, 5, dtype=torch.long), "chosen_attention_mask": torch.ones(3, 5),
             "rejected_input_ids": torch.zeros(3, 7, dtype=torch.long), "rejected_attention_mask": torch.ones(3, 7)}
    assert batch_counts(pairs) == (3, 36, 7)
    # lit_align's own preference batch: the prompt/completion split is a second view of the same tokens
    from lit_align.data_modules.preference import EncodedTriplet, collate_pairs

    arr = lambda n: np.arange(1, n + 1, dtype=np.int64)  # noqa: E731
    items = [EncodedTriplet(arr(5), arr(3), arr(6), 0, 0, "a"), EncodedTriplet(arr(2), arr(4), arr(1), 1, 1, "b")]
    real = (5 + 3) + (2 + 4) + (5 + 6) + (2 + 1)
    assert batch_counts(collate_pairs(items, pad_token_id=0)) == (4, real, 11)
    packed = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "position_ids": torch.zeros(2, 6, dtype=torch.long)}
    assert batch_counts(packed) == (2, 12, 6)
    with pytest.raises(KeyError, match="no 2-D '\\*input_ids'"):
        batch_counts({"prompt": ["x"]})


class FakeClock:
    """Advances 0.5 s per reading."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 0.5
        return self.now


class Recorder(L.Callback):
    def __init__(self, monitor):
        self.monitor, self.metrics, self.batches = monitor, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append(dict(self.monitor.last_metrics))
        self.batches.append({k: v.clone() for k, v in batch.items()})


class GeneratingSFT(SFT):
    """An SFT module that pretends to generate 100 tokens per step, as an online objective would."""

    generated_tokens = 0

    def training_step(self, batch, batch_idx):
        self.generated_tokens += 100
        return super().training_step(batch, batch_idx)


def _batches(n=6):
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        ids = torch.randint(4, 260, (2, 16 + 4 * k), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -(k + 1):] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _fit(module, monitor, batches):
    recorder = Recorder(monitor)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, recorder])
    trainer.fit(module, datamodule=Data())
    return trainer, recorder


def test_logged_rates_equal_counted_tokens_over_clock_time():
    monitor = TokenThroughput(window_size=3, peak_flops=1e9, clock=FakeClock())
    module = GeneratingSFT(model_name_or_path="preset:tiny")
    trainer, rec = _fit(module, monitor, _batches())
    n = TINY.matmul_params
    # one clock reading at train start and one per batch: batch k ends at 0.5 * (k + 1) s after the start
    assert [m.get("throughput/time") for m in rec.metrics] == [0.5 * (k + 1) for k in range(6)]
    assert "throughput/tokens_per_sec" not in rec.metrics[1]  # the window of 3 batches is not full yet
    for k in range(2, 6):
        window = rec.batches[k - 1:k + 1]  # rates use the difference between the window's first and last update
        tokens = sum(int(b["attention_mask"].sum()) for b in window)
        flops = sum(int(b["attention_mask"].sum()) * (6 * n + 12 * 4 * 128 * b["input_ids"].size(1)) for b in window)
        m = rec.metrics[k]
        assert m["throughput/tokens_per_sec"] == pytest.approx(tokens / 1.0)
        assert m["throughput/samples_per_sec"] == pytest.approx(4 / 1.0)
        assert m["throughput/batches_per_sec"] == pytest.approx(2 / 1.0)
        assert m["throughput/flops_per_sec"] == pytest.approx(flops / 1.0, rel=1e-9)
        assert m["throughput/mfu"] == pytest.approx(flops / 1.0 / 1e9, rel=1e-9)
        assert m["throughput/generated_tokens_per_sec"] == pytest.approx(200 / 1.0)
        assert m["throughput/generation_flops_per_sec"] == pytest.approx(200 * 2 * n)
    assert rec.metrics[-1]["throughput/tokens"] == sum(int(b["attention_mask"].sum()) for b in rec.batches)
    assert rec.metrics[-1]["throughput/generated_tokens"] == 600
    # what was logged is what the callback computed
    assert float(trainer.callback_metrics["throughput/tokens_per_sec"]) == pytest.approx(
        rec.metrics[-1]["throughput/tokens_per_sec"])


def test_lora_flops_and_no_mfu_without_peak_on_cpu():
    monitor = TokenThroughput(window_size=2, clock=FakeClock())
    module = SFT(model_name_or_path="preset:tiny", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    with pytest.warns(UserWarning, match="no peak FLOP/s for this device"):
        _, rec = _fit(module, monitor, _batches(3))
    lora = sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)
    assert lora == 4 * 4 * (4 * (128 + 128) + 3 * (128 + 384))  # r * (in + out) for 7 linears in 4 blocks
    b = rec.batches[2]
    tokens = int(b["attention_mask"].sum())
    n = TINY.matmul_params
    expected = tokens * (4 * n + 6 * lora + 12 * 4 * 128 * b["input_ids"].size(1)) / 0.5
    assert rec.metrics[2]["throughput/flops_per_sec"] == pytest.approx(expected, rel=1e-9)
    assert "throughput/mfu" not in rec.metrics[2]
    assert "throughput/generated_tokens_per_sec" not in rec.metrics[2]


def test_a_reward_models_flops_count_its_score_head_not_an_lm_head():
    """The reward model's config is its causal LM's; under its score head the LM head's matmul is not in the pass,
    so the FLOPs per token (6N) count the blocks' weights and the one-output head only (with LoRA too)."""
    from lit_align.modules.reward import RewardModel

    for lora in (None, {"r": 4, "alpha": 8, "dropout": 0.0}):
        module = RewardModel(model_name_or_path="preset:tiny", lora=lora)
        module.configure_model()
        monitor = TokenThroughput(window_size=2, clock=FakeClock())
        monitor._read_model(module)
        assert monitor._shape.matmul_params == TINY.num_layers * TINY.block_linear_params() + 128
        assert monitor._shape.matmul_params == TINY.matmul_params - 260 * 128 + 128


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window_size must be >= 2"):
        TokenThroughput(window_size=1)
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        TokenThroughput(peak_flops=0)


# ---------------------------------------------------------------------- online objectives: counted from the step

L_Q = 4 * 128  # layers x q_dim of the tiny preset
ANSWERS = ["    return 1\n", "    x = 2\n    return x\n", "    return None  # nothing\n", "    pass\n"]


class Scripted:
    """Online-module mixin: fixed completions (sample k of every prompt is ANSWERS[k]), a reward of -length (no
    sandbox), and each step's rollouts and counts kept for the test."""

    def generate_rollouts(self, batch, train=True):
        params = self.sampling_params(train)
        tok = self.tokenizer
        group = [Completion(t, tok(t, add_special_tokens=False)["input_ids"], None, "stop") for t in ANSWERS[:params.n]]
        groups = [list(group) for _ in batch]
        return self.build_rollouts(list(batch), groups, params)

    def score(self, items, texts):
        return torch.tensor([-float(len(t)) for t in texts], device=self.device), [None] * len(items)

    def update(self, rollouts):
        self.seen = getattr(self, "seen", []) + [rollouts]
        return super().update(rollouts)


class ScriptedGRPO(Scripted, GRPO):
    pass


class ScriptedRAFT(Scripted, RAFT):
    pass


class StepRecorder(L.Callback):
    def __init__(self, monitor):
        self.monitor, self.metrics, self.steps = monitor, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append(dict(self.monitor.last_metrics))
        self.steps.append(replace(pl_module.step_tokens))


def _fit_online(module, monitor, max_steps, **trainer_kw):
    recorder = StepRecorder(monitor)
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=2)], val_sources=[],
                             tokenizer="preset:tiny", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[monitor, recorder], **trainer_kw)
    trainer.fit(module, datamodule=data)
    return recorder


def test_step_tokens_count_passes_at_their_own_width():
    step = StepTokens()
    step.add_pass(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), trained=True)  # 7 tokens at width 4
    step.add_pass(torch.tensor([[1, 1, 0, 0, 0, 0]]), trained=True)  # 2 tokens at width 6
    step.add_pass(torch.ones(3, 5), trained=False)
    assert (step.trained, step.trained_span, step.trained_seq) == (9, 7 * 4 + 2 * 6, (7 * 4 + 2 * 6) / 9)
    assert (step.forward_only, step.forward_only_span) == (15, 15 * 5)
    assert step.trained_seq == pytest.approx(40 / 9) and step.forward_only_seq == 5.0
    assert StepTokens().trained_seq == 0.0


def test_grpo_flops_and_mfu_come_from_the_steps_rollouts_and_passes():
    """2 prompts x 2 samples, 2 epochs, a frozen reference (beta > 0): every row goes through 2 trained passes and 2
    forward-only ones (old log-probs, reference log-probs); generation (hf) counts in FLOP/s and MFU."""
    torch.manual_seed(0)
    monitor = TokenThroughput(window_size=2, peak_flops=1e9, clock=FakeClock(), extra_forward_passes=1)
    module = ScriptedGRPO(model_name_or_path="preset:tiny", samples_per_prompt=2, beta=0.1, num_iterations=2,
                          micro_batch_size=4)
    with pytest.warns(UserWarning, match="extra_forward_passes=1 is ignored for ScriptedGRPO"):
        rec = _fit_online(module, monitor, max_steps=4)  # 2 optimizer steps per batch: 2 training steps
    assert len(module.seen) == 2 and len(rec.steps) == 2
    n = TINY.matmul_params
    for rollouts, step in zip(module.seen, rec.steps):
        tokens = int(rollouts.attention_mask.sum())
        generated = int(rollouts.response_mask.sum())
        width = rollouts.input_ids.size(1)  # one micro-batch holds every row: every pass is as wide as the rollouts
        assert step.backend == "hf" and step.rollouts == 4
        assert step.generated == generated == sum(len(module.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1
                                                  for a in ANSWERS[:2]) * 2  # + the end-of-sequence token
        assert step.prompt_tokens == int(rollouts.attention_mask[:, :rollouts.prompt_width].sum()) == tokens - generated
        assert step.trained == 2 * tokens and step.trained_seq == width  # 2 epochs
        assert step.forward_only == 2 * tokens and step.forward_only_seq == width  # old + reference log-probs
    assert module.generated_tokens == sum(s.generated for s in rec.steps)

    last = rec.steps[-1]
    expected = (last.trained * (6 * n + 12 * L_Q * last.trained_seq)  # extra_forward_passes not added
                + last.forward_only * (2 * n + 4 * L_Q * last.forward_only_seq)
                + (last.generated + last.prompt_tokens) * 2 * n)
    generation = (last.generated + last.prompt_tokens) * 2 * n
    m = rec.metrics[-1]  # window of 2: the last step over 0.5 s of fake clock
    assert m["throughput/flops_per_sec"] == pytest.approx(expected / 0.5, rel=1e-9)
    assert m["throughput/mfu"] == pytest.approx(expected / 0.5 / 1e9, rel=1e-9)
    assert m["throughput/tokens_per_sec"] == pytest.approx(last.trained / 0.5)
    assert m["throughput/samples_per_sec"] == pytest.approx(4 / 0.5)
    assert m["throughput/generated_tokens_per_sec"] == pytest.approx(last.generated / 0.5)
    assert m["throughput/generation_flops_per_sec"] == pytest.approx(generation / 0.5)
    assert m["throughput/tokens"] == sum(s.trained for s in rec.steps)
    assert m["throughput/generated_tokens"] == module.generated_tokens

    # a backend that generates elsewhere (a server) or in its own engine: generation is left out of FLOP/s and MFU
    for backend in ("openai", "vllm"):
        elsewhere = monitor.flops_per_step(replace(last, backend=backend))
        assert elsewhere == pytest.approx((expected - generation, generation))


def test_grpo_with_one_update_per_batch_makes_only_the_reference_forward_only_pass():
    """num_iterations=1 and one minibatch, beta > 0: the old log-probs are the current ones and are not computed, so
    every row goes through one trained pass and one forward-only pass (the reference's)."""
    monitor = TokenThroughput(window_size=2, peak_flops=1e9, clock=FakeClock())
    module = ScriptedGRPO(model_name_or_path="preset:tiny", samples_per_prompt=2, beta=0.1, micro_batch_size=4)
    rec = _fit_online(module, monitor, max_steps=1)
    tokens = int(module.seen[0].attention_mask.sum())
    assert (rec.steps[0].trained, rec.steps[0].forward_only) == (tokens, tokens)


def test_raft_counts_only_the_kept_rows_as_trained():
    """4 samples per prompt, the best half kept (the shortest: reward = -length), 2 SFT epochs, no forward-only pass."""
    monitor = TokenThroughput(window_size=2, peak_flops=1e9, clock=FakeClock())
    module = ScriptedRAFT(model_name_or_path="preset:tiny", samples_per_prompt=4, keep_fraction=0.5, sft_epochs=2,
                          micro_batch_size=8)
    rec = _fit_online(module, monitor, max_steps=4)
    n = TINY.matmul_params
    for rollouts, step in zip(module.seen, rec.steps):
        lengths = rollouts.response_mask.sum(-1)
        kept = torch.tensor([k for k in range(8) if k % 4 in (0, 3)])  # ANSWERS[0] and [3] are the shortest
        assert lengths[kept].max() < lengths.max()
        width = rollouts.prompt_width + int(lengths[kept].max())  # the kept rows, trimmed to their longest response
        assert step.rollouts == 8 and step.generated == int(lengths.sum())
        assert step.trained == 2 * int(rollouts.attention_mask[kept].sum()) < 2 * int(rollouts.attention_mask.sum())
        assert step.trained_seq == width < rollouts.input_ids.size(1)
        assert step.forward_only == 0
    last, m = rec.steps[-1], rec.metrics[-1]
    expected = last.trained * (6 * n + 12 * L_Q * last.trained_seq) + (last.generated + last.prompt_tokens) * 2 * n
    assert m["throughput/flops_per_sec"] == pytest.approx(expected / 0.5, rel=1e-9)
    assert m["throughput/mfu"] == pytest.approx(expected / 0.5 / 1e9, rel=1e-9)
    assert m["throughput/tokens_per_sec"] == pytest.approx(last.trained / 0.5)
    assert m["throughput/samples_per_sec"] == pytest.approx(8 / 0.5)


def test_a_raft_step_that_keeps_nothing_trains_no_tokens_and_is_still_timed():
    monitor = TokenThroughput(window_size=2, peak_flops=1e9, clock=FakeClock())
    module = ScriptedRAFT(model_name_or_path="preset:tiny", samples_per_prompt=4, min_reward=0.0)  # rewards are < 0
    rec = _fit_online(module, monitor, max_steps=-1, max_epochs=2)  # no optimizer step: stop after 2 batches
    assert [s.trained for s in rec.steps] == [0, 0] and [s.rollouts for s in rec.steps] == [8, 8]
    m, last = rec.metrics[-1], rec.steps[-1]
    assert m["throughput/tokens_per_sec"] == 0.0 and m["throughput/samples_per_sec"] == pytest.approx(8 / 0.5)
    assert m["throughput/flops_per_sec"] == pytest.approx((last.generated + last.prompt_tokens) * 2 * TINY.matmul_params
                                                          / 0.5, rel=1e-9)
