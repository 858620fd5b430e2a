"""Per-device memory planner: estimate what a training config needs before anything is allocated.

    lit_align plan-memory --config configs/iotacode/multi_gpu/sft_fsdp.yaml --trainer.devices 8
    lit_align plan-memory --config configs/quickstart/sft.yaml --model.init_args.lora.r 8 --json

The config is parsed by the same LightningCLI parser as ``lit_align fit`` (so overrides and validation are the
same), but nothing is instantiated: the model's shapes come from its ``config.json`` (a preset's from its definition),
and every figure below is arithmetic on those shapes.

What is counted, per device, for one optimizer step of Lightning's automatic optimization (which zeroes gradients
after the forward pass, so the previous step's gradients are still alive while activations accumulate):

- weights: parameters in their storage dtype; QLoRA's NF4 linear weights with double quantization cost
  0.5 byte + 1/64 byte (8-bit absmax per 64 values) + 4/16384 byte (fp32 second-level absmax per 256 blocks) each,
  and peft's ``prepare_model_for_kbit_training`` keeps every other weight in fp32. LoRA adapters are fp32 (peft
  up-casts them) unless the whole module is cast by a ``*-true`` precision.
- gradients and AdamW state: trainable parameters only; torch's AdamW keeps two moments in the parameter's dtype;
  DeepSpeed with bf16/fp16 keeps fp32 master weights and fp32 moments (12 bytes per trainable parameter).
- autocast weight copies: under ``*-mixed`` precision with fp32 weights, every matmul weight is cast to bf16/fp16 once
  per use and the copy is saved for the backward pass (one half-precision copy of the matmul weights).
- activations: the tensors autograd saves in a Hugging Face Llama block with SDPA attention, counted tensor by tensor
  (see :func:`layer_activation_bytes`); with gradient checkpointing only each block's input, plus one block
  recomputed in the backward pass.
- logits and loss: the loss's fp32 cross-entropy keeps up to three (batch x seq x vocab) fp32-sized buffers alive.
- reference model (DPO/PPO/GRPO): nothing when it is the LoRA policy with its adapter disabled, a frozen copy
  otherwise; PPO's value head; the KV cache of online objectives' generation phase.
- sharding: ``ddp`` replicates everything (and adds DDP's gradient buckets, one more gradient copy);
  ``fsdp``/``deepspeed_stage_3`` divide weights, gradients and optimizer state by the device count (plus the gathered
  blocks being computed); ``deepspeed_stage_2`` divides gradients and optimizer state; ``deepspeed_stage_1`` the
  optimizer state only; ``*_offload`` moves optimizer state to host memory.

What it cannot know: allocator caching and fragmentation (the CUDA caching allocator typically reserves 5-15% above
what is live), the CUDA context (about 0.3-0.5 GiB per process), NCCL buffers, and kernels' workspaces. The
activation rules were checked tensor by tensor on CPU; GPU kernels (flash/memory-efficient attention) save the same
tensors, but that has not been measured here. BENCHMARKS.md (memory planner section) compares estimates with measured CPU peaks.

Layout: shapes (parameter counts from a config.json or a preset, constants), estimate (the per-device
arithmetic and the table), config (a training config to planner inputs, and the command).
"""

from lit_align.memory.config import inputs_from_config, main, parse_training_config
from lit_align.memory.estimate import (MemoryPlan, PlanInputs, Row, StrategyInfo, estimate, format_plan,
                                       layer_activation_bytes, normalize_precision, normalize_strategy)
from lit_align.memory.shapes import (BLOCK_LINEARS, DTYPE_BYTES, LLAMA_LIKE, NF4_BYTES_PER_PARAM, OBJECTIVES, ONLINE,
                                     PAIRWISE, GiB, MiB, ModelShape, PlanError, load_model_config, preset_config)

__all__ = ["BLOCK_LINEARS", "DTYPE_BYTES", "GiB", "LLAMA_LIKE", "MemoryPlan", "MiB", "ModelShape", "NF4_BYTES_PER_PARAM",
           "OBJECTIVES", "ONLINE", "PAIRWISE", "PlanError", "PlanInputs", "Row", "StrategyInfo", "estimate",
           "format_plan", "inputs_from_config", "layer_activation_bytes", "load_model_config", "main",
           "normalize_precision", "normalize_strategy", "parse_training_config", "preset_config"]
