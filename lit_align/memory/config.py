"""From a training config to planner inputs, and the `lit_align plan-memory` command."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_align.hints import HintingArgumentParser
from lit_align.memory.estimate import PlanInputs, _fmt, estimate, format_plan, normalize_precision, normalize_strategy
from lit_align.memory.shapes import (BLOCK_LINEARS, DTYPE_BYTES, LLAMA_LIKE, OBJECTIVES, ONLINE, PAIRWISE, GiB, ModelShape,
                                     PlanError, _namespace_to_dict, load_model_config)


# ---------------------------------------------------------------------------------------------------------- configs
def _find_key(init_args: dict, names: tuple[str, ...]) -> Any:
    """The first of ``names`` in ``init_args`` or in one nested dict of it (for example a sampling config)."""
    for name in names:
        if init_args.get(name) is not None:
            return init_args[name]
    for value in init_args.values():
        if isinstance(value, dict):
            found = _find_key(value, names)
            if found is not None:
                return found
    return None


def detect_objective(class_path: str) -> str:
    name = class_path.rsplit(".", 1)[-1].lower()
    for objective in ("grpo", "orpo", "dpo", "ppo", "raft", "reward", "sft"):
        if objective in name:
            return objective
    raise PlanError(f"model.class_path {class_path!r}: cannot tell its objective; pass --objective {{{','.join(OBJECTIVES)}}}")


def parse_training_config(cli_args: list[str]) -> dict:
    """Parse a fit config and overrides with lit_align's LightningCLI parser, instantiating nothing; returns a dict."""
    from lit_align.cli import LitAlignCLI

    class _ParseOnly(LitAlignCLI):
        def _set_seed(self) -> None:  # parsing must not touch the global RNG
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():  # LightningCLI warns when args are given while sys.argv holds `plan-memory ...`
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = _ParseOnly(args=cli_args, run=False)
    return _namespace_to_dict(cli.config)


def inputs_from_config(config: dict, objective: str = "auto", reference: str = "auto", seq_len: int | None = None,
                       samples_per_prompt: int | None = None, max_new_tokens: int | None = None,
                       update_batch: int | None = None) -> PlanInputs:
    """Resolve the planner's inputs from a parsed fit config (``model``/``data``/``trainer`` sections)."""
    model = config.get("model") or {}
    data = config.get("data") or {}
    trainer = config.get("trainer") or {}
    m_args = dict(model.get("init_args") or {})
    d_args = dict(data.get("init_args") or {})
    notes: list[str] = []
    if objective == "auto":
        objective = detect_objective(str(model.get("class_path", "")))
    shape = ModelShape.from_hf_config(load_model_config(str(m_args.get("model_name_or_path", "preset:tiny")), notes))
    if shape.model_type not in LLAMA_LIKE:
        notes.append(f"model_type {shape.model_type!r} is not Llama-shaped: sizes are read from its config, but the "
                     "block is assumed to be a Llama block (gated MLP, RMSNorm)")

    lora_cfg = m_args.get("lora")
    lora_r = targets = None
    dropout = 0.0
    if lora_cfg:
        lora_r = int(lora_cfg.get("r", 32))
        raw = lora_cfg.get("target_modules", "all-linear")
        targets = BLOCK_LINEARS if raw == "all-linear" else tuple([raw] if isinstance(raw, str) else raw)
        unknown = [t for t in targets if t not in BLOCK_LINEARS]
        if unknown:
            raise PlanError(f"model.init_args.lora.target_modules {unknown} are not linear layers of a Llama block; "
                            f"choose from {list(BLOCK_LINEARS)} or 'all-linear'")
        dropout = float(lora_cfg.get("dropout", 0.0))
    dtype = str(m_args.get("dtype") or "float32")
    if dtype == "auto":
        cfg_dtype = str(getattr(load_model_config(str(m_args.get("model_name_or_path"))), "torch_dtype", "float32") or "float32")
        dtype = cfg_dtype.replace("torch.", "")
        notes.append(f"dtype 'auto' resolved to the checkpoint's {dtype}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"model.init_args.dtype {dtype!r}: expected one of {sorted(DTYPE_BYTES)} or 'auto'")

    batch = int(d_args.get("batch_size", 8))
    max_length = int(d_args.get("max_length", 1024))
    k = samples_per_prompt or _find_key(m_args, ("samples_per_prompt", "num_generations", "group_size")) or 1
    new = max_new_tokens if max_new_tokens is not None else _find_key(m_args, ("max_new_tokens",))
    generation_batch = None
    if objective in ONLINE:
        if new is None:
            raise PlanError(f"{objective}: cannot find max_new_tokens in model.init_args; pass --max-new-tokens")
        if not samples_per_prompt and k == 1 and objective == "grpo":
            notes.append("grpo: samples per prompt not found in the config; assumed 1 (pass --samples-per-prompt)")
        micro = update_batch or _find_key(m_args, ("micro_batch_size",))
        rollouts = batch * int(k)
        generation_batch = min(rollouts, int(_find_key(m_args, ("generation_batch_size",)) or rollouts))
        if micro and int(micro) < rollouts:
            notes.append(f"update pass: {micro} of the {rollouts} rollouts per forward/backward (micro_batch_size)")
            rollouts = int(micro)
        batch, k = rollouts, 1  # the update's forward/backward sees `rollouts` sequences
        backend = str(m_args.get("generation_backend") or "hf")
        if backend != "hf":
            notes.append(f"generation_backend {backend!r}: its memory (vLLM: gpu_memory_utilization of the device) is "
                         "not in this plan; the KV cache row is the hf backend's")
    else:
        k, new = 1, 0
    length = seq_len or (max_length + int(new or 0))
    if objective in ONLINE and not seq_len:
        notes.append(f"rollouts planned at the worst case of {max_length} prompt + {new} new tokens; pass --seq-len "
                     "for the typical padded rollout length")

    if reference == "auto":
        ref_value = next((str(v) for key, v in m_args.items()
                          if "reference" in key and "placement" not in key and isinstance(v, str)), None)
        if objective not in ("dpo", "ppo", "grpo") or (objective == "grpo" and m_args.get("beta") == 0):
            reference = "none"
        elif ref_value and "precomputed" in ref_value.lower():
            reference = "none"
            notes.append("reference log-probs are precomputed once before training: no reference model in memory")
        elif ref_value and any(w in ref_value.lower() for w in ("copy", "frozen", "separate")):
            reference = "copy"
        elif ref_value and "adapter" in ref_value.lower() and lora_r is None:
            raise PlanError(f"model.init_args reference {ref_value!r} needs a LoRA adapter (model.init_args.lora)")
        else:
            reference = "adapter" if lora_r is not None else "copy"
    reward_model, rm_dtype, rm_lora, rm_4bit = None, "float32", 0, False
    rm_path = m_args.get("reward_model") if isinstance(m_args.get("reward_model"), str) else None
    if objective in ONLINE and rm_path and m_args.get("reward", "execution") == "reward_model":
        reward_model, rm_dtype, rm_lora, rm_4bit = reward_model_weights(rm_path)

    strategy_info = normalize_strategy(trainer.get("strategy"))
    notes += strategy_info.notes
    devices = trainer.get("devices", 1)
    try:
        devices = int(devices)
    except (TypeError, ValueError):
        devices = len(devices) if isinstance(devices, (list, tuple)) else 1
        if devices == 1 and str(trainer.get("devices")) in ("auto", "-1"):
            notes.append(f"trainer.devices {trainer.get('devices')!r}: planned for 1 device (pass --trainer.devices N)")
    devices *= int(trainer.get("num_nodes", 1) or 1)
    accelerator = str(trainer.get("accelerator") or "auto")
    accelerator = "cpu" if accelerator == "cpu" else "gpu"
    grad_accum = int(trainer.get("accumulate_grad_batches", 1) or 1)
    if grad_accum > 1:
        notes.append(f"accumulate_grad_batches={grad_accum}: memory is that of one micro-batch of {batch}")
    packing = bool(d_args.get("packing", False))
    return PlanInputs(
        shape=shape, objective=objective, batch_size=batch, seq_len=length, samples_per_prompt=int(k),
        generation_batch=generation_batch,
        max_new_tokens=int(new or 0), lora_r=lora_r, lora_targets=targets or BLOCK_LINEARS, lora_dropout=dropout,
        quantize_4bit=bool(m_args.get("quantize_4bit", False)), dtype=dtype,
        precision=normalize_precision(trainer.get("precision")),
        gradient_checkpointing=bool(m_args.get("gradient_checkpointing", False)),
        attn_implementation=str(m_args.get("attn_implementation") or "sdpa"),
        padded=packing or batch * int(k) * (2 if objective in PAIRWISE else 1) > 1,
        strategy=strategy_info.name, ddp_bucket_copy=strategy_info.ddp_bucket_copy,
        deepspeed_buckets=strategy_info.deepspeed_buckets if strategy_info.overlap_comm else None,
        devices=devices, accelerator=accelerator, reference=reference,
        value_head=objective == "ppo", reward_model=reward_model, reward_model_dtype=rm_dtype,
        reward_model_lora_params=rm_lora, reward_model_4bit=rm_4bit,
        reference_replicated=m_args.get("reference_placement") == "replicate",
        logits_chunk_size=int(m_args["logits_chunk_size"]) if m_args.get("logits_chunk_size") else None,
        reward_model_replicated=m_args.get("reward_placement", "replicate") != "shard",
        notes=notes + ([f"packed sequences of {max_length} tokens"] if packing else []),
    )


def reward_model_weights(path: str) -> tuple[ModelShape, str, int, bool]:
    """(shape, load dtype, LoRA parameters, 4-bit) of the reward model an online objective loads from ``path``, as
    :func:`lit_align.modules.reward.load_reward_model` builds it, without loading any weights: a saved directory's
    config.json (loaded in float32), or a RewardModel checkpoint's hyperparameters (memory-mapped; its base model's
    config.json, its ``dtype``, ``lora`` and ``quantize_4bit``)."""
    from pathlib import Path

    option = "model.init_args.reward_model"
    if not path.endswith(".ckpt"):
        return ModelShape.from_hf_config(load_model_config(path, option=option)), "float32", 0, False
    from lit_align.models import checkpoint_hyperparameters

    if not Path(path).expanduser().is_file():
        raise PlanError(f"{option}: checkpoint {path!r} does not exist")
    try:
        hp = checkpoint_hyperparameters(path)
    except Exception as err:  # noqa: BLE001  (a torn or foreign file: name it)
        raise PlanError(f"{option}: cannot read the checkpoint {path!r} ({type(err).__name__}: {err})") from err
    base = str(hp.get("model_name_or_path") or "")
    if not base:
        raise PlanError(f"{option}: {path!r} has no model_name_or_path hyperparameter: it is not a RewardModel checkpoint")
    base_config = load_model_config(base, option=f"{option} (the base model of {path})")
    shape = ModelShape.from_hf_config(base_config)
    dtype = str(hp.get("dtype") or "float32")
    if dtype == "auto":
        dtype = str(getattr(base_config, "torch_dtype", None) or "float32").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"{option}: {path!r} was trained with dtype {dtype!r}, which the planner does not know")
    lora = hp.get("lora")
    lora_params = 0
    if lora:
        get = lora.get if isinstance(lora, dict) else (lambda k, d=None: getattr(lora, k, d))
        raw = get("target_modules", "all-linear")
        targets = BLOCK_LINEARS if raw == "all-linear" else tuple(t for t in ([raw] if isinstance(raw, str) else raw)
                                                                  if t in BLOCK_LINEARS)
        lora_params = shape.lora_params(int(get("r", 32)), targets)
    return shape, dtype, lora_params, bool(hp.get("quantize_4bit", False))


# ---------------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = HintingArgumentParser(
        prog="lit_align plan-memory",
        description="Estimate per-device memory of a training config without allocating the model. Takes the same "
                    "--config and dotted overrides as `lit_align fit` (e.g. --model.init_args.lora.r 8 "
                    "--data.init_args.batch_size 4 --trainer.strategy fsdp --trainer.devices 8).")
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="the training config (as for `lit_align fit`); dotted overrides may follow")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--objective", default="auto", choices=("auto",) + OBJECTIVES,
                        help="objective to plan for (auto: from model.class_path)")
    parser.add_argument("--reference", default="auto", choices=("auto", "none", "adapter", "copy"),
                        help="reference model: the adapter-disabled policy, a frozen copy, or none (auto: from the config)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data max_length + max_new_tokens)")
    parser.add_argument("--samples-per-prompt", type=int, default=None, help="online objectives: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="online objectives: generated tokens per completion")
    parser.add_argument("--update-batch", type=int, default=None,
                        help="online objectives: rollouts per forward/backward of the update (default: micro_batch_size)")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB per device: report whether the peak fits")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lit_align plan-memory``: print the estimate for a config; exit 1 when it does not fit --device-memory."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not args.config:
        parser.error("--config FILE.yaml is required (the same file `lit_align fit` takes)")
    for path in args.config:
        if not Path(path).expanduser().is_file():
            parser.error(f"--config {path}: no such file")
    rest = [a for c in args.config for a in ("--config", c)] + rest  # configs first, then the overrides
    for flag in ("--seq-len", "--samples-per-prompt", "--max-new-tokens", "--update-batch"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    try:
        config = parse_training_config(rest)
        inputs = inputs_from_config(config, objective=args.objective, reference=args.reference, seq_len=args.seq_len,
                                    samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                    update_batch=args.update_batch)
        plan = estimate(inputs)
    except PlanError as err:
        print(f"lit_align plan-memory: error: {err}", file=sys.stderr)
        return 2
    fits = None if args.device_memory is None else plan.peak_bytes <= args.device_memory * GiB
    if args.json:
        out = plan.to_dict()
        out["inputs"] = {k: v for k, v in asdict(inputs).items() if k not in ("notes",)}
        if fits is not None:
            out["fits"] = fits
        print(json.dumps(out, indent=2, default=str))
    else:
        s = inputs.shape
        title = (f"{inputs.objective} on {s.model_type} ({s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}); "
                 f"precision {inputs.precision}, dtype {inputs.dtype}, strategy {inputs.strategy} x {inputs.devices}")
        print(format_plan(plan, title))
        if fits is not None:
            verdict = "fits" if fits else "does NOT fit"
            print(f"\n{verdict} in {args.device_memory:g} GiB per device "
                  f"(headroom {_fmt(args.device_memory * GiB - plan.peak_bytes)}; keep ~10% for the allocator)")
    return 0 if fits in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())

