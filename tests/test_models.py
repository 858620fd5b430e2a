"""Model factory: offline preset, LoRA / QLoRA / full fine-tuning each train exactly the weights they should."""

import pytest
import torch

from lit_align.models import (LoRAConfig, ModelLoadError, apply_lora, build_preset_model, check_lora_targets,
                              load_causal_lm, load_tokenizer, materialize_preset, parse_preset)


def _one_step(model, steps: int = 1):
    tok = load_tokenizer("preset:tiny")
    batch = tok(["def f(x):\n    return x + 1\n", "def g(s):\n    return s[::-1]\n"], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_preset_is_deterministic_per_seed_and_loads_offline():
    a, _ = build_preset_model("tiny", seed=0)
    b, _ = build_preset_model("tiny", seed=0)
    c, _ = build_preset_model("tiny", seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    loaded = load_causal_lm("preset:tiny")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, wa)
    assert parse_preset("preset:tiny:3") == ("tiny", 3)


def test_byte_tokenizer_round_trips_code():
    tok = load_tokenizer("preset:tiny")
    text = 'def f(x):\n    """Ünïcode ✓."""\n    return x\t+ 1\n'
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(tok) == 260 and tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_full_finetuning_changes_every_weight():
    model = load_causal_lm("preset:tiny")
    before = _snapshot(model)
    _one_step(model)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_lora_trains_only_adapter_weights_on_every_block_linear():
    model = apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(r=4, dropout=0.0))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = _snapshot(model)
    _one_step(model, steps=2)  # lora_B starts at zero, so lora_A only moves from the second step on
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # base, embeddings and LM head untouched


def test_lora_target_list_and_unknown_target():
    model = apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    with pytest.raises(ModelLoadError, match=r"\['query'\] match no linear layer.*q_proj"):
        apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(target_modules=["query"]))


def test_lora_targets_are_checked_from_the_config_alone(monkeypatch):
    """check_lora_targets refuses what apply_lora would refuse, with the same message, without loading a weight."""
    check_lora_targets("preset:tiny", LoRAConfig(target_modules=["q_proj", "layers.1.mlp.down_proj"]))
    check_lora_targets("preset:tiny", LoRAConfig(target_modules="all-linear"))
    with pytest.raises(ModelLoadError) as from_config:
        check_lora_targets("preset:tiny", LoRAConfig(target_modules=["q_proj", "wq"]))
    with pytest.raises(ModelLoadError) as from_weights:
        apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(target_modules=["q_proj", "wq"]))
    assert str(from_config.value) == str(from_weights.value)
    assert str(from_config.value).startswith("lora.target_modules ['wq'] match no linear layer of the model; "
                                             "the transformer blocks have: ['down_proj', 'gate_proj', 'k_proj', ")
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the check must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ModelLoadError, match="wq"):
        check_lora_targets("preset:tiny", LoRAConfig(target_modules=["wq"]))
    # a config that cannot be read (no such hub id, offline) is left to the load, which names the problem
    check_lora_targets("no-such-org/no-such-model-xyz", LoRAConfig(target_modules=["wq"]))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
@pytest.mark.filterwarnings("error:.*gradient_checkpointing_enable:FutureWarning")  # enabled by its current name
def test_qlora_4bit_base_is_frozen_and_adapter_trains(checkpointing):
    bnb = pytest.importorskip("bitsandbytes")
    model = load_causal_lm("preset:tiny", quantize_4bit=True, gradient_checkpointing=checkpointing)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
    model = apply_lora(model, LoRAConfig(r=4, dropout=0.0))
    probe = torch.tensor([[5, 70, 80, 90, 100]])

    def base_logits():  # bitsandbytes' CPU backend repacks 4-bit storage on first use: compare what the base computes
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=probe).logits

    base_before = base_logits()
    before = _snapshot(model)
    _one_step(model, steps=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)
    assert torch.equal(base_logits(), base_before)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=probe).logits, base_before)  # the adapter now changes the output


def test_qlora_gradients_after_an_eval_pass_are_those_of_the_dequantized_model():
    """A pass in eval mode without gradient (validation, a reference pass, generation) made bitsandbytes repack the
    4-bit weights for its CPU inference kernel on CPUs with AVX-512 BF16, and every later training pass ran that kernel,
    which has no backward: the gradient through each 4-bit layer to its input was dropped (layer 0's adapter got 0.58
    of a 0.83 gradient norm). The adapters' gradients now equal those of the same model with the dequantized weights
    in plain linear layers, on any CPU."""
    import copy

    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    model = apply_lora(load_causal_lm("preset:tiny", quantize_4bit=True), LoRAConfig(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the A matrices a gradient
            torch.nn.init.normal_(p, std=0.05)
    dense = copy.deepcopy(model)  # the twin, built before any pass: the 4-bit storage as loaded
    for module in list(dense.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb_functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=child.bias is not None)
                linear.weight.data.copy_(weight)
                linear.requires_grad_(False)
                setattr(module, child_name, linear)
    tok = load_tokenizer("preset:tiny")
    batch = tok(["def f(x):\n    return x + 1\n", "def g(s):\n    return s[::-1]\n"], return_tensors="pt", padding=True)

    def gradients(net):
        net.train()
        loss = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}

    model.eval()
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    loss, grads = gradients(model)
    dense_loss, dense_grads = gradients(dense)
    assert loss == pytest.approx(dense_loss, rel=1e-5) and grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_unknown_model_id_offline_and_missing_directory_are_clear_errors(tmp_path, monkeypatch):
    from lit_align.models import hub_retries_hint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries: the message does not suggest what is already set
    with pytest.raises(ModelLoadError, match=r"could not be loaded from the Hugging Face hub \(no such id, or the hub "
                                             r"is unreachable/offline\)\. Use a local path"):
        load_causal_lm("no-such-org/no-such-model-xyz")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, or retrying an unreachable hub for ~20 s: the message says how not to
    monkeypatch.setattr("lit_align.models.hub_resolves", lambda: True)
    assert hub_retries_hint() == " (on a machine without internet, HF_HUB_OFFLINE=1 skips the hub's retries)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="exists but is not a loadable model directory"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown preset 'huge'"):
        load_causal_lm("preset:huge")


@pytest.fixture
def no_proxy_no_offline(monkeypatch):
    """HF_HUB_OFFLINE and proxies unset, and :func:`hub_resolves` asked afresh (it answers once per process)."""
    from lit_align.models import _PROXY_VARIABLES, hub_resolves

    for name in ("HF_HUB_OFFLINE", *_PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    hub_resolves.cache_clear()
    yield
    hub_resolves.cache_clear()


def test_a_hub_id_where_the_hubs_host_does_not_resolve_reads_the_cache_only(monkeypatch, no_proxy_no_offline):
    """No DNS for the hub (a machine without internet): a hub id loads with local_files_only, so a file not in the
    cache fails at once (instead of ~20 s of retries per file) with a message saying why; local paths and presets
    are untouched."""
    import socket

    from lit_align.models import hub_kwargs, hub_resolves, load_tokenizer

    asked = []

    def no_dns(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert not hub_resolves() and asked == ["huggingface.co"]
    assert hub_kwargs("no-such-org/no-such-model-xyz") == {"local_files_only": True}
    assert hub_kwargs("./some/dir") == {} and hub_kwargs(str(materialize_preset("preset:tiny"))) == {}
    with pytest.raises(ModelLoadError, match=r"unreachable/offline; the hub's host does not resolve here, so only the "
                                             r"local cache was read\)"):
        load_tokenizer("no-such-org/no-such-model-xyz")
    hub_resolves()
    assert len(asked) == 1  # asked once per process


def test_a_hub_dataset_where_the_hubs_host_does_not_resolve_reads_the_cache_only(monkeypatch, no_proxy_no_offline):
    """The same for ``datasets.load_dataset`` (which has no per-call switch): offline for the call only, and the
    error says why."""
    import socket

    import datasets
    from huggingface_hub import constants

    from lit_align.data_modules.sources import DataError, DataSource, load_rows

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    # the offline flag datasets reads (HF_HUB_OFFLINE; HF_DATASETS_OFFLINE in datasets < 3) and huggingface_hub's
    flags = [(m, n) for m in (datasets.config, constants) for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if hasattr(m, n)]
    assert any(m is datasets.config for m, _ in flags) and any(m is constants for m, _ in flags)
    for module, name in flags:
        monkeypatch.setattr(module, name, False)
    seen = []

    def load_dataset(*args, **kwargs):
        seen.append({getattr(module, name) for module, name in flags})
        raise ConnectionError("Couldn't reach 'no-such-org/no-such-dataset' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"cannot load dataset 'no-such-org/no-such-dataset' \(split 'train'\): "
                                        r"ConnectionError: .*; the hub's host does not resolve here, so only the "
                                        r"local cache was read$"):
        load_rows(DataSource(path="no-such-org/no-such-dataset"), ("prompt", "completion"))
    assert seen == [{True}]  # offline during the load
    assert {getattr(module, name) for module, name in flags} == {False}  # and put back after


def test_behind_a_proxy_or_with_dns_the_hub_is_asked_as_usual(monkeypatch, no_proxy_no_offline):
    import socket
    import threading

    from lit_align.models import hub_kwargs, hub_resolves

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.2.3.4", 443))])
    assert hub_resolves() and hub_kwargs("org/name") == {}
    hub_resolves.cache_clear()

    def no_dns(*args, **kwargs):
        raise AssertionError("a proxy resolves names itself: nothing is asked here")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub_resolves() and hub_kwargs("org/name") == {}
    monkeypatch.delenv("HTTPS_PROXY")
    hub_resolves.cache_clear()
    answered = threading.Event()

    def slow_dns(*args, **kwargs):  # a resolver that has not answered when the wait ends: undecided, so asked as usual
        answered.wait(5)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    assert hub_resolves(timeout=0.05)
    answered.set()


def test_materialized_preset_is_a_standard_hf_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path))
    path = materialize_preset("preset:tiny:5")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ref, _ = build_preset_model("tiny", seed=5)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert materialize_preset("preset:tiny:5") == path  # cached, not rebuilt
    # Each transformers major version has its own copy: transformers 4 cannot load a tokenizer saved by 5
    import transformers

    major = int(transformers.__version__.split(".")[0])
    assert path.endswith(f"-transformers{major}")
    monkeypatch.setattr(transformers, "__version__", f"{major - 1}.57.6")
    other = materialize_preset("preset:tiny:5")
    assert other != path and other.endswith(f"-transformers{major - 1}")


def test_lora_weights_stay_float32_over_a_bfloat16_base():
    model = apply_lora(load_causal_lm("preset:tiny", dtype="bfloat16"), LoRAConfig(r=4, modules_to_save=["lm_head"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_a_new_score_head_is_one_line_and_other_load_reports_still_show(tmp_path, caplog):
    """A reward model drawn from a causal LM (lm_head unused, score missing) is what every reward stage does: one
    lit_align line instead of transformers' table; a causal LM loaded from a scorer is a real mismatch and keeps it."""
    import logging

    sft = materialize_preset("preset:tiny")
    transformers_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    transformers_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            scorer = load_causal_lm(sft, head="score")
            assert f"lit_align: {sft} has no score head: a new one is drawn (its lm_head is not loaded)" in caplog.text
            assert "UNEXPECTED" not in caplog.text and "Some weights" not in caplog.text
            scorer.save_pretrained(tmp_path / "scorer")
            caplog.clear()
            load_causal_lm(str(tmp_path / "scorer"), head="score")  # has its head: nothing to say
            load_causal_lm(str(tmp_path / "scorer"), head="lm")
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert "no score head" not in caplog.text
    assert "MISSING" in caplog.text or "newly initialized" in caplog.text  # transformers 5's table, 4's sentence
