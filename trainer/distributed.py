"""Process-group facts the trainer and the prepare command both need."""

from __future__ import annotations

import os

import torch


def cpu_only_multiprocess() -> bool:
    """Several processes (torchrun set WORLD_SIZE) on a machine without any accelerator: run them on
    the CPU over gloo. accelerate's own CPU launcher needs MPI; its multi-GPU launcher (torchrun)
    works everywhere, but then accelerate must be told that there is no GPU to bind to."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerators = (torch.cuda.is_available(), getattr(torch, "xpu", None) is not None and torch.xpu.is_available(),
                    torch.backends.mps.is_available())
    return not any(accelerators)
