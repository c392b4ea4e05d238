"""Noising and training targets: what the denoiser sees and what its output is compared with.

A family's objective turns the per-sample uniform draws and Gaussian noise delivered by the data
pipeline (see :mod:`trainer.data`) into timesteps, noisy latents and targets. Drawing those
numbers in the data pipeline, keyed by each sample's position in the global batch, is what makes
a run independent of how it is split across processes.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .errors import TrainerError


class DDPMObjective:
    """Discrete-time diffusion (SD 1.x/2.x): epsilon or v-prediction, with an x0 option.

    The noise schedule (betas, number of train timesteps) is diffusers' own scheduler built from
    the model's scheduler config, so the schedule is the one the model was trained with.
    """

    def __init__(self, scheduler_config: dict, prediction_type: str, objective: str = "native"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise TrainerError(f"prediction_type {prediction_type!r} is not supported for this model "
                               "(expected epsilon or v_prediction)")
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type
        self.objective = objective
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        """Map uniform draws in [0, 1) to integer timesteps in [0, T)."""
        return (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)
        a = alphas_cumprod[t].view(-1, *([1] * (like.ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def loss_pair(self, latents, noise, noisy, prediction, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) in fp32 for the loss function."""
        prediction = prediction.float()
        if self.objective == "x0":
            sqrt_a, sqrt_1ma = self._alphas(t, noisy)
            noisy = noisy.float()
            if self.prediction_type == "epsilon":
                x0 = (noisy - sqrt_1ma * prediction) / sqrt_a
            else:
                x0 = sqrt_a * noisy - sqrt_1ma * prediction
            return x0, latents.float()
        if self.prediction_type == "epsilon":
            return prediction, noise.float()
        return prediction, self.scheduler.get_velocity(latents.float(), noise.float(), t)
