"""Lightning's FSDPStrategy on CPU processes (gloo), for tests only.

Lightning refuses FSDP without a GPU accelerator, and torch's FSDP picks its device from the parameters or the
current accelerator and refuses CPU when ``device_id`` is not given, which Lightning never gives on CPU. Both checks
are about *where* to compute, not how: with ``device_id=cpu`` FSDP's sharding, gathering, reduce-scatter, mixed
trainable/frozen flat parameters (``use_orig_params``), activation checkpointing and sharded checkpoints run on gloo.
:class:`CPUFSDPStrategy` lifts the two checks so that lit_align's modules can be tested under the real FSDP code
paths here; what it cannot show is anything CUDA-specific (NCCL, streams, bf16 kernels, memory).

Checkpoints: Lightning gathers state dicts with ``offload_to_cpu=True``, which on a GPU copies each gathered tensor
to host memory. On CPU that copy is a no-op, so the state dict would alias FSDP's unsharded buffers, which FSDP frees
right after (saving then reads freed memory and crashes). Importing this module makes Lightning's FSDP strategy
gather without the offload, which on CPU means FSDP clones each tensor: the same result a GPU run gets.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.fsdp.fully_sharded_data_parallel as _fsdp_module
import lightning.pytorch.strategies.fsdp as _lightning_fsdp
from lightning.pytorch.strategies import FSDPStrategy

_init_device_handle = _fsdp_module._init_device_handle


def _state_dict_context(state_dict_type: str):
    def context(module: torch.nn.Module, world_size: int = 1, rank0_only: bool = True):
        from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
        from torch.distributed.fsdp.api import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            ShardedOptimStateDictConfig,
            ShardedStateDictConfig,
        )

        if state_dict_type == "full":
            configs = (StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                       FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))
        else:
            configs = (StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=False),
                       ShardedOptimStateDictConfig(offload_to_cpu=False))
        return FullyShardedDataParallel.state_dict_type(module, *configs)

    return context


_lightning_fsdp._get_full_state_dict_context = _state_dict_context("full")
_lightning_fsdp._get_sharded_state_dict_context = _state_dict_context("sharded")


def _init_device_handle_cpu(state: Any, module: Any, ignored_params: Any, device_id: Any) -> Any:
    return _init_device_handle(state, module, ignored_params, device_id if device_id is not None else torch.device("cpu"))


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy that runs on CPU processes (a subclass, so Lightning's accelerator check does not apply)."""

    strategy_name = "fsdp_cpu_test"

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        _fsdp_module._init_device_handle = _init_device_handle_cpu
        try:
            return super()._setup_model(model)
        finally:
            _fsdp_module._init_device_handle = _init_device_handle

    @contextmanager
    def model_sharded_context(self):  # where a module wraps its own networks (online objectives' configure_model)
        _fsdp_module._init_device_handle = _init_device_handle_cpu
        try:
            with super().model_sharded_context():
                yield
        finally:
            _fsdp_module._init_device_handle = _init_device_handle
