"""DPO module: reference modes agree, step-0 rewards are exactly 0, one paired forward, the precomputed cache, metrics."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_align import losses
from lit_align.data_modules.preference import PreferenceDataModule, PreferenceSource
from lit_align.models import LoRAConfig
from lit_align.modules.base import OptimizerConfig
from lit_align.modules.dpo import DPO


def _trainer(root, max_steps, callbacks=(), **kw):
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
                     num_sanity_val_steps=0, **kw)


def _small(**kw):
    """20 training tasks, 2 pairs each, no validation: for runs that score the whole dataset."""
    return _data(train_sources=[PreferenceSource(limit=20)], val_sources=[], val_fraction=0.0, **kw)


def _data(**kw):
    kw.setdefault("batch_size", 4)
    return PreferenceDataModule(tokenizer="preset:tiny", max_pairs_per_problem=2, **kw)


@pytest.fixture(scope="module")
def dm():
    data = _data()
    data.setup()
    return data


@pytest.fixture
def batch(dm):
    return dm.collate(dm.train_items[::97][:5])  # 5 pairs from different tasks


def _lora():
    return LoRAConfig(r=4, dropout=0.1)


def _built(**kw):
    module = DPO(**kw)
    module.configure_model()
    return module


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_beta_is_refused_at_construction(beta):
    with pytest.raises(ValueError, match=r"DPO beta must be > 0.*beta=" + str(beta)):
        DPO(beta=beta, model_name_or_path="/no/such/model")  # refused before anything is loaded


def test_bad_reference_settings_are_refused():
    with pytest.raises(ValueError, match="adapter_disabled' needs a LoRA adapter"):
        DPO(reference="adapter_disabled")
    with pytest.raises(ValueError, match="reference must be auto"):
        DPO(reference="ema")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(label_smoothing=0.7)
    with pytest.raises(ValueError, match="reference_placement must be shard or replicate"):
        DPO(reference_placement="offload")
    with pytest.raises(ValueError, match="reference_placement='replicate' places a frozen copy.*adapter_disabled"):
        DPO(lora=LoRAConfig(r=4), reference_placement="replicate")  # auto with LoRA: the adapter-disabled policy


def test_a_replicated_reference_is_no_submodule_and_gives_the_same_reference_logps():
    torch.manual_seed(0)
    shard, replicate = DPO(reference="frozen_copy"), DPO(reference="frozen_copy", reference_placement="replicate")
    for m in (shard, replicate):
        torch.manual_seed(0)
        m.configure_model()
    assert replicate.reference_model is None and replicate.reference_network is not None
    assert not any(n.startswith("reference") for n, _ in replicate.named_parameters())  # outside the module tree
    assert "reference_model.model.embed_tokens.weight" not in replicate.state_dict()
    batch = {"input_ids": torch.randint(3, 200, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :5] = -100
    for a, b in zip(shard.reference_logps(batch), replicate.reference_logps(batch)):
        torch.testing.assert_close(a, b)


def test_auto_reference_is_adapter_disabled_with_lora_and_a_frozen_copy_without():
    with_lora = _built(lora=_lora())
    assert with_lora.reference_mode == "adapter_disabled" and with_lora.reference_model is None
    full = _built()
    assert full.reference_mode == "frozen_copy"
    assert all(not p.requires_grad for p in full.reference_model.parameters())


def test_frozen_copy_scores_in_eval_mode_and_lightning_finds_no_module_in_eval_mode(tmp_path, batch, recwarn):
    """The copy stays in train mode, as the policy, so Lightning's "Found N module(s) in eval mode at the start of
    training" warning has nothing to report; its passes run in eval mode (dropout kept on, so the mode matters)."""
    module = _built(reference="frozen_copy", disable_dropout=False).train()
    modes = []
    module.reference_model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    module.reference_logps(batch)
    assert modes == [False] * len(modes) and modes and module.reference_model.training
    _trainer(tmp_path, 1, enable_checkpointing=False).fit(DPO(reference="frozen_copy"), datamodule=_small(batch_size=2))
    assert not [w for w in recwarn if "eval mode" in str(w.message)]


# ---------------------------------------------------------------- step 0 and reference equivalence
@pytest.mark.parametrize("kw", [dict(lora=_lora()), dict(reference="frozen_copy")], ids=["adapter_disabled", "frozen_copy"])
def test_every_implicit_reward_is_exactly_zero_at_step_0(kw, batch):
    module = _built(beta=0.5, **kw).train()
    policy = module.concatenated_logps(batch)
    ref_chosen, ref_rejected = module.reference_logps(batch)
    per_example, chosen_r, rejected_r = module.compute_loss(policy["chosen_logps"], policy["rejected_logps"],
                                                            ref_chosen, ref_rejected)
    assert torch.equal(chosen_r, torch.zeros(5)) and torch.equal(rejected_r, torch.zeros(5))
    assert per_example.tolist() == pytest.approx([math.log(2.0)] * 5, abs=1e-7)
    assert torch.equal(module.example_margins(batch), torch.zeros(5))


def test_adapter_disabled_reference_equals_a_frozen_copy_of_the_initial_policy(tmp_path, batch):
    L.seed_everything(0)
    trained = DPO(beta=0.5, lora=_lora(), optimizer=OptimizerConfig(lr=2e-2))
    _trainer(tmp_path, 4, enable_checkpointing=False).fit(trained, datamodule=_data())

    L.seed_everything(1)  # a different adapter initialisation: it does not matter, its B matrices start at 0
    copy_ref = _built(beta=0.5, lora=_lora(), reference="frozen_copy")
    copy_ref.model.load_state_dict(trained.model.state_dict())
    a, b = trained.eval(), copy_ref.eval()
    with torch.no_grad():
        ref_a, ref_b = a.reference_logps(batch), b.reference_logps(batch)
        pol_a, pol_b = a.concatenated_logps(batch), b.concatenated_logps(batch)
    assert torch.allclose(ref_a[0], ref_b[0], atol=1e-5) and torch.allclose(ref_a[1], ref_b[1], atol=1e-5)
    loss_a = a.compute_loss(pol_a["chosen_logps"], pol_a["rejected_logps"], *ref_a)[0]
    loss_b = b.compute_loss(pol_b["chosen_logps"], pol_b["rejected_logps"], *ref_b)[0]
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert a.example_margins(batch).abs().min() > 1e-3  # training moved the policy away from the reference


def test_loss_wiring_matches_dpo_loss_of_separate_forward_passes(batch):
    module = _built(beta=0.3, label_smoothing=0.1, lora=_lora())
    with torch.no_grad():
        lora_b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
        for p in lora_b:
            p.normal_(0, 0.05)  # make the policy differ from its reference
        b = batch["input_ids"].size(0) // 2
        full = module.completion_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
        with module.model.disable_adapter():
            ref = module.completion_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
        expected = losses.dpo_loss(full["sum"][:b], full["sum"][b:], ref["sum"][:b], ref["sum"][b:], beta=0.3,
                                   label_smoothing=0.1)[0].mean()
        policy = module.concatenated_logps(batch)
        per_example = module.compute_loss(policy["chosen_logps"], policy["rejected_logps"],
                                          *module.reference_logps(batch))[0]
    # the paired pass computes logits only from the last prompt position on: same numbers as the full pass
    assert torch.allclose(policy["chosen_logps"], full["sum"][:b], atol=1e-4)
    assert torch.allclose(per_example.mean(), expected, atol=1e-5)
    assert abs(expected.item() - math.log(2.0)) > 1e-3


def test_rpo_alpha_adds_the_chosen_token_mean_nll_to_the_dpo_loss(batch):
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        DPO(rpo_alpha=-0.1)
    logged = {}
    values = {}
    for alpha in (0.0, 0.7):
        torch.manual_seed(0)  # the same LoRA A initialisation for both modules
        module = _built(beta=0.3, rpo_alpha=alpha, lora=_lora()).train()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in module.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        module.log_metrics = lambda stage, metrics, **kw: logged.update({alpha: metrics})
        values[alpha] = module.training_step(batch, 0).item()
    b = batch["input_ids"].size(0) // 2
    with torch.no_grad():  # the NLL from an independent full-sequence pass: sum of chosen log-probs / chosen tokens
        full = module.completion_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    chosen_tokens = (batch["labels"][:b, 1:] != losses.IGNORE_INDEX).sum()
    nll = -(full["sum"][:b].sum() / chosen_tokens).item()
    assert "nll" not in logged[0.0] and logged[0.7]["nll"].item() == pytest.approx(nll, abs=1e-4)
    assert values[0.7] == pytest.approx(values[0.0] + 0.7 * nll, abs=1e-4)  # dropout is off: the same DPO term
    assert nll > 1.0  # the term is not negligible: the comparison tests its weight


# ---------------------------------------------------------------- speed contracts
class ForwardCounter:
    def __init__(self, net):
        self.rows = []
        net.register_forward_hook(lambda mod, args, kwargs, out: self.rows.append(kwargs["input_ids"].size(0)),
                                  with_kwargs=True)


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared_prompt", "full_sequences"])
@pytest.mark.parametrize("reference,passes", [("adapter_disabled", 2), ("precomputed", 1)])
def test_one_pass_scores_chosen_and_rejected_together(tmp_path, reference, passes, share_prompt):
    module = DPO(lora=_lora(), reference=reference, share_prompt=share_prompt)
    data = _small(batch_size=3)
    trainer = _trainer(tmp_path, 2, enable_checkpointing=False)
    counters = {}

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "c" not in counters:
                counters["c"] = ForwardCounter(pl_module.model)
            counters["c"].rows.clear()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counters.setdefault("per_step", []).append(list(counters["c"].rows))

    trainer.callbacks.append(Count())
    trainer.fit(module, datamodule=data)
    # a pass: the 3 prompts once, then the 6 completions on their cached keys/values; or the 6 full sequences.
    # (step 0 of the precomputed run also scores the whole dataset once, before the first update)
    one_pass = [3, 6] if share_prompt else [6]
    assert counters["per_step"][-1] == one_pass * passes


def test_frozen_copy_runs_policy_and_reference_once_each(batch):
    module = _built().train()
    policy_rows, ref_rows = ForwardCounter(module.model), ForwardCounter(module.reference_model)
    module.log_metrics = lambda *a, **k: None
    module.training_step(batch, 0).backward()
    assert policy_rows.rows == [5, 10] and ref_rows.rows == [5, 10]
    assert all(p.grad is None for p in module.reference_model.parameters())


@pytest.mark.filterwarnings("error:.*gradient_checkpointing_enable:FutureWarning")  # enabled by its current name
def test_gradient_checkpointing_shares_prompts_through_a_cache_only_in_the_pass_without_gradient(batch):
    """Checkpointed layers re-run in the backward pass, which a pass filling a KV cache cannot: the policy runs one
    packed row per pair (prompt | chosen | rejected), while the adapter-disabled reference (no gradient, nothing re-run)
    shares its prompts through the cache. The first packed pass is checked against full rows once. The loss is the one
    without any sharing, and the modules' training modes are left as they were."""
    module = _built(lora=_lora(), gradient_checkpointing=True).train()
    rows = ForwardCounter(module.model).rows
    module.log_metrics = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    # reference: 5 prompts, then 10 completions on their cache; the check: 5 packed rows and 10 full sequences without
    # gradient; the policy: 5 packed rows
    assert rows == [5, 10, 5, 10, 5] and module.packing.ok
    assert module._prompt_sharing_ok  # the prompt pass returned its cache (transformers < 5 drops it in train mode)
    assert all(m.training for m in module.model.modules())
    rows.clear()
    assert module.training_step(batch, 0).item() == pytest.approx(loss.item(), abs=1e-6) and rows == [5, 10, 5]
    module.hparams.packed_pairs = False  # the policy's 2B full sequences; the reference still shares its cache
    rows.clear()
    assert module.training_step(batch, 0).item() == pytest.approx(loss.item(), abs=1e-6) and rows == [5, 10, 10]
    module.hparams.share_prompt = False
    rows.clear()
    assert module.training_step(batch, 0).item() == pytest.approx(loss.item(), abs=1e-6) and rows == [10, 10]


def test_packing_falls_back_to_full_sequences_where_the_attention_would_not_apply_its_mask(batch, caplog):
    module = _built(gradient_checkpointing=True).train()
    module.model.config._attn_implementation = "flash_attention_2"  # not used with a custom 4D mask at all
    assert not module._use_packed_pairs(batch) and module.packing.ok is None
    module.model.config._attn_implementation = "sdpa"
    forward = module.model.forward

    def ignoring_masks(*args, attention_mask=None, **kwargs):  # an architecture that drops a 4D mask
        return forward(*args, attention_mask=attention_mask if attention_mask.dim() == 2 else None, **kwargs)

    module.model.forward = ignoring_masks
    rows = ForwardCounter(module.model).rows
    out = module.concatenated_logps(batch)
    assert module.packing.ok is False and "packed pairs differ from full sequences" in caplog.text
    assert rows == [5, 10, 10]  # the check (packed, full), then full sequences
    module.hparams.share_prompt = False
    reference = module.concatenated_logps(batch)
    assert torch.allclose(out["chosen_logps"], reference["chosen_logps"])


@pytest.mark.filterwarnings("error:.*past_key_values:FutureWarning")  # the KV cache goes by its current name
@pytest.mark.parametrize("checkpointing,attention", [(False, "sdpa"), (True, "sdpa"), (True, "eager")],
                         ids=["cache", "packed-sdpa", "packed-eager"])
def test_shared_prompt_passes_give_the_full_sequence_numbers_and_gradients(batch, checkpointing, attention):
    """The prompt computed once (through the KV cache; under gradient checkpointing one packed row per pair, the
    rejected tokens masked from the chosen and positioned after the prompt): each completion's log-probability and the
    gradients equal those of the 2B full sequences (share_prompt: false), to float32 rounding."""
    module = _built(lora=_lora(), gradient_checkpointing=checkpointing, attn_implementation=attention).train()
    gen = torch.Generator().manual_seed(0)  # not the global RNG: other tests' draws must not change this one's weights
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    grads, sums = {}, {}
    for share in (True, False):
        module.hparams.share_prompt = share
        module.zero_grad()
        out = module.concatenated_logps(batch)
        (out["chosen_logps"].sum() - 2 * out["rejected_logps"].sum()).backward()
        grads[share] = [p.grad.clone() for p in module.parameters() if p.requires_grad]
        sums[share] = torch.cat([out["chosen_logps"], out["rejected_logps"]])
        assert out["mask"].sum() == (batch["labels"] != losses.IGNORE_INDEX).sum()  # every completion token, once
    assert torch.allclose(sums[True], sums[False], atol=1e-4)
    assert module.packing.ok is (True if checkpointing else None)  # packed rows ran only where the cache could not
    # float32 summation order: differences measured at 2-4e-6 of each tensor's largest gradient over 8 random inits
    # through the cache, up to 5e-6 over 20 inits and 1.1e-5 in 1 of 13 runs packed (its attention sums over other
    # keys); a wrong mask or position is O(1)
    for a, b in zip(grads[True], grads[False]):
        assert (a - b).abs().max() <= (3e-5 if checkpointing else 1e-5) * b.abs().max()
    if checkpointing:  # and packed rows give the cache's token log-probabilities
        with torch.no_grad():
            packed, mask = module._packed_token_logps(batch, None)
            cached, cached_mask = module._shared_prompt_token_logps(batch, None)
        assert torch.equal(mask, cached_mask) and (packed - cached).abs().max() < 1e-4


# ---------------------------------------------------------------- precomputed reference
def test_precomputed_cache_matches_live_reference_under_shuffling(tmp_path, dm):
    L.seed_everything(0)
    module = DPO(lora=_lora(), reference="precomputed", optimizer=OptimizerConfig(lr=1e-2))
    data = _small()
    _trainer(tmp_path, 3, enable_checkpointing=False).fit(module, datamodule=data)
    cache = module._ref_cache
    assert cache["key"].numel() == len(data.train_items) == 40  # 2 pairs x 20 tasks
    shuffled = [data.train_items[i] for i in torch.randperm(len(data.train_items), generator=torch.Generator().manual_seed(3))[:6]]
    batch = data.collate(shuffled)
    module.eval()
    cached = module.reference_logps(batch)
    module.reference_mode = "adapter_disabled"
    live = module.reference_logps(batch)
    assert torch.allclose(cached[0], live[0], atol=1e-4) and torch.allclose(cached[1], live[1], atol=1e-4)


def test_precomputed_cache_is_restored_from_the_checkpoint_on_resume(tmp_path):
    L.seed_everything(0)
    data = _small()
    first = DPO(reference="precomputed", optimizer=OptimizerConfig(lr=1e-2))  # full fine-tuning: no live reference
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path / "a", 2, [ckpt]).fit(first, datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert torch.equal(saved["lit_align_reference_cache"]["key"], first._ref_cache["key"])

    resumed = DPO(reference="precomputed", optimizer=OptimizerConfig(lr=1e-2))
    resumed.precompute_reference = lambda: pytest.fail("a resumed run must not recompute the reference")
    _trainer(tmp_path / "b", 4, enable_checkpointing=False).fit(resumed, datamodule=_small(),
                                                                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert resumed.trainer.global_step == 4
    assert torch.equal(resumed._ref_cache["chosen"], first._ref_cache["chosen"])


def test_precomputed_full_finetuning_refuses_pairs_it_cannot_score_after_training_started(dm, batch):
    module = _built(reference="precomputed")
    module._ref_cache_built = True  # as after a run whose DataModule did not hold these pairs
    module._loaded_from_checkpoint = True
    with pytest.raises(ValueError, match="not in the reference cache"):
        module.reference_logps(batch)


# ---------------------------------------------------------------- margins and metrics
def test_example_margins_are_per_pair_without_gradient_and_restore_the_mode(batch):
    module = _built(beta=2.0, lora=_lora()).train()
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    margins = module.example_margins(batch)
    assert margins.shape == (5,) and not margins.requires_grad and module.training
    with torch.no_grad():
        module.eval()
        policy = module.concatenated_logps(batch)
        rc, rr = module.reference_logps(batch)
    expected = 2.0 * ((policy["chosen_logps"] - rc) - (policy["rejected_logps"] - rr))
    assert torch.allclose(margins, expected, atol=1e-5)


def test_training_logs_the_preference_metrics(tmp_path):
    module = DPO(lora=_lora())
    trainer = _trainer(tmp_path, 2, enable_checkpointing=False, limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, datamodule=_data())
    names = set(trainer.callback_metrics)
    for stage in ("train", "val"):
        for metric in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                       "logps/chosen", "logps/rejected"):
            assert f"{stage}/{metric}" in names, f"{stage}/{metric}"
    m = trainer.callback_metrics
    assert m["val/rewards/margins"].item() == pytest.approx(
        (m["val/rewards/chosen"] - m["val/rewards/rejected"]).item(), abs=1e-5)


@pytest.mark.slow
def test_dpo_raises_heldout_accuracy_well_above_chance(tmp_path):
    L.seed_everything(0)
    module = DPO(beta=0.1, optimizer=OptimizerConfig(lr=5e-3, warmup_steps=5))
    data = PreferenceDataModule(tokenizer="preset:tiny", batch_size=8, eval_batch_size=64)
    _trainer(tmp_path, 40, enable_checkpointing=False).fit(module, datamodule=data)  # accuracy ~0.76 from step 35 on
    result = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       ).validate(module, datamodule=data, verbose=False)[0]
    assert len(data.val_items) == 324  # every pair of the held-out tasks
    assert result["val/rewards/accuracies"] > 0.65
    assert result["val/rewards/margins"] > 0


def test_a_data_module_that_does_not_say_what_it_holds_is_judged_by_its_first_batch():
    """A user's DataModule with no ``batch_kind``: DPO trained on an SFT DataModule's batches without an error (their
    rows read as pairs); now its first batch's layout is refused, before any update (also for SFT on pairs). One that
    says ``batch_kind = "preference"`` is taken at its word."""
    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataError, DataSource
    from lit_align.modules.sft import SFT

    class MyRows(SFTDataModule):
        batch_kind = None

    class MyPairs(PreferenceDataModule):
        batch_kind = None

    def fit(module, data, sanity_steps=0):
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=sanity_steps)
        trainer.fit(module, datamodule=data)
        return trainer

    rows = dict(train_sources=[DataSource(limit=8)], val_fraction=0.25, tokenizer="preset:tiny", batch_size=2)
    dpo = DPO(lora=LoRAConfig(r=4))
    with pytest.raises(DataError, match=r"DPO trains on preference batches, but the first batch of MyRows is laid out "
                                        r"as sft batches \(it holds attention_mask, input_ids, labels\), which it "
                                        r"would misread; use --data PreferenceDataModule, or"):
        fit(dpo, MyRows(**rows), sanity_steps=1)  # refused at the sanity check's first batch
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(DataError, match="SFT trains on sft batches, but the first batch of MyPairs is laid out as "
                                        "preference batches"):
        trainer.fit(SFT(), datamodule=MyPairs(train_sources=[PreferenceSource(limit=8)], val_sources=[],
                                              val_fraction=0.0, tokenizer="preset:tiny", batch_size=2))
    assert trainer.global_step == 0  # refused before any update

    class SaysPairs(SFTDataModule):  # its own word is taken: rows read as pairs, as it says they are
        batch_kind = "preference"

    assert fit(DPO(lora=LoRAConfig(r=4)), SaysPairs(**rows)).global_step == 2
