"""The node's loss functions, with torch's own definitions (mean over all elements)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "MSE": F.mse_loss,
    "L1": F.l1_loss,
    "Huber": F.huber_loss,  # delta = 1.0
    "SmoothL1": F.smooth_l1_loss,  # beta = 1.0
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return LOSSES[name]
