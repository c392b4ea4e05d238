"""Sample images while training (``--sample_prompts``): the family's own diffusers pipeline around
the denoiser being trained, with the model folder's VAE and scheduler. Video families (Wan,
HunyuanVideo) sample clips, written as animated WebP.

Cost and side effects, by design:

- the text encoders run once, at start-up, for every prompt and negative prompt; their outputs are
  kept on the CPU and the encoders are freed before training starts;
- the VAE is loaded once and lives on the CPU; it is moved to the device only while sampling;
- sampling runs under ``no_grad`` in eval mode with the CPU and CUDA RNG states saved and restored,
  and never touches the data order or the adapter, so a run with samples ends with exactly the same
  adapter as one without;
- with several processes the main process samples while the others wait at a barrier (the sampled
  model is the same on every process; splitting four or so prompts over processes would save
  little and need the images gathered).

Prompt syntax (kohya's, which users of ``--sample_prompts`` files already have)::

    a photo of sks dog on a beach --n blurry, low quality --w 768 --h 512 --s 30 --g 6 --d 42

``--n`` negative prompt, ``--w``/``--h`` size in pixels, ``--s`` steps, ``--g`` (or kohya's ``--l``)
guidance scale, ``--d`` seed, and for video models ``--f`` frames (musubi-tuner's spelling). Blank lines
and lines starting with ``#`` are skipped.

Video: each clip is ``<k>.webp`` (animated, at the family's frame rate, quality 90; a 1-frame clip is a
``<k>.png`` as an image is), the grid an animated ``grid.webp`` (one grid per frame; shorter clips hold
their last frame), and the trackers get the grid's middle frame as an image.
"""

from __future__ import annotations

import gc
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import WatchArgs
from .errors import ConfigError, TrainerError
from .models.precision import DTYPES
from .outputs import atomic_path

logger = logging.getLogger(__name__)

#: the options a prompt line may carry: letter -> (field, type)
OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
           "g": ("guidance", float), "l": ("guidance", float), "d": ("seed", int), "f": ("frames", int)}
_GRID_COLUMNS = 4
_GRID_CELL = 256  # smallest cell width in the grid, so that a caption under a tiny image stays readable


@dataclass
class SamplePrompt:
    """One prompt line; ``None`` fields take the run's defaults."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    #: clip length in pixel frames (video models only)
    frames: int | None = None


def parse_prompt(line: str, where: str) -> SamplePrompt:
    """One line of the prompt syntax (see the module docstring); ``where`` names it in errors."""
    parts = (" " + line.strip()).split(" --")
    sample = SamplePrompt(parts[0].strip())
    if not sample.prompt:
        raise ConfigError(f"{where}: the line has options but no prompt")
    for part in parts[1:]:
        letter, _, value = part.partition(" ")
        if letter not in OPTIONS:
            raise ConfigError(f"{where}: unknown option --{letter} (known: "
                              f"{', '.join('--' + k for k in OPTIONS)})")
        name, kind = OPTIONS[letter]
        value = value.strip()
        try:
            parsed = kind(value)
        except ValueError:
            raise ConfigError(f"{where}: --{letter} expects a{'n integer' if kind is int else ' number'}, got "
                              f"{value!r}") from None
        if kind is not str and (parsed < 0 or (letter in "whsf" and parsed < 1)):
            raise ConfigError(f"{where}: --{letter} must be positive, got {value}")
        setattr(sample, name, parsed)
    return sample


def read_prompts(source: str | list[str]) -> list[SamplePrompt]:
    """The prompts of ``--sample_prompts``: a text file or a list of lines (from the YAML file).

    Raises :class:`ConfigError` for an unreadable or empty file and for a malformed line.
    """
    if isinstance(source, list):
        lines, name = source, "--sample_prompts"
        where = [f"--sample_prompts: item {i}" for i in range(len(lines))]
    else:
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"--sample_prompts: cannot read {path}: {reason}") from None
        name = f"--sample_prompts: {path}"
        where = [f"{name}, line {i + 1}" for i in range(len(lines))]
    prompts = [parse_prompt(line, where[i]) for i, line in enumerate(lines)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{name} holds no prompts (one per line; blank lines and lines starting with # are "
                          "skipped)")
    return prompts


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``--sample_size``: ``WIDTHxHEIGHT`` or one number for a square, as ``(width, height)``."""
    if value is None:
        return None
    parts = value.lower().replace(" ", "").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise ConfigError(f"--sample_size: expected WIDTHxHEIGHT or one number of pixels, got {value!r}")
    return (numbers[0], numbers[-1])


# ----------------------------------------------------------------------------- the sampler


class PromptSampler:
    """Makes, writes and reports the sample images (video models: clips) of one step (on the main process;
    the others wait)."""

    def __init__(self, pipe, prompts: list[SamplePrompt], embeds: list[dict[str, torch.Tensor]],
                 size: tuple[int, int], steps: int, guidance: float | None, seed: int, out_dir: Path,
                 frames: list[int] | None = None, fps: float = 16.0):
        self.pipe = pipe
        self.prompts = prompts
        #: per prompt: the pipeline's embedding arguments (prompt_embeds, negative_prompt_embeds, ...), on the CPU
        self.embeds = embeds
        self.size, self.steps, self.guidance, self.seed = size, steps, guidance, seed
        self.out_dir = out_dir
        #: per prompt: its clip length in frames (video models), or None (image models)
        self.frames, self.fps = frames, fps
        #: wall seconds spent sampling in this run (all sample steps)
        self.seconds = 0.0

    def sample(self, accelerator, step: int) -> list:
        """Generate every prompt's image at optimizer step ``step`` (total count); on the main process
        write them (``samples/step-NNNNNNNN/<k>.png`` and ``grid.png``; video: ``<k>.webp`` and
        ``grid.webp``) and send the grid (video: its middle frame) to the trackers. Every process must
        call this (the others wait). Returns the images (video: a list of frames per prompt; main process)."""
        images = []
        if accelerator.is_main_process:
            started = time.perf_counter()
            images = self._generate(accelerator)
            folder = self.out_dir / "samples" / f"step-{step:08d}"
            captions, title = [p.prompt for p in self.prompts], f"step {step}"
            if self.frames is None:
                for k, image in enumerate(images):
                    save_png(image, folder / f"{k}.png")
                grid = make_grid(images, captions, title)
                save_png(grid, folder / "grid.png")
            else:
                for k, clip in enumerate(images):
                    save_clip(clip, folder / str(k), self.fps)
                grids = grid_frames(images, captions, title)
                save_clip(grids, folder / "grid", self.fps)
                grid = grids[len(grids) // 2]
            log_image(accelerator, "samples", grid, step)
            seconds = time.perf_counter() - started
            self.seconds += seconds
            logger.info("sampled %d %s at step %d in %.1f s", len(images),
                        "image(s)" if self.frames is None else "clip(s)", step, seconds)
        accelerator.wait_for_everyone()
        return images

    def _generate(self, accelerator) -> list:
        device = accelerator.device
        denoiser = self.pipe.components[_denoiser_name(self.pipe)]
        was_training = denoiser.training
        vae = self.pipe.vae
        # sampling must not move any random stream that training reads: fork_rng restores the CPU
        # (and this device's CUDA) generator state afterwards
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            denoiser.eval()
            vae.to(device)
            try:
                images = []
                for k, (prompt, embeds) in enumerate(zip(self.prompts, self.embeds)):
                    images.append(self._one(accelerator, k, prompt, embeds))
            finally:
                vae.to("cpu")
                denoiser.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return images

    def _one(self, accelerator, k: int, prompt: SamplePrompt, embeds: dict[str, torch.Tensor]):
        width = prompt.width or self.size[0]
        height = prompt.height or self.size[1]
        seed = prompt.seed if prompt.seed is not None else (self.seed + k) % 2**64
        kwargs: dict[str, Any] = {name: _to_device(value, accelerator.device) for name, value in embeds.items()}
        guidance = prompt.guidance if prompt.guidance is not None else self.guidance
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        if self.frames is not None:
            kwargs["num_frames"] = self.frames[k]
        # a CPU generator: the same seed gives the same starting noise on every device
        generator = torch.Generator("cpu").manual_seed(seed)
        try:
            with accelerator.autocast():  # the precision the denoiser trains in (bf16 autocast or fp32)
                out = self.pipe(height=height, width=width, num_inference_steps=prompt.steps or self.steps,
                                generator=generator, output_type="pil", **kwargs)
        except ValueError as e:  # the pipeline's own input checks (e.g. a size its VAE cannot make)
            raise TrainerError(f"--sample_prompts: prompt {k} ({prompt.prompt[:40]!r}, {width}x{height}): "
                               f"{str(e).splitlines()[0]}") from None
        return out.images[0] if self.frames is None else list(out.frames[0])


def _to_device(value, device: torch.device):
    """A call argument on ``device``: a tensor, or a list of tensors (Z-Image's per-prompt embeddings)."""
    return [v.to(device) for v in value] if isinstance(value, list) else value.to(device)


def _denoiser_name(pipe) -> str:
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_clip(frames: list, stem: Path, fps: float) -> Path:
    """A clip as an animated WebP ``<stem>.webp`` at ``fps`` (quality 90, looping); a 1-frame clip as
    ``<stem>.png``, as an image is written. Returns the path written."""
    if len(frames) == 1:
        path = stem.with_name(stem.name + ".png")
        save_png(frames[0], path)
        return path
    path = stem.with_name(stem.name + ".webp")
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="WEBP", save_all=True, append_images=list(frames[1:]),
                       duration=round(1000 / fps), loop=0, quality=90)
    return path


def grid_frames(clips: list[list], captions: list[str], title: str) -> list:
    """The grid of every frame of the clips (:func:`make_grid` per frame); a shorter clip holds its last frame."""
    length = max(len(clip) for clip in clips)
    return [make_grid([clip[min(i, len(clip) - 1)] for clip in clips], captions, title) for i in range(length)]


def log_image(accelerator, tag: str, image, step: int) -> None:
    """Send one image to every tracker that takes images (TensorBoard: an NHWC array; W&B: PIL)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [image]}, step=step)


def make_grid(images: list, captions: list[str], title: str):
    """The images side by side (up to four a row), each with its prompt under it, ``title`` on top."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    cell_w = max(max(im.width for im in images), _GRID_CELL)
    # small images are enlarged by a whole factor (nearest neighbour: pixels stay visible as pixels)
    scaled = [im.resize((im.width * (cell_w // im.width), im.height * (cell_w // im.width)), Image.NEAREST)
              if im.width < cell_w else im for im in images]
    cell_h = max(im.height for im in scaled)
    chars = max(8, cell_w // 8)
    wrapped = ["\n".join(textwrap.wrap(c, chars, max_lines=3, placeholder=" ...")) for c in captions]
    lines = max(text.count("\n") + 1 for text in wrapped)
    caption_h, title_h, pad = lines * 18 + 8, 28, 6
    columns = min(_GRID_COLUMNS, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, title_h + rows * (cell_h + caption_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 6), title, fill="black", font=ImageFont.load_default(size=18))
    for k, (image, text) in enumerate(zip(scaled, wrapped)):
        x = pad + (k % columns) * (cell_w + pad)
        y = title_h + (k // columns) * (cell_h + caption_h + pad)
        grid.paste(image.convert("RGB"), (x, y))
        draw.multiline_text((x, y + cell_h + 4), text, fill="black", font=font, spacing=4)
    return grid


# ----------------------------------------------------------------------------- start-up


def pipeline_source(loaded, model_arg: Any) -> Path | Any | None:
    """Where the VAE, text encoders and scheduler come from: a pipeline object given to the library
    call, a pipeline folder, or the pipeline folder above a ``unet/``/``transformer/`` folder; None when
    there is none (a bare denoiser folder, a single file, the demo)."""
    if hasattr(model_arg, "components"):
        return model_arg
    if loaded.kind == "pipeline":
        return Path(loaded.source)
    if loaded.kind == "folder" and (Path(loaded.source).parent / "model_index.json").is_file():
        return Path(loaded.source).parent
    return None


def build_sampler(cfg: WatchArgs, output_dir: str, training_dtype: str, loaded, model_arg: Any,
                  prompts: list[SamplePrompt], size: tuple[int, int], accelerator,
                  latent_frames: int = 1) -> PromptSampler:
    """Encode the prompts, load the VAE and scheduler around the (adapted) denoiser.

    Every process checks the model; only the main process loads and encodes (it alone samples).
    ``latent_frames``: the training set's most common clip length in latent frames (video models), from
    which the default clip length comes. Raises :class:`TrainerError` when the model has no pipeline (VAE
    and text encoders) around it, for frame counts the VAE cannot make, for frames asked of an image
    model and for a Wan 2.2 A14B expert (its pipeline needs both experts).
    """
    from accelerate.utils import DistributedType

    video = loaded.family.latent_ndim == 4
    if not video:
        asked = ["--sample_frames"] if cfg.sample_frames is not None else []
        asked += [f"--f in prompt {k} ({p.prompt[:40]!r})" for k, p in enumerate(prompts) if p.frames is not None]
        if asked:
            raise TrainerError(f"--sample_prompts: {loaded.family.name} is an image model; {asked[0]} gives a "
                               "clip length, which only video models (wan, hunyuan_video) take")
    source = pipeline_source(loaded, model_arg)
    if source is None:
        what = {"folder": f"a bare {loaded.family.subfolder}/ folder", "single_file": "a single-file checkpoint",
                "demo": "the built-in demo UNet", "object": "a model object, not a pipeline"}.get(loaded.kind, "")
        raise TrainerError(f"--sample_prompts: sampling needs a diffusers pipeline folder (model_index.json with "
                           f"vae/ and the text encoders); --model {loaded.source} is {what}")
    if isinstance(source, Path):
        _check_components(source)
    frames = _clip_frames(cfg, prompts, source, latent_frames) if video else None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise TrainerError("--sample_prompts: sampling is not supported under FSDP (the main process samples "
                           "alone and FSDP shards the denoiser); sample from the saved LoRA instead")
    out_dir = Path(output_dir)
    fps = loaded.family.encoding.fps
    if not accelerator.is_main_process:
        return PromptSampler(None, prompts, [], size, cfg.sample_steps, cfg.sample_guidance, cfg.sample_seed,
                             out_dir, frames, fps)
    started = time.perf_counter()
    dtype = DTYPES[training_dtype]
    embeds = encode_prompts(source, loaded.family.name, prompts, dtype, accelerator.device)
    pipe = _sampling_pipeline(source, loaded)
    pipe.set_progress_bar_config(disable=True)
    embeds = _accepted_embeddings(pipe, prompts, embeds)
    clips = "" if frames is None else f", {'/'.join(str(f) for f in sorted(set(frames)))} frames"
    logger.info("sampling %d prompt(s) at %dx%d%s, %d steps: encoded in %.1f s", len(prompts), size[0], size[1],
                clips, cfg.sample_steps, time.perf_counter() - started)
    return PromptSampler(pipe, prompts, embeds, size, cfg.sample_steps, cfg.sample_guidance, cfg.sample_seed,
                         out_dir, frames, fps)


def _clip_frames(cfg: WatchArgs, prompts: list[SamplePrompt], source, latent_frames: int) -> list[int]:
    """Each prompt's clip length in pixel frames: its ``--f``, else ``--sample_frames``, else the training
    set's most common clip length (``(T - 1) x`` the VAE's temporal factor ``+ 1``). Refuses a count the VAE
    cannot make and a Wan 2.2 A14B expert (the pipeline denoises with both experts)."""
    from .models.base import read_json, vae_temporal_factor

    if isinstance(source, Path):
        index = read_json(source / "model_index.json")
        vae_file = source / "vae" / "config.json"
        vae_config = read_json(vae_file) if vae_file.is_file() else None
        second = (index.get("transformer_2") or [None])[0] is not None
        boundary = index.get("boundary_ratio")
    else:
        vae = getattr(source, "vae", None)
        vae_config = dict(vae.config) if vae is not None else None
        second = getattr(source, "transformer_2", None) is not None
        boundary = getattr(source, "config", {}).get("boundary_ratio")
    if second and boundary is not None:
        raise TrainerError("--sample_prompts: this is one expert of a two-expert Wan 2.2 pipeline (boundary_ratio, "
                           "transformer_2), which samples only with both experts loaded; sample from the saved "
                           "LoRAs with both experts")
    factor = vae_temporal_factor(vae_config)
    default = cfg.sample_frames or (latent_frames - 1) * factor + 1
    frames = [p.frames or default for p in prompts]
    for k, (p, count) in enumerate(zip(prompts, frames)):
        if (count - 1) % factor:
            what = (f"prompt {k} ({p.prompt[:40]!r}): --f {count}" if p.frames
                    else f"--sample_frames {count}")
            low = (count - 1) // factor * factor + 1
            raise TrainerError(f"--sample_prompts: {what} frames cannot be made by the VAE: a clip has 1 + a "
                               f"multiple of {factor} frames (e.g. {low} or {low + factor})")
    return frames


def _check_components(root: Path) -> None:
    from .models.base import read_json

    index = read_json(root / "model_index.json")
    missing = [name for name in ("vae", "text_encoder")
               if not (isinstance(index.get(name), list) and index[name][0] is not None and (root / name).is_dir())]
    if missing:
        raise TrainerError(f"--sample_prompts: sampling needs the pipeline's VAE and text encoders, but {root} has "
                           f"no {' or '.join(f'{m}/' for m in missing)}")


#: pipeline components the text encoding needs (prepare's list without the VAE)
def _accepted_embeddings(pipe, prompts: list[SamplePrompt], embeds: list[dict]) -> list[dict]:
    """The embeddings without the negative ones when the pipeline's call takes none (Flux.2: guidance-distilled,
    no true CFG); a prompt's own negative text is then a :class:`TrainerError`, not silently dropped."""
    import inspect

    if "negative_prompt_embeds" in inspect.signature(pipe.__call__).parameters:
        return embeds
    for k, p in enumerate(prompts):
        if p.negative:
            raise TrainerError(f"--sample_prompts: prompt {k} ({p.prompt[:40]!r}) has a negative prompt (--n) but "
                               f"{type(pipe).__name__} takes none")
    return [{name: value for name, value in e.items() if not name.startswith("negative_")} for e in embeds]


def _encoder_components() -> tuple[str, ...]:
    from .prepare import ENCODER_COMPONENTS

    return tuple(c for c in ENCODER_COMPONENTS if c != "vae")


@torch.no_grad()
def encode_prompts(source, family: str, prompts: list[SamplePrompt], dtype: torch.dtype,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Each prompt's and negative prompt's embeddings, as the pipeline's call arguments, on the CPU.

    The text encoders are those of ``source`` (a pipeline folder: loaded here, then freed; a pipeline
    object: used where they are). The per-family encoding is ``lora-prepare``'s.
    """
    from .models import get_family

    if isinstance(source, Path):
        from diffusers import DiffusionPipeline

        from .models.base import read_json

        index = read_json(source / "model_index.json")
        keep = _encoder_components()
        leave_out = {name: None for name, value in index.items() if isinstance(value, list) and name not in keep}
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **leave_out)
        pipe.to(device)
    else:
        pipe = source
        device = pipe.device
    family = get_family(family)
    encode = family.encoding.encode_text
    positive = encode(pipe, [p.prompt for p in prompts], device)
    negative = encode(pipe, [p.negative for p in prompts], device)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        # SDXL's pipelines use zeros, not the encoded empty string, for an empty negative prompt
        for k, p in enumerate(prompts):
            if not p.negative:
                for tensor in negative.values():
                    tensor[k] = 0
    embeds = [family.sampling_arguments({**{name: value[k:k + 1].cpu() for name, value in positive.items()},
                                         **{f"negative_{name}": value[k:k + 1].cpu()
                                            for name, value in negative.items()}})
              for k in range(len(prompts))]
    if isinstance(source, Path):
        del pipe  # the text encoders are not needed again
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return embeds


def _sampling_pipeline(source, loaded):
    """The family's pipeline holding only the VAE (on the CPU), the scheduler and the trained denoiser."""
    denoiser = loaded.denoiser
    name = loaded.family.subfolder
    if isinstance(source, Path):
        from diffusers import DiffusionPipeline

        from .models.base import read_json

        index = read_json(source / "model_index.json")
        leave_out = {n: None for n, value in index.items()
                     if isinstance(value, list) and n not in ("vae", "scheduler", name)}
        if "requires_safety_checker" in index:
            leave_out["requires_safety_checker"] = False
        # the folder's own pipeline class: DiffusionPipeline.from_pretrained drops a passed component that
        # the class's __init__ gives a default (WanPipeline's transformer, optional beside transformer_2) and
        # loads the folder's weights in its place
        import diffusers

        pipeline_class = getattr(diffusers, str(index.get("_class_name")), DiffusionPipeline)
        pipe = pipeline_class.from_pretrained(source, **{name: denoiser}, **leave_out)
        if pipe.components.get(name) is not denoiser:
            raise TrainerError(f"--sample_prompts: {type(pipe).__name__} did not take the trained {name}; sample "
                               "from the saved LoRA instead")
        return pipe
    import inspect

    parameters = inspect.signature(type(source).__init__).parameters
    components = {n: (c if n in ("vae", "scheduler") else None) for n, c in source.components.items()}
    components[name] = denoiser
    # the pipeline's own settings (Wan 2.2 TI2V-5B's expand_timesteps, boundary_ratio) travel too
    components.update({n: source.config[n] for n in parameters
                       if n not in components and n != "self" and n in source.config})
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    pipe = type(source)(**components)
    pipe.vae.to("cpu")  # the caller's VAE object: it waits on the CPU between samples like a loaded one
    return pipe


def _common_latent_shape(data, flag: str) -> tuple[int, ...]:
    """One row's latent shape in the training set's largest bucket; streamed data: the shape its schema fixes,
    else a :class:`TrainerError` asking for ``flag`` (a stream's rows are not known up front)."""
    if hasattr(data, "buckets"):
        bucket = max(data.buckets, key=len)
        return tuple(data.rows([bucket[0]])["latents"].shape[1:])
    shape = getattr(data, "fixed", {}).get("latents")
    if shape is None:
        raise TrainerError("--sample_prompts: with --streaming and latents of several shapes the samples' size "
                           f"cannot be read from the data up front; give {flag}")
    return tuple(shape)


def most_common_frames(data) -> int:
    """Latent frames T of the training set's largest bucket (video rows ``[C, T, H, W]``; 1 for image rows)."""
    shape = _common_latent_shape(data, "--sample_frames")
    return int(shape[-3]) if len(shape) == 4 else 1


def most_common_size(data, vae_scale_factor: int) -> tuple[int, int]:
    """(width, height) in pixels of the training set's largest bucket (its latent size x the VAE factor)."""
    height, width = _common_latent_shape(data, "--sample_size")[-2:]
    return (int(width) * vae_scale_factor, int(height) * vae_scale_factor)
