"""Process-group facts the trainer and the prepare command both need."""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedType


def cpu_only_multiprocess() -> bool:
    """Several processes (torchrun set WORLD_SIZE) on a machine without any accelerator: run them on
    the CPU over gloo. accelerate's own CPU launcher needs MPI; its multi-GPU launcher (torchrun)
    works everywhere, but then accelerate must be told that there is no GPU to bind to."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerators = (torch.cuda.is_available(), getattr(torch, "xpu", None) is not None and torch.xpu.is_available(),
                    torch.backends.mps.is_available())
    return not any(accelerators)


def shards_the_model(accelerator) -> bool:
    """FSDP and DeepSpeed save and load the model (and its optimizer state) through their own
    checkpoint formats; accelerate's ``save_state`` calls them and they must not be bypassed."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def full_parameters(accelerator, wrapped: torch.nn.Module):
    """A context in which the wrapped model's parameters are whole on every process: FSDP shards
    them (all processes must enter, it is a collective); otherwise they already are."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return contextlib.nullcontext()
