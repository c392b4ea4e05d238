"""Noising and training targets: what the denoiser sees and what its output is compared with.

A family's objective turns the per-sample uniform draws and Gaussian noise delivered by the data
pipeline (see :mod:`trainer.data`) into timesteps, noisy latents and targets. Drawing those
numbers in the data pipeline, keyed by each sample's position in the global batch, is what makes
a run independent of how it is split across processes: every function here maps one sample's draw
to one sample's timestep, never a batch statistic.

Two kinds of objective:

- :class:`DDPMObjective` (SD 1.x/2.x, SDXL): discrete timesteps ``t`` in ``[0, T)``,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; the model predicts ``eps`` or ``v``.
- :class:`FlowMatchObjective` (SD3/3.5, Flux.1): rectified flow, ``x_s = (1 - s) x0 + s eps`` for
  a noise level ``s`` in ``(0, 1]``; the model predicts the velocity ``eps - x0``. Timesteps passed
  around are the scheduler's, ``s * T`` (as ``FlowMatchEulerDiscreteScheduler.timesteps``).

Both offer ``objective="x0"`` (the loss on the predicted clean latents, the node's behaviour) and
per-sample loss weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from .config import ObjectiveOptions  # the objective's section of the run's config
from .errors import TrainerError

#: the config's defaults (sections are frozen: one shared instance is safe)
DEFAULT_OPTIONS = ObjectiveOptions()


def noise_fraction(u: torch.Tensor, method: str, logit_mean: float, logit_std: float,
                   mode_scale: float) -> torch.Tensor:
    """Map per-sample uniform draws ``u`` in [0, 1) to noise levels in [0, 1] (1 = pure noise).

    ``uniform`` returns ``u``; ``logit_normal`` is ``sigmoid(mean + std * z)`` with ``z`` the
    standard normal quantile of ``u`` (the SD3 paper's lognorm, drawn by inversion so that one
    uniform per sample suffices); ``mode`` is the SD3 paper's ``f_mode(u) = 1 - u - s (cos^2(pi u/2)
    - 1 + u)``.
    """
    u = u.float()
    if method == "uniform":
        return u
    if method == "logit_normal":
        eps = 1e-6  # keeps the normal quantile finite at u = 0
        z = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(eps, 1 - eps) - 1)
        return torch.sigmoid(logit_mean + logit_std * z)
    # "mode": the last of the three methods config.py accepts
    return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def weighted_loss(loss_fn: Callable, prediction: torch.Tensor, target: torch.Tensor,
                  weights: torch.Tensor | None) -> torch.Tensor:
    """``loss_fn`` (torch's definition) reduced to a 0-dim tensor.

    Unweighted: the plain mean over all elements. Weighted: the mean per sample, times its weight,
    averaged over the batch. A batch mean (not ``sum(w l) / sum(w)``) keeps the loss of a global
    batch equal to the average of its micro-batches, however they are split.
    """
    if weights is None:
        return loss_fn(prediction, target)
    per_sample = loss_fn(prediction, target, reduction="none").flatten(1).mean(1)
    return (per_sample * weights.to(per_sample)).mean()


def _check_options(options: ObjectiveOptions, weightings: tuple[str, ...], kind: str) -> None:
    """The choices config.py checks are valid for some family; which weightings fit this one is known here."""
    if options.loss_weighting not in ("none", *weightings):
        raise TrainerError(f"--loss_weighting {options.loss_weighting} does not apply to {kind} models "
                           f"(use one of: none, {', '.join(weightings)})")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] tensor shaped to broadcast over a [B, ...] tensor."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class DDPMObjective:
    """Discrete-time diffusion (SD 1.x/2.x, SDXL): epsilon or v-prediction, with an x0 option.

    The noise schedule (betas, number of train timesteps) is diffusers' own scheduler built from
    the model's scheduler config, so the schedule is the one the model was trained with.
    """

    def __init__(self, scheduler_config: dict, prediction_type: str,
                 options: ObjectiveOptions = DEFAULT_OPTIONS, model_inputs: dict[str, Any] | None = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise TrainerError(f"prediction_type {prediction_type!r} is not supported for this model "
                               "(expected epsilon or v_prediction)")
        _check_options(options, ("min_snr",), "DDPM (epsilon / v-prediction)")
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type
        self.options = options
        self.objective = options.objective
        self.sampling = "uniform" if options.timestep_sampling == "auto" else options.timestep_sampling
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        #: constant keyword inputs of the family's ``forward`` for this run
        self.model_inputs = model_inputs or {}
        self._device_alphas: torch.Tensor | None = None

    def timesteps(self, u: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Map uniform draws in [0, 1) to integer timesteps in [0, T)."""
        fraction = u if self.sampling == "uniform" else noise_fraction(
            u, self.sampling, self.options.logit_mean, self.options.logit_std, self.options.mode_scale)
        return (fraction * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def _alphas_cumprod(self, device: torch.device) -> torch.Tensor:
        """The schedule's cumulative alphas on ``device``, copied there once (not a transfer per step)."""
        if self._device_alphas is None or self._device_alphas.device != device:
            self._device_alphas = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._device_alphas

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = _per_sample(self._alphas_cumprod(like.device)[t], like)
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

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None for the plain mean.

        min-SNR (Hang et al. 2023): ``min(SNR, gamma)`` divided by what the target's error scales
        with: ``SNR`` for epsilon, ``SNR + 1`` for v, 1 for x0.
        """
        if self.options.loss_weighting != "min_snr":
            return None
        abar = self._alphas_cumprod(t.device)[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.options.min_snr_gamma)
        if self.objective == "x0":
            return clipped
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)


@dataclass
class FlowShift:
    """The scheduler's timestep shift: a constant (``shift``) or, with ``use_dynamic_shifting``,
    one that grows with the image's token count (Flux.1): ``mu`` is linear in the sequence length
    between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``."""

    shift: float = 1.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    #: "exponential": the shift factor is exp(mu); "linear": it is mu
    shift_type: str = "exponential"

    @classmethod
    def from_scheduler_config(cls, config: dict) -> FlowShift:
        full = FlowMatchEulerDiscreteScheduler.from_config(config).config  # fills in the defaults
        return cls(shift=float(full.shift), dynamic=bool(full.use_dynamic_shifting),
                   base_seq_len=full.base_image_seq_len, max_seq_len=full.max_image_seq_len,
                   base_shift=full.base_shift, max_shift=full.max_shift,
                   shift_type=full.get("time_shift_type", "exponential"))

    def factor(self, seq_len: int) -> float:
        """The factor ``k`` of ``s -> k s / (1 + (k - 1) s)`` for an image of ``seq_len`` tokens."""
        if not self.dynamic:
            return self.shift
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        mu = self.base_shift + slope * (seq_len - self.base_seq_len)
        return math.exp(mu) if self.shift_type == "exponential" else mu


class FlowMatchObjective:
    """Rectified flow (SD3/3.5, Flux.1): ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``.

    Noise levels: the sampled fraction (``timestep_sampling``, default logit-normal) is clamped to
    ``[1/T, 1]`` (the range of the scheduler's training sigmas) and then shifted by the scheduler's
    shift, so training sees the noise levels the model's sampler uses.
    """

    def __init__(self, scheduler_config: dict, options: ObjectiveOptions = DEFAULT_OPTIONS,
                 patch_size: int = 1, model_inputs: dict[str, Any] | None = None):
        _check_options(options, ("sigma_sqrt", "cosmap"), "flow-matching")
        self.options = options
        self.objective = options.objective
        self.sampling = "logit_normal" if options.timestep_sampling == "auto" else options.timestep_sampling
        self.num_train_timesteps = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler_config).config.num_train_timesteps
        self.shift = FlowShift.from_scheduler_config(scheduler_config)
        #: latent pixels per token side (SD3: the patch size, Flux: 2 for its 2x2 packing)
        self.patch_size = patch_size
        self.model_inputs = model_inputs or {}

    def sigmas(self, u: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Per-sample noise levels in (0, 1] for these latents (their size sets a dynamic shift)."""
        o, T = self.options, self.num_train_timesteps
        s = noise_fraction(u, self.sampling, o.logit_mean, o.logit_std, o.mode_scale).clamp(1 / T, 1.0)
        height, width = latents.shape[-2:]
        k = self.shift.factor((height // self.patch_size) * (width // self.patch_size))
        return k * s / (1 + (k - 1) * s)

    def timesteps(self, u: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler's timesteps ``sigma * T`` (floats) for these draws."""
        return self.sigmas(u, latents) * self.num_train_timesteps

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(t.float() / self.num_train_timesteps, like)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t, latents)
        return (1 - sigma) * latents + sigma * noise

    def loss_pair(self, latents, noise, noisy, prediction, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) in fp32 for the loss function."""
        prediction = prediction.float()
        if self.objective == "x0":
            return noisy.float() - self._sigma(t, noisy) * prediction, latents.float()
        return prediction, noise.float() - latents.float()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the SD3 paper (as diffusers' ``compute_loss_weighting_for_sd3``):
        ``sigma_sqrt`` = 1/sigma^2, ``cosmap`` = 2 / (pi (1 - 2 sigma + 2 sigma^2)); None: the plain mean."""
        sigma = t.float() / self.num_train_timesteps
        if self.options.loss_weighting == "sigma_sqrt":
            return sigma ** -2.0
        if self.options.loss_weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return None
