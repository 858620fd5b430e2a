"""The memory planner: parameter counts, the activation rules tensor by tensor, sharding, the command, and the
estimate against peaks measured on CPU (the acceptance criterion: within 15% for at least three configurations)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lit_align import memory
from lit_align.memory import (
    NF4_BYTES_PER_PARAM,
    ModelShape,
    PlanError,
    PlanInputs,
    estimate,
    inputs_from_config,
    layer_activation_bytes,
    preset_config,
)
from lit_align.models import LoRAConfig, apply_lora, build_preset_model

REPO = Path(__file__).resolve().parents[1]
TINY = ModelShape.from_hf_config(preset_config("tiny"))
TINY_BASE = ModelShape.from_hf_config(preset_config("tiny-base"))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------- counts
def test_parameter_counts_from_the_config_match_the_built_model():
    model, _ = build_preset_model("tiny-base")
    assert TINY_BASE.total_params == sum(p.numel() for p in model.parameters()) == 4_855_040
    assert TINY_BASE.matmul_params == 4_855_040 - 260 * 256 - 13 * 256  # everything but the embedding and the norms
    peft_model = apply_lora(model, LoRAConfig(r=16))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert TINY_BASE.lora_params(16, memory.BLOCK_LINEARS) == lora == 466_944
    only_q = apply_lora(build_preset_model("tiny-base")[0], LoRAConfig(r=4, target_modules=["q_proj"]))
    assert TINY_BASE.lora_params(4, ("q_proj",)) == sum(p.numel() for n, p in only_q.named_parameters() if "lora_" in n)


def test_a_reward_model_is_planned_with_its_score_head_not_the_lm_head():
    """Training the reward model (objective reward): the decoder under a one-output score head, as load_causal_lm
    builds it with head="score", so the weights, gradients and AdamW state of the LM head are not counted."""
    from lit_align.models import load_causal_lm

    scorer = load_causal_lm("preset:tiny-base", head="score")
    plan = estimate(PlanInputs(shape=TINY_BASE, objective="reward", accelerator="cpu"))
    assert plan.params["total"] == sum(p.numel() for p in scorer.parameters()) == 4_855_040 - 260 * 256 + 256
    assert plan.params["trainable"] == plan.params["total"]  # full fine-tuning
    lm = estimate(PlanInputs(shape=TINY_BASE, objective="sft", accelerator="cpu"))
    assert lm.row("weights") - plan.row("weights") == (260 * 256 - 256) * 4  # fp32


def test_qwen2_biases_and_tied_heads_are_counted():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    shape = ModelShape.from_hf_config(cfg)
    assert shape.total_params == sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())


def test_weights_of_qlora_are_nf4_with_double_quantization_overhead():
    base = PlanInputs(shape=TINY_BASE, lora_r=8, quantize_4bit=True, dtype="bfloat16", accelerator="cpu")
    plan = estimate(base)
    block = TINY_BASE.num_layers * TINY_BASE.block_linear_params()
    other = TINY_BASE.total_params - block
    lora = TINY_BASE.lora_params(8, memory.BLOCK_LINEARS)
    # 0.5 byte per 4-bit value + 1/64 (8-bit absmax per 64) + 4/16384 (fp32 absmax per 256 blocks); the rest in fp32
    assert NF4_BYTES_PER_PARAM == pytest.approx(0.515869, abs=1e-6)
    assert plan.row("weights") == pytest.approx(block * NF4_BYTES_PER_PARAM + other * 4 + lora * 4)
    assert plan.row("gradients") == lora * 4 and plan.row("optimizer state") == 2 * lora * 4
    with pytest.raises(PlanError, match="quantize_4bit needs model.init_args.lora"):
        estimate(PlanInputs(shape=TINY_BASE, quantize_4bit=True))
    with pytest.raises(PlanError, match="not supported under DeepSpeed ZeRO-3"):
        estimate(PlanInputs(shape=TINY_BASE, lora_r=8, quantize_4bit=True, strategy="deepspeed_stage_3", devices=2))


# ---------------------------------------------------------------------------------------------------------- activations
def _saved_bytes_per_token(dtype, autocast, lora_dropout, padded, batch=3, seq=40):
    """Bytes autograd saves per token inside decoder layer 1 of a 2-layer Llama, measured with saved-tensor hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=260, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    if lora_dropout is not None:
        model = apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=lora_dropout)).base_model.model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer = model.model.layers[1]
    inside, seen = [False], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        per_token = t.dim() > 0 and t.shape[0] in (batch, batch * seq)  # autocast's weight copies are not per token
        if inside[0] and per_token and ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    ids = torch.randint(4, 260, (batch, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -4:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values()) / (batch * seq)


RULE_CASES = {
    # name: (weights dtype, autocast, LoRA dropout or None for full fine-tuning, padded, planner dtype/precision)
    "fp32-full": (torch.float32, False, None, False, "float32", "32-true"),
    "fp32-full-padded-gqa": (torch.float32, False, None, True, "float32", "32-true"),
    "autocast-full": (torch.float32, True, None, False, "float32", "bf16-mixed"),
    "bf16-full": (torch.bfloat16, False, None, False, "bfloat16", "32-true"),
    "fp32-lora-dropout": (torch.float32, False, 0.05, False, "float32", "32-true"),
    "fp32-lora-no-dropout": (torch.float32, False, 0.0, False, "float32", "32-true"),
    "autocast-lora-dropout": (torch.float32, True, 0.05, True, "float32", "bf16-mixed"),
    "bf16-lora-dropout": (torch.bfloat16, False, 0.05, False, "bfloat16", "32-true"),
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_activation_rules_equal_the_tensors_autograd_saves(name):
    dtype, autocast, dropout, padded, plan_dtype, precision = RULE_CASES[name]
    shape = ModelShape(vocab_size=260, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32)
    inputs = PlanInputs(shape=shape, seq_len=40, lora_r=8 if dropout is not None else None, lora_dropout=dropout or 0.0,
                        dtype=plan_dtype, precision=precision, padded=padded, accelerator="cpu")
    measured = _saved_bytes_per_token(dtype, autocast, dropout, padded)
    assert layer_activation_bytes(inputs, full_finetune=dropout is None) == measured


# ---------------------------------------------------------------------------------------------------------- sharding
def _static(plan):
    return {k: plan.row(k) for k in ("weights", "gradients", "optimizer state", "fp32 master weights")}


def test_strategies_divide_what_they_shard():
    base = dict(shape=TINY_BASE, devices=8, precision="bf16-mixed")
    ddp = _static(estimate(PlanInputs(strategy="ddp", **base)))
    fsdp = estimate(PlanInputs(strategy="fsdp", **base))
    z2 = _static(estimate(PlanInputs(strategy="deepspeed_stage_2", **base)))
    z3 = _static(estimate(PlanInputs(strategy="deepspeed_stage_3", **base)))
    p = TINY_BASE.total_params
    assert ddp == {"weights": 4 * p, "gradients": 4 * p, "optimizer state": 8 * p, "fp32 master weights": 0}
    assert estimate(PlanInputs(strategy="ddp", **base)).row("DDP gradient buckets") == 4 * p
    assert _static(fsdp) == {"weights": 4 * p / 8, "gradients": 4 * p / 8, "optimizer state": 8 * p / 8,
                             "fp32 master weights": 0}
    assert fsdp.row("gathered weights") > 0 and fsdp.row("autocast weight copies") == 0
    # DeepSpeed bf16: half-precision module, fp32 master weights and moments in the (sharded) optimizer
    assert z2 == {"weights": 2 * p, "gradients": 2 * p / 8, "optimizer state": 8 * p / 8, "fp32 master weights": 4 * p / 8}
    assert z3 == {"weights": 2 * p / 8, "gradients": 2 * p / 8, "optimizer state": 8 * p / 8,
                  "fp32 master weights": 4 * p / 8}
    offload = estimate(PlanInputs(strategy="deepspeed_stage_2_offload", **base))
    assert offload.row("optimizer state") == 0 and any("host memory" in a for a in offload.assumptions)


def test_deepseek_coder_full_finetune_matches_the_reports_rule_of_four():
    """The report's table: fp32 training needs weights + gradients + 2 Adam moments = 4x the weights at the step."""
    shape = ModelShape(vocab_size=32256, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
                       num_kv_heads=16, head_dim=128)
    plan = estimate(PlanInputs(shape=shape, batch_size=1, seq_len=512))
    assert shape.total_params == pytest.approx(1.346e9, rel=1e-3)
    assert plan.phases["optimizer step"] >= 4 * plan.row("weights")
    assert plan.row("weights") / 1e9 == pytest.approx(5.385, rel=1e-3)
    lora = estimate(PlanInputs(shape=shape, batch_size=1, seq_len=512, lora_r=32, dtype="bfloat16",
                               precision="bf16-mixed", lora_dropout=0.05))
    assert lora.params["trainable"] / shape.total_params == pytest.approx(0.0223, abs=1e-3)  # r=32 on all linears
    assert lora.row("autocast weight copies") == 0  # bf16 base weights need no cast copies


# ---------------------------------------------------------------------------------------------------------- configs
def test_objectives_resolve_reference_and_pairs():
    cfg = {"model": {"class_path": "lit_align.modules.dpo.DPO",
                     "init_args": {"model_name_or_path": "preset:tiny", "lora": {"r": 8}}},
           "data": {"init_args": {"batch_size": 2, "max_length": 64}}, "trainer": {}}
    dpo = inputs_from_config(cfg)
    assert (dpo.objective, dpo.reference) == ("dpo", "adapter")
    plan = estimate(dpo)
    assert plan.row("reference model") == 0 and "4 seqs x 64 tokens" in next(r.note for r in plan.rows if r.component == "activations")
    cfg["model"]["init_args"]["lora"] = None
    full = estimate(inputs_from_config(cfg))
    assert full.row("reference model") == full.row("weights")  # a frozen copy
    cfg["model"]["class_path"] = "GRPO"
    with pytest.raises(PlanError, match="max_new_tokens"):
        inputs_from_config(cfg)
    grpo = inputs_from_config(cfg, samples_per_prompt=4, max_new_tokens=32)
    # 2 prompts x 4 samples = 8 rollouts of 64 + 32 tokens, all decoded together and updated in one pass
    assert (grpo.seq_len, grpo.batch_size, grpo.generation_batch, grpo.reference) == (96, 8, 8, "copy")
    kv = next(r for r in estimate(grpo).rows if r.component == "generation KV cache")
    assert kv.bytes == 2 * 4 * 128 * 4 * 8 * 96  # K and V, 4 layers, kv width 128, fp32, 8 sequences, 96 tokens
    # logits only at the 33 positions predicting a response token (logits_to_keep), fp32 cross-entropy buffers
    assert estimate(grpo).row("logits + loss") == 8 * 33 * TINY.vocab_size * 12
    # logits_chunk_size: 64 of those 264 positions' logits at a time (fp32: 10 bytes each at the peak measured on CPU),
    # the head's input rows kept for backward twice (the rows and their gradient); full fine-tuning adds the head's
    # fp32 gradient sum
    chunked = inputs_from_config({**cfg, "model": {**cfg["model"], "init_args": {
        **cfg["model"]["init_args"], "logits_chunk_size": 64}}}, samples_per_prompt=4, max_new_tokens=32)
    plan = estimate(chunked)
    assert plan.row("logits + loss") == (64 * TINY.vocab_size * 10 + 2 * 8 * 33 * TINY.hidden_size * 4
                                         + TINY.head_params * 4)
    assert "logits_chunk_size: 64 tokens" in next(r.note for r in plan.rows if r.component == "logits + loss")
    cfg["model"]["init_args"].update(samples_per_prompt=8, max_new_tokens=16, micro_batch_size=4, beta=0.0)
    grpo = inputs_from_config(cfg)  # the module's own keys: micro-batches of 4 rollouts, no KL so no reference
    assert (grpo.batch_size, grpo.generation_batch, grpo.seq_len, grpo.reference) == (4, 16, 80, "none")
    assert any("4 of the 16 rollouts" in n for n in grpo.notes) and "generation" in estimate(grpo).phases
    cfg["model"]["class_path"] = "MyObjective"
    with pytest.raises(PlanError, match="cannot tell its objective; pass --objective"):
        inputs_from_config(cfg)


def test_replicated_reference_and_reward_model_are_whole_on_every_device():
    from lit_align.models import materialize_preset

    reward_dir = str(materialize_preset("preset:tiny"))  # only its config.json is read: the reward model's shape
    args = {"model_name_or_path": "preset:tiny", "lora": None, "max_new_tokens": 16, "reward": "reward_model",
            "reward_model": reward_dir}
    cfg = {"model": {"class_path": "GRPO", "init_args": args}, "data": {"init_args": {"batch_size": 2, "max_length": 48}},
           "trainer": {"strategy": "fsdp", "devices": 4}}
    sharded = estimate(inputs_from_config({**cfg, "model": {"class_path": "GRPO", "init_args": {
        **args, "reference_placement": "shard", "reward_placement": "shard"}}}))
    default = estimate(inputs_from_config(cfg))  # reference sharded, reward model replicated (the modules' defaults)
    replicated = estimate(inputs_from_config({**cfg, "model": {"class_path": "GRPO", "init_args": {
        **args, "reference_placement": "replicate", "reward_placement": "replicate"}}}))
    whole = sharded.row("weights") * 4  # the policy's weights, sharded over 4 devices
    assert sharded.row("reference model") == pytest.approx(whole / 4) == default.row("reference model")
    assert replicated.row("reference model") == pytest.approx(whole)
    assert "reference_placement: replicate" in next(r.note for r in replicated.rows if r.component == "reference model")
    # the reward model has the policy's shape, frozen, in float32 like it; a one-label score head replaces the LM head
    rm_whole = whole - (TINY.vocab_size - 1) * TINY.hidden_size * 4
    assert sharded.row("reward model") == pytest.approx(rm_whole / 4)
    assert default.row("reward model") == replicated.row("reward model") == pytest.approx(rm_whole)
    assert replicated.peak_bytes - sharded.peak_bytes == pytest.approx((whole + rm_whole) * 3 / 4)
    assert default.peak_bytes - sharded.peak_bytes == pytest.approx(rm_whole * 3 / 4)


def test_reward_model_is_planned_in_its_own_dtype_and_from_a_checkpoints_hyperparameters(tmp_path):
    """A saved directory loads in float32 whatever the policy's dtype; a checkpoint's base model, dtype and LoRA
    adapter are read from its hyperparameters (memory-mapped, no weights loaded)."""
    from lit_align.models import materialize_preset

    def reward_row(reward_model, dtype="bfloat16", placement="replicate", strategy="ddp"):
        cfg = {"model": {"class_path": "PPO", "init_args": {
                   "model_name_or_path": "preset:tiny", "dtype": dtype, "max_new_tokens": 16, "reward": "reward_model",
                   "reward_model": reward_model, "reward_placement": placement}},
               "data": {"init_args": {"batch_size": 2, "max_length": 48}},
               "trainer": {"strategy": strategy, "devices": 2, "precision": "bf16-mixed"}}
        return next(r for r in estimate(inputs_from_config(cfg)).rows if r.component == "reward model")

    base = TINY_BASE
    blocks = base.num_layers * base.block_linear_params()
    rest = base.embedding_params + base.norm_params + base.hidden_size
    directory = str(materialize_preset("preset:tiny-base"))
    row = reward_row(directory)
    assert row.bytes == pytest.approx((blocks + rest) * 4) and "fp32" in row.note  # not the bf16 policy's 2 bytes

    ckpt = tmp_path / "rm.ckpt"
    torch.save({"state_dict": {"model.score.weight": torch.zeros(1, 256)}, "hyper_parameters": {
        "model_name_or_path": "preset:tiny-base", "dtype": "bfloat16",
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"]}}}, ckpt)
    lora = base.lora_params(8, ("q_proj", "v_proj"))
    assert lora == 6 * 8 * ((256 + 256) + (256 + 128))  # 6 layers; q: 256 -> 256, v: 256 -> 4 kv heads x 32
    row = reward_row(str(ckpt), dtype="float32")
    assert row.bytes == pytest.approx((blocks + rest) * 2 + lora * 4)
    assert "half precision" in row.note and "LoRA" in row.note
    # sharded under ZeRO-3: a bf16 module split over the 2 devices
    assert reward_row(str(ckpt), placement="shard", strategy="deepspeed_stage_3").bytes == pytest.approx(
        ((blocks + rest) * 2 + lora * 4) / 2)
    with pytest.raises(PlanError, match="model.init_args.reward_model: checkpoint .*missing.ckpt.* does not exist"):
        reward_row(str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name_or_path": str(tmp_path / "gone")}},
               tmp_path / "orphan.ckpt")  # a checkpoint whose base model directory is gone: both named
    with pytest.raises(PlanError, match=r"model.init_args.reward_model \(the base model of .*orphan.ckpt\): local model "
                                        r"directory .*gone.* does not exist"):
        reward_row(str(tmp_path / "orphan.ckpt"))
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(PlanError, match="has no model_name_or_path hyperparameter"):
        reward_row(str(tmp_path / "other.ckpt"))


def test_command_parses_the_fit_config_with_overrides(capsys):
    args = ["--config", "configs/quickstart/sft.yaml", "--model.init_args.lora.r", "8", "--data.init_args.batch_size", "4",
            "--trainer.strategy", "fsdp", "--trainer.devices", "8", "--json"]
    assert memory.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["lora_r"] == 8 and out["inputs"]["batch_size"] == 4 and out["inputs"]["devices"] == 8
    assert out["inputs"]["strategy"] == "fsdp" and out["inputs"]["seq_len"] == 512
    rows = {r["component"]: r["bytes"] for r in out["rows"]}
    tiny = ModelShape.from_hf_config(preset_config("tiny"))
    assert rows["weights"] == pytest.approx((tiny.total_params + tiny.lora_params(8, memory.BLOCK_LINEARS)) * 4 / 8)
    assert out["peak_bytes"] == max(out["phases"].values())
    assert memory.main(["--config", "configs/quickstart/sft.yaml", "--device-memory", "0.01"]) == 1
    table = capsys.readouterr().out
    assert "does NOT fit in 0.01 GiB" in table and "activations" in table and "peak per device" in table


def test_command_errors_name_the_field(capsys, tmp_path, monkeypatch):
    assert memory.main(["--config", "configs/quickstart/sft.yaml", "--model.init_args.model_name_or_path",
                        "nobody/no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "model.init_args.model_name_or_path" in err and "nobody/no-such-model-xyz" in err and "config.json" in err
    assert memory.main(["--config", "configs/quickstart/sft.yaml", "--model.init_args.lora.r", "8",
                        "--model.init_args.lora.target_modules", "[wq]"]) == 2
    assert "lora.target_modules ['wq']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(["--json"])
    assert "--config FILE.yaml is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a mistyped file name: plan-memory's own error, not the root parser's usage
        memory.main(["--config", "configs/quickstart/sft.yml"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lit_align plan-memory: error: --config configs/quickstart/sft.yml: no such file")
    # a later stage planned before the stage it starts from was trained: the model it can be planned with instead
    monkeypatch.chdir(tmp_path)  # where runs/iotacode/sft-model cannot exist
    dpo = str(REPO / "configs" / "iotacode" / "dpo.yaml")
    assert memory.main(["--config", dpo]) == 2
    assert capsys.readouterr().err.strip() == (
        "lit_align plan-memory: error: model.init_args.model_name_or_path: local model directory "
        "'runs/iotacode/sft-model' does not exist (train and export the previous stage first; to plan before it exists, "
        "give the model that stage starts from, which has the same architecture: --model.init_args.model_name_or_path "
        "ID_OR_DIR, for configs/iotacode deepseek-ai/deepseek-coder-1.3b-base)")
    assert memory.main(["--config", dpo, "--model.init_args.model_name_or_path",
                        "deepseek-ai/deepseek-coder-1.3b-base"]) == 0
    assert "peak per device" in capsys.readouterr().out
    # PPO's reward model missing too: the error names its own option (not the policy's, which is given here)
    ppo = [str(REPO / "configs" / "iotacode" / "ppo.yaml"), "--model.init_args.model_name_or_path",
           "deepseek-ai/deepseek-coder-1.3b-base"]
    assert memory.main(["--config", *ppo]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "lit_align plan-memory: error: model.init_args.reward_model: local model directory 'runs/iotacode/reward-model' "
        "does not exist (train and export the previous stage first; to plan before it exists, give the model that stage "
        "starts from, which has the same architecture: --model.init_args.reward_model ID_OR_DIR")
    assert memory.main(["--config", *ppo, "--model.init_args.reward_model", "deepseek-ai/deepseek-coder-1.3b-base"]) == 0
    assert "reward model" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------- measured
MEASURED = ["tiny-base-full-b2-s128", "tiny-lora-r8-b4-s256", "tiny-bf16mixed-b4-s256", "tiny-full-gc-b4-s256"]


@pytest.mark.parametrize("name", MEASURED)
def test_estimate_is_within_15_percent_of_the_measured_cpu_peak(name):
    """Peak bytes of live tensors over 3 real SFT training steps (bench/bench_memory.py's protocol) vs the estimate."""
    bench = _bench()
    cases = {c.name: c for c in [
        bench.MemoryCase("tiny-base-full-b2-s128", batch_size=2, seq_len=128),
        bench.MemoryCase("tiny-lora-r8-b4-s256", model="preset:tiny", lora_r=8),
        bench.MemoryCase("tiny-bf16mixed-b4-s256", model="preset:tiny", precision="bf16-mixed"),
        bench.MemoryCase("tiny-full-gc-b4-s256", model="preset:tiny", gradient_checkpointing=True),
    ]}
    case = cases[name]
    measured = bench.measure(case)["tensor_peak"]
    planned = bench.planned(case).peak_bytes
    assert measured > 20 * 2**20  # a real training footprint, not noise
    assert abs(planned - measured) / measured < 0.15, (planned / 2**20, measured / 2**20)


def test_chunked_logits_are_planned_within_15_percent_of_the_measured_cpu_peak(tmp_path_factory):
    """logits_chunk_size on a model whose 32k-vocabulary LM head dominates (DeepSeek-Coder's vocabulary on a 2-layer,
    hidden-128 Llama, bench/bench_gpu_scale.py's "tiny" shape): the measured peak drops to less than half, and the
    planner follows it."""
    bench = _bench()
    spec = importlib.util.spec_from_file_location("bench_gpu_scale", REPO / "bench" / "bench_gpu_scale.py")
    scale = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu_scale"] = scale
    spec.loader.exec_module(scale)
    model = tmp_path_factory.mktemp("vocab32k") / "model"
    scale.build_model_dir("tiny", model, "float32")
    whole = bench.MemoryCase("tiny32k-b4-s256", model=str(model))
    chunked = bench.MemoryCase("tiny32k-b4-s256-chunk256", model=str(model), logits_chunk_size=256)
    measured = {c.name: bench.measure(c)["tensor_peak"] for c in (whole, chunked)}
    assert measured[chunked.name] < 0.5 * measured[whole.name]  # measured 234 MiB against 534 MiB
    for case in (whole, chunked):
        planned = bench.planned(case).peak_bytes
        assert abs(planned - measured[case.name]) / measured[case.name] < 0.15, (case.name, planned / 2**20,
                                                                                   measured[case.name] / 2**20)


# ---------------------------------------------------------------------------------------------------------- configs
MULTI_GPU = sorted((REPO / "configs" / "iotacode" / "multi_gpu").glob("*.yaml"))


def test_multi_gpu_configs_parse_and_plan():
    """Each multi-GPU config parses with `lit_align fit`'s parser and plans with the strategy it names."""
    assert {p.name for p in MULTI_GPU} >= {"sft_ddp.yaml", "sft_fsdp.yaml", "sft_deepspeed_zero2.yaml",
                                           "sft_deepspeed_zero3.yaml", "sft_lora_ddp.yaml"}
    plans = {}
    for path in MULTI_GPU:
        cfg = memory.parse_training_config(["--config", str(path)])
        assert cfg["trainer"]["use_distributed_sampler"] is False and cfg["trainer"]["devices"] == 8
        inputs = inputs_from_config(cfg)
        assert inputs.shape.num_layers == 24 and inputs.devices == 8  # DeepSeek-Coder 1.3B (built-in config offline)
        plans[path.stem] = (inputs, estimate(inputs))
    ddp_in, ddp = plans["sft_ddp"]
    assert ddp_in.strategy == "ddp" and not ddp_in.ddp_bucket_copy and ddp.row("DDP gradient buckets") == 0
    fsdp_in, fsdp = plans["sft_fsdp"]
    assert fsdp_in.strategy == "fsdp" and fsdp.row("weights") == ddp.row("weights") / 8
    assert not any("auto_wrap_policy" in n for n in fsdp.assumptions)  # the config wraps each decoder layer
    assert plans["sft_deepspeed_zero2"][0].strategy == "deepspeed_stage_2"
    assert plans["sft_deepspeed_zero2"][1].row("DeepSpeed buckets") == 4.5 * 4e8 * 2
    assert plans["sft_deepspeed_zero3"][1].row("gathered weights") > 0
    lora_in, lora = plans["sft_lora_ddp"]
    assert lora_in.lora_r == 32 and lora.params["trainable"] == 24 * 32 * (4 * 4096 + 3 * (2048 + 5504))
    assert fsdp.peak_bytes < ddp.peak_bytes / 3 and lora.peak_bytes < ddp.peak_bytes / 3


def test_the_papers_model_id_is_planned_from_the_built_in_config_when_the_hub_is_unreachable(monkeypatch):
    """Offline (HF_HUB_OFFLINE, as in the tests) the built-in copy of DeepSeek-Coder 1.3B's config.json is used and
    said so; where the hub failed without HF_HUB_OFFLINE set, the note also says how to skip the hub's retries."""
    from lit_align.memory.shapes import load_model_config

    notes: list[str] = []
    config = load_model_config("deepseek-ai/deepseek-coder-1.3b-base", notes)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2048, 24, 32256)
    assert notes == ["deepseek-ai/deepseek-coder-1.3b-base: hub unreachable, used lit_align's built-in copy of its "
                     "config.json"]

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", unreachable)
    monkeypatch.setattr("lit_align.models.hub_resolves", lambda: True)  # the host resolves, the hub does not answer
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    notes.clear()
    load_model_config("deepseek-ai/deepseek-coder-1.3b-base", notes)
    assert notes[0].endswith("(on a machine without internet, HF_HUB_OFFLINE=1 skips the hub's retries)")


def test_the_plan_suggests_the_chunked_head_where_the_logits_outweigh_the_activations():
    """The paper's DPO (DeepSeek-Coder 1.3B, 4000 tokens, checkpointing): 2.88 GiB of logits against 816 MiB of
    activations, so the plan says what logits_chunk_size 1024 would hold instead, and is silent once it is set."""
    cfg = {"model": {"class_path": "lit_align.modules.dpo.DPO", "init_args": {
               "model_name_or_path": "deepseek-ai/deepseek-coder-1.3b-base", "lora": {"r": 32}, "dtype": "bfloat16",
               "gradient_checkpointing": True}},
           "data": {"init_args": {"batch_size": 1, "max_length": 4000}},
           "trainer": {"precision": "bf16-mixed", "devices": 2, "strategy": "ddp"}}
    plan = estimate(inputs_from_config(cfg))
    [hint] = [n for n in plan.assumptions if "outweigh" in n]
    assert hint.endswith("would plan 377.5 MiB for them instead of 2.88 GiB")
    cfg["model"]["init_args"]["logits_chunk_size"] = 1024
    chunked = estimate(inputs_from_config(cfg))
    assert not [n for n in chunked.assumptions if "outweigh" in n]
    assert chunked.row("logits + loss") == pytest.approx(377.5 * 2**20, rel=1e-3)
    assert plan.peak_bytes - chunked.peak_bytes > 1.2 * 2**30
