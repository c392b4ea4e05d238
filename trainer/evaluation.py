"""The held-out loss (``--eval_latents`` / ``--eval_fraction``, ``--eval_every``).

The training loss of a diffusion model is noisy because every step draws new noise and new
timesteps. The held-out loss removes both: each held-out row is scored at ``EVAL_LEVELS`` fixed noise
levels, evenly spaced over the schedule, with fixed noise, both drawn from a generator seeded by
the row's index alone. So the number is comparable across steps, across runs (whatever their seed)
and across process counts:

- each row is one forward pass of its ``EVAL_LEVELS`` noisy copies, whichever process runs it, so
  its loss does not depend on how rows are split;
- the per-row losses land in a vector that is zero except where a process filled it, and the
  vectors are summed over processes (adding zeros is exact), so the mean is the same to the last
  bit on 1 or N processes;
- every process runs the same number of forward passes (a short share is padded with a repeated
  row whose result is dropped), which DDP/FSDP forwards need.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from .data import TrainingData, mix_seed
from .errors import TrainerError

logger = logging.getLogger(__name__)

#: noise levels per held-out row: (k + h) / EVAL_LEVELS for k < EVAL_LEVELS, h a fixed per-row offset in [0, 1)
EVAL_LEVELS = 4
_EVAL_STREAM = 0xE7A1  # keeps the held-out draws apart from the training stream's


def hold_out(data: TrainingData, fraction: float, seed: int) -> list[int]:
    """Take ``fraction`` of the rows (at least one, chosen by ``seed``) out of ``data``'s training buckets
    and return them, sorted."""
    count = max(1, round(fraction * data.num_rows))
    if count >= data.num_rows:
        raise TrainerError(f"--eval_fraction {fraction} holds out all {data.num_rows} rows of --latents, leaving "
                           "none to train on")
    g = torch.Generator().manual_seed(mix_seed(seed, _EVAL_STREAM))
    held = np.sort(torch.randperm(data.num_rows, generator=g)[:count].numpy())
    kept = [np.asarray(rows)[~np.isin(rows, held)].tolist() for rows in data.buckets]
    data.buckets = [rows for rows in kept if rows]
    logger.info("held out %d of %d rows for the evaluation loss", count, data.num_rows)
    return held.tolist()


def open_eval_set(dataset, positive, family, model) -> TrainingData:
    """``--eval_latents`` checked exactly as the training set is (columns, shapes, channels, NaN/inf).
    Its own conditioning columns are used when it has them all, else ``--positive`` (one row for every
    latent, or one per held-out row)."""
    if all(name in dataset.column_names for name in family.conditioning):
        positive = None
    try:
        return TrainingData(dataset, positive, family, model)
    except TrainerError as e:
        # TrainingData names the parameter it usually checks; this set came from --eval_latents
        raise TrainerError(str(e).replace("--latents", "--eval_latents")) from None


class HeldOutLoss:
    """The loss on fixed rows at fixed noise levels and noise; see the module docstring."""

    def __init__(self, data: TrainingData, rows: list[int]):
        self.data = data
        self.rows = rows
        #: wall seconds spent evaluating in this run
        self.seconds = 0.0

    def batch(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` repeated ``EVAL_LEVELS`` times with its fixed noise and noise levels (on the CPU)."""
        batch = {name: value.repeat(EVAL_LEVELS, *([1] * (value.ndim - 1)))
                 for name, value in self.data.rows([row]).items()}
        g = torch.Generator().manual_seed(mix_seed(_EVAL_STREAM, row))
        offset = torch.rand((), generator=g)
        batch["u"] = (torch.arange(EVAL_LEVELS) + offset) / EVAL_LEVELS
        batch["noise"] = torch.randn(batch["latents"].shape, generator=g)
        return batch

    @torch.no_grad()
    def evaluate(self, accelerator, denoiser: torch.nn.Module,
                 loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> float:
        """The mean held-out loss; every process must call this. ``loss_of(batch)`` is the training loss
        of a batch (the model's forward and objective); ``denoiser`` is put in eval mode meanwhile."""
        started = time.perf_counter()
        processes, rank, n = accelerator.num_processes, accelerator.process_index, len(self.rows)
        mine = list(range(rank, n, processes))
        share = -(-n // processes)
        padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
        losses = torch.zeros(n, device=accelerator.device)
        was_training = denoiser.training
        denoiser.eval()
        try:
            for j, i in enumerate(padded):
                batch = {k: v.to(accelerator.device) for k, v in self.batch(self.rows[i]).items()}
                loss = loss_of(batch)
                if j < len(mine):
                    losses[i] = loss.float()
        finally:
            denoiser.train(was_training)
        if processes > 1:
            losses = accelerator.reduce(losses, reduction="sum")
        value = losses.mean().item()  # note: a device-to-host sync point, once per evaluation
        self.seconds += time.perf_counter() - started
        return value
