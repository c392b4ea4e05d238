"""The model-family interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import TrainerError

FAMILIES: dict[str, "ModelFamily"] = {}


def register_family(cls: type["ModelFamily"]) -> type["ModelFamily"]:
    """Class decorator: make a family available by its ``name`` to detection and ``--model_family``."""
    FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> "ModelFamily":
    try:
        return FAMILIES[name]
    except KeyError:
        raise TrainerError(f"--model_family: unknown family {name!r} (known: {', '.join(FAMILIES)})") from None


class ModelFamily:
    """What the trainer needs to know about one kind of diffusion model."""

    name: ClassVar[str]
    #: diffusers class of the denoiser, and its subfolder in a pipeline folder
    denoiser_class: ClassVar[type]
    subfolder: ClassVar[str]
    #: module-name prefix of kohya-style LoRA keys for this denoiser
    kohya_prefix: ClassVar[str]
    #: module-name suffixes adapted by default
    default_targets: ClassVar[tuple[str, ...]]
    #: conditioning columns the denoiser needs: name -> number of dims per row
    conditioning: ClassVar[dict[str, int]]

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether a denoiser config (its ``config.json``) belongs to this family."""
        raise NotImplementedError

    def latent_channels(self, model: torch.nn.Module) -> int:
        return model.config.in_channels

    def check_conditioning(self, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise :class:`TrainerError` if conditioning of these per-row shapes cannot feed ``model``."""

    def make_objective(self, scheduler_config: dict | None, prediction_type: str, objective: str):
        raise NotImplementedError

    def forward(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]):
        raise NotImplementedError

    def single_file_config(self, state_dict: dict[str, torch.Tensor]) -> tuple[Path, dict]:
        """The built-in diffusers config folder and scheduler config for a single-file checkpoint."""
        raise NotImplementedError

    def base_model_version(self, model: torch.nn.Module) -> str:
        return self.name


@dataclass
class LoadedModel:
    """A denoiser ready for training, with what the trainer needs to know about it."""

    family: ModelFamily
    denoiser: torch.nn.Module
    scheduler_config: dict | None
    prediction_type: str
    #: where it came from: a path, "demo" or "object"
    source: str
    #: "pipeline" (a folder with model_index.json), "folder", "single_file", "demo" or "object"
    kind: str
    extra: dict[str, Any] = field(default_factory=dict)
