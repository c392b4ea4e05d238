"""Find, identify and load the denoiser from whatever the user points ``--model`` at."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..errors import TrainerError
from .base import (
    CHECKPOINT_PREFIX,
    LoadedModel,
    ModelFamily,
    detect_family,
    families,
    get_family,
    read_json,
    vae_scale_factor,
)
from .precision import FP8, apply_weight_dtype, quantization_config

logger = logging.getLogger(__name__)

#: checkpoint formats that can run arbitrary code when loaded; we never unpickle them
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def refuse_pickle(path: Path, flag: str) -> None:
    """The one pickle guard: raise :class:`TrainerError` if ``path`` is a pickle checkpoint, by its suffix
    or, under any name, by its first bytes (a ``torch.save`` zip archive or a bare pickle; safetensors
    starts with an 8-byte header length and then ``{``). Nothing here ever unpickles a file."""
    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    if not pickled and path.is_file():
        with path.open("rb") as f:
            head = f.read(9)
        pickled = head[8:9] != b"{" and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80")
    if pickled:
        raise TrainerError(f"{flag}: {path.name} is a pickle checkpoint, which can run arbitrary code when "
                           "loaded and is never unpickled here; convert it to .safetensors")


def read_scheduler_config(folder: Path) -> dict | None:
    """The one reader of a pipeline's ``scheduler/scheduler_config.json`` (None when absent)."""
    file = folder / "scheduler" / "scheduler_config.json"
    return read_json(file) if file.is_file() else None


def load_model(model, family: str = "auto", prediction_type: str = "auto",
               model_config: str | None = None, dtype: torch.dtype | None = None,
               weight_dtype: str = "default") -> LoadedModel:
    """Load the denoiser from a path, ``"demo"``, a diffusers model or a diffusers pipeline.

    ``dtype``: the training dtype; a model read from disk is materialised directly in it (never
    through fp32). ``weight_dtype``: how its frozen weights are stored (:mod:`.precision`).

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
        loaded = _from_path(Path(model), family, model_config, Loading(dtype, weight_dtype))
    apply_weight_dtype(loaded.denoiser, weight_dtype, dtype or torch.float32)
    loaded.prediction_type = _prediction_type(loaded.scheduler_config, prediction_type)
    return loaded


def _from_object(source, denoiser, family, scheduler_config, kind) -> LoadedModel:
    config = {**dict(denoiser.config), "_class_name": type(denoiser).__name__}
    fam = _detect(config, family, f"the {type(denoiser).__name__} object")
    return LoadedModel(fam, denoiser, scheduler_config, "", "object" if kind == "object" else str(source), kind)


@dataclass
class Loading:
    """What every diffusers load call is given: the dtype to materialise the weights in, and the
    quantization to apply tensor by tensor while loading."""

    dtype: torch.dtype | None
    weight_dtype: str = "default"

    def kwargs(self) -> dict:
        return {"torch_dtype": self.dtype, "quantization_config": quantization_config(self.weight_dtype)}

    def load(self, cls, read, config):
        """``read()`` the model; or, on the processes that FSDP's CPU-RAM-efficient loading spares, build
        it from ``config()`` on the meta device without reading a byte of weights."""
        if not self.spared_by_fsdp():
            return read()
        from accelerate import init_empty_weights

        logger.info("FSDP CPU-RAM-efficient loading: local rank 0 reads the weights, this rank gets them "
                    "from it when the model is wrapped")
        with init_empty_weights():
            model = cls.from_config(config())
        return model.to(self.dtype) if self.dtype is not None else model

    def spared_by_fsdp(self) -> bool:
        """Whether this process is one that accelerate's FSDP CPU-RAM-efficient loading spares (it sets
        these variables; FSDP's ``sync_module_states`` then broadcasts local rank 0's weights and its
        ``param_init_fn`` materialises the meta tensors). diffusers' loaders, unlike transformers', do not
        read the variables themselves, so it is done here. An int8 base is quantized while it is read,
        so every process reads it."""
        enabled = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and \
            os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true")
        return enabled and int(os.environ.get("LOCAL_RANK", "0")) != 0 and self.weight_dtype != "int8"


def _from_path(path: Path, family: str, model_config: str | None, how: Loading) -> LoadedModel:
    if not path.exists():
        raise TrainerError(f"--model: no such file or folder: {path}")
    if path.is_file():
        return _from_single_file(path, family, model_config, how)
    if (path / "model_index.json").is_file():
        return _from_pipeline(path, family, how)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        fam = _detect(config, family, str(path))
        cls = fam.denoiser_class
        model = how.load(cls, partial(cls.from_pretrained, path, **how.kwargs()), partial(cls.load_config, path))
        return LoadedModel(fam, model, read_scheduler_config(path.parent), "", str(path), "folder",
                           vae_scale_factor=_vae_scale_factor(path.parent))
    raise TrainerError(f"--model: {path} is neither a diffusers pipeline folder (model_index.json) nor a "
                       "model folder (config.json)")


def _from_pipeline(path: Path, family: str, how: Loading) -> LoadedModel:
    index = read_json(path / "model_index.json")
    for subfolder in ("transformer", "unet"):
        if subfolder in index and (path / subfolder / "config.json").is_file():
            fam = _detect(read_json(path / subfolder / "config.json"), family, str(path / subfolder))
            cls = fam.denoiser_class
            model = how.load(cls, partial(cls.from_pretrained, path, subfolder=subfolder, **how.kwargs()),
                             partial(cls.load_config, path, subfolder=subfolder))
            return LoadedModel(fam, model, read_scheduler_config(path), "", str(path), "pipeline",
                               extra={"subfolder": subfolder}, vae_scale_factor=_vae_scale_factor(path))
    raise TrainerError(f"--model: pipeline folder {path} has no unet/ or transformer/ with a config.json")


def _from_single_file(path: Path, family: str, model_config: str | None, how: Loading) -> LoadedModel:
    refuse_pickle(path, "--model")
    if path.suffix.lower() != ".safetensors":
        raise TrainerError(f"--model: {path.name} is not a .safetensors checkpoint")
    header = read_checkpoint_header(path)
    overrides: dict = {}
    if model_config is not None:
        config_root = Path(model_config)
        config_file = next((p for p in (config_root / "config.json", config_root / "unet" / "config.json",
                                        config_root / "transformer" / "config.json") if p.is_file()), None)
        if config_file is None:
            raise TrainerError(f"--model_config: no config.json in {config_root} (or its unet/, transformer/)")
        fam = _detect(read_json(config_file), family, str(config_file))
        scheduler = read_scheduler_config(config_file.parent.parent)
        subfolder = None if config_file.parent == config_root else config_file.parent.name
        vae_scale_factor = _vae_scale_factor(config_file.parent.parent)
    else:
        fam = _single_file_family(header, family, path)
        config_root, scheduler = fam.single_file_config(header)
        try:
            overrides = fam.single_file_overrides(header)
        except KeyError as e:
            raise TrainerError(f"--model: {path.name} looks like a {fam.name} checkpoint but has no tensor {e} "
                               f"({describe_layout(header)})") from None
        subfolder, vae_scale_factor = fam.subfolder, 8

    def read():
        # only the denoiser's tensors are read (an all-in-one file also holds the VAE and text encoders),
        # each cast to the training dtype as it is read: the host never holds the file's copy and the
        # model's copy of the whole denoiser at once. Tensors stored in the fp8 of --weight_dtype stay so.
        keep = FP8.get(how.weight_dtype)
        state_dict = fam.single_file_state_dict(read_denoiser_tensors(path, header, how.dtype, keep=keep))
        try:
            if keep is not None:
                return _assign_stored(fam.denoiser_class, config(), state_dict, how)
            return fam.denoiser_class.from_single_file(state_dict, config=str(config_root), subfolder=subfolder,
                                                       local_files_only=True, **how.kwargs(), **overrides)
        except (ValueError, KeyError, RuntimeError) as e:  # diffusers' converters raise these on a mismatch
            where = "--model_config" if model_config is not None else f"the built-in {fam.name} config"
            raise TrainerError(f"--model: {path.name} does not fit {where} ({str(e).splitlines()[0][:200]}); "
                               "pass --model_config with the checkpoint's diffusers config folder") from None

    def config():
        return {**fam.denoiser_class.load_config(str(config_root), subfolder=subfolder), **overrides}

    model = how.load(fam.denoiser_class, read, config)
    return LoadedModel(fam, model, scheduler, "", str(path), "single_file",
                       vae_scale_factor=vae_scale_factor)


def _assign_stored(cls, config: dict, state_dict: dict[str, torch.Tensor], how: Loading) -> torch.nn.Module:
    """A single file under an fp8 ``--weight_dtype``: the model built on the meta device with its layerwise
    casting in place, then each tensor cast to the dtype its parameter is stored in and assigned.

    ``from_single_file`` would cast every tensor to one ``torch_dtype`` first, so an fp8 file (ComfyUI's
    flux1-dev-fp8) would be held in bf16 (twice its size) before going back to fp8; this holds it
    once, in fp8. diffusers' own key conversion for the class is used when the names differ."""
    from accelerate import init_empty_weights

    from ..compat import single_file_converter

    with init_empty_weights():
        model = cls.from_config(config)
    model.to(how.dtype)
    apply_weight_dtype(model, how.weight_dtype, how.dtype)  # the stored layers' meta parameters turn fp8
    expected = model.state_dict()
    if set(expected) != set(state_dict):
        convert = single_file_converter(cls.__name__)
        state_dict = convert(config=config, checkpoint=state_dict)
    for key in list(state_dict):
        if key in expected and state_dict[key].is_floating_point():
            state_dict[key] = state_dict[key].to(expected[key].dtype)  # one tensor at a time
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def read_checkpoint_header(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors (names, shapes and dtypes; no data read): enough to
    detect the family and variant of a checkpoint without loading it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: _meta(f.get_slice(key)) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise TrainerError(f"--model: cannot read {path}: {e}") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _meta(tensor_slice) -> torch.Tensor:
    dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.uint8)
    return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")


def read_denoiser_tensors(path: Path, header: dict[str, torch.Tensor], dtype: torch.dtype | None,
                          keep: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The denoiser's tensors of a single file under their original names without the
    ``model.diffusion_model.`` prefix (a file either has it on all denoiser keys, all-in-one, or on
    none, diffusion-model-only), floating ones cast to ``dtype`` one by one as they are read, except
    those stored in ``keep``."""
    from safetensors import safe_open

    prefixed = any(key.startswith(CHECKPOINT_PREFIX) for key in header)
    keys = [key for key in header if key.startswith(CHECKPOINT_PREFIX)] if prefixed else list(header)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            tensor = f.get_tensor(key)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype not in (dtype, keep):
                tensor = tensor.to(dtype)
            tensors[key.removeprefix(CHECKPOINT_PREFIX)] = tensor
    return tensors


def _single_file_family(state_dict, family: str, path: Path) -> ModelFamily:
    if family != "auto":
        return get_family(family)
    fam = checkpoint_family(state_dict)
    if fam is None:
        known = [f.name for f in families().values() if type(f).matches_checkpoint is not ModelFamily.matches_checkpoint]
        raise TrainerError(f"--model: {path.name} is no single-file layout known here ({describe_layout(state_dict)}); "
                           f"known: the original layouts of {', '.join(known)}; "
                           "pass --model_family and --model_config for others")
    return fam


def describe_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """What a checkpoint holds, in a few words: its tensor count and its most common key prefixes."""
    from collections import Counter

    heads = Counter(".".join(key.removeprefix(CHECKPOINT_PREFIX).split(".")[:1]) for key in state_dict)
    common = ", ".join(f"{name}.* x{count}" for name, count in heads.most_common(4))
    return f"{len(state_dict)} tensors: {common}" if state_dict else "no tensors"


def checkpoint_family(state_dict: dict[str, torch.Tensor]) -> ModelFamily | None:
    """The family whose denoiser a single-file checkpoint (original key names) holds, or None."""
    return next((fam for fam in families().values() if fam.matches_checkpoint(state_dict)), None)


def _vae_scale_factor(pipeline_root: Path) -> int:
    """Pixels per latent pixel from ``vae/config.json`` (as diffusers' pipelines compute it), else 8."""
    vae_config = pipeline_root / "vae" / "config.json"
    if not vae_config.is_file():
        return 8
    return vae_scale_factor(read_json(vae_config))


def _detect(config: dict, family: str, where: str) -> ModelFamily:
    if family != "auto":
        fam = get_family(family)
        if not fam.matches(config):
            logger.warning("--model_family %s does not match %s (%s); using it anyway",
                           family, where, config.get("_class_name"))
        return fam
    return detect_family(config, where)


def _prediction_type(scheduler_config: dict | None, requested: str) -> str:
    if requested != "auto":
        return requested
    if scheduler_config and scheduler_config.get("prediction_type"):
        return scheduler_config["prediction_type"]
    return "epsilon"

