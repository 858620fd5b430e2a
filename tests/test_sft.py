"""SFT module: exact resume, packing without cross-attention, adapter-only checkpoints, learning on the task suite."""

from functools import partial

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_align.data_modules.collate import encode_example, pack_examples, pad_batch, pad_packed_batch
from lit_align.data_modules.sources import DataSource
from lit_align.data_modules.sft import SFTDataModule
from lit_align.models import LoRAConfig, load_causal_lm, load_tokenizer
from lit_align.modules.base import OptimizerConfig, warmup_decay
from lit_align.modules.sft import SFT


class RecordLosses(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class StopAt(Callback):
    """Simulates an interruption: the run is configured for more steps but stops after ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _trainer(tmp_path, max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _data(pairs_file, **kw):
    kw.setdefault("batch_size", 4)
    return SFTDataModule(train_sources=[DataSource(path=pairs_file)], val_fraction=0.0, tokenizer="preset:tiny",
                         max_length=128, **kw)


def _module():
    return SFT(lora=LoRAConfig(r=4, dropout=0.1), optimizer=OptimizerConfig(lr=1e-2, warmup_steps=2))


@pytest.mark.parametrize("max_epochs", [None, 2], ids=["max_steps", "max_epochs_too"])
def test_resume_mid_epoch_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path, pairs_file, recwarn, max_epochs):
    """48 examples / batch 4 = 12 batches per epoch; stop at step 7 (mid-epoch), run to 15 (into epoch 2). The loader's
    position is in the checkpoint (TrainLoader's state), so Lightning has no "dataloader is not resumable" to warn.
    With max_epochs set too, the schedule's length is epochs x batches, which needs the training loader: built before
    Lightning restores the loop state, the loader would start the epoch again from its first batch."""
    make_trainer = partial(_trainer, max_epochs=max_epochs)
    L.seed_everything(0)
    full = RecordLosses()
    make_trainer(tmp_path / "a", 15, [full], enable_checkpointing=False).fit(_module(), datamodule=_data(pairs_file))

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    make_trainer(tmp_path / "b", 15, [ckpt, StopAt(7)]).fit(_module(), datamodule=_data(pairs_file))
    path = tmp_path / "ckpt" / "epoch=0-step=7.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["state_dict"]
    assert state and all("lora_" in k for k in state)  # adapter only: the frozen base is rebuilt from its id
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches_done": 7}]

    L.seed_everything(123)  # a different global seed: the checkpoint's RNG state must win
    resumed = RecordLosses()
    make_trainer(tmp_path / "c", 15, [resumed], enable_checkpointing=False).fit(_module(), datamodule=_data(pairs_file), ckpt_path=path)
    assert sorted(resumed.losses) == list(range(8, 16))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), step
    assert not [w for w in recwarn if "not resumable" in str(w.message)]

    # a checkpoint without the loader's state (written before loaders had one) resumes at the same batch
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    again = RecordLosses()
    make_trainer(tmp_path / "d", 9, [again], enable_checkpointing=False).fit(_module(), datamodule=_data(pairs_file),
                                                                         ckpt_path=tmp_path / "old.ckpt")
    assert again.losses == pytest.approx({step: resumed.losses[step] for step in (8, 9)}, abs=1e-6)


def test_packing_gives_the_same_per_token_logps_as_separate_sequences():
    tok = load_tokenizer("preset:tiny")
    model = load_causal_lm("preset:tiny").eval()
    examples = [encode_example(tok, f"def f{k}(x):\n", f"    return x * {k}\n") for k in (3, 17, 256)]
    separate = pad_batch(examples, tok.pad_token_id)
    packed_items = pack_examples(examples, max_length=200)
    assert len(packed_items) == 1
    packed = pad_packed_batch(packed_items, tok.pad_token_id)
    from lit_align.losses import token_logps

    module = SFT()
    module.model = model
    with torch.no_grad():
        sep_lp, sep_mask = token_logps(module(separate["input_ids"], separate["attention_mask"]), separate["labels"])
        pk_lp, pk_mask = token_logps(module(packed["input_ids"], position_ids=packed["position_ids"]), packed["labels"])
    assert int(pk_mask.sum()) == int(sep_mask.sum())
    assert torch.allclose(pk_lp[pk_mask], sep_lp[sep_mask], atol=1e-5)
    # and attention really is blocked: without position ids the later examples would see the earlier ones
    with torch.no_grad():
        leak_lp, _ = token_logps(model(input_ids=packed["input_ids"]).logits, packed["labels"])
    assert not torch.allclose(leak_lp[pk_mask], sep_lp[sep_mask], atol=1e-3)


def test_warmup_cosine_schedule_values():
    assert warmup_decay(0, 4, 10, "cosine", 0.0) == pytest.approx(0.25)
    assert warmup_decay(3, 4, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert warmup_decay(7, 4, 10, "cosine", 0.0) == pytest.approx(0.5)  # halfway through the 6 decay steps
    assert warmup_decay(10, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert warmup_decay(7, 4, 10, "linear", 0.0) == pytest.approx(0.5)
    assert warmup_decay(9, 4, 10, "constant", 0.0) == 1.0
    asked = []  # a run sized in epochs reads its length once the training loader exists: not before it decays

    def total() -> int:
        asked.append(True)
        return 10

    assert [warmup_decay(s, 4, total, "cosine", 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0] and not asked
    assert warmup_decay(7, 4, total, "cosine", 0.0) == pytest.approx(0.5) and asked


def test_scheduler_steps_per_optimizer_step_under_gradient_accumulation(tmp_path, pairs_file):
    module = SFT(optimizer=OptimizerConfig(lr=1.0, warmup_steps=4, schedule="constant"))
    _trainer(tmp_path, 3, accumulate_grad_batches=2).fit(module, datamodule=_data(pairs_file))
    lr = module.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1.0)  # 3 optimizer steps done (6 micro-batches): the 4th step's warm-up value is 4/4


def test_accumulation_windows_follow_lightnings_steps_and_limit_train_batches(tmp_path, pairs_file):
    """Micro-batches 0-1 step together, and micro-batch 2 alone where limit_train_batches=3 ends the epoch: each
    carries the completion tokens of its own step's micro-batches (the trainer's accumulation and limit, read when
    the epoch's batches are drawn), and the step's gradient is that of one batch of those micro-batches."""
    seen, grads = [], []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            window = batch.get("window_tokens")
            seen.append((None if window is None else int(window), int((batch["labels"][:, 1:] != -100).sum())))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).clone())

    torch.manual_seed(0)
    module = SFT(optimizer=OptimizerConfig(lr=0.0, schedule="constant"))  # lr 0: every step at the same weights
    _trainer(tmp_path, -1, [Watch()], max_epochs=1, limit_train_batches=3, accumulate_grad_batches=2,
             enable_checkpointing=False).fit(module, datamodule=_data(pairs_file, group_by_length=False, batch_size=2))
    (w0, t0), (w1, t1), (w2, t2) = seen
    assert w0 == w1 == t0 + t1 and w2 == t2 and t0 != t1 and len(grads) == 2
    torch.manual_seed(0)  # the first step's two micro-batches as one batch of 4, without accumulation
    whole = SFT(optimizer=OptimizerConfig(lr=0.0, schedule="constant"))
    seen.clear()
    _trainer(tmp_path / "whole", 1, [Watch()], enable_checkpointing=False).fit(
        whole, datamodule=_data(pairs_file, group_by_length=False, batch_size=4))
    assert seen == [(None, t0 + t1)]  # one micro-batch per step: untagged, its own token mean
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_fused_adamw_when_asked_steps_like_the_default_kernels(tmp_path, pairs_file):
    """optimizer.fused: null keeps torch's default kernels on CPU (fused only by itself on CUDA); true runs the fused
    kernel, whose updates are the same AdamW's."""
    trained = {}
    for fused in (None, True):
        torch.manual_seed(0)
        module = SFT(optimizer=OptimizerConfig(lr=1e-2, schedule="constant", weight_decay=0.1, fused=fused))
        _trainer(tmp_path / str(fused), 3, enable_checkpointing=False).fit(module, datamodule=_data(pairs_file))
        assert module.trainer.optimizers[0].defaults["fused"] is fused
        trained[fused] = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    start = load_causal_lm("preset:tiny")  # the weights both runs started from
    assert any(not torch.equal(trained[None][n], p) for n, p in start.named_parameters())  # the steps moved weights
    for name, weight in trained[None].items():  # 3 steps of lr 1e-2: equal to a thousandth of one step's size
        torch.testing.assert_close(trained[True][name], weight, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sft_on_task_suite_lowers_heldout_loss_clearly(tmp_path):
    data = SFTDataModule(tokenizer="preset:tiny", max_length=256, batch_size=16)
    module = SFT(optimizer=OptimizerConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1))
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert before > 4.5  # a random byte-level model: about log(260) = 5.56 nats per token
    assert after < 0.5 * before, (before, after)


@pytest.mark.filterwarnings("error:Found keys")  # the frozen base is absent by design: no warning listing it
def test_load_from_checkpoint_rebuilds_a_lora_module_from_an_adapter_only_checkpoint(tmp_path, pairs_file):
    module = _module()
    _trainer(tmp_path, 3).fit(module, datamodule=_data(pairs_file))
    path = module.trainer.checkpoint_callback.last_model_path or module.trainer.checkpoint_callback.best_model_path
    restored = SFT.load_from_checkpoint(path)
    probe = torch.tensor([[5, 70, 80, 90]])
    module.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(probe), module(probe))
    trained = dict(module.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in restored.named_parameters() if "lora_" in n)
