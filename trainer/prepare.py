"""``lora-prepare`` / ``python -m trainer.prepare``: a folder of images, videos and captions (or ComfyUI
``.latent`` files) to a latents dataset that ``--latents`` reads.

1. :func:`scan` lists the inputs: png/jpg/webp images, mp4/webm/mov/mkv/avi videos (video models only),
   captions from same-name ``.txt`` files or ``metadata.jsonl``/``metadata.csv`` (``file_name``, ``text``),
   kohya-style ``N_name`` folders (N repeats), ``.latent`` files; what cannot be used is reported with
   the reason.
2. Each image or video goes to the aspect-ratio bucket of closest aspect ratio (:func:`make_buckets`)
   and is resized and center-cropped to it only as needed. A video also gets a frame count: the
   longest of ``--frames`` that it covers at ``--fps``, taken from its start (:func:`frame_times`).
3. The model's own VAE and the family's text encoders (each family's ``encoding``,
   :class:`~trainer.models.base.FamilyEncoding`) encode the images, clips and captions in batches, each
   process its share (``accelerate launch``); every result lands in a cache folder keyed by file, mtime
   and settings, so a rerun encodes only what is new. Videos are decoded with PyAV (FFmpeg in its
   wheel) and encoded one clip at a time with the VAE's tiling on (diffusers' ``enable_tiling``), so a
   long or large clip needs the memory of one tile; video models' images become 1-frame clips.
4. The main process writes one ``datasets`` dataset with ``save_to_disk``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import EXIT_CONFIG, EXIT_INPUT, EXIT_INTERRUPTED, configure_logging
from .config import OneLineParser, _param, add_parameters
from .errors import ConfigError, TrainerError

if TYPE_CHECKING:  # torch takes seconds to import: only the encoding functions import it
    import torch

    from .models.base import FamilyEncoding

logger = logging.getLogger("trainer.prepare")  # also when run as __main__

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
LATENT_SUFFIX = ".latent"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: pipeline components loaded for encoding; the denoiser and everything else are left on disk
# (the scheduler is tiny, and some pipelines read it in __init__)
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                      "tokenizer_3", "scheduler")
#: --dtype's choices (names of models.precision.DTYPES; torch is imported only when encoding: `--help` stays instant)
_DTYPES = ("fp32", "fp16", "bf16")
_REPEATS = re.compile(r"^(\d+)_(.*)$")
_EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------- families


# ----------------------------------------------------------------------------- parameters


@dataclass
class PrepareConfig:
    """Parameters of ``lora-prepare``; each is a ``--flag`` of the same name (fields made by
    :func:`trainer.config._param`, flags by :func:`trainer.config.add_parameters`, as train.py's)."""

    images: str = _param(MISSING, "folder of png/jpg/webp images, mp4/webm/mov/mkv/avi videos (video models) "
                         "and/or ComfyUI .latent files; captions in same-name .txt files or "
                         "metadata.jsonl/metadata.csv (file_name, text); kohya-style N_name subfolders repeat "
                         "their files N times")
    model: str = _param(MISSING, "diffusers pipeline folder (model_index.json) with vae/ and text encoders")
    output: str = _param(MISSING, "dataset folder to write (save_to_disk), for train.py --latents")
    resolution: int | None = _param(None, "bucket area at most RESOLUTION^2 pixels (default: the family's, "
                                    "512 for SD 1.x/2.x, 1024 for SDXL, SD3, Flux)")
    model_family: str = _param("auto", "model family; auto detects it from the denoiser's config")
    bucket_step: int | None = _param(None, "bucket sides are multiples of this many pixels (default: the "
                                     "model's own multiple, raised to at least 64)")
    max_aspect_ratio: float = _param(4.0, "widest bucket: long side / short side")
    batch_size: int = _param(8, "images (and captions) per encoder batch; videos are encoded one clip at a time")
    dtype: str = _param("fp32", "encoder dtype: fp32, fp16 or bf16; stored as float16 with fp16, else "
                        "float32")
    sample_latents: bool = _param(False, "draw a seeded sample from the VAE's latent distribution instead "
                                  "of taking its mean")
    seed: int = _param(0, "seed of --sample_latents (each image's noise derives from it and the image)")
    positive: str | None = _param(None, "caption for files that have none (e.g. .latent files)")
    cache_dir: str | None = _param(None, "per-image encodings, kept for resuming (default: OUTPUT.cache)")
    frames: str | None = _param(None, "video models: comma-separated frame counts a clip may have (each 1 + a "
                                "multiple of the VAE's temporal factor, 4 for Wan and HunyuanVideo); each video "
                                "becomes the longest clip it covers at --fps, from its start (default: the "
                                "family's, 1,17,33,49,65,81 for Wan, 1,33,65,97,129 for HunyuanVideo)")
    fps: float | None = _param(None, "video models: frame rate the clips are sampled at, dropping or repeating "
                               "source frames (default: the family's, 16 for Wan, 24 for HunyuanVideo)")
    clips: int = _param(1, "video models: clips per video, at most: as many as fit without overlapping, spread "
                        "evenly from its start to its end (1: one clip, from its start)")

    def __post_init__(self):
        for name in ("images", "model"):
            if not Path(getattr(self, name)).exists():
                raise ConfigError(f"--{name}: no such file or folder: {getattr(self, name)}")
        if not Path(self.images).is_dir():
            raise ConfigError(f"--images: {self.images} is not a folder")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"--resolution: expected at least 8 pixels, got {self.resolution}")
        if self.bucket_step is not None and self.bucket_step < 1:
            raise ConfigError(f"--bucket_step: expected a positive number of pixels, got {self.bucket_step}")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError(f"--max_aspect_ratio: expected a number >= 1, got {self.max_aspect_ratio}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size: expected at least 1, got {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if Path(self.output).resolve() == Path(self.images).resolve():
            raise ConfigError("--output must not be the --images folder")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps: expected a positive frame rate, got {self.fps}")
        if self.frames is not None:
            parse_frames(self.frames)  # a bad list is an error before anything is read
        if self.clips < 1:
            raise ConfigError(f"--clips: expected at least 1, got {self.clips}")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(f"{self.output.rstrip('/')}.cache")


def parse_frames(text: str) -> tuple[int, ...]:
    """``--frames`` as sorted distinct counts."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--frames: expected comma-separated frame counts like 1,17,33, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"--frames: expected frame counts of at least 1, got {text!r}")
    return tuple(counts)


# ----------------------------------------------------------------------------- buckets


def make_buckets(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)``: for each short side (a multiple of ``step`` up to
    ``resolution``) the longest long side, also a multiple of ``step``, that keeps the area within
    ``resolution**2``; both orientations; aspect ratio at most ``max_aspect_ratio``."""
    area, buckets = resolution * resolution, set()
    for short in range(step, resolution + 1, step):
        long = area // short // step * step
        if long >= short and long <= max_aspect_ratio * short:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets)


def closest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of closest aspect ratio (on a log scale); ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1], b))


def fit_plan(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of this size becomes ``bucket``: its size after resizing (just enough to cover the
    bucket; unchanged when it already does in one side and fits the other) and the ``(top, left)`` of the
    center crop."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    resized = (width, height)
    if scale != 1:
        resized = (max(bw, round(width * scale)), max(bh, round(height * scale)))
    return resized, ((resized[1] - bh) // 2, (resized[0] - bw) // 2)


def clip_frames(counts: tuple[int, ...], fps: float, seconds: float, rate: float) -> int | None:
    """The longest of ``counts`` whose frames, ``1 / fps`` apart from the video's start, all fall within a
    video whose frames (``rate`` per second, 0 if unknown) cover ``seconds``; None if none does."""
    last = seconds - (1 / rate if rate else 0.0)  # when the last frame starts
    fitting = [n for n in counts if (n - 1) / fps <= last + 1e-6]
    return max(fitting, default=None)


def clip_starts(clips: int, frames: int, fps: float, seconds: float, rate: float) -> list[float]:
    """Start times (seconds) of at most ``clips`` clips of ``frames`` frames at ``fps`` in a video like
    :func:`clip_frames`'s: as many as fit without overlapping, evenly spread from its start to its end."""
    room = seconds - (1 / rate if rate else 0.0) - (frames - 1) / fps  # the latest start
    count = min(clips, 1 + int(room / (frames / fps) + 1e-6)) if room > 0 else 1
    return [0.0] if count <= 1 else [i * room / (count - 1) for i in range(count)]


def frame_times(count: int, fps: float, start: float = 0.0) -> list[float]:
    """Seconds from the video's start at which a clip of ``count`` frames at ``fps`` from ``start`` samples it."""
    return [start + k / fps for k in range(count)]


# ----------------------------------------------------------------------------- scanning


@dataclass
class Source:
    """One usable input file and the rows it becomes."""

    path: Path
    #: path relative to --images, with / separators: the ``file_name`` column
    name: str
    caption: str
    repeats: int
    kind: str  # "image", "video" or "latent"
    #: image, video: (width, height) as seen upright; .latent: (batch, channels, [frames,] height, width)
    size: tuple[int, ...]
    #: image, video: bucket (width, height), size after resizing, crop (top, left)
    bucket: tuple[int, int] | None = None
    resized: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    #: video: frames of its clip and their rate; 1 for an image of a video model, 0 for an image model's
    frames: int = 0
    fps: float = 0.0
    #: video: where its clip starts (seconds from its first frame), and that frame's timestamp
    start: float = 0.0
    origin: float = 0.0
    #: image, video: name of its cached latents
    key: str = ""


@dataclass
class Skipped:
    """A file left out: ``kind`` is a short category for the summary, ``reason`` the whole story."""

    name: str
    kind: str
    reason: str


class _Skip(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class Plan:
    """Everything the scan found, before any encoding."""

    sources: list[Source] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def scan(folder: Path, positive: str | None = None,
         exclude: tuple[Path, ...] = ()) -> tuple[list[Source], list[Skipped]]:
    """List the inputs under ``folder`` with their captions and repeats (sizes are filled in by
    :func:`plan`). Returns the usable files and the ones skipped, with why."""
    folder = folder.resolve()
    excluded = [p.resolve() for p in exclude]
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and not any(p.is_relative_to(x) for x in excluded))
    metadata, skipped = _read_metadata(folder, [p for p in files if p.name in METADATA_FILES])
    inputs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES + (LATENT_SUFFIX,)]
    stems = {(p.parent, p.stem) for p in inputs}
    sources = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if path.name in METADATA_FILES:
            continue
        if suffix == ".txt":
            if (path.parent, path.stem) not in stems:
                skipped.append(Skipped(name, "caption without an image", "caption file without an image or video"))
            continue
        if path not in inputs:
            skipped.append(Skipped(name, "unsupported", "not a png/jpg/webp image, an mp4/webm/mov/mkv/avi video "
                                   "or a ComfyUI .latent file"))
            continue
        repeats, folder_caption = _repeats(path.relative_to(folder))
        if repeats == 0:
            skipped.append(Skipped(name, "0 repeats", "in a folder with 0 repeats"))
            continue
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        elif path in metadata:
            caption = metadata[path]
        else:
            caption = folder_caption or positive or ""
        kind = "latent" if suffix == LATENT_SUFFIX else "video" if suffix in VIDEO_SUFFIXES else "image"
        sources.append(Source(path, name, caption, repeats, kind, ()))
    missing = sorted(set(metadata) - set(inputs))
    skipped += [Skipped(p.relative_to(folder).as_posix(), "missing", "listed in a metadata file, not found")
                for p in missing]
    return sources, skipped


def _repeats(relative: Path) -> tuple[int, str]:
    """kohya's ``N_name`` folders: N repeats of every file below, and ``name`` as the fallback caption."""
    if len(relative.parts) > 1:
        match = _REPEATS.match(relative.parts[0])
        if match:
            return int(match.group(1)), match.group(2).strip()
    return 1, ""


def _read_metadata(folder: Path, files: list[Path]) -> tuple[dict[Path, str], list[Skipped]]:
    """``file_name`` -> ``text`` of every metadata.jsonl/csv (names relative to the file's folder)."""
    captions, skipped = {}, []
    for meta in files:
        name = meta.relative_to(folder).as_posix()
        try:
            with meta.open(encoding="utf-8", newline="") as f:
                rows = [json.loads(line) for line in f if line.strip()] if meta.suffix == ".jsonl" \
                    else list(csv.DictReader(f))
        except (OSError, ValueError, csv.Error) as e:
            skipped.append(Skipped(name, "unreadable", f"unreadable metadata: {e}"))
            continue
        for i, row in enumerate(rows):
            text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(row, dict) or "file_name" not in row or text is None:
                skipped.append(Skipped(f"{name}, row {i + 1}", "bad metadata", "no 'file_name' and 'text'"))
                continue
            captions[(meta.parent / row["file_name"]).resolve()] = str(text).strip()
    return captions, skipped


def plan(cfg: PrepareConfig, model: ModelInfo) -> Plan:
    """Scan, read image sizes, video headers and .latent headers, and choose each image's or video's bucket
    and crop (and a video's frame count)."""
    from PIL import Image, UnidentifiedImageError

    sources, skipped = scan(Path(cfg.images), cfg.positive, exclude=(Path(cfg.output), cfg.cache))
    buckets = make_buckets(model.resolution, model.bucket_step, cfg.max_aspect_ratio)
    if not buckets:
        raise ConfigError(f"--resolution {model.resolution} is below --bucket_step {model.bucket_step}")
    smallest = min(min(b) for b in buckets)
    if any(src.kind == "video" for src in sources) and model.fps is not None:
        _pyav()  # one clear line now rather than a skip per video
    result = Plan()
    for src in sources:
        try:
            if src.path.stat().st_size == 0:
                raise _Skip("empty", "empty file")
            if src.kind == "latent":
                src.size = _latent_header(src.path, model.latent_ndim + 1)
                reason = model.latent_problem(src.size)
                if reason:
                    raise _Skip("does not fit the model", reason)
                result.sources.append(src)
                continue
            if model.vae is None:
                raise _Skip("no VAE", f"the model {cfg.model} has no VAE to encode images with")
            if src.kind == "video":
                if model.fps is None:
                    raise _Skip("video for an image model", f"a video, but {model.family} is an image model")
                width, height, seconds, rate, src.origin = _probe_video(src.path)
                frames = clip_frames(model.frames, model.fps, seconds, rate)
                if frames is None:
                    raise _Skip("too short", f"{seconds:.2f} s is shorter than the shortest clip, "
                                f"{model.frames[0]} frames at {model.fps:g} fps; add a shorter count to --frames")
                src.frames, src.fps = frames, model.fps
                starts = clip_starts(cfg.clips, frames, model.fps, seconds, rate)
            else:
                with Image.open(src.path) as image:
                    width, height = image.size
                    if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                        width, height = height, width
                src.frames, starts = (1 if model.fps is not None else 0), [0.0]
            if min(width, height) < smallest:
                raise _Skip("too small", f"{width}x{height} is smaller than the smallest bucket side "
                            f"({smallest} px at resolution {model.resolution}); use a larger {src.kind} or a "
                            "lower --resolution")
            src.size = (width, height)
            src.bucket = closest_bucket(width, height, buckets)
            src.resized, src.crop = fit_plan(width, height, src.bucket)
            stat = src.path.stat()
            for start in starts:  # a video's clips are rows of their own
                clip = replace(src, start=start)
                clip.key = _key(str(src.path.resolve()), stat.st_size, stat.st_mtime_ns, src.bucket,
                                src.resized, src.crop, model.vae_stamp, cfg.dtype, cfg.sample_latents,
                                cfg.seed if cfg.sample_latents else None,
                                *((src.frames, src.fps) if src.frames else ()), *((start,) if start else ()))
                result.sources.append(clip)
        except _Skip as e:
            result.skipped.append(Skipped(src.name, e.kind, str(e)))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL and PyAV raise these
            result.skipped.append(Skipped(src.name, "unreadable", f"unreadable: {e}"))
    result.skipped = skipped + result.skipped
    return result


def _pyav():
    """PyAV, the video decoder (FFmpeg's libraries are in its wheel): an optional dependency."""
    try:
        import av
    except ImportError:
        raise TrainerError("reading videos needs PyAV: pip install av (or the project's [video] extra)") from None
    return av


def _probe_video(path: Path) -> tuple[int, int, float, float, float]:
    """A video's (width, height) as shown (its rotation applied), the seconds its frames cover, its frame
    rate (0 when the file does not say) and its first frame's timestamp, from its header and first frame."""
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _Skip("unreadable", "no video stream in it")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise _Skip("unreadable", "no frame could be decoded")
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            else:
                seconds = stream.frames / rate if stream.frames and rate else 0.0
            width, height = first.width, first.height
            if first.rotation % 180:
                width, height = height, width
    except av.error.FFmpegError as e:  # not all of FFmpeg's errors are OSError or ValueError (EOFError, ...)
        raise _Skip("unreadable", f"unreadable: {e}") from None
    return width, height, seconds, rate, first.time or 0.0


def _latent_header(path: Path, ndim: int) -> tuple[int, ...]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if "latent_tensor" not in f.keys():
                raise _Skip("unreadable", "no 'latent_tensor' in it (not written by ComfyUI's SaveLatent)")
            shape = tuple(f.get_slice("latent_tensor").get_shape())
    except _Skip:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise _Skip("unreadable", f"unreadable .latent file: {e}") from None
    if len(shape) != ndim:
        expected = "[batch, channels, frames, height, width]" if ndim == 5 else "[batch, channels, height, width]"
        raise _Skip("does not fit the model", f"latent_tensor has shape {list(shape)}, expected {expected}")
    return shape


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelInfo:
    """The pipeline folder's family and geometry, read from its configs (no weights loaded)."""

    path: Path
    family: str
    encoding: FamilyEncoding
    #: the denoiser's subfolder ("unet" or "transformer") and its config.json
    denoiser: str
    denoiser_config: dict
    #: vae/config.json, or None when the pipeline has no VAE
    vae: dict | None
    vae_factor: int
    resolution: int
    bucket_step: int
    #: identities of the encoders' files: part of every cache key
    vae_stamp: str
    text_stamp: str
    #: dims of a dataset row: 3 [C, H, W], or 4 [C, T, H, W] for video models
    latent_ndim: int = 3
    #: video models: the clips' frame rate and allowed frame counts; pixel frames per latent frame
    fps: float | None = None
    frames: tuple[int, ...] = ()
    temporal_factor: int = 1

    @property
    def multiple(self) -> int:
        """Pixels that every bucket side must be a multiple of."""
        return self.vae_factor * self.encoding.denoiser_factor(self.denoiser_config)

    @property
    def latent_scale(self) -> tuple:
        """(scale, shift): numbers, or per-channel lists (see ``trainer.models.base.scale_latents``)."""
        if self.vae is None:
            return self.encoding.latent_scale
        if self.encoding.vae_normalisation is not None:
            return self.encoding.vae_normalisation(self.vae)
        return self.vae.get("scaling_factor", 1.0), self.vae.get("shift_factor") or 0.0

    @property
    def latent_channels(self) -> int | None:
        """Channels of the VAE's latents (video VAEs call them ``z_dim``), or None without a VAE config."""
        if self.vae is None:
            return None
        return self.vae.get("latent_channels") or self.vae.get("z_dim")

    def latent_shape(self, src: Source) -> tuple[int, ...]:
        """The dataset row shape of an encoded image or video: [C, H, W], or [C, T, H, W] for video models."""
        channels = self.latent_channels or 4
        height, width = src.bucket[1] // self.vae_factor, src.bucket[0] // self.vae_factor
        if self.latent_ndim == 3:
            return channels, height, width
        return channels, 1 + (src.frames - 1) // self.temporal_factor, height, width

    def latent_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a .latent of this shape does not fit the model, or None."""
        if self.encoding.normalize_latents is not None:
            return (f"{self.family}'s latent normalisation is in its VAE's weights; import images, not "
                    ".latent files")
        channels = self.latent_channels
        if channels is not None and shape[1] != channels:
            return f"latent_tensor has {shape[1]} channels but the model's VAE makes {channels}"
        factor = self.multiple // self.vae_factor
        height, width = shape[-2:]
        if height % factor or width % factor:
            return f"latent size {height}x{width} is not a multiple of {factor}, which the model needs"
        return None


def inspect_model(cfg: PrepareConfig) -> ModelInfo:
    """Read the pipeline folder's configs: family, VAE, bucket geometry. Raises TrainerError."""
    from .models.base import detect_family, get_family, read_json, vae_scale_factor, vae_temporal_factor

    path = Path(cfg.model)
    if not (path / "model_index.json").is_file():
        raise TrainerError(f"--model: {path} is not a diffusers pipeline folder (no model_index.json); "
                           "preparing data needs the whole pipeline, with its VAE and text encoders")
    index = read_json(path / "model_index.json")
    denoiser = next((sub for sub in ("transformer", "unet")
                     if sub in index and (path / sub / "config.json").is_file()), None)
    if denoiser is None:
        raise TrainerError(f"--model: {path} has no unet/ or transformer/ with a config.json")
    config = read_json(path / denoiser / "config.json")
    family = get_family(cfg.model_family) if cfg.model_family != "auto" else detect_family(config, path / denoiser)
    if not (path / "text_encoder" / "config.json").is_file():
        raise TrainerError(f"--model: {path} has no text_encoder/ to encode captions with")
    vae_file = path / "vae" / "config.json"
    vae = read_json(vae_file) if index.get("vae", [None])[0] is not None and vae_file.is_file() else None
    vae_factor = vae_scale_factor(vae)
    encoding = family.encoding
    info = ModelInfo(path, family.name, encoding, denoiser, config, vae, vae_factor,
                     cfg.resolution or encoding.resolution, 0, _stamp(path, ("vae",)),
                     _stamp(path, [c for c in ENCODER_COMPONENTS if c != "vae"]), latent_ndim=family.latent_ndim)
    if family.latent_ndim == 4:
        info.fps, info.temporal_factor = cfg.fps or encoding.fps, vae_temporal_factor(vae)
        info.frames = parse_frames(cfg.frames) if cfg.frames else encoding.frames
        wrong = [n for n in info.frames if (n - 1) % info.temporal_factor]
        if wrong:
            raise ConfigError(f"--frames: {', '.join(map(str, wrong))} frames cannot be encoded by this VAE: a clip "
                              f"has 1 + a multiple of {info.temporal_factor} frames (e.g. 1, "
                              f"{1 + 4 * info.temporal_factor}, {1 + 8 * info.temporal_factor})")
    else:
        given = [name for name, default in (("frames", None), ("fps", None), ("clips", 1))
                 if getattr(cfg, name) != default]
        if given:
            raise ConfigError(f"--{given[0]}: {family.name} is an image model; --frames, --fps and --clips apply to "
                              "video models")
    multiple = info.multiple
    info.bucket_step = cfg.bucket_step or multiple * math.ceil(64 / multiple)
    if info.bucket_step % multiple:
        raise ConfigError(f"--bucket_step: {info.bucket_step} is not a multiple of {multiple} pixels "
                          f"(VAE factor {vae_factor} x the {denoiser}'s {multiple // vae_factor}), which "
                          "this model needs")
    return info


def _stamp(path: Path, subfolders) -> str:
    """Names, sizes and modification times of a pipeline's component files: a changed model means new keys."""
    files = sorted(p for s in subfolders if (path / s).is_dir() for p in (path / s).rglob("*") if p.is_file())
    return _key(str(path.resolve()), [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                                      for p in files])


def load_encoders(model: ModelInfo, dtype: torch.dtype, device: torch.device):
    """The pipeline with only its VAE, text encoders, tokenizers and scheduler loaded."""
    import torch
    from diffusers import DiffusionPipeline

    from .models.base import read_json

    index = read_json(model.path / "model_index.json")
    leave_out = {name: None for name, value in index.items()
                 if isinstance(value, list) and name not in ENCODER_COMPONENTS}
    if model.vae is None:
        leave_out["vae"] = None  # a pipeline saved without one still expects the argument
    pipe = DiffusionPipeline.from_pretrained(model.path, dtype=dtype, **leave_out)
    pipe.to(device)
    if pipe.vae is not None and dtype == torch.float16 and pipe.vae.config.get("force_upcast"):
        pipe.vae.to(torch.float32)  # this VAE overflows in fp16 (SD 1.x/SDXL): diffusers upcasts it too
    if pipe.vae is not None and model.latent_ndim == 4:
        # a clip is encoded in spatial (and, by HunyuanVideo's VAE, temporal) tiles once it is larger than one
        # tile: the memory of one tile for any clip size (Wan's causal VAE also runs 4 frames at a time)
        pipe.vae.enable_tiling()
    return pipe


# ----------------------------------------------------------------------------- encoding


class Cache:
    """One safetensors file per encoded image (``latents/``) and per caption (``text/``), each written
    atomically."""

    def __init__(self, root: Path):
        self.root = root

    def latents(self, key: str) -> Path:
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def text(self, key: str) -> Path:
        return self.root / "text" / key[:2] / f"{key}.safetensors"

    @staticmethod
    def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from .outputs import atomic_path

        with atomic_path(path, durable=False) as tmp:  # a cache: no fsync per image
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _fit(image, src: Source) -> torch.Tensor:
    """An upright RGB PIL image of ``src.size`` (or already resized to ``src.resized``), resized and cropped
    to its bucket, as [3, H, W] in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    if image.size not in (src.size, src.resized):
        raise ValueError(f"decoded as {image.size[0]}x{image.size[1]}, its header said "
                         f"{src.size[0]}x{src.size[1]}")
    if image.size != src.resized:
        image = image.resize(src.resized, Image.Resampling.LANCZOS)
    top, left = src.crop
    if image.size != src.bucket:
        image = image.crop((left, top, left + src.bucket[0], top + src.bucket[1]))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def _pixels(src: Source) -> torch.Tensor:
    """The image as [3, H, W] (an image model's) or [3, 1, H, W] (a 1-frame clip of a video model's)."""
    from datasets import Image as ImageFeature

    pixels = _fit(ImageFeature(mode="RGB").decode_example({"path": str(src.path), "bytes": None}), src)
    return pixels.unsqueeze(1) if src.frames else pixels


def _clip_pixels(src: Source) -> torch.Tensor:
    """The video's clip, ``src.frames`` frames at ``src.fps`` from ``src.start``, as [3, F, H, W]. Each sampled
    instant takes the frame on screen then (by the frames' timestamps, so variable frame rates are kept in
    time), decoded in order from the key frame before the clip and resized as it comes: only the clip's
    frames are held."""
    import torch

    av = _pyav()
    times, clip = frame_times(src.frames, src.fps, src.start), []
    with av.open(str(src.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if src.start and stream.time_base is not None:  # to the key frame at or before the clip's start
            container.seek(int((src.origin + src.start) / stream.time_base), stream=stream, backward=True)
        # timestamps are rounded by the container (to 1 ms in mkv and webm): a frame counts as on screen from a
        # quarter of a frame before its timestamp
        early = 0.25 / (rate or src.fps)
        shown, shown_pixels, t = None, None, 0.0

        def take():
            nonlocal shown_pixels
            if shown_pixels is None:
                # FFmpeg's scaler converts to RGB and resizes in one pass, at the resized size: 5-10x faster than
                # converting the full frame and resizing it with PIL (bicubic, its filter widened when shrinking)
                turned = shown.rotation % 180 != 0
                width, height = src.resized[::-1] if turned else src.resized
                image = shown.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_image()
                shown_pixels = _fit(image.rotate(shown.rotation, expand=True) if shown.rotation else image, src)
            clip.append(shown_pixels)

        for index, frame in enumerate(container.decode(stream)):
            if frame.time is None and src.start:
                raise ValueError("its frames have no timestamps, so a clip cannot start past its first frame")
            t = frame.time - src.origin if frame.time is not None else index / (rate or src.fps)
            while shown is not None and len(clip) < len(times) and times[len(clip)] < t - early:
                take()
            if len(clip) == len(times):
                break
            shown, shown_pixels = frame, None
        # the last frame stays on screen for one frame's duration
        end = t + (1 / rate if rate else 0.0)
        while shown is not None and len(clip) < len(times) and times[len(clip)] < end - early:
            take()
    if len(clip) < len(times):
        raise ValueError(f"decoded {end:.2f} s of video, {src.frames} frames at {src.fps:g} fps from "
                         f"{src.start:.2f} s need {times[-1]:.2f} s")
    return torch.stack(clip, dim=1)


@dataclass
class Decoding:
    """Video frames decoded (and resized) and the seconds it took."""

    frames: int = 0
    seconds: float = 0.0


def encode_images(pipe, sources: list[Source], cache: Cache, model: ModelInfo, cfg: PrepareConfig,
                  decoding: Decoding | None = None) -> list[Skipped]:
    """Encode one batch (images of one bucket, or one video) with the VAE into the cache; returns the files
    that failed to decode. Video decoding is counted in ``decoding``. Call under ``torch.no_grad()``."""
    import torch

    from .data import mix_seed
    from .models.base import scale_latents

    pixels, done, failed = [], [], []
    for src in sources:
        try:
            if src.kind == "video":
                started = time.perf_counter()
                pixels.append(_clip_pixels(src))
                if decoding is not None:
                    decoding.frames += src.frames
                    decoding.seconds += time.perf_counter() - started
            else:
                pixels.append(_pixels(src))
            done.append(src)
        except Exception as e:
            failed.append(Skipped(src.name, "unreadable", f"unreadable: {type(e).__name__}: {e}"))
    if not done:
        return failed
    vae = pipe.vae
    pixels = torch.stack(pixels).to(vae.device, vae.dtype)
    encode = model.encoding.encode_pixels
    dist = encode(vae, pixels) if encode is not None else vae.encode(pixels).latent_dist
    latents = dist.mean
    if cfg.sample_latents:
        # each image's noise comes from its own key, so the sample does not depend on the batch or process
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
            mix_seed(cfg.seed, int(src.key[:16], 16)))) for src in done])
        latents = latents + dist.std * noise.to(latents.device, latents.dtype)
    if model.encoding.normalize_latents is not None:
        latents = model.encoding.normalize_latents(vae, latents)
    else:  # diffusers' convention: the denoiser sees (z - shift) * scale
        latents = scale_latents(latents, *model.latent_scale)
    for src, tensor in zip(done, latents):
        cache.write(cache.latents(src.key), {"latents": tensor})
    return failed


def encode_captions(pipe, captions: list[str], keys: list[str], cache: Cache, model: ModelInfo,
                    device: torch.device) -> None:
    """Encode one batch of captions into the cache. Call under ``torch.no_grad()``."""
    columns = model.encoding.encode_text(pipe, captions, device)
    for i, key in enumerate(keys):
        cache.write(cache.text(key), {name: value[i] for name, value in columns.items()})


def _batches(items: list, size: int, group=lambda item: None) -> list[list]:
    """Consecutive batches of ``size`` items of one group each, in the items' order within each group."""
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(group(item), []).append(item)
    return [members[i:i + size] for g in sorted(groups, key=lambda g: (g is None, g or ()))
            for members in [groups[g]] for i in range(0, len(members), size)]


# ----------------------------------------------------------------------------- the run


@dataclass
class PrepareResult:
    """What :func:`prepare` made."""

    output: Path
    rows: int
    #: rows per latent shape ``(C, H, W)`` or ``(C, T, H, W)``
    shapes: dict[tuple[int, ...], int]
    skipped: list[Skipped]
    #: images and videos encoded by this run (not found in the cache), over all processes
    encoded: int
    encode_seconds: float
    #: video frames decoded by this run and the seconds it took (the slowest process)
    decoded_frames: int = 0
    decode_seconds: float = 0.0


def prepare(cfg: PrepareConfig) -> PrepareResult | None:
    """Encode ``cfg.images`` into a latents dataset at ``cfg.output``. On several processes
    (``accelerate launch``) each encodes its share; the main process writes the dataset and gets the
    result, the others get None. Raises :class:`TrainerError` when nothing can be prepared."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from .distributed import cpu_only_multiprocess
    from .models.precision import DTYPES

    state = PartialState(cpu=cpu_only_multiprocess())
    model = inspect_model(cfg)
    work = plan(cfg, model)
    if not work.sources:
        raise TrainerError(f"nothing to prepare in {cfg.images}: {_skip_summary(work.skipped)}")
    cache = Cache(cfg.cache)
    text_keys = {caption: _key(caption, model.family, model.text_stamp, cfg.dtype)
                 for caption in dict.fromkeys(src.caption for src in work.sources)}
    todo_images = [s for s in work.sources if s.kind != "latent" and not cache.latents(s.key).is_file()]
    todo_text = [c for c, key in text_keys.items() if not cache.text(key).is_file()]
    state.wait_for_everyone()  # every process has seen the cache as it was before anyone writes to it

    # batches are formed globally, then dealt out: an image is encoded in the same batch on any number
    # of processes, so the result does not depend on the split
    mine = slice(state.process_index, None, state.num_processes)
    image_batches = (_batches([s for s in todo_images if s.kind == "image"], cfg.batch_size, lambda s: s.bucket)
                     + [[s] for s in todo_images if s.kind == "video"])[mine]  # a clip is a batch of its frames
    text_batches = _batches(todo_text, cfg.batch_size)[mine]
    failed: list[Skipped] = []
    seconds = 0.0  # spent encoding images
    decoding = Decoding()
    if image_batches or text_batches:
        pipe = load_encoders(model, DTYPES[cfg.dtype], state.device)
        bar = tqdm(total=sum(map(len, image_batches)) + sum(map(len, text_batches)), desc="encoding",
                   unit="item", disable=not state.is_main_process)
        started = time.perf_counter()
        with torch.no_grad():
            for batch in image_batches:
                failed += encode_images(pipe, batch, cache, model, cfg, decoding)
                bar.update(len(batch))
            seconds = time.perf_counter() - started
            for batch in text_batches:
                encode_captions(pipe, batch, [text_keys[c] for c in batch], cache, model, state.device)
                bar.update(len(batch))
        bar.close()
    if state.num_processes > 1:
        failed = gather_object(failed)
        seconds = max(gather_object([seconds]))
        decodings = gather_object([decoding])
        decoding = Decoding(sum(d.frames for d in decodings), max(d.seconds for d in decodings))
    encoded = len(todo_images) - len(failed)
    result = None
    if state.is_main_process:
        result = write_dataset(cfg, model, work, cache, text_keys, failed)
        result.encoded, result.encode_seconds = encoded, seconds
        result.decoded_frames, result.decode_seconds = decoding.frames, decoding.seconds
    state.wait_for_everyone()
    return result


def write_dataset(cfg: PrepareConfig, model: ModelInfo, work: Plan, cache: Cache, text_keys: dict[str, str],
                  failed: list[Skipped]) -> PrepareResult:
    """Assemble the rows from the cache (and the .latent files) and save them, replacing ``cfg.output``
    only once the new dataset is complete."""
    import datasets
    from safetensors.torch import load_file

    failed_names = {s.name for s in failed}
    sources = [s for s in work.sources if s.name not in failed_names]
    if not sources:
        raise TrainerError(f"nothing to prepare in {cfg.images}: {_skip_summary(work.skipped + failed)}")
    store = "float16" if cfg.dtype == "fp16" else "float32"
    text = load_file(str(cache.text(text_keys[sources[0].caption])))
    shapes: Counter = Counter()
    for src in sources:
        if src.kind == "latent":
            shapes[tuple(src.size[1:])] += src.size[0] * src.repeats
        else:
            shapes[model.latent_shape(src)] += src.repeats
    ndim = model.latent_ndim
    nested = datasets.Value(store)
    for _ in range(ndim):
        nested = datasets.List(nested)
    pair = datasets.List(datasets.Value("int32"), length=2)
    features = {
        "latents": (datasets.Array3D if ndim == 3 else datasets.Array4D)(next(iter(shapes)), store)
        if len(shapes) == 1 else nested,
        **{name: _feature(value, store) for name, value in text.items()},
        # each row's [C, H, W] (or [C, T, H, W]): the trainer finds the buckets from this small column
        # instead of reading the latents' nested lists (trainer.data.SHAPE_COLUMN)
        "latent_shape": datasets.List(datasets.Value("int32"), length=ndim),
        "caption": datasets.Value("string"),
        "file_name": datasets.Value("string"),
        # SDXL's time ids (trainer.models.sdxl): source (height, width), crop (top, left), bucket size
        "original_size": pair, "crop_coords": pair, "target_size": pair,
    }
    rows = [(str(s.path), s.name, s.caption, s.repeats, s.kind, list(s.size), s.key, list(s.bucket or ()),
             list(s.crop)) for s in sources]
    build = cache.root / f"build-{os.getpid()}"
    tmp = Path(f"{cfg.output.rstrip('/')}.tmp-{os.getpid()}")
    try:
        ds = datasets.Dataset.from_generator(
            _rows, features=datasets.Features(features), cache_dir=str(build),
            fingerprint=_key(rows, store, text_keys, model.latent_scale, model.vae_factor),
            gen_kwargs=dict(rows=rows, cache_root=str(cache.root), text_keys=text_keys,
                            scale=model.latent_scale, vae_factor=model.vae_factor, store=store),
            writer_batch_size=64)  # rows can be large (T5 embeddings): keep the writer's buffer small
        ds.save_to_disk(str(tmp))  # in shards of at most 500 MB (datasets' default)
        del ds
        _replace(tmp, Path(cfg.output))
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(shapes.values())
    return PrepareResult(Path(cfg.output), total, dict(shapes), work.skipped + failed, 0, 0.0)


def _feature(value: torch.Tensor, store: str):
    import datasets

    if value.ndim == 1:
        return datasets.List(datasets.Value(store), length=value.shape[0])
    return datasets.Array2D(tuple(value.shape), store)


def _rows(rows, cache_root, text_keys, scale, vae_factor, store):
    """The dataset's rows, each source's row repeated as its folder says (a generator for
    ``Dataset.from_generator``: nothing but one source is held in memory)."""
    import numpy as np
    from safetensors.torch import load_file

    cache = Cache(Path(cache_root))
    dtype = np.float16 if store == "float16" else np.float32
    for path, name, caption, repeats, kind, size, key, bucket, crop in rows:
        conditioning = {k: v.float().numpy().astype(dtype) for k, v in
                        load_file(str(cache.text(text_keys[caption]))).items()}
        if kind != "latent":
            latents = [load_file(str(cache.latents(key)))["latents"].float()]
            sizes = dict(original_size=[size[1], size[0]], crop_coords=crop,
                         target_size=[bucket[1], bucket[0]])
        else:
            latents = list(_comfy_latents(Path(path), scale))
            pixels = [size[-2] * vae_factor, size[-1] * vae_factor]
            sizes = dict(original_size=pixels, crop_coords=[0, 0], target_size=pixels)
        for tensor in latents:
            row = {"latents": tensor.numpy().astype(dtype), "latent_shape": list(tensor.shape), **conditioning,
                   "caption": caption, "file_name": name, **sizes}
            for _ in range(repeats):
                yield row


def _comfy_latents(path: Path, scale: tuple[float, float]):
    """The latents of a ComfyUI ``.latent`` file, scaled for the denoiser. ComfyUI stores the VAE's raw
    latents (it scales them inside the model); files without ``latent_format_version_0`` are older and
    hold SD 1.x-scaled latents, which ComfyUI's LoadLatent divides by 0.18215."""
    from safetensors.torch import load_file

    from .models.base import scale_latents

    tensors = load_file(str(path))
    raw = tensors["latent_tensor"].float()
    if "latent_format_version_0" not in tensors:
        raw = raw / 0.18215
    yield from scale_latents(raw, *scale)


def _replace(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an earlier dataset there is removed only after the rename."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _skip_summary(skipped: list[Skipped]) -> str:
    if not skipped:
        return "no images, videos or .latent files found"
    kinds = Counter(s.kind for s in skipped)
    return f"{len(skipped)} skipped (" + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ")"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lora-prepare", description="Encode a folder of images, videos and captions (or "
                     "ComfyUI .latent files) into a latents dataset for train.py --latents.")
    add_parameters(parser, fields(PrepareConfig), typed=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = PrepareConfig(**vars(build_parser().parse_args(argv)))
    except ConfigError as e:
        print(f"lora-prepare: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging()
    try:
        result = prepare(cfg)
    except ConfigError as e:  # a parameter that does not suit the model (e.g. --bucket_step)
        print(f"lora-prepare: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainerError as e:
        print(f"lora-prepare: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:  # every file encoded so far is in the cache; the output was not touched
        print(f"lora-prepare: interrupted; what was encoded is kept in {cfg.cache}, and the same command "
              "continues from there", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is not None:
        report(result)
    return 0


def report(result: PrepareResult) -> None:
    """Log every skipped file with its reason, then a summary."""
    for s in result.skipped:
        logger.warning("skipped %s: %s", s.name, s.reason)
    shapes = ", ".join(f"{'x'.join(map(str, shape))}: {n}" for shape, n in sorted(result.shapes.items()))
    what, decoded = "images", ""
    if result.decoded_frames:
        what = "images and videos"
        decoded = (f", {result.decoded_frames} video frames decoded at "
                   f"{result.decoded_frames / max(result.decode_seconds, 1e-9):.0f} frames/s")
    speed = f" ({result.encoded / result.encode_seconds:.1f} {what}/s)" if result.encode_seconds else ""
    skipped = _skip_summary(result.skipped) if result.skipped else "nothing skipped"
    print(f"wrote {result.rows} rows to {result.output} (latent shapes {shapes}); encoded {result.encoded} "
          f"new {what}{speed}{decoded}; {skipped}")


if __name__ == "__main__":
    sys.exit(main())
