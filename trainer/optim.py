"""The node's optimizers, with torch's defaults for everything but the learning rate."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    kwargs = {}
    if all(p.is_cuda for p in params) and name in ("AdamW", "Adam", "SGD"):
        kwargs["fused"] = True  # one kernel for all adapter tensors instead of one per tensor
    return OPTIMIZERS[name](params, lr=lr, **kwargs)
