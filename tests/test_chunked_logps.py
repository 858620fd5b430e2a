"""logits_chunk_size: the LM head and log-softmax a chunk of tokens at a time give the logits' own log-probabilities and
gradients (the kernel; SFT; DPO and ORPO through each of their passes), keep no (tokens x vocabulary) tensor for the
backward pass, and fall back to the logits where the model post-processes them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lit_align import losses
from lit_align.data_modules.preference import PreferenceDataModule
from lit_align.models import LoRAConfig
from lit_align.modules.chunked_logps import chunked_target_logps, lm_head
from lit_align.modules.dpo import DPO
from lit_align.modules.orpo import ORPO
from lit_align.modules.sft import SFT


def _grads_of(tensors, scalar):
    return torch.autograd.grad(scalar, tensors)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_gives_cross_entropys_values_and_gradients(chunk, bias):
    gen = torch.Generator().manual_seed(chunk)
    n, h, v = 120, 16, 300
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)  # any downstream use of the log-probabilities (DPO's weights per row)
    inputs = [hidden, weight] + ([b] if bias else [])
    expected = -F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="none")
    got = chunked_target_logps(hidden, weight, b, targets, chunk)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    for g, e in zip(_grads_of(inputs, (got * upstream).sum()), _grads_of(inputs, (expected * upstream).sum())):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_target_logps(hidden, weight, b, targets, 0)


def test_the_kernel_keeps_no_logits_for_the_backward_pass_and_follows_autocast():
    n, h, v = 64, 8, 500
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        chunked_target_logps(hidden, weight, None, targets, 16).sum().backward()
    assert saved and all(v not in shape or shape == (v, h) for shape in saved), saved  # the weight, not (n, v)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        F.cross_entropy(F.linear(hidden, weight), targets)
    assert (n, v) in saved  # what the logits' own path keeps
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's matmul in the autocast dtype, as the LM head's
        got = chunked_target_logps(hidden, weight, None, targets, 16)
        expected = -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()  # bf16 logits' rounding, summed differently
    exact = -F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    assert (got - exact).abs().max() > 1e-4  # so the matmul did run in bf16


def _sft_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (3, 24), generator=gen)
    labels = ids.clone()
    labels[:, :9] = losses.IGNORE_INDEX  # prompts
    labels[2, 17:] = losses.IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sft_step(chunk, batch, **kw):
    torch.manual_seed(0)
    module = SFT(logits_chunk_size=chunk, **kw)
    module.configure_model()
    module.log_metrics = lambda *a, **k: None
    if module.lora_config is not None:
        with torch.no_grad():
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    loss = module.shared_step(batch, "train")
    loss.backward()
    return module, loss, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kw", [{}, {"lora": LoRAConfig(r=4, dropout=0.0), "gradient_checkpointing": True}],
                         ids=["full", "lora-checkpointing"])
def test_sft_loss_and_gradients_through_chunks_equal_the_logits(kw):
    batch = _sft_batch()
    _, loss, grads = _sft_step(None, batch, **kw)
    module, chunked_loss, chunked_grads = _sft_step(5, batch, **kw)
    assert module.chunked_logps.ok is True  # checked once and used
    assert torch.allclose(chunked_loss, loss, atol=1e-6)
    assert chunked_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert (chunked_grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-8, name
    # a packed batch (position ids, no mask): the block-diagonal mask goes to the backbone too
    packed = {"input_ids": batch["input_ids"][:2].reshape(1, -1), "labels": batch["labels"][:2].reshape(1, -1),
              "position_ids": torch.arange(24).repeat(2).unsqueeze(0)}
    _, loss, _ = _sft_step(None, packed, **kw)
    _, chunked_loss, _ = _sft_step(5, packed, **kw)
    assert torch.allclose(chunked_loss, loss, atol=1e-6)


def test_bad_chunk_sizes_and_an_overridden_sft_loss_are_refused():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="logits_chunk_size must be >= 1"):
            SFT(logits_chunk_size=bad, model_name_or_path="/no/such/model")
        with pytest.raises(ValueError, match="logits_chunk_size must be >= 1"):
            DPO(logits_chunk_size=bad, model_name_or_path="/no/such/model")

    class Focal(SFT):
        def compute_loss(self, logits, labels):
            return super().compute_loss(logits, labels) * 2

    with pytest.raises(ValueError, match="Focal overrides compute_loss"):
        Focal(logits_chunk_size=8)
    Focal()  # without chunks the override is used as before


@pytest.fixture(scope="module")
def pairs():
    dm = PreferenceDataModule(tokenizer="preset:tiny", batch_size=4, max_pairs_per_problem=2)
    dm.setup()
    return dm.collate(dm.train_items[::97][:4])


@pytest.mark.parametrize("path", ["cache", "packed", "full"])
@pytest.mark.parametrize("cls", [DPO, ORPO])
def test_preference_log_probabilities_through_chunks_equal_the_logits(pairs, path, cls):
    """Each of the paired passes (prompt through the KV cache; packed rows under checkpointing; the 2B full rows)
    gives the same completion log-probabilities and gradients through chunks as through the logits."""
    kw = {"lora": LoRAConfig(r=4, dropout=0.0), "share_prompt": path != "full",
          "gradient_checkpointing": path == "packed"}
    results = {}
    for chunk in (None, 6):
        torch.manual_seed(0)  # the same LoRA initialization
        module = cls(logits_chunk_size=chunk, **kw)
        module.configure_model()
        with torch.no_grad():
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        out = module.concatenated_logps(pairs)
        (out["chosen_logps"].sum() - 2 * out["rejected_logps"].sum()).backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        results[chunk] = (out, grads, module)
    (out, grads, _), (chunked, chunked_grads, module) = results[None], results[6]
    assert module.chunked_logps.ok is True
    assert module.packing.ok is (True if path == "packed" else None)  # the pass meant ran
    assert torch.equal(chunked["mask"], out["mask"])
    assert torch.allclose(chunked["token_logps"], out["token_logps"], atol=1e-5)
    for g, e in zip(chunked_grads, grads):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max()


def test_a_model_that_post_processes_its_logits_keeps_them(pairs, caplog):
    """A head the backbone's hidden states do not give alone (here: logits scaled after the head, as some architectures
    do) fails the one-time check: a warning, and the logits' own numbers from then on."""
    module = DPO(lora=LoRAConfig(r=4, dropout=0.0), logits_chunk_size=8, share_prompt=False)
    module.configure_model()
    base = module.model.get_base_model()
    original = base.forward

    def scaled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    base.forward = scaled
    assert lm_head(module.model) is not None  # it looks like a plain head
    with caplog.at_level(logging.WARNING):
        out = module.concatenated_logps(pairs)
    assert module.chunked_logps.ok is False and "chunked LM head differ" in caplog.text
    module.hparams.logits_chunk_size = None
    assert torch.allclose(out["token_logps"], module.concatenated_logps(pairs)["token_logps"])


# ---------------------------------------------------------------- the online objectives' passes over rollouts
@pytest.fixture(scope="module")
def rollouts():
    from lit_align.data_modules.prompts import PromptBatch, PromptSource, load_prompt_items
    from test_online_prompt_sharing import _ppo

    torch.manual_seed(0)
    return _ppo().generate_rollouts(PromptBatch(load_prompt_items(PromptSource(split="train", limit=2))))


@pytest.mark.parametrize("path", ["cache", "packed", "full"])
def test_online_log_probabilities_entropy_values_and_gradients_through_chunks_equal_the_logits(rollouts, path):
    """PPO's pass over rollouts (prompts shared through the KV cache; packed under checkpointing; full rows): log-probs,
    values, the entropy the losses read (``token_entropy``) and the gradients of all three are the logits' own."""
    from lit_align.modules.online import OnlineModule
    from test_online_prompt_sharing import _ppo

    rows = rollouts.rows(torch.tensor([4, 0, 5, 2]))
    mask = rows["response_mask"]
    results = {}
    for chunk in (None, 5):
        torch.manual_seed(0)
        module = _ppo(gradient_checkpointing=path == "packed", share_prompt=path != "full",
                      logits_chunk_size=chunk).train()
        out = module.rollout_forward(rows, with_values=True)
        entropy = OnlineModule.token_entropy(out) * mask
        (out["logps"].sum() + out["values"].pow(2).sum() + entropy.sum()).backward()
        results[chunk] = (out, entropy, [p.grad for p in module.parameters() if p.requires_grad], module)
    (out, entropy, grads, _), (chunked, chunked_entropy, chunked_grads, module) = results[None], results[5]
    assert module.chunked_logps.ok is True and "logits" not in chunked
    assert module.packing.ok is (True if path == "packed" else None)
    for key in ("logps", "values"):
        assert torch.allclose(chunked[key], out[key], atol=2e-5), key
    assert torch.allclose(chunked_entropy, entropy, atol=2e-5)
    for g, e in zip(chunked_grads, grads):
        assert (g - e).abs().max() <= 1e-5 * max(float(e.abs().max()), 1.0)


def test_grpo_and_raft_losses_through_chunks_equal_the_logits(rollouts):
    from lit_align.modules.grpo import GRPO
    from lit_align.modules.raft import RAFT
    from test_online_prompt_sharing import _randomized, grpo_loss

    grpo, raft = {}, {}
    for chunk in (None, 4):
        torch.manual_seed(0)
        module = GRPO(samples_per_prompt=3, beta=0.1, lora=LoRAConfig(r=4), micro_batch_size=3, logits_chunk_size=chunk)
        module.configure_model()
        _randomized(module)
        loss, figures = grpo_loss(module, rollouts)
        grpo[chunk] = (loss.item(), figures["entropy"].item())
        torch.manual_seed(0)
        module = RAFT(samples_per_prompt=3, lora=LoRAConfig(r=4), logits_chunk_size=chunk)
        module.configure_model()
        _randomized(module)
        seen = []
        module.run_updates = lambda n, loss_fn, *a, **k: seen.append(loss_fn(torch.arange(n))[0].item()) or {}
        rollouts.rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
        module.update(rollouts)
        raft[chunk] = seen[0]
    assert grpo[4] == pytest.approx(grpo[None], abs=1e-5) and raft[4] == pytest.approx(raft[None], abs=1e-5)

    class Weighted(RAFT):
        def compute_loss(self, logits, labels):
            return super().compute_loss(logits, labels) * 2

    with pytest.raises(ValueError, match="Weighted overrides compute_loss"):
        Weighted(logits_chunk_size=8)


def test_the_head_module_computes_the_planned_calls_in_chunks_and_gets_its_forward_back():
    """head_in_chunks: each call of the head module does what its plan says (the chunked log-probabilities and
    entropies of the selected hidden states, or with None the head's own logits), the returned ``logits`` are those,
    and the head module's forward is its own again afterwards: after the pass, after an error inside it, and where
    the model called its head more or fewer times than planned (HeadNotCalled)."""
    from lit_align.modules.chunked_logps import HeadNotCalled, head_in_chunks

    module = SFT(model_name_or_path="preset:tiny")
    module.configure_model()
    net = module.model
    head = lm_head(net)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 5:].clone()
    targets[1, -2:] = losses.IGNORE_INDEX  # nothing wanted there: 0
    logits = net(input_ids=ids).logits
    expected, _ = losses.target_logps(logits[:, 4:-1], targets)
    probs = logits[:, 4:-1].float().softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) * (targets != losses.IGNORE_INDEX)
    with head_in_chunks(net, [None, (lambda hidden: hidden[:, 4:-1], targets)], chunk=5, entropy=True):
        first = net(input_ids=ids, logits_to_keep=1).logits
        second = net(input_ids=ids).logits
    assert torch.allclose(first, logits[:, -1:], atol=1e-6)  # the head's own logits where the plan says None
    assert second.shape == (2, 7, 2)
    assert torch.allclose(second[..., 0], expected, atol=1e-5) and torch.allclose(second[..., 1], entropy, atol=1e-4)
    assert "forward" not in head.__dict__
    with pytest.raises(HeadNotCalled, match="more often"):
        with head_in_chunks(net, [(lambda hidden: hidden, targets)], chunk=5):
            net(input_ids=ids[:, :7])
            net(input_ids=ids[:, :7])
    with pytest.raises(HeadNotCalled, match="forward did not call its LM head module"):
        with head_in_chunks(net, [(lambda hidden: hidden, targets)], chunk=5):
            pass
    with pytest.raises(RuntimeError, match="no cache"):
        with head_in_chunks(net, [None, None], chunk=5):
            net(input_ids=ids)
            raise RuntimeError("no cache")  # a pass that fails half-way (a model without a KV cache)
    assert "forward" not in head.__dict__ and torch.equal(net(input_ids=ids).logits, logits)


def test_a_model_that_computes_its_logits_without_calling_its_head_module_keeps_them(pairs, caplog):
    """The chunked head stands in for the head module's forward inside the model's forward (where FSDP and ZeRO-3
    hold its weight whole); a model that multiplies by the head's weight itself never calls it: the one-time check
    fails, with a warning saying so, and the logits' own numbers run from then on."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    module = DPO(lora=LoRAConfig(r=4, dropout=0.0), logits_chunk_size=8, share_prompt=False)
    module.configure_model()
    base = module.model.get_base_model()

    def by_weight(input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs).last_hidden_state
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return CausalLMOutputWithPast(logits=F.linear(hidden, base.lm_head.weight))

    base.forward = by_weight
    with caplog.at_level(logging.WARNING):
        out = module.concatenated_logps(pairs)
    assert module.chunked_logps.ok is False and caplog.text.count("did not call its LM head module") == 1
    assert "forward" not in base.lm_head.__dict__  # the head module's own forward is back
    module.hparams.logits_chunk_size = None
    assert torch.equal(out["token_logps"], module.concatenated_logps(pairs)["token_logps"])
