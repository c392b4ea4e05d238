"""Find, identify and load the denoiser from whatever the user points ``--model`` at."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import TrainerError
from .base import FAMILIES, LoadedModel, ModelFamily, get_family, read_json

logger = logging.getLogger(__name__)

#: checkpoint formats that can run arbitrary code when loaded; we never unpickle them
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def load_model(model, family: str = "auto", prediction_type: str = "auto",
               model_config: str | None = None) -> LoadedModel:
    """Load the denoiser from a path, ``"demo"``, a diffusers model or a diffusers pipeline.

    Raises :class:`TrainerError` for a missing path, an unknown layout or family, or a pickle file.
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        loaded = _from_object(model, model, family, None, "object")
    elif hasattr(model, "components"):  # a diffusers pipeline object
        denoiser = getattr(model, "transformer", None) or getattr(model, "unet", None)
        if denoiser is None:
            raise TrainerError("--model: the pipeline object has neither a unet nor a transformer")
        loaded = _from_object(model, denoiser, family, dict(model.scheduler.config), "object")
        loaded.vae_scale_factor = getattr(model, "vae_scale_factor", loaded.vae_scale_factor)
    elif str(model) == "demo":
        from ..demo import build_demo_model

        loaded = _from_object(model, build_demo_model(), family, None, "demo")
    else:
        loaded = _from_path(Path(model), family, model_config)
    loaded.prediction_type = _prediction_type(loaded.scheduler_config, prediction_type)
    return loaded


def _from_object(source, denoiser, family, scheduler_config, kind) -> LoadedModel:
    config = {**dict(denoiser.config), "_class_name": type(denoiser).__name__}
    fam = _detect(config, family, f"the {type(denoiser).__name__} object")
    return LoadedModel(fam, denoiser, scheduler_config, "", "object" if kind == "object" else str(source), kind)


def _from_path(path: Path, family: str, model_config: str | None) -> LoadedModel:
    if not path.exists():
        raise TrainerError(f"--model: no such file or folder: {path}")
    if path.is_file():
        return _from_single_file(path, family, model_config)
    if (path / "model_index.json").is_file():
        return _from_pipeline(path, family)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        fam = _detect(config, family, str(path))
        model = fam.denoiser_class.from_pretrained(path)
        sibling = path.parent / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(sibling) if sibling.is_file() else None
        return LoadedModel(fam, model, scheduler_config, "", str(path), "folder",
                           vae_scale_factor=_vae_scale_factor(path.parent))
    raise TrainerError(f"--model: {path} is neither a diffusers pipeline folder (model_index.json) nor a "
                       "model folder (config.json)")


def _from_pipeline(path: Path, family: str) -> LoadedModel:
    index = read_json(path / "model_index.json")
    for subfolder in ("transformer", "unet"):
        if subfolder in index and (path / subfolder / "config.json").is_file():
            fam = _detect(read_json(path / subfolder / "config.json"), family, str(path / subfolder))
            model = fam.denoiser_class.from_pretrained(path, subfolder=subfolder)
            scheduler_file = path / "scheduler" / "scheduler_config.json"
            scheduler_config = read_json(scheduler_file) if scheduler_file.is_file() else None
            return LoadedModel(fam, model, scheduler_config, "", str(path), "pipeline",
                               extra={"subfolder": subfolder}, vae_scale_factor=_vae_scale_factor(path))
    raise TrainerError(f"--model: pipeline folder {path} has no unet/ or transformer/ with a config.json")


def _from_single_file(path: Path, family: str, model_config: str | None) -> LoadedModel:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TrainerError(f"--model: {path.name} is a pickle checkpoint, which can run arbitrary code when "
                           "loaded and is never unpickled here; convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise TrainerError(f"--model: {path.name} is not a .safetensors checkpoint")
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise TrainerError(f"--model: cannot read {path}: {e}") from None
    if model_config is not None:
        config_root = Path(model_config)
        config_file = next((p for p in (config_root / "config.json", config_root / "unet" / "config.json",
                                        config_root / "transformer" / "config.json") if p.is_file()), None)
        if config_file is None:
            raise TrainerError(f"--model_config: no config.json in {config_root} (or its unet/, transformer/)")
        fam = _detect(read_json(config_file), family, str(config_file))
        scheduler_file = config_file.parent.parent / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(scheduler_file) if scheduler_file.is_file() else None
        subfolder = None if config_file.parent == config_root else config_file.parent.name
        vae_scale_factor = _vae_scale_factor(config_file.parent.parent)
    else:
        fam = _single_file_family(state_dict, family, path)
        config_root, scheduler_config = fam.single_file_config(state_dict)
        subfolder, vae_scale_factor = fam.subfolder, 8
    try:
        model = fam.denoiser_class.from_single_file(state_dict, config=str(config_root), subfolder=subfolder,
                                                    local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as e:  # diffusers' converters raise these on a mismatch
        where = "--model_config" if model_config is not None else f"the built-in {fam.name} config"
        raise TrainerError(f"--model: {path.name} does not fit {where} ({str(e).splitlines()[0][:200]}); "
                           "pass --model_config with the checkpoint's diffusers config folder") from None
    return LoadedModel(fam, model, scheduler_config, "", str(path), "single_file",
                       vae_scale_factor=vae_scale_factor)


def _single_file_family(state_dict, family: str, path: Path) -> ModelFamily:
    if family != "auto":
        return get_family(family)
    fam = checkpoint_family(state_dict)
    if fam is None:
        raise TrainerError(f"--model: cannot tell the family of single-file checkpoint {path.name}; pass "
                           "--model_family and --model_config")
    return fam


def checkpoint_family(state_dict: dict[str, torch.Tensor]) -> ModelFamily | None:
    """The family whose denoiser a single-file checkpoint (original key names) holds, or None."""
    return next((fam for fam in FAMILIES.values() if fam.matches_checkpoint(state_dict)), None)


def _vae_scale_factor(pipeline_root: Path) -> int:
    """Pixels per latent pixel from ``vae/config.json`` (as diffusers' pipelines compute it), else 8."""
    vae_config = pipeline_root / "vae" / "config.json"
    if not vae_config.is_file():
        return 8
    return 2 ** (len(read_json(vae_config).get("block_out_channels", [0] * 4)) - 1)


def _detect(config: dict, family: str, where: str) -> ModelFamily:
    if family != "auto":
        fam = get_family(family)
        if not fam.matches(config):
            logger.warning("--model_family %s does not match %s (%s); using it anyway",
                           family, where, config.get("_class_name"))
        return fam
    for fam in FAMILIES.values():
        if fam.matches(config):
            return fam
    raise TrainerError(f"--model: cannot tell the model family of {where} ({config.get('_class_name')}); "
                       f"pass --model_family (known: {', '.join(FAMILIES)})")


def _prediction_type(scheduler_config: dict | None, requested: str) -> str:
    if requested != "auto":
        return requested
    if scheduler_config and scheduler_config.get("prediction_type"):
        return scheduler_config["prediction_type"]
    return "epsilon"

