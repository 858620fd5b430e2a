"""Prompt sharing in the online objectives' passes over rollouts: each prompt of a micro-batch runs once and its
completions run on its cached keys/values, giving the full-sequence log-probs, values and gradients."""

import pytest
import torch

from lit_align.data_modules.prompts import PromptBatch, PromptSource, load_prompt_items
from lit_align.models import LoRAConfig
from lit_align.modules.grpo import GRPO
from lit_align.modules.ppo import PPO
from test_dpo import ForwardCounter as RowCounter  # rows of every forward pass of a network


def _randomized(module):
    """Non-zero LoRA B weights and value head, drawn from a generator of their own (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or name.startswith("value_head"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def _ppo(**kw):
    module = PPO(samples_per_prompt=3, max_new_tokens=10, micro_batch_size=4, lora=LoRAConfig(r=4), shared_critic=True,
                 temperature=1.0, **kw)
    module.configure_model()
    return _randomized(module)


@pytest.fixture(scope="module")
def rollouts():
    torch.manual_seed(0)
    module = _ppo()
    return module.generate_rollouts(PromptBatch(load_prompt_items(PromptSource(split="train", limit=2))))


def test_statistics_with_shared_prompts_equal_the_full_sequence_ones(rollouts):
    module = _ppo()
    assert rollouts.group_size == 3 and len(rollouts) == 6
    stats, rows = {}, RowCounter(module.model).rows
    for share in (True, False):
        module.hparams.share_prompt = share
        stats[share] = module.rollout_statistics(rollouts, with_values=True, with_reference=True)
    # micro-batches of 4 rows hold prompts [0, 0, 0, 1] and [1, 1]: shared, the policy and the adapter-disabled
    # reference each run 2 prompts then 4 completions, then 1 prompt then 2 completions; unshared, 4 then 2 rows
    assert rows == [2, 4, 2, 4, 1, 2, 1, 2] + [4, 4, 2, 2]
    for key in ("old_logps", "old_values", "ref_logps"):
        assert stats[True][key].shape == rollouts.response_mask.shape
        assert torch.allclose(stats[True][key], stats[False][key], atol=2e-5), key
    assert (stats[True]["old_logps"] != stats[True]["ref_logps"]).any()  # the adapter moved the policy off the reference


@pytest.mark.parametrize("checkpointing,attention", [(False, "sdpa"), (True, "sdpa"), (True, "eager")],
                         ids=["cache", "packed-sdpa", "packed-eager"])
def test_a_pass_with_gradient_shares_prompts_and_gives_the_full_sequence_gradients(rollouts, checkpointing, attention):
    """Rows in a shuffled minibatch order, as run_updates draws them: prompt 1 twice, prompt 0 twice. Each prompt runs
    once, through the KV cache or, under gradient checkpointing, packed with its rows' responses into one row (each
    response seeing the prompt and itself); log-probs, values, logits and gradients equal those of the full rows."""
    module = _ppo(gradient_checkpointing=checkpointing, attn_implementation=attention).train()
    rows = rollouts.rows(torch.tensor([4, 0, 5, 2]))
    grads, outs, counted = {}, {}, RowCounter(module.model).rows
    for share in (True, False):
        module.hparams.share_prompt = share
        module.zero_grad()
        out = module.rollout_forward(rows, with_values=True)
        (out["logps"].sum() + out["values"].pow(2).sum()).backward()
        outs[share] = out
        grads[share] = [p.grad.clone() for p in module.parameters() if p.requires_grad]
    # cache: 2 prompts, then 4 windows on their cache; packed: the run's check (2 packed rows, 4 full rows), then 2
    # packed rows; then the 4 full rows
    assert counted == ([2, 4, 2, 4] if checkpointing else [2, 4, 4])
    mask = rows["response_mask"]
    for key in ("logps", "values"):
        assert torch.allclose(outs[True][key], outs[False][key], atol=2e-5), key
    assert torch.allclose(outs[True]["logits"][mask], outs[False]["logits"][mask], atol=2e-5)  # where they predict
    for a, b in zip(grads[True], grads[False]):  # float32 summation order, as for DPO (tests/test_dpo.py)
        assert (a - b).abs().max() <= (3e-5 if checkpointing else 1e-5) * max(float(b.abs().max()), 1.0)


def test_a_checkpointed_pass_with_gradient_packs_a_prompts_rows_and_nothing_is_shared_without_repeats(rollouts):
    module = _ppo(gradient_checkpointing=True).train()
    counted = RowCounter(module.model).rows
    module.rollout_forward(rollouts.rows(torch.tensor([0, 3])))  # prompts 0 and 1: nothing to share
    assert counted == [2]
    counted.clear()
    # checkpointed, with gradient: no cache; prompt 0 and its 2 rows packed into 1 row (the first time also checked
    # against the 2 full rows, without gradient)
    loss = module.rollout_forward(rollouts.rows(torch.tensor([0, 1])))["logps"].sum()
    loss.backward()
    assert counted == [1, 2, 1] and module.packing.ok
    assert module.model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad is not None
    counted.clear()
    module.hparams.packed_groups = False
    module.rollout_forward(rollouts.rows(torch.tensor([0, 1])))
    assert counted == [2]  # the full rows
    counted.clear()
    with torch.no_grad():
        module.rollout_forward(rollouts.rows(torch.tensor([0, 1])))  # without gradient nothing re-runs: shared
    assert counted == [1, 2]
    assert module._prompt_sharing_ok and all(m.training for m in module.model.modules())


def grpo_loss(module, rollouts):
    """GRPO's (loss, figures) over the first prompt's 3 rollouts: fixed rewards and advantages, the reference
    log-probs from the batch's statistics."""
    rollouts.rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    stats = module.rollout_statistics(rollouts, with_reference=True)
    out = module.rollout_forward(rollouts.rows(torch.arange(3)))
    mask = rollouts.response_mask[:3, :out["logps"].size(1)]
    batch = {"old_logps": None, "ref_logps": stats["ref_logps"][:3, :mask.size(1)], "mask": mask,
             "advantages": torch.tensor([[1.0], [-1.0], [0.0]]).expand_as(mask)}
    return module.compute_loss(out, batch)


def test_grpo_update_runs_the_same_loss_with_and_without_sharing(rollouts):
    losses = {}
    module = GRPO(samples_per_prompt=3, beta=0.1, lora=LoRAConfig(r=4), micro_batch_size=3)
    module.configure_model()
    _randomized(module)
    for share in (True, False):
        module.hparams.share_prompt = share
        losses[share] = grpo_loss(module, rollouts)[0]
    assert losses[True].item() == pytest.approx(losses[False].item(), abs=1e-5)


class NoCacheNoKeep(torch.nn.Module):
    """A decoder without a KV cache or ``logits_to_keep``: a forward taking only the full-sequence arguments."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, attention_mask, position_ids, use_cache, output_hidden_states=False):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, output_hidden_states=output_hidden_states)


def test_a_model_without_cache_or_logits_to_keep_runs_full_sequences_with_a_warning(rollouts, caplog):
    module = _ppo()
    rows = rollouts.rows(torch.arange(4))
    with torch.no_grad():
        expected = module.rollout_forward(rows, with_values=True)
        got = module.rollout_forward(rows, model=NoCacheNoKeep(module.model), with_values=True)
    assert "prompt sharing is not supported by this model" in caplog.text
    assert not module._prompt_sharing_ok and not module._logits_to_keep_ok
    for key in ("logps", "values", "logits"):
        assert torch.allclose(got[key], expected[key], atol=2e-5), key


def test_a_shuffled_minibatch_runs_each_prompts_completions_in_one_micro_batch():
    """run_updates draws a minibatch's rows at random but splits it in rollout order: with K = micro_batch_size = 4,
    every micro-batch of a single update holds one prompt's four completions, whose prompt then runs once."""
    import lightning.pytorch as L

    from lit_align.data_modules.prompts import PromptsDataModule

    seen = []

    class Recording(GRPO):
        def rollout_forward(self, rows, model=None, with_values=False):
            seen.append(rows["index"].tolist())
            return super().rollout_forward(rows, model, with_values)

    torch.manual_seed(0)
    module = Recording(samples_per_prompt=4, micro_batch_size=4, beta=0.0, max_new_tokens=6, execution_timeout_s=1.0)
    data = PromptsDataModule(train_sources=[PromptSource(split="train", limit=2)], val_sources=[],
                             tokenizer="preset:tiny", batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    module.configure_model()
    counted = RowCounter(module.model).rows
    trainer.fit(module, data)
    assert sorted(map(sorted, seen)) == [[0, 1, 2, 3], [4, 5, 6, 7]] and all(s == sorted(s) for s in seen)
    assert counted[-4:] == [1, 4, 1, 4]  # after generation: per micro-batch one prompt, then its 4 completions


@pytest.mark.parametrize("share", [True, False], ids=["shared_prompt", "full_rows"])
def test_raft_loss_over_the_response_window_equals_the_sft_loss_over_full_rows(rollouts, share):
    from lit_align import losses
    from lit_align.modules.raft import RAFT

    module = RAFT(samples_per_prompt=3, lora=LoRAConfig(r=4), share_prompt=share)
    module.configure_model()
    _randomized(module)
    kept = torch.tensor([0, 2, 3, 4])  # two completions of each prompt, as keep_fraction 2/3 would keep
    rows = rollouts.rows(kept)
    counted = RowCounter(module.model).rows
    logits, hidden = module.response_window(rows)
    assert hidden is None and logits.shape[:2] == (4, rows["response_ids"].size(1) + 1)
    assert counted == ([2, 4] if share else [4])
    labels = torch.nn.functional.pad(rows["response_ids"].masked_fill(~rows["response_mask"], losses.IGNORE_INDEX),
                                     (1, 0), value=losses.IGNORE_INDEX)
    full_labels = torch.full_like(rows["input_ids"], losses.IGNORE_INDEX)
    full_labels[:, rollouts.prompt_width:] = labels[:, 1:]
    full = losses.sft_loss(module(rows["input_ids"], rows["attention_mask"], rows["position_ids"]), full_labels)
    assert module.compute_loss(logits, labels).item() == pytest.approx(full.item(), abs=1e-5)


def test_no_sharing_through_a_network_that_gathers_weights_from_other_processes(rollouts, monkeypatch):
    """Under FSDP and ZeRO-3 every process must make the same forward passes: a shared pass is two where another
    process's rows (one per prompt, or none: a zero-loss pass) may need one, so those strategies run full rows."""
    import lit_align.modules.online as online

    module = _ppo()
    counted = RowCounter(module.model).rows
    monkeypatch.setattr(online, "gathers_weights_per_forward", lambda net: net is module.model)
    module._world_size = lambda: 2
    with torch.no_grad():
        module.rollout_forward(rollouts.rows(torch.arange(4)))
    assert counted == [4]
    module._world_size = lambda: 1  # one process gathers from no one: shared
    with torch.no_grad():
        module.rollout_forward(rollouts.rows(torch.arange(4)))
    assert counted == [4, 2, 4]


def test_a_single_token_prompt_runs_full_rows_and_leaves_sharing_on(rollouts):
    """The shared pass runs each prompt but its last token once; a prompt of one token has nothing before it, so
    the micro-batch runs full rows (the same numbers), and sharing stays on for the next one."""
    module = _ppo()
    rows = dict(rollouts.rows(torch.arange(4)))
    p = rollouts.prompt_width
    mask = rows["attention_mask"].clone()
    mask[:3, :p - 1] = 0  # prompt 0 (rows 0-2): only its last token is left
    rows["attention_mask"] = mask
    rows["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    counted = RowCounter(module.model).rows
    with torch.no_grad():
        got = module.rollout_forward(rows)
        module.hparams.share_prompt = False
        full = module.rollout_forward(rows)
    assert counted == [4, 4] and module._prompt_sharing_ok
    assert torch.allclose(got["logps"], full["logps"], atol=2e-5)
