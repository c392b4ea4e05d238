"""Parameters of both commands: typed dataclasses, filled from a YAML file and ``--flags``.

A training run's parameters are grouped in sections (:class:`ModelArgs`, :class:`DataArgs`,
:class:`AdapterArgs`, :class:`ObjectiveOptions`, :class:`OptimizationArgs`, :class:`CheckpointArgs`,
:class:`OutputArgs`, :class:`WatchArgs`) composed into :class:`TrainConfig`; ``lora-prepare``'s are
:class:`trainer.prepare.PrepareConfig`. Every field is made by :func:`_param` and carries its help
text, default and allowed range/choices in its metadata, so the command line
(:func:`add_parameters`), the YAML loader, ``--help`` and validation all read one definition.
Parameter names are flat and unique across sections: the YAML keys and ``--flags`` are the names
alone, and ``cfg.<name>`` reads a parameter wherever it lives. Values are checked before any model
or data is touched; a bad value raises :class:`ConfigError` with a one-line message naming the
parameter and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError
from .models import family_names  # the folder listing only: no torch (fast --help)

MAX_SEED = 2**64 - 1


def _param(default, help, *, range=None, choices=None, identity=True):
    """A dataclass field whose metadata drives parsing, ``--help`` and validation.

    ``identity``: whether the parameter changes what the run computes. Every checkpoint records the
    values of the identity parameters (:func:`TrainConfig.identity`), and ``--resume_from_checkpoint``
    continues only a checkpoint whose values match. Pass ``identity=False`` for a parameter that only
    says how long to run, where to write, what to log or how fast to compute (``steps``,
    ``output_dir``, ``log_every``, ``num_workers``...): a new parameter left at the default True is
    compared, the safe side.
    """
    return field(default=default, metadata={"help": help, "range": range, "choices": choices,
                                            "identity": identity})


class _Section:
    """A group of parameters (frozen: checked once, then read): each value is converted to its field's type
    and checked on construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))


@dataclass(frozen=True)
class ModelArgs(_Section):
    """The frozen base model: where it is, what it is, how it is stored and computed."""

    model: str = _param("demo", "diffusers pipeline folder, bare unet/transformer folder, single-file "
                        ".safetensors checkpoint, or 'demo' (a tiny built-in model)")
    model_family: str = _param("auto", "model family, one package each in trainer/models/ (sd = SD 1.x/2.x, "
                               "sd3 = SD3/3.5, flux = Flux.1; the README's family table lists them); auto "
                               "detects it from the model", choices=("auto", *family_names()))
    model_config: str | None = _param(None, "diffusers config folder for a single-file checkpoint "
                                      "(default: the built-in config of the detected family and variant)")
    prediction_type: str = _param("auto", "what the model predicts (SD/SDXL; SD3/Flux predict the flow "
                                  "velocity); auto reads the pipeline's scheduler config",
                                  choices=("auto", "epsilon", "v_prediction"))
    training_dtype: str = _param("bf16", "compute dtype of the frozen model (bf16 = bf16 weights + autocast)",
                                 choices=("bf16", "fp32"))
    weight_dtype: str = _param("default", "how the frozen base is stored: default = the training dtype; "
                               "fp8_e4m3fn/fp8_e5m2 = fp8, each layer computed in the training dtype; int8 = "
                               "int8 weight-only (needs torchao)",
                               choices=("default", "fp8_e4m3fn", "fp8_e5m2", "int8"))
    gradient_checkpointing: bool = _param(True, "recompute activations in backward to save memory", identity=False)
    compile: bool = _param(False, "compile the denoiser with torch.compile (inductor): slower start, often "
                           "faster steps on a GPU", identity=False)


@dataclass(frozen=True)
class DataArgs(_Section):
    """The training latents and conditioning, how they are batched and read."""

    latents: str = _param("demo", "latents dataset: a save_to_disk folder, Parquet/Arrow files (file, "
                          "folder or glob), or 'demo'")
    positive: str | None = _param(None, "conditioning dataset or .safetensors file with 1 row (repeated) or "
                                  "one row per latent; default: columns of the latents dataset")
    batch_size: int = _param(1, "samples per process per micro-batch", range=(1, 10000))
    num_workers: int = _param(0, "DataLoader worker processes", range=(0, 64), identity=False)
    streaming: bool = _param(False, "read --latents as a stream (datasets IterableDataset: local files, a URL or a "
                             "Hub dataset), split between processes, for data that does not fit one disk; "
                             "resume is exact for the same number of processes")
    shuffle_buffer: int = _param(1000, "--streaming: examples read ahead and shuffled together (more: better "
                                 "mixing, more memory)", range=(1, 1000000))


@dataclass(frozen=True)
class AdapterArgs(_Section):
    """The trained adapter: algorithm, size, where it attaches, a file to continue."""

    algorithm: str = _param("LoRA", "adapter algorithm", choices=("LoRA", "LoHa", "LoKr", "OFT"))
    rank: int = _param(8, "adapter rank (LoRA/LoHa: rank of the update; LoKr: rank of w2; OFT: "
                    "the LyCORIS factor, about the block size)", range=(1, 128))
    alpha: float | None = _param(1.0, "adapter alpha; the update is scaled by alpha/rank (the node uses 1.0; "
                                 "none = rank, a scale of 1); for OFT the norm constraint (0 = none; "
                                 "LoRA/LoHa/LoKr need alpha > 0)", range=(0.0, 1e6))
    target_modules: str = _param("all", "what to train. all: an adapter on every Linear/Conv layer (the "
                                 "node's layers; loads in diffusers and ComfyUI); node: all plus full offsets "
                                 "of every norm weight and bias (.diff/.diff_b), exactly what the node trains "
                                 "(loads in ComfyUI and this trainer, not in diffusers); attention: the "
                                 "family's attention projections; or comma-separated module names (suffix "
                                 "match)")
    existing_lora: str | None = _param(None, "LoRA .safetensors file to continue (weights and step count)")
    # not identity: checkpoints hold the fp32 masters; the dtype applies only when the file is written
    lora_dtype: str = _param("bf16", "dtype of the adapter weights as saved (training keeps fp32 masters)",
                             choices=("bf16", "fp32"), identity=False)


@dataclass(frozen=True)
class ObjectiveOptions(_Section):
    """The training objective: loss, target, noise levels and per-sample weights."""

    loss_function: str = _param("MSE", "loss between prediction and target",
                                choices=("MSE", "L1", "Huber", "SmoothL1"))
    objective: str = _param("native", "native: the model's own target; x0: loss on the predicted clean "
                            "latents (the node's behaviour)", choices=("native", "x0"))
    timestep_sampling: str = _param("auto", "how noise levels are drawn: uniform, logit_normal or mode (SD3 "
                                    "paper); auto = uniform for SD/SDXL, logit_normal for SD3/Flux",
                                    choices=("auto", "uniform", "logit_normal", "mode"))
    logit_mean: float = _param(0.0, "logit_normal: mean of the logit of the noise level (> 0: noisier)",
                               range=(-10.0, 10.0))
    logit_std: float = _param(1.0, "logit_normal: standard deviation of the logit of the noise level",
                              range=(0.01, 10.0))
    mode_scale: float = _param(1.29, "mode: the SD3 paper's scale s (0 = uniform)", range=(-1.0, 1.75))
    loss_weighting: str = _param("none", "per-sample loss weights: min_snr (SD/SDXL), sigma_sqrt or cosmap "
                                 "(SD3/Flux, the SD3 paper's)",
                                 choices=("none", "min_snr", "sigma_sqrt", "cosmap"))
    min_snr_gamma: float = _param(5.0, "min_snr: the SNR at which weights are clipped", range=(0.01, 1000.0))
    guidance: float = _param(1.0, "Flux.1 dev-style (guidance-distilled) models: the guidance value fed "
                             "while training; 1.0 keeps the distilled guidance intact", range=(0.0, 100.0))


@dataclass(frozen=True)
class OptimizationArgs(_Section):
    """The optimizer and how long and how it steps."""

    optimizer: str = _param("AdamW", "optimizer", choices=("AdamW", "Adam", "SGD", "RMSprop"))
    learning_rate: float = _param(0.0005, "optimizer learning rate", range=(1e-7, 1.0))
    steps: int = _param(16, "optimizer steps to train in this run", range=(1, 100000), identity=False)
    grad_accumulation_steps: int = _param(1, "micro-batches per optimizer step", range=(1, 1024))
    seed: int = _param(0, "seeds adapter init, data order, noise and timesteps", range=(0, MAX_SEED))


@dataclass(frozen=True)
class CheckpointArgs(_Section):
    """Full-state checkpoints and resuming from one."""

    checkpointing_steps: int | None = _param(None, "save a full-state checkpoint (adapter, optimizer, RNG, "
                                             "progress) every N steps under output_dir/checkpoints",
                                             range=(1, 100000), identity=False)
    checkpoints_total_limit: int | None = _param(None, "keep at most this many checkpoints (oldest removed)",
                                                 range=(1, 100000), identity=False)
    resume_from_checkpoint: str | None = _param(None, "'latest' (the newest checkpoint of this same run that "
                                                "loads) or a checkpoint folder: continue that run exactly "
                                                "(--steps counts the whole run)", identity=False)


@dataclass(frozen=True)
class OutputArgs(_Section):
    """What is written where, and what is logged."""

    output_dir: str = _param("output", "folder for the LoRA file, loss.json, loss.png and result.json", identity=False)
    output_name: str = _param("lora", "file name (without .safetensors) of the trained adapter: a plain name, "
                              "no folder", identity=False)
    file_layout: str = _param("auto", "LoRA file layout. auto: the family's layout that diffusers, ComfyUI and "
                              "kohya tools load (lora.safetensors; for HunyuanVideo and Lumina 2 diffusers' only, "
                              "ComfyUI reads comfyui); comfyui: the Train LoRA node's own keys "
                              "(diffusion_model.<ComfyUI module>, alpha folded into the weights) and file name "
                              "<output_name>_<steps>_steps_00001_.safetensors, which the node can continue",
                              choices=("auto", "comfyui"), identity=False)
    save_merged_model: bool = _param(False, "also write model_with_lora/: the base model with the adapter "
                                     "merged, as a diffusers folder", identity=False)
    log_every: int = _param(10, "read the loss back from the device and log it every N steps",
                            range=(1, 100000), identity=False)
    report_to: str = _param("none", "experiment tracker", choices=("none", "tensorboard", "wandb", "all"),
                            identity=False)

    def __post_init__(self):
        super().__post_init__()
        _check_plain_name("output_name", self.output_name)


@dataclass(frozen=True)
class WatchArgs(_Section):
    """Watching a run: sample images and a held-out loss (issue 17)."""

    # (the default is None, not a shared list: RUF009 only sees "list" in the type)
    sample_prompts: str | list | None = _param(  # noqa: RUF009
        None, "sample images (video models: clips) while training from these prompts: a text file, one prompt per "
        "line with optional --n NEGATIVE --w WIDTH --h HEIGHT --s STEPS --g GUIDANCE --d SEED (video models also "
        "--f FRAMES), or a list of such lines in the YAML file; needs a pipeline folder (VAE, text encoders)",
        identity=False)
    sample_every: int | None = _param(None, "also sample every N optimizer steps (samples are always made before "
                                      "the first and after the last step)", range=(1, 100000), identity=False)
    sample_steps: int = _param(20, "denoising steps per sample image", range=(1, 1000), identity=False)
    sample_guidance: float | None = _param(None, "guidance scale of the samples (Flux: its distilled guidance); "
                                           "none = the pipeline's own default", range=(0.0, 100.0),
                                           identity=False)
    sample_size: str | None = _param(None, "sample size in pixels, WIDTHxHEIGHT or one number (square); default: "
                                     "the training set's most common latent size times the VAE factor",
                                     identity=False)
    sample_frames: int | None = _param(None, "frames per sample clip of a video model (Wan, HunyuanVideo), 1 + a "
                                       "multiple of the VAE's temporal factor (4); a prompt line's --f overrides "
                                       "it; default: the training set's most common clip length in frames",
                                       range=(1, 10000), identity=False)
    sample_seed: int = _param(0, "noise seed of the first prompt; prompt k uses sample_seed + k unless its line "
                              "gives --d", range=(0, MAX_SEED), identity=False)
    eval_latents: str | None = _param(None, "held-out latents dataset (same format and checks as --latents) for an "
                                      "evaluation loss", identity=False)
    eval_fraction: float | None = _param(None, "hold this fraction of the --latents rows (chosen by the seed) out of "
                                         "training for an evaluation loss; 0 or none = no hold-out",
                                         range=(0.0, 0.9))
    eval_every: int | None = _param(None, "also compute the held-out loss every N optimizer steps (it is always "
                                    "computed before the first and after the last step)", range=(1, 100000),
                                    identity=False)


@dataclass(init=False)
class TrainConfig:
    """All parameters of a training run; names and defaults follow ComfyUI's Train LoRA node.

    Built from flat names (``TrainConfig(rank=4, steps=3)``, as the YAML file and the flags give them)
    or from sections (``TrainConfig(adapter=AdapterArgs(rank=4))``, or a mapping per section, the
    nested YAML form); ``cfg.adapter`` is a section, ``cfg.rank`` the same value read by its name.
    """

    base: ModelArgs
    data: DataArgs
    adapter: AdapterArgs
    objective_options: ObjectiveOptions
    optimization: OptimizationArgs
    checkpointing: CheckpointArgs
    outputs: OutputArgs
    watching: WatchArgs

    #: section attribute -> its class
    SECTIONS: ClassVar[dict[str, type]] = {
        "base": ModelArgs, "data": DataArgs, "adapter": AdapterArgs, "objective_options": ObjectiveOptions,
        "optimization": OptimizationArgs, "checkpointing": CheckpointArgs, "outputs": OutputArgs,
        "watching": WatchArgs}
    #: the order of ``--help``, ``to_dict()`` and ``identity()``: the node's inputs first, then each
    # parameter in the order it was added (the order these listed before sections existed)
    ORDER: ClassVar[tuple[str, ...]] = (
        "model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps", "learning_rate", "rank",
        "optimizer", "loss_function", "seed", "training_dtype", "lora_dtype", "algorithm", "gradient_checkpointing",
        "existing_lora", "alpha", "target_modules", "output_dir", "output_name", "model_family", "prediction_type",
        "objective", "timestep_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting",
        "min_snr_gamma", "guidance", "model_config", "log_every", "report_to", "save_merged_model", "num_workers",
        "compile", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "weight_dtype",
        "streaming", "shuffle_buffer", "sample_prompts", "sample_every", "sample_steps", "sample_guidance",
        "sample_size", "sample_frames", "sample_seed", "eval_latents", "eval_fraction", "eval_every", "file_layout")

    def __init__(self, **values: Any):
        flat = _flatten(values)
        owner = _owners()
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} (run with --help for the list)")
        for section, cls in self.SECTIONS.items():
            names = {f.name for f in dataclasses.fields(cls)}
            setattr(self, section, cls(**{k: v for k, v in flat.items() if k in names}))
        if self.alpha == 0 and self.algorithm != "OFT" and self.existing_lora is None:  # else the file decides
            raise ConfigError(f"--alpha: 0 would scale the {self.algorithm} update to nothing; give alpha > 0 "
                              "(0 means 'no constraint' only for OFT)")

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from a mapping of names to values (flat, or per section); unknown names are errors."""
        return cls(**values)

    @classmethod
    def parameters(cls) -> tuple[dataclasses.Field, ...]:
        """Every parameter's field, in :attr:`ORDER`."""
        fields = {f.name: f for section in cls.SECTIONS.values() for f in dataclasses.fields(section)}
        return tuple(fields[name] for name in cls.ORDER)

    def to_dict(self) -> dict[str, Any]:
        """Flat names -> values (the LoRA file's ``trainer_config`` and the tracker's hparams)."""
        return {name: _copy(getattr(self, name)) for name in self.ORDER}

    def identity(self) -> dict[str, Any]:
        """The parameters that change what the run computes (fields with ``identity=True``)."""
        return {f.name: _copy(getattr(self, f.name)) for f in self.parameters() if f.metadata["identity"]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value  # sample_prompts: never share the list


def _owners() -> dict[str, str]:
    """Parameter name -> the section attribute that holds it."""
    return {f.name: section for section, cls in TrainConfig.SECTIONS.items() for f in dataclasses.fields(cls)}


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Flat names -> values from flat names, section objects and (nested YAML) per-section mappings.

    Sections come first so that a flat name given alongside its section (``dataclasses.replace``) wins."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key not in TrainConfig.SECTIONS:
            continue
        if isinstance(value, _Section):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its parameters to values, got {value!r}")
        names = {f.name for f in dataclasses.fields(TrainConfig.SECTIONS[key])}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown parameter '{key}.{unknown[0]}' (run with --help for the list)")
        flat.update(value)
    flat.update({k: v for k, v in values.items() if k not in TrainConfig.SECTIONS})
    return flat


def _flat_property(section: str, name: str, help: str) -> property:
    """``cfg.<name>`` reads the parameter in its section: the YAML keys, the flags and every caller use
    the one flat name, whichever section holds it (``dataclasses.replace(cfg, name=value)`` changes one)."""
    return property(lambda self: getattr(getattr(self, section), name), doc=help)


for _section, _cls in TrainConfig.SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        setattr(TrainConfig, _f.name, _flat_property(_section, _f.name, _f.metadata["help"]))
assert set(TrainConfig.ORDER) == set(_owners()) and len(TrainConfig.ORDER) == len(_owners())


def _check_plain_name(name: str, value: str) -> None:
    """A file name, never a path: ``../x`` or ``a/b`` would write outside ``output_dir``."""
    if not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0") or value != Path(value).name:
        raise ConfigError(f"--{name}: expected a plain file name (no folder, '/', '\\' or '..'), got {value!r}")


def _describe(f: dataclasses.Field) -> str:
    meta, typ = f.metadata, f.type.replace(" | None", "")
    optional = " or none" if "None" in f.type else ""
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if meta["range"]:
        lo, hi = meta["range"]
        if typ == "int":
            return f"an integer in {lo}..{hi}{optional}"
        return f"a number in {lo:g}..{hi:g}{optional}"
    if typ == "bool":
        return "true or false"
    if typ == "str | list":
        return "a file name or (in the YAML file) a list of strings" + optional
    return "a string" + optional


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert ``value`` (from YAML, a flag string or Python) to the field's type and check it."""
    name, meta = f.name, f.metadata
    typ = f.type.replace(" | None", "")
    bad = ConfigError(f"--{name}: expected {_describe(f)}, got {value!r}")
    optional = "None" in f.type
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise bad
    if typ == "str | list" and isinstance(value, list):  # a list only comes from the YAML file
        if not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise bad
    if typ == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = int(value.strip(), 0)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad
    elif typ.startswith("float"):
        if isinstance(value, bool):
            raise bad
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(value):
            raise bad
    else:
        if not isinstance(value, (str, Path)):
            raise bad
        value = str(value)
    if meta["choices"] and value not in meta["choices"]:
        # accept case-insensitive spellings of a choice ("adamw", "mse"), store the canonical one
        folded = {c.lower(): c for c in meta["choices"]}
        if isinstance(value, str) and value.lower() in folded:
            return folded[value.lower()]
        raise bad
    if meta["range"]:
        lo, hi = meta["range"]
        if not lo <= value <= hi:
            raise bad
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing usage and exiting, so every
    command reports a bad flag as one line with its own exit code."""

    def error(self, message):
        raise ConfigError(message)


def add_parameters(parser: argparse.ArgumentParser, params: Iterable[dataclasses.Field], *,
                   typed: bool = False) -> None:
    """One ``--<name>`` flag per parameter, its help text from the field: the one flag builder of both commands.

    ``typed=False`` (train.py): every flag takes a string that :func:`_coerce` converts and checks when the
    config is built, exactly as a YAML value is, and the help says the default and what is allowed.
    ``typed=True`` (lora-prepare, which has no YAML file): argparse converts the value by the field's type,
    a bool is a switch, a field without a default is a required flag, and the help gives the default."""
    for f in params:
        if not typed:
            default = f.default if f.default is not None else "None"
            parser.add_argument(f"--{f.name}", metavar="VALUE", default=argparse.SUPPRESS,
                                help=f"{f.metadata['help']} [default: {default}; {_describe(f)}]")
            continue
        kind, required = _flag_type(f), f.default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS,
                                help=f.metadata["help"])
            continue
        default = "" if required or f.default is None else f" [default: {f.default}]"
        parser.add_argument(f"--{f.name}", type=kind, required=required, default=argparse.SUPPRESS,
                            metavar=f.name.upper(), help=f.metadata["help"] + default)


def _flag_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool}.get(f.type.replace(" | None", ""), str)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="train.py",
        description="Train a LoRA (or LoHa, LoKr, OFT) on a diffusion model from a latents dataset. "
        "With no arguments, runs a small built-in demo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the parameters below; "
                        "flags given on the command line override it")
    add_parameters(parser, TrainConfig.parameters())
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``--config FILE`` and ``--name VALUE`` flags into a validated :class:`TrainConfig`."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(load_yaml(config_file))
    values.update(args)
    return TrainConfig.from_mapping(values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of parameter names to values")
    return data
