"""The model-family interface and its registry.

A family is one package ``trainer/models/<name>/`` (see the README's "Adding a model family"):
its ``__init__.py`` defines a :class:`ModelFamily` subclass named ``<name>`` and decorates it with
:func:`register_family`. The registry finds the packages itself (:func:`trainer.models.family_names`)
and imports them on first use, so adding a family edits no other file.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import TrainerError
from ..objectives import ObjectiveOptions

#: family name -> the family; filled by :func:`register_family` as :func:`families` imports the packages
FAMILIES: dict[str, ModelFamily] = {}
#: where an all-in-one checkpoint (A1111/ComfyUI/SAI) keeps the denoiser's tensors
CHECKPOINT_PREFIX = "model.diffusion_model."


#: class attributes every family sets (see :class:`ModelFamily`)
REQUIRED_ATTRIBUTES = ("name", "denoiser_class", "subfolder", "kohya_prefix", "default_targets", "conditioning",
                       "encoding")


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available by its ``name`` to detection and ``--model_family``.
    A family missing a required attribute or method is a :class:`TrainerError` naming them."""
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(cls, a)] + sorted(cls.__abstractmethods__)
    if missing:
        raise TrainerError(f"model family {cls.__module__}.{cls.__name__} does not define {', '.join(missing)} "
                           "(see trainer/models/base.py ModelFamily)")
    FAMILIES[cls.name] = cls()
    return cls


def families() -> dict[str, ModelFamily]:
    """Every family, by name, in the order of :func:`~trainer.models.family_names` (detection tries them
    in that order). Imports each family package once; a package that registers no family of its own
    name is a :class:`TrainerError`."""
    from . import family_names

    names = family_names()
    for name in names:
        if name not in FAMILIES:
            importlib.import_module(f"{__package__}.{name}")
            if name not in FAMILIES:
                raise TrainerError(f"trainer/models/{name}/ registers no model family named {name!r} "
                                   "(its ModelFamily subclass needs name = the package's name and "
                                   "@register_family)")
    return {name: FAMILIES[name] for name in names}


def get_family(name: str) -> ModelFamily:
    known = families()
    try:
        return known[name]
    except KeyError:
        raise TrainerError(f"--model_family: unknown family {name!r} (known: {', '.join(known)})") from None


def detect_family(config: dict[str, Any], where: str) -> ModelFamily:
    """The family whose :meth:`ModelFamily.matches` takes a denoiser's ``config.json`` (read from
    ``where``); none is a :class:`TrainerError` asking for ``--model_family``."""
    known = families()
    for family in known.values():
        if family.matches(config):
            return family
    raise TrainerError(f"--model: cannot tell the model family of {where} ({config.get('_class_name')}); "
                       f"pass --model_family (known: {', '.join(known)})")


def vae_scale_factor(vae_config: dict | None) -> int:
    """Pixels per latent pixel of a VAE from its ``config.json`` (as diffusers' pipelines compute it: one
    downsampler between each pair of blocks); 8 without a VAE config."""
    if vae_config is None:
        return 8
    for name in ("scale_factor_spatial", "spatial_compression_ratio"):  # video VAEs that say it (Wan, HunyuanVideo)
        if vae_config.get(name):
            return int(vae_config[name])
    if "temperal_downsample" in vae_config:  # video VAEs (Qwen-Image, Wan): one spatial halving per entry
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def vae_temporal_factor(vae_config: dict | None) -> int:
    """Pixel frames per latent frame after the first of a video VAE (4 for Wan's and HunyuanVideo's: 1 + 4k
    frames make 1 + k latent frames), from its ``config.json``; 1 for image VAEs."""
    if vae_config is None:
        return 1
    for name in ("scale_factor_temporal", "temporal_compression_ratio"):
        if vae_config.get(name):
            return int(vae_config[name])
    return 2 ** sum(bool(x) for x in vae_config.get("temperal_downsample", ()))


@dataclass(frozen=True)
class FamilyEncoding:
    """What ``lora-prepare`` needs to make a family's data beyond its VAE (and what reading a ComfyUI
    LATENT needs)."""

    #: default training resolution (buckets hold at most this many pixels squared)
    resolution: int
    #: the denoiser's own downsampling or patching, in latent pixels, from its ``config.json``; a bucket
    #: side is a multiple of the VAE factor times this
    denoiser_factor: Callable[[dict], int]
    #: (pipeline, captions, device) -> conditioning columns ``{name: tensor [B, ...]}``, through the
    #: family's diffusers pipeline's ``encode_prompt`` (the pipeline holds the text encoders)
    encode_text: Callable[[Any, list[str], torch.device], dict[str, torch.Tensor]]
    #: the family's VAE ``(scaling_factor, shift_factor)``, for ``.latent`` imports when the model has no VAE;
    #: each a number or one number per latent channel (see :func:`scale_latents`)
    latent_scale: tuple[Any, Any]
    #: (VAE config) -> ``(scale, shift)`` for VAEs that do not use ``scaling_factor`` / ``shift_factor``
    #: (per-channel statistics: Qwen-Image); None reads those two fields
    vae_normalisation: Callable[[dict], tuple[Any, Any]] | None = None
    #: (VAE, pixels [B, 3, H, W]) -> the VAE's latent distribution over [B, C, h, w], for VAEs whose
    #: ``encode`` takes another shape (video VAEs: a frame axis); None calls ``vae.encode(pixels)``
    encode_pixels: Callable[[Any, torch.Tensor], Any] | None = None

    #: (vae, raw VAE latents [B, C, H, W]) -> the latents the denoiser trains on, for a VAE whose
    #: normalisation lives in its weights rather than in its config (Flux.2's batch-norm statistics);
    #: None: :func:`scale_latents` with ``vae_normalisation`` or ``scaling_factor``/``shift_factor``
    normalize_latents: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    #: video families: the frame rate the model was trained at, ``lora-prepare``'s default ``--fps``
    fps: float | None = None
    #: video families: ``lora-prepare``'s default ``--frames`` (pixel frames a clip may have, shortest first)
    frames: tuple[int, ...] = ()


def per_channel_normalisation(vae_config: dict) -> tuple[list[float], list[float]]:
    """(scale, shift) per channel from a VAE config with ``latents_mean`` / ``latents_std`` (Wan's VAEs,
    Qwen-Image's): the denoiser sees ``(z - mean) / std``."""
    return [1.0 / s for s in vae_config["latents_std"]], list(vae_config["latents_mean"])


def scale_latents(latents: torch.Tensor, scale: Any, shift: Any) -> torch.Tensor:
    """``(latents - shift) * scale`` over a batch [B, C, ...] (images or clips): what the denoiser sees from
    raw VAE latents. ``scale`` and ``shift`` are numbers or per-channel sequences (applied along dim 1)."""
    def per_channel(value):
        if isinstance(value, (int, float)):
            return value
        return torch.as_tensor(value, dtype=latents.dtype, device=latents.device).view(-1, *[1] * (latents.ndim - 2))

    return (latents - per_channel(shift)) * per_channel(scale)


class ModelFamily(ABC):
    """What the trainer needs to know about one kind of diffusion model.

    A subclass sets the class attributes below and implements :meth:`matches`, :meth:`make_objective`
    and :meth:`forward`; every other method has a default that suits a diffusers-named denoiser and
    can be overridden. The loop, ``lora-prepare``, sampling, the file layouts and ``--model_family``
    only use this interface.
    """

    #: the family's name: its package's name and the ``--model_family`` value
    name: ClassVar[str]
    #: for ``lora-prepare``, sampling and ComfyUI LATENT inputs: text encoding, VAE constants, bucket step
    encoding: ClassVar[FamilyEncoding]
    #: diffusers class of the denoiser, and its subfolder in a pipeline folder
    denoiser_class: ClassVar[type]
    subfolder: ClassVar[str]
    #: module-name prefix of kohya-style keys for this denoiser (ComfyUI reads LyCORIS tensors under it)
    kohya_prefix: ClassVar[str]
    #: module-name suffixes adapted by default
    default_targets: ClassVar[tuple[str, ...]]
    #: conditioning columns the denoiser needs: name -> number of dims per row
    conditioning: ClassVar[dict[str, int]]
    #: conditioning columns used when the data has them (else derived): name -> number of dims per row
    optional_conditioning: ClassVar[dict[str, int]] = {}
    #: module paths that ``--target_modules all`` (and ``node``) leaves out: layers the family's file
    #: loaders cannot read an adapter for
    all_targets_leave_out: ClassVar[tuple[str, ...]] = ()
    #: whether ComfyUI's LoRA loader reads this family's default file layout (``--file_layout auto``); where
    #: it does not, a run says so at start and points to ``--file_layout comfyui``
    comfyui_reads_default_layout: ClassVar[bool] = True
    #: dims of one ``latents`` row: 3 for image models ``[C, H, W]``, 4 for video models ``[C, T, H, W]``
    #: (which also read ``[C, H, W]`` rows, images, as 1-frame clips)
    latent_ndim: ClassVar[int] = 3

    @abstractmethod
    def matches(self, config: dict[str, Any]) -> bool:
        """Whether a denoiser config (its ``config.json``) belongs to this family."""
        raise NotImplementedError

    def matches_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether a single-file checkpoint (original key names) holds this family's denoiser."""
        return False

    def latent_channels(self, model: torch.nn.Module) -> int:
        return model.config.in_channels

    def check_conditioning(self, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise :class:`TrainerError` if rows of these shapes (``latents`` and the conditioning
        columns, per row) cannot feed ``model``."""

    @abstractmethod
    def make_objective(self, loaded: LoadedModel, options: ObjectiveOptions):
        """The run's objective (:mod:`trainer.objectives`), with the constant keyword inputs of
        :meth:`forward` in its ``model_inputs``."""
        raise NotImplementedError

    @abstractmethod
    def forward(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, torch.Tensor],
                **inputs) -> torch.Tensor:
        """The denoiser's prediction, shaped like ``noisy``, from the batch's conditioning columns."""
        raise NotImplementedError

    def single_file_config(self, state_dict: dict[str, torch.Tensor]) -> tuple[Path, dict]:
        """The built-in diffusers config folder and scheduler config for a single-file checkpoint."""
        raise TrainerError(f"single-file {self.name} checkpoints need --model_config: the diffusers config "
                           f"folder of the model (its {self.subfolder}/ folder, or the pipeline folder)")

    def single_file_overrides(self, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Config fields read from a single file's shapes, over the built-in config (its depth and widths,
        so a pruned or scaled variant loads too); ``state_dict`` may hold meta tensors."""
        return {}

    def single_file_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A single file's denoiser tensors (original names, prefix removed) as this family's diffusers
        ``from_single_file`` takes them: by default under ``model.diffusion_model.``, where diffusers'
        LDM UNet converter looks for them."""
        return {CHECKPOINT_PREFIX + key: tensor for key, tensor in tensors.items()}

    def base_model_version(self, model: torch.nn.Module) -> str:
        return self.name

    def file_tensors(self, module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One adapted module's tensors (fp32, keyed by algorithm suffix: ``lora_down.weight``,
        ``alpha``, ``hada_w1_a``, ...) under this family's file keys: kohya names by default,
        ``<kohya_prefix><module path with _>.<suffix>``, which diffusers and ComfyUI read."""
        key = self.kohya_prefix + module.replace(".", "_")
        return {f"{key}.{suffix}": tensor for suffix, tensor in tensors.items()}

    def offset_tensors(self, model: torch.nn.Module,
                       offsets: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The full offsets (module -> {"diff", "diff_b"}, fp32) under this family's file keys:
        :meth:`file_tensors` per module, which ComfyUI reads (diffusers' loaders do not read offsets),
        except on layers ComfyUI fuses or swaps (:meth:`comfyui_names`), whose offsets its loader reads only
        under its own names (``adapters.comfyui.split_offsets``)."""
        from ..adapters.comfyui import split_offsets

        try:
            names = self.comfyui_names(model) if offsets else {}
        except TrainerError:
            names = {}  # ComfyUI's names are not known for this family: nothing is fused
        rest, comfy_keys = split_offsets(model, names, offsets)
        state = {}
        for module, tensors in rest.items():
            state.update(self.file_tensors(module, tensors))
        return {**state, **comfy_keys}

    def module_spellings(self, model: torch.nn.Module) -> dict[str, str]:
        """Other dotted names that files (other tools' LoRAs) use for the model's modules -> diffusers
        module path, beyond the model's own names (SD/SDXL: the original LDM UNet's names)."""
        return {}

    def comfyui_spellings(self, model: torch.nn.Module) -> dict[str, str]:
        """Other tools' spellings of ComfyUI's module names in LoRA file keys (the key without its tensor name,
        e.g. diffusion-pipe's ``transformer.double_blocks.0.img_attn_qkv``) -> ComfyUI module path, for
        ``--existing_lora``: such keys are read as ComfyUI's own (fused layers split); by default none."""
        return {}

    def comfyui_extra_columns(self, extra: dict) -> dict[str, torch.Tensor]:
        """Conditioning columns taken from the extras of one ComfyUI CONDITIONING entry (``extra``: its
        dict) besides ``prompt_embeds`` and ``pooled_prompt_embeds``; by default none."""
        return {}

    def comfyui_names(self, model: torch.nn.Module) -> dict:
        """Diffusers module path -> :class:`~trainer.adapters.comfyui.ComfyPart`, where ComfyUI's model
        holds that module's weight (``--file_layout comfyui``, and reading the node's files)."""
        raise TrainerError(f"--file_layout comfyui: ComfyUI's module names are not known for {self.name}")

    def sampling_arguments(self, embeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The pipeline's call arguments (tensors, or lists of tensors) from one prompt's encoded columns
        (``prompt_embeds``, ``negative_prompt_embeds``, ..., each [1, ...]): by default the columns."""
        return embeds

    def file_metadata(self, tensors: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, str]:
        """Metadata entries that this family's layout of ``tensors`` (the file) sets differently from the
        trainer's defaults."""
        return {}


def latent_layout(ndim: int) -> str:
    """How a latent row of ``ndim`` dims is spelled in messages: ``[C, H, W]`` or ``[C, T, H, W]``."""
    return "[C, T, H, W]" if ndim == 4 else "[C, H, W]"


def has_checkpoint_key(state_dict: dict[str, torch.Tensor], key: str) -> bool:
    """Whether an original-layout checkpoint holds ``key``, bare or under ``model.diffusion_model.``."""
    return key in state_dict or CHECKPOINT_PREFIX + key in state_dict


def denoiser_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout checkpoint's denoiser tensors without the ``model.diffusion_model.`` prefix (a
    file either has it on all of them, all-in-one, or on none, diffusion-model-only)."""
    if any(key.startswith(CHECKPOINT_PREFIX) for key in state_dict):
        return {key.removeprefix(CHECKPOINT_PREFIX): t for key, t in state_dict.items()
                if key.startswith(CHECKPOINT_PREFIX)}
    return state_dict


def checkpoint_tensor(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """An original-layout checkpoint's tensor ``key``, bare or under ``model.diffusion_model.``, or None."""
    found = state_dict.get(key)
    return found if found is not None else state_dict.get(CHECKPOINT_PREFIX + key)


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
    #: pixels per latent pixel, from the pipeline's VAE config when there is one (SD/SDXL/SD3/Flux: 8)
    vae_scale_factor: int = 8


def read_json(path: Path) -> dict:
    """A JSON config file; a missing or malformed one is a :class:`TrainerError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainerError(f"cannot read {path}: {e}") from None
