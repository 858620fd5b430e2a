"""The memory estimate: per-device weights, gradients, optimizer state and activations for one step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lit_align.memory.shapes import (BLOCK_LINEARS, CHUNKED_LOGITS, DTYPE_BYTES, GiB, MiB, ModelShape, NF4_BYTES_PER_PARAM,
                                     OBJECTIVES, PAIRWISE, PlanError, _namespace_to_dict)


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass
class PlanInputs:
    """Everything the estimate depends on, resolved from a config (or given directly from Python)."""

    shape: ModelShape
    """The policy's sizes."""
    objective: str = "sft"
    """One of OBJECTIVES; decides sequences per example, reference model, value head and generation."""
    batch_size: int = 8
    """Examples (prompts for online objectives) per micro-batch per device."""
    seq_len: int = 1024
    """Tokens per sequence (the padded length: data max_length, plus max_new_tokens for online objectives)."""
    samples_per_prompt: int = 1
    """Online objectives: completions generated per prompt (GRPO's group size)."""
    max_new_tokens: int = 0
    """Online objectives: generated tokens per completion."""
    generation_batch: int | None = None
    """Online objectives: sequences decoded together (the KV cache holds these); None: batch_size x samples_per_prompt."""
    lora_r: int | None = None
    """LoRA rank; None for full fine-tuning."""
    lora_targets: tuple[str, ...] = BLOCK_LINEARS
    """Block linear layers carrying adapters."""
    lora_dropout: float = 0.0
    """LoRA dropout (a dropout mask and a dropped copy of the input are saved per adapted layer when > 0)."""
    quantize_4bit: bool = False
    """QLoRA: block linear weights in NF4 with double quantization."""
    dtype: str = "float32"
    """dtype the weights are loaded in (module ``dtype``)."""
    precision: str = "32-true"
    """Lightning precision."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass."""
    attn_implementation: str = "sdpa"
    """sdpa, eager or flash_attention_2."""
    padded: bool = True
    """Batches carry an attention mask (padding or packing), which SDPA turns into a float bias saved per layer."""
    strategy: str = "ddp"
    """Normalized strategy: ddp, fsdp, deepspeed_stage_1/2/3 (optionally _offload)."""
    ddp_bucket_copy: bool = True
    """DDP keeps a flat copy of the gradients for all-reduce (False with gradient_as_bucket_view=True)."""
    deepspeed_buckets: tuple[int, int] | None = (200_000_000, 200_000_000)
    """DeepSpeed stage 1/2 (allgather, reduce) bucket elements with overlap_comm; None without overlap_comm."""
    devices: int = 1
    """Data-parallel processes (world size)."""
    accelerator: str = "gpu"
    """cpu or gpu: CPU dropout keeps a float mask, CUDA a bool one; the optimizer's foreach temporaries differ."""
    reference: str = "none"
    """none, adapter (the LoRA policy with the adapter disabled) or copy (a frozen copy of the weights)."""
    value_head: bool = False
    """PPO: a trainable scalar head on the policy."""
    reward_model: ModelShape | None = None
    """A frozen reward model held in memory (PPO with a learned reward)."""
    reward_model_dtype: str = "float32"
    """dtype the reward model is loaded in: a saved directory loads in float32 (RewardModel's default), a checkpoint in
    the ``dtype`` it was trained with."""
    reward_model_lora_params: int = 0
    """LoRA adapter weights of a reward model trained with LoRA (kept in float32)."""
    reward_model_4bit: bool = False
    """The reward model was trained with QLoRA: its block linear weights load in NF4, the rest in float32."""
    logits_chunk_size: int | None = None
    """The LM head and log-softmax over this many tokens at a time (every objective but the reward model: the modules'
    option); None: all at once."""
    reference_replicated: bool = False
    """The frozen reference copy is a whole copy on every device (``reference_placement: replicate``), not sharded."""
    reward_model_replicated: bool = True
    """The reward model is a whole copy on every device (``reward_placement: replicate``, the default), not sharded."""
    notes: list[str] = field(default_factory=list)
    """Assumptions made while resolving the config."""


# ---------------------------------------------------------------------------------------------------------- dtypes
def normalize_precision(precision: Any) -> str:
    value = "32-true" if precision is None else str(precision)
    aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "half": "16-mixed", "64": "64-true"}
    value = aliases.get(value, value)
    known = {"32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine", "64-true"}
    if value not in known:
        raise PlanError(f"trainer.precision {precision!r} is not one the planner knows: {sorted(known)}")
    if value in ("64-true", "transformer-engine"):
        raise PlanError(f"trainer.precision {value!r} is not supported by the planner")
    return value


def _half_precision(precision: str) -> bool:
    return precision in ("bf16-true", "16-true")


def _mixed(precision: str) -> bool:
    return precision.endswith("-mixed")


def base_weight_bytes(inputs: PlanInputs) -> float:
    """Bytes per (non-quantized) base weight."""
    if _half_precision(inputs.precision):
        return 2
    if inputs.quantize_4bit:
        return 4  # prepare_model_for_kbit_training up-casts every non-quantized weight to fp32
    return DTYPE_BYTES[inputs.dtype]


def adapter_bytes(inputs: PlanInputs) -> int:
    """Bytes per LoRA weight (fp32: peft up-casts adapters of half-precision bases) and per value-head weight."""
    return 2 if _half_precision(inputs.precision) else 4


def activation_mode(inputs: PlanInputs) -> str:
    """fp32 (all fp32), autocast (fp32 weights under *-mixed) or half (half-precision weights or compute)."""
    if _half_precision(inputs.precision) or (inputs.strategy.startswith("deepspeed") and _mixed(inputs.precision)):
        return "half"  # DeepSpeed runs a half-precision module instead of autocast
    if inputs.quantize_4bit:
        return "fp32" if inputs.dtype == "float32" and not _mixed(inputs.precision) else "half"
    if inputs.dtype != "float32":
        return "half"
    return "autocast" if _mixed(inputs.precision) else "fp32"


# ---------------------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(inputs: PlanInputs, full_finetune: bool) -> float:
    """Bytes autograd keeps per token for one decoder block (HF Llama, SDPA), by the tensors each op saves.

    fp32 full fine-tuning, for example, gives 32h + 8kv + 4n + 8 + 16i bytes per token (h hidden, kv key/value
    width, n heads, i intermediate): the residual stream into both RMSNorms and their rsqrt, the normalized values
    (norm weights are trained), the inputs of q/k/v and gate/up (shared), rotated q and k, v, SDPA's output and
    log-sum-exp, and the MLP's gate, SiLU, up and product. Frozen linears save nothing for their own weight; LoRA
    adds, per adapted layer, the dropout mask and the dropped input (or the input itself with dropout 0) and the rank-r
    intermediate. Autocast casts a linear's input once per consumer (q, k and v each save their own half copy).
    """
    s, m = inputs.shape, activation_mode(inputs)
    h, i, kv, n = s.hidden_size, s.intermediate_size, s.kv_dim, s.num_heads
    act = 4 if m == "fp32" else 2  # matmul outputs, attention tensors
    norm_out = 2 if m == "half" else 4  # the RMSNorm computes in fp32 and casts back to the input dtype
    lora_w = adapter_bytes(inputs)
    lora_compute = 2 if m == "autocast" else lora_w  # what lora_A/lora_B see
    mask_bytes = 1 if inputs.accelerator == "gpu" else lora_w  # CUDA dropout saves a bool mask, CPU a float one
    targets = set(inputs.lora_targets) if inputs.lora_r else set()
    r = inputs.lora_r or 0

    total = 2 * (4 * h + 4)  # residual stream (fp32, or the norm's fp32 up-cast) + rsqrt, for both norms
    if full_finetune:
        total += 2 * norm_out * h  # normalized values, saved for the norm weights' gradient

    def linear_inputs(width: int, consumers: tuple[str, ...], dtype_bytes: int, cast_per_consumer: bool,
                      already_saved: bool) -> float:
        """Saved inputs of a group of linears reading one tensor of ``width`` per token."""
        out = 0.0
        base_saves = full_finetune and not already_saved
        if base_saves:
            out += width * dtype_bytes * (len(consumers) if cast_per_consumer else 1)
        adapted = [c for c in consumers if c in targets]
        if adapted and inputs.lora_dropout > 0:
            per = width * mask_bytes + width * lora_compute
            out += len(adapted) * per
        elif adapted:
            if m == "fp32" and lora_compute == act:
                out += 0 if (base_saves or already_saved) else width * dtype_bytes  # lora_A reads the same tensor
            else:  # peft/autocast cast the input to the adapter's dtype, once per adapted layer
                out += len(adapted) * width * lora_compute
        out += len(adapted) * r * lora_compute
        return out

    cast = m == "autocast"
    x_bytes = {"fp32": 4, "autocast": 2, "half": 2}[m]
    total += linear_inputs(h, ("q_proj", "k_proj", "v_proj"), 4 if m == "fp32" else x_bytes, cast, False)
    total += linear_inputs(h, ("gate_proj", "up_proj"), 4 if m == "fp32" else x_bytes, cast, False)

    # attention: rotated q and k, v (repeated to all heads when SDPA gets a mask with GQA), output, log-sum-exp
    impl = inputs.attn_implementation
    kv_eff = s.q_dim if (inputs.padded and impl == "sdpa" and s.num_kv_heads != n) else kv
    total += act * (s.q_dim + 2 * kv_eff) + 4 * n
    if impl == "eager":  # softmax probabilities in fp32 (+ their half copy) instead of SDPA's output and lse
        total += n * inputs.seq_len * (4 + (2 if act == 2 else 0)) - 4 * n
        total += linear_inputs(s.q_dim, ("o_proj",), act, False, False)
    else:
        total += act * s.q_dim
        total += linear_inputs(s.q_dim, ("o_proj",), act, False, True)
        if inputs.padded and impl == "sdpa":
            total += inputs.seq_len * act  # SDPA's float copy of the (batch, 1, seq, seq) mask, kept per layer
    # MLP: gate (SiLU input), SiLU output, up; the product is down_proj's input
    total += 3 * act * i
    total += linear_inputs(i, ("down_proj",), act, False, False)
    return total


def backward_transient_bytes(inputs: PlanInputs) -> float:
    """Per token: gradients alive at once in a block's MLP backward, beyond its saved activations.

    The product's gradient and the two it splits into (SiLU and up) are i wide; the saved product is released at the
    same time, so about two i-wide gradients are extra. They are fp32 when the block computes in fp32 or when a fp32
    LoRA adapter on down_proj produces the product's gradient.
    """
    fp32_grads = activation_mode(inputs) == "fp32" or (inputs.lora_r and "down_proj" in inputs.lora_targets
                                                        and adapter_bytes(inputs) == 4)
    return 2 * inputs.shape.intermediate_size * (4 if fp32_grads else 2)


def checkpointed_layer_bytes(inputs: PlanInputs) -> float:
    """Bytes per token per block kept under gradient checkpointing: the block's input (the residual stream)."""
    return (2 if activation_mode(inputs) == "half" else 4) * inputs.shape.hidden_size


def final_norm_bytes(inputs: PlanInputs, full_finetune: bool) -> float:
    """Per token: the final RMSNorm's input and rsqrt, its normalized values and the LM head's input when trained."""
    h, m = inputs.shape.hidden_size, activation_mode(inputs)
    total = 4 * h + 4
    if full_finetune:
        total += (2 if m == "half" else 4) * h + (4 if m == "fp32" else 2) * h
    return total


# ---------------------------------------------------------------------------------------------------------- the plan
@dataclass
class Row:
    component: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-device estimate: one row per component, the peak of each phase, and the assumptions made."""

    rows: list[Row]
    phases: dict[str, float]
    assumptions: list[str]
    params: dict[str, int]

    @property
    def peak_bytes(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def row(self, component: str) -> float:
        return next((r.bytes for r in self.rows if r.component == component), 0.0)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "phases": self.phases, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase, "params": self.params, "assumptions": self.assumptions}


@dataclass
class StrategyInfo:
    """What the planner needs from ``trainer.strategy``."""

    name: str
    """ddp, fsdp or deepspeed_stage_N[_offload]."""
    ddp_bucket_copy: bool = True
    """DDP copies gradients into all-reduce buckets (gradient_as_bucket_view=False, the default)."""
    deepspeed_buckets: tuple[int, int] = (200_000_000, 200_000_000)
    """DeepSpeed (allgather, reduce) bucket sizes in elements (Lightning's defaults)."""
    overlap_comm: bool = True
    """DeepSpeed overlap_comm (Lightning's default), which multiplies the bucket memory."""
    notes: list[str] = field(default_factory=list)


def normalize_strategy(strategy: Any) -> StrategyInfo:
    """Lightning's strategy (a registered name, or a class_path dict) -> what the plan needs."""
    if isinstance(strategy, dict) or hasattr(strategy, "class_path"):
        get = strategy.get if isinstance(strategy, dict) else (lambda k, d=None: getattr(strategy, k, d))
        class_path = str(get("class_path", ""))
        init = dict(_namespace_to_dict(get("init_args", {}) or {}))
        init.update(dict(_namespace_to_dict(get("dict_kwargs", {}) or {})))
        if "FSDP" in class_path:
            sharding = init.get("sharding_strategy", "FULL_SHARD")
            sharding = getattr(sharding, "name", str(sharding))
            notes = [] if sharding in ("FULL_SHARD", "HYBRID_SHARD") else [f"FSDP sharding_strategy {sharding} is planned as FULL_SHARD"]
            if not init.get("auto_wrap_policy"):
                notes.append("FSDP without auto_wrap_policy gathers the whole model at once; the plan assumes one unit "
                             "per decoder block (set auto_wrap_policy: [...LlamaDecoderLayer])")
            return StrategyInfo("fsdp", notes=notes)
        if "DeepSpeed" in class_path:
            stage = int(init.get("stage", 2))
            offload = bool(init.get("offload_optimizer", False))
            return StrategyInfo(f"deepspeed_stage_{stage}" + ("_offload" if offload else ""),
                                deepspeed_buckets=(int(init.get("allgather_bucket_size", 200_000_000)),
                                                   int(init.get("reduce_bucket_size", 200_000_000))),
                                overlap_comm=bool(init.get("overlap_comm", True)))
        if "DDP" in class_path or "SingleDevice" in class_path:
            return StrategyInfo("ddp", ddp_bucket_copy=not init.get("gradient_as_bucket_view", False))
        raise PlanError(f"trainer.strategy {class_path!r} is not one the planner knows (DDP, FSDP or DeepSpeed)")
    name = "auto" if strategy is None else str(strategy)
    if name in ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device", "dp") or name.startswith("ddp_"):
        return StrategyInfo("ddp")
    if name.startswith("fsdp"):
        return StrategyInfo("fsdp", notes=["FSDP by name has no auto_wrap_policy and gathers the whole model at once; "
                                           "the plan assumes one unit per decoder block (see configs/iotacode/multi_gpu)"])
    if name == "deepspeed":
        return StrategyInfo("deepspeed_stage_2")
    if name.startswith("deepspeed_stage_") and name.split("_")[2] in ("1", "2", "3"):
        return StrategyInfo(name)
    raise PlanError(f"trainer.strategy {name!r} is not one the planner knows: ddp, fsdp, deepspeed, "
                    "deepspeed_stage_1/2/3[_offload]")


def estimate(inputs: PlanInputs) -> MemoryPlan:
    """The per-device estimate for ``inputs``."""
    s = inputs.shape
    if inputs.objective == "reward":  # the reward model trained: the decoder under a score head, no LM head
        s = replace(s, score_head=True)
    rows: list[Row] = []
    notes = list(inputs.notes)
    mode = activation_mode(inputs)
    objective = inputs.objective
    if objective not in OBJECTIVES:
        raise PlanError(f"objective {objective!r} is not one of {OBJECTIVES}")
    lora = inputs.lora_r is not None
    if inputs.quantize_4bit and not lora:
        raise PlanError("model.init_args.quantize_4bit needs model.init_args.lora (QLoRA trains adapters only)")
    if inputs.quantize_4bit and inputs.strategy.startswith("deepspeed_stage_3"):
        raise PlanError("model.init_args.quantize_4bit (QLoRA) is not supported under DeepSpeed ZeRO-3 (training "
                        "refuses it); plan for trainer.strategy deepspeed_stage_2, fsdp or ddp")
    full_ft = not lora
    strategy = inputs.strategy
    n_dev = max(1, inputs.devices)
    deepspeed = strategy.startswith("deepspeed")
    offload = strategy.endswith("_offload")
    stage = int(strategy.split("_")[2]) if deepspeed else 0
    shard_weights = strategy == "fsdp" or stage == 3
    shard_grads = shard_weights or stage == 2
    shard_opt = shard_grads or stage == 1
    half_compute = mode != "fp32"

    # ---- parameter counts
    block = s.num_layers * s.block_linear_params()
    other = s.embedding_params + s.head_params + s.norm_params
    lora_params = s.lora_params(inputs.lora_r, inputs.lora_targets) if lora else 0
    value_head = s.hidden_size + 1 if inputs.value_head else 0
    trainable_extra = lora_params + value_head
    trainable_base = s.total_params if full_ft else 0
    base_w = base_weight_bytes(inputs)
    adapter_w = adapter_bytes(inputs)
    if deepspeed and _mixed(inputs.precision):
        base_w = 2  # DeepSpeed keeps the module in half precision and the fp32 copy in its optimizer
    block_w = NF4_BYTES_PER_PARAM if inputs.quantize_4bit else base_w
    weights = block * block_w + other * base_w + trainable_extra * adapter_w
    trainable_bytes = trainable_base * base_w + trainable_extra * adapter_w
    trainable = trainable_base + trainable_extra
    desc = f"{s.total_params / 1e6:,.1f}M params"
    if inputs.quantize_4bit:
        desc += f": {block / 1e6:,.1f}M block weights in NF4 (double quantization), the rest fp32"
    else:
        desc += f" in {_dtype_name(base_w)}"
    if lora:
        desc += f"; LoRA r={inputs.lora_r} on {len(inputs.lora_targets)} linears: {lora_params / 1e6:,.2f}M in {_dtype_name(adapter_w)}"
    w_div = n_dev if shard_weights else 1
    rows.append(Row("weights", weights / w_div, desc + (f", sharded over {n_dev}" if w_div > 1 else "")))

    # ---- gradients, optimizer, master weights
    g_div = n_dev if shard_grads else 1
    grads = trainable_bytes / g_div
    rows.append(Row("gradients", grads, f"{trainable / 1e6:,.2f}M trainable params" + (f", sharded over {n_dev}" if g_div > 1 else "")))
    o_div = n_dev if shard_opt else 1
    if deepspeed:
        moment_bytes = 8 * trainable
        master = 4 * trainable if base_w == 2 else 0
    else:
        moment_bytes = 2 * trainable_bytes
        master = 0
    opt_note = "AdamW: 2 moments per trainable param" + (" (fp32)" if deepspeed else " in the param's dtype")
    if offload:
        notes.append(f"optimizer state and master weights ({_fmt((moment_bytes + master) / o_div)}) live in host memory (offload)")
        moment_bytes = master = 0
    rows.append(Row("optimizer state", moment_bytes / o_div, opt_note + (f", sharded over {n_dev}" if o_div > 1 else "")))
    if master:
        rows.append(Row("fp32 master weights", master / o_div, "DeepSpeed mixed precision"))

    # ---- autocast copies (fp32 weights computed in half precision)
    casts = 0.0
    if mode == "autocast" and not deepspeed:
        if strategy != "fsdp":  # FSDP's mixed precision gathers half-precision blocks instead (the gather row)
            casts = 2 * (s.matmul_params + lora_params)
            rows.append(Row("autocast weight copies", casts, "half copy of each matmul weight, saved for backward"))

    # ---- reference, value head, reward model
    def frozen_network(component: str, whole_bytes: float, note: str, replicated: bool, option: str) -> float:
        """Add the row of a frozen network held whole on every device (``option: replicate``) or sharded like the
        policy's weights; return its bytes per device."""
        per_device = whole_bytes if replicated else whole_bytes / w_div
        if w_div > 1:
            note += f", a whole copy per device ({option}: replicate)" if replicated else f", sharded over {n_dev}"
        rows.append(Row(component, per_device, note))
        return per_device

    ref = 0.0  # per device: the reference copy and the reward model
    if inputs.reference == "copy":
        ref += frozen_network("reference model", block * block_w + other * base_w, "frozen copy of the weights",
                              inputs.reference_replicated, "reference_placement")
    elif inputs.reference == "adapter":
        rows.append(Row("reference model", 0.0, "the policy with its LoRA adapter disabled"))
    if inputs.reward_model is not None:
        rm = inputs.reward_model
        rm_blocks = rm.num_layers * rm.block_linear_params()
        rm_rest = rm.embedding_params + rm.norm_params + rm.hidden_size  # a one-label score head, no LM head
        rm_w = 4 if inputs.reward_model_4bit else DTYPE_BYTES[inputs.reward_model_dtype]
        if not inputs.reward_model_replicated and (deepspeed or _half_precision(inputs.precision)):
            rm_w = 2  # a sharded one is in the module tree: cast to half precision like the policy
        rm_bytes = (rm_blocks * (NF4_BYTES_PER_PARAM if inputs.reward_model_4bit else rm_w) + rm_rest * rm_w
                    + inputs.reward_model_lora_params * 4)
        rm_note = f"{(rm_blocks + rm_rest) / 1e6:,.1f}M params in " + (
            "NF4 (blocks) and fp32" if inputs.reward_model_4bit else _dtype_name(rm_w))
        if inputs.reward_model_lora_params:
            rm_note += f" + {inputs.reward_model_lora_params / 1e6:,.2f}M LoRA in fp32"
        ref += frozen_network("reward model", rm_bytes, rm_note + ", frozen", inputs.reward_model_replicated,
                              "reward_placement")
    if value_head:
        rows.append(Row("value head", value_head * adapter_w * 4,
                        "weights, gradients and AdamW state (also counted in the rows above)"))

    # ---- activations of one micro-batch
    seqs = inputs.batch_size * inputs.samples_per_prompt * (2 if objective in PAIRWISE else 1)
    tokens = seqs * inputs.seq_len
    per_layer = layer_activation_bytes(inputs, full_ft)
    # the online objectives' passes over rollouts keep logits only where they predict a response token (logits_to_keep)
    online = objective in ("ppo", "grpo", "raft") and inputs.max_new_tokens
    logit_rows = min(inputs.max_new_tokens + 1, inputs.seq_len) if online else inputs.seq_len
    logits_elems = seqs * logit_rows * (1 if objective == "reward" else s.vocab_size)
    logits_fwd = logits_elems * (10 if half_compute else 12)
    logits_bwd = logits_elems * 12
    chunk = inputs.logits_chunk_size if objective in CHUNKED_LOGITS else None

    def chunked_logits(size: int) -> tuple[float, float]:
        """(forward, backward) bytes with the LM head ``size`` tokens at a time: one chunk's logits (float32 copies,
        softmax, gradient), the head's input rows kept for backward (and their gradient), the head's fp32 gradient
        sum under full fine-tuning."""
        head_rows = seqs * logit_rows * s.hidden_size * (2 if half_compute else 4)
        per_logit = 10  # measured on CPU: 10.4 B per chunk logit at the peak in fp32, about 9 under bf16 autocast
        elems = min(size, seqs * logit_rows) * s.vocab_size
        return (elems * per_logit + head_rows,
                elems * per_logit + 2 * head_rows + (s.head_params * 4 if full_ft else 0))

    if chunk:
        logits_fwd, logits_bwd = chunked_logits(chunk)
    mask = seqs * inputs.seq_len**2 if inputs.padded and inputs.attn_implementation != "flash_attention_2" else 0
    # the final norm and LM head input, plus rotary cos/sin (shared by all blocks)
    final = tokens * (final_norm_bytes(inputs, full_ft) + 2 * s.head_dim * (2 if mode == "half" else 4))
    if inputs.gradient_checkpointing:
        kept = tokens * s.num_layers * checkpointed_layer_bytes(inputs)
        recompute = tokens * per_layer
        acts = kept + final
        act_note = (f"{seqs} seqs x {inputs.seq_len} tokens; checkpointed: {checkpointed_layer_bytes(inputs):,.0f} B/token x "
                    f"{s.num_layers} blocks, + one block recomputed ({per_layer:,.0f} B/token) in backward")
    else:
        recompute = 0.0
        acts = tokens * s.num_layers * per_layer + final
        act_note = f"{seqs} seqs x {inputs.seq_len} tokens x {s.num_layers} blocks x {per_layer:,.0f} B/token ({mode})"
    rows.append(Row("activations", acts, act_note))
    if chunk:
        rows.append(Row("logits + loss", max(logits_fwd, logits_bwd),
                        f"logits_chunk_size: {min(chunk, seqs * logit_rows):,} tokens x {s.vocab_size:,} logits at a time; "
                        "the LM head's input rows kept" + ("; the head's fp32 gradient sum" if full_ft else "")))
    else:
        rows.append(Row("logits + loss", max(logits_fwd, logits_bwd),
                        f"{logits_elems / tokens:,.0f} logits per token; fp32 cross-entropy buffers"
                        + (f" (over the {logit_rows} positions predicting the response)" if logit_rows < inputs.seq_len else "")))
    if mask:
        rows.append(Row("attention mask", mask, "(batch, 1, seq, seq) bool mask"))
    if not chunk and objective in CHUNKED_LOGITS and max(logits_fwd, logits_bwd) > acts:
        notes.append(f"the logits outweigh the activations: model.init_args.logits_chunk_size 1024 (the LM head 1024 "
                     f"tokens at a time) would plan {_fmt(max(chunked_logits(1024)))} for them instead of "
                     f"{_fmt(max(logits_fwd, logits_bwd))}")

    # ---- sharding / data-parallel extras
    extra_dp = 0.0
    if strategy == "ddp" and n_dev > 1 and trainable and inputs.ddp_bucket_copy:
        extra_dp = grads
        rows.append(Row("DDP gradient buckets", extra_dp, "flat gradient copy for all-reduce (gradient_as_bucket_view=False)"))
    if deepspeed and stage in (1, 2) and n_dev > 1 and inputs.deepspeed_buckets and trainable:
        allgather, reduce = (min(b, trainable) for b in inputs.deepspeed_buckets)
        buckets = 4.5 * (allgather + reduce) * 2
        extra_dp += buckets
        rows.append(Row("DeepSpeed buckets", buckets, "overlap_comm: 4.5 x (allgather + reduce bucket) half-precision "
                        "elements, DeepSpeed's documented footprint; smaller buckets or overlap_comm=false cut it"))
    if shard_weights and n_dev > 1:
        gathered_bytes = 2 if half_compute else base_w
        per_block = s.block_linear_params() * (block_w if inputs.quantize_4bit else gathered_bytes)
        extra_dp = 2 * per_block + (s.embedding_params + s.head_params) * gathered_bytes
        note = "two unsharded blocks (current + prefetched) and the embedding/head unit"
        if full_ft:  # a block's full gradient exists until it is reduce-scattered
            extra_dp += s.block_linear_params() * base_w
            note += ", one block's unsharded gradient"
        rows.append(Row("gathered weights", extra_dp, note))
        if deepspeed:
            notes.append("DeepSpeed stage 3 may keep up to stage3_max_live_parameters (default 1e9) gathered and has "
                         "its own reduce/prefetch buckets; the plan assumes block-by-block gathering")

    # ---- phases
    static = weights / w_div + ref + moment_bytes / o_div + master / o_div + extra_dp
    opt_tmp = trainable_bytes / g_div if inputs.accelerator == "gpu" else 2 * _largest_param(s, full_ft, adapter_w, base_w, inputs)
    transient = tokens * backward_transient_bytes(inputs)
    # three candidate moments: the end of the forward pass (the previous gradients still alive), the loss's backward,
    # and the first block's backward (the final norm's tensors released, a block's gradients in flight)
    if inputs.gradient_checkpointing:  # the block backward holds one recomputed block and (nearly) all gradients
        blocks = acts - final
        train_peak = static + casts + mask + max(acts + grads + logits_fwd, acts + logits_bwd,
                                                 blocks + grads + recompute + transient)
    else:
        head_grad = s.head_params * base_w / g_div if full_ft else 0
        train_peak = static + casts + mask + acts + max(grads + logits_fwd, logits_bwd, head_grad + transient - final)
    phases = {"training step": train_peak, "optimizer step": static + grads + opt_tmp}
    if objective in ("ppo", "grpo") or (objective == "raft" and inputs.max_new_tokens):
        kv_bytes = 2 if half_compute else 4
        gen_seqs = inputs.generation_batch or inputs.batch_size * inputs.samples_per_prompt
        kv = 2 * s.num_layers * s.kv_dim * kv_bytes * gen_seqs * inputs.seq_len
        rows.append(Row("generation KV cache", kv, f"{gen_seqs} sequences x {inputs.seq_len} tokens (generation phase)"))
        phases["generation"] = static + grads + kv + gen_seqs * s.vocab_size * 4 * 2
    notes.append(f"activations: {mode} ({'Llama block, ' + inputs.attn_implementation}); padded batches: {inputs.padded}; "
                 "Lightning zeroes gradients after the forward pass, so the previous gradients are alive during it")
    if objective in PAIRWISE:
        notes.append("chosen and rejected sequences go through the model in one batch (2 x batch_size sequences)")
    if objective in PAIRWISE or online:
        packed = ("one packed row per pair, packed_pairs" if objective in PAIRWISE
                  else "a prompt's rows packed into one, packed_groups")
        notes.append("activations are planned for full rows; prompt sharing (share_prompt: through a KV cache, or under "
                     f"gradient checkpointing or torch_compile {packed}, whose (rows, L, L) attention mask is not "
                     "counted) keeps one prompt's activations for all of its rows, so the training pass needs less")
    if inputs.reference in ("adapter", "copy"):
        notes.append("reference log-probs are computed under no_grad before the policy's forward: only their weights count")
    params = {"total": s.total_params, "trainable": trainable, "lora": lora_params, "matmul": s.matmul_params}
    return MemoryPlan(rows=rows, phases=phases, assumptions=notes, params=params)


def _largest_param(s: ModelShape, full_ft: bool, adapter_w: int, base_w: float, inputs: PlanInputs) -> float:
    """Bytes of the largest trainable tensor (CPU AdamW steps one tensor at a time)."""
    if full_ft:
        return max(s.embedding_params, *(a * b for a, b in s.linear_shapes().values())) * base_w
    if inputs.lora_r:
        shapes = s.linear_shapes()
        return max(inputs.lora_r * max(shapes[t]) for t in inputs.lora_targets) * adapter_w
    return 0.0


def _dtype_name(nbytes: float) -> str:
    return {4: "fp32", 2: "half precision"}.get(nbytes, f"{nbytes} B")


def _fmt(nbytes: float) -> str:
    if abs(nbytes) >= GiB:
        return f"{nbytes / GiB:,.2f} GiB"
    return f"{nbytes / MiB:,.1f} MiB"


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """The plan as a fixed-width table: one row per component, the phases, the peak and the assumptions."""
    width = max(len(r.component) for r in plan.rows + [Row("peak per device", 0)]) + 2
    lines = [title] if title else []
    lines.append(f"{'component':<{width}}{'per device':>12}  note")
    lines.append("-" * (width + 14 + 40))
    for r in plan.rows:
        lines.append(f"{r.component:<{width}}{_fmt(r.bytes):>12}  {r.note}")
    lines.append("-" * (width + 14 + 40))
    for name, value in plan.phases.items():
        lines.append(f"{name:<{width}}{_fmt(value):>12}  {'<- peak' if name == plan.peak_phase else ''}".rstrip())
    lines.append(f"{'peak per device':<{width}}{_fmt(plan.peak_bytes):>12}")
    lines.append("")
    lines.append("assumptions:")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    lines.append("  - not counted: allocator caching/fragmentation, the CUDA context (~0.3-0.5 GiB), NCCL and kernel workspaces")
    return "\n".join(lines)


