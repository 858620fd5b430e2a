"""Lightning's DeepSpeedStrategy on CPU processes (gloo), for tests only.

Lightning refuses DeepSpeed without a CUDA accelerator, checks that each process's device index equals its local
rank (a CPU device has no index), and hands DeepSpeed that index as its device rank. DeepSpeed itself runs on CPU (its
CPU accelerator is picked when no GPU is found; ZeRO's partitioning, gathering, reduce-scatter, clipping and its
optimizer wrapper are the same code as on a GPU). :class:`CPUDeepSpeedStrategy` lifts the three device checks and
nothing else, so lit_align's modules are tested under the real ZeRO-2/ZeRO-3 code paths here; what it cannot show is
anything CUDA-specific (NCCL, streams, bf16/fp16 kernels and loss scaling, memory).

DeepSpeed would also compile a shared-memory communication extension the first time it starts on a CPU (about 25 s,
and again for every new virtualenv); it serves only its CPU inference all-reduce, which these runs never call
(collectives go through torch.distributed on gloo, as they go through NCCL on a GPU). :class:`CPUDeepSpeedStrategy`
skips that build, so the tests need no C++ compiler either.
"""

from __future__ import annotations

import argparse
import importlib.util
from contextlib import nullcontext

import pytest
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -e '.[deepspeed]')")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy that runs on CPU processes (the device checks lifted, nothing else changed)."""

    strategy_name = "deepspeed_cpu_test"

    def __init__(self, *args, partition_all: bool = False, **kwargs) -> None:
        """``partition_all``: ZeRO-3 partitions every weight, the small ones too (DeepSpeed keeps a weight of under
        ``stage3_param_persistence_threshold`` = 1e5 elements whole on every process by default: the tiny preset's LM
        head among them, where a real model's is partitioned)."""
        super().__init__(*args, **kwargs)
        if partition_all:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # ZeRO-3 keeps a gathered parameter while it is used again within `stage3_max_reuse_distance` elements of the
        # recorded module order; it checks that by walking the order from each module, and the default (1e9, more
        # than the tiny preset holds) walks all of it at every module: 40% of a ZeRO-3 run's time here. 0 releases
        # each module's parameters after its use (re-gathered when needed): the same numbers, less wasted time.
        self.config.setdefault("zero_optimization", {}).setdefault("stage3_max_reuse_distance", 0)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips only DeepSpeedStrategy's "CUDA accelerator" check

    def setup_distributed(self) -> None:  # as DeepSpeedStrategy's, without the device-index check
        # the CPU-only shared-memory extension (see above); by module name: `deepspeed.comm.torch` is the torch package
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # the device rank is the local rank, as on a GPU (Lightning passes the device index, None on a CPU)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


def zero3_gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """A context in which ZeRO-3's partitioned parameters among ``params`` are whole (the others: nothing to do);
    with ``modifier_rank``, what that process writes into them is kept and sent to the others."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
