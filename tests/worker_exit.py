"""How the multi-process test workers (run as scripts by test_ddp_objectives, test_ddp_sft, test_online_ddp) end."""

from __future__ import annotations

import os
import sys


def leave_worker() -> None:
    """Wait for the other processes, then leave without the interpreter's teardown.

    Under CPU load the exit after training occasionally aborts in native teardown ("terminate called without an
    active exception", SIGABRT, exit status -6) with every result already written: seen in the 2-process workers and in
    tests/generation/test_hf_synchronized.py. What the tests check is written before this point; the barrier makes
    sure every process has written it before any leaves (the test reads all ranks' files once process 0 exits)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
