"""When to sample images and compute the held-out loss: before the first step of a run, every
``sample_every`` / ``eval_every`` optimizer steps, and after the last step. Every process calls
:meth:`Watch.step` at the same steps (the decisions depend on the step count alone)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .checkpoint import Progress
from .config import WatchArgs
from .errors import ConfigError
from .evaluation import HeldOutLoss
from .sampling import PromptSampler

logger = logging.getLogger(__name__)


def check_config(cfg: WatchArgs) -> None:
    """Combinations of the watching parameters (the config's ``watching`` section) that cannot work; raises
    :class:`ConfigError`."""
    if cfg.eval_latents is not None and cfg.eval_fraction:
        raise ConfigError("--eval_latents and --eval_fraction both give a held-out set; choose one")
    if cfg.eval_every is not None and cfg.eval_latents is None and not cfg.eval_fraction:
        raise ConfigError("--eval_every needs a held-out set: --eval_latents PATH or --eval_fraction F")
    if cfg.sample_every is not None and cfg.sample_prompts is None:
        raise ConfigError("--sample_every needs --sample_prompts")
    if cfg.sample_frames is not None and cfg.sample_prompts is None:
        raise ConfigError("--sample_frames needs --sample_prompts")


class Watch:
    """The run's sample images and held-out loss; either may be absent."""

    def __init__(self, accelerator, progress: Progress, steps: int, sampler: PromptSampler | None,
                 sample_every: int | None, held_out: HeldOutLoss | None, eval_every: int | None,
                 denoiser: torch.nn.Module, loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
        self.accelerator, self.progress, self.steps = accelerator, progress, steps
        self.sampler, self.sample_every = sampler, sample_every
        self.held_out, self.eval_every = held_out, eval_every
        self.denoiser, self.loss_of = denoiser, loss_of

    @property
    def seconds(self) -> float:
        """Wall seconds spent sampling and evaluating so far (this process)."""
        return (self.sampler.seconds if self.sampler else 0.0) + (self.held_out.seconds if self.held_out else 0.0)

    def start(self) -> None:
        """Before the first step of this run (a resumed run skips a held-out loss it already has)."""
        evaluated = bool(self.progress.eval_steps) and self.progress.eval_steps[-1] == self.progress.total
        self._run(sample=self.sampler is not None, evaluate=self.held_out is not None and not evaluated)

    def step(self) -> None:
        """After an optimizer step: whatever is due at this step (the last one is left to :meth:`end`)."""
        done = self.progress.done
        if done >= self.steps:
            return
        self._run(sample=self.sampler is not None and bool(self.sample_every) and done % self.sample_every == 0,
                  evaluate=self.held_out is not None and bool(self.eval_every) and done % self.eval_every == 0)

    def end(self) -> None:
        """After the last step."""
        self._run(sample=self.sampler is not None, evaluate=self.held_out is not None)

    def _run(self, sample: bool, evaluate: bool) -> None:
        step = self.progress.total
        if evaluate:
            loss = self.held_out.evaluate(self.accelerator, self.denoiser, self.loss_of)
            self.progress.add_eval(step, loss)
            self.accelerator.log({"eval_loss": loss}, step=step)
            logger.info("held-out loss at step %d: %.5f", step, loss)
        if sample:
            self.sampler.sample(self.accelerator, step)
