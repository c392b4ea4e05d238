"""Video latents end to end: rows ``[C, T, H, W]`` for video families (``latent_ndim`` 4), bucketed by
(frames, height, width), images as 1-frame clips in the same dataset, split-invariant batches, and
data checks naming the row and the shape. Uses the tiny Wan transformer of ``test_family_wan``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST
from test_family_wan import TEXT_DIM, TOKENS, tiny_wan

from trainer import train_lora
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.errors import TrainerError
from trainer.models import get_family

#: (frames, height, width) -> rows: images (1 frame) and clips of 3 frames, at two sizes
MIXED = {(1, 8, 8): 4, (3, 8, 8): 4, (3, 8, 4): 4}


def video_dataset(shapes=None, channels=4, seed=0, rows_as_images=False):
    """Rows of random ``[C, T, H, W]`` latents in the given shapes (interleaved, so no bucket is a
    contiguous range), with random ``prompt_embeds``; ``rows_as_images``: ``[C, H, W]`` rows."""
    from datasets import Dataset

    shapes = shapes or MIXED
    g = torch.Generator().manual_seed(seed)
    order = [shape for shape, n in shapes.items() for _ in range(n)]
    order = [order[i] for i in torch.randperm(len(order), generator=g)]
    latents = [torch.randn(channels, *shape, generator=g) for shape in order]
    if rows_as_images:
        latents = [t[:, 0] for t in latents]
    return Dataset.from_dict({"latents": [t.numpy() for t in latents],
                              "prompt_embeds": [torch.randn(TOKENS, TEXT_DIM, generator=g).numpy() for _ in order]})


def batches(data, batch_size, steps, processes=1, accumulation=1, seed=0):
    sampler = StepBatchSampler(data.buckets, batch_size, processes, accumulation, seed, 0, steps)
    view = LatentBatches(data, seed)
    return [view.__getitems__(keys) for keys in sampler]


def test_buckets_by_frames_height_and_width():
    data = TrainingData(video_dataset(), None, get_family("wan"), tiny_wan())
    assert sorted(tuple(data.rows([int(b[0])])["latents"].shape[1:]) for b in data.buckets) == \
        sorted((4, *shape) for shape in MIXED)
    seen = set()
    for batch in batches(data, batch_size=2, steps=12):
        latents = batch["latents"]
        assert latents.ndim == 5 and latents.shape[0] == 2
        assert batch["noise"].shape == latents.shape
        seen.add(tuple(latents.shape[2:]))
    assert seen == set(MIXED)  # every bucket is drawn, each batch holds one (T, H, W)


def test_batches_are_deterministic_and_split_invariant():
    data = TrainingData(video_dataset(), None, get_family("wan"), tiny_wan())
    one = batches(data, batch_size=4, steps=3)
    again = batches(data, batch_size=4, steps=3)
    split = batches(data, batch_size=2, steps=3, accumulation=2)
    for a, b in zip(one, again):
        torch.testing.assert_close(a["latents"], b["latents"])
    for a, (b, c) in zip(one, zip(split[::2], split[1::2])):
        for name in ("latents", "noise", "u", "prompt_embeds"):
            torch.testing.assert_close(a[name], torch.cat([b[name], c[name]]))


def test_training_is_split_invariant_with_video_latents():
    """1 process x batch 4 and 1 process x batch 2 x 2 accumulation steps train the same adapter."""
    def vector(res):
        return torch.cat([t.flatten() for _, t in sorted(res.lora.items())])

    common = dict(optimizer="SGD", learning_rate=0.05, rank=4, **{**FAST, "steps": 3})
    a = train_lora(tiny_wan(), video_dataset(), batch_size=4, grad_accumulation_steps=1, **common)
    b = train_lora(tiny_wan(), video_dataset(), batch_size=2, grad_accumulation_steps=2, **common)
    torch.testing.assert_close(vector(a), vector(b), atol=1e-6, rtol=1e-5)
    assert a.loss["loss"] == pytest.approx(b.loss["loss"], rel=1e-5)


def test_image_rows_are_one_frame_clips():
    """A video family reads ``[C, H, W]`` rows as ``[C, 1, H, W]``: the same batches as 1-frame rows."""
    family, model = get_family("wan"), tiny_wan()
    shapes = {(1, 8, 8): 4, (1, 8, 4): 4}
    images = TrainingData(video_dataset(shapes, rows_as_images=True), None, family, model)
    clips = TrainingData(video_dataset(shapes), None, family, model)
    for a, b in zip(batches(images, 2, 4), batches(clips, 2, 4)):
        assert a["latents"].shape[2] == 1
        torch.testing.assert_close(a["latents"], b["latents"])
        torch.testing.assert_close(a["noise"], b["noise"])
    res = train_lora(tiny_wan(), video_dataset(shapes, rows_as_images=True), batch_size=2, **FAST)
    assert res.steps == 2 and all(np.isfinite(res.loss["loss"]))


def test_image_families_keep_reading_three_dim_rows_only():
    from test_families import family_dataset, tiny_sd3

    data = TrainingData(family_dataset("sd3"), None, get_family("sd3"), tiny_sd3())
    assert data.latent_shape == (4, 16, 16)
    with pytest.raises(TrainerError, match=r"latents must be \[C, H, W\] per row for sd3, got shape "
                                           r"\(4, 1, 8, 8\) in row \d"):
        TrainingData(video_dataset({(1, 8, 8): 2}), {"prompt_embeds": torch.zeros(TOKENS, 32), "pooled_prompt_embeds": torch.zeros(64)}, get_family("sd3"),
                     tiny_sd3())


@pytest.mark.parametrize("latents, message", [
    (lambda: [np.zeros((4, 8), np.float32)] * 2, (r"latents must be \[C, T, H, W\] per row for wan, got shape "
                                                 r"\(4, 8\) in row 0")),
    (lambda: [np.zeros((4, 3, 8, 8), np.float32), np.zeros((6, 3, 8, 8), np.float32)],
     r"row 1 has 6 latent channels but row 0 has 4"),
    (lambda: [np.zeros((4, 3, 8, 8), np.float32), np.full((4, 1, 8, 8), np.nan, np.float32)],
     r"row 1 holds NaN or inf"),
    (lambda: [np.zeros((4, 3, 7, 8), np.float32)] * 2, r"latent size 3x7x8 .* not a multiple of the patch size"),
])
def test_bad_video_rows_name_the_row_and_shape(latents, message):
    from datasets import Dataset

    rows = latents()
    ds = Dataset.from_dict({"latents": rows, "prompt_embeds": [np.zeros((TOKENS, TEXT_DIM), np.float32)] * len(rows)})
    with pytest.raises(TrainerError, match=message):
        TrainingData(ds, None, get_family("wan"), tiny_wan())


def test_streaming_reads_video_and_image_rows(tmp_path):
    """--streaming: 5-D rows in buckets of one (T, H, W) per batch, and image rows as 1-frame clips."""
    from trainer.streaming import StreamData, StreamingBatches

    for name, images in (("clips", False), ("images", True)):
        video_dataset(rows_as_images=images).to_parquet(str(tmp_path / f"{name}.parquet"))
        data = StreamData(str(tmp_path / f"{name}.parquet"), None, get_family("wan"), tiny_wan())
        shapes = set()
        for batch in StreamingBatches(data, 2, 0, 1, 1, seed=0, buffer=12, start_step=0, end_step=4):
            assert batch["latents"].ndim == 5 and batch["noise"].shape == batch["latents"].shape
            shapes.add(tuple(batch["latents"].shape[2:]))
        assert shapes <= {(1, 8, 8), (1, 8, 4)} if images else len(shapes) > 1
    res = train_lora(tiny_wan(), str(tmp_path / "clips.parquet"), streaming=True, shuffle_buffer=12, batch_size=2,
                     **FAST)
    assert res.steps == 2


@pytest.mark.slow  # two launched processes: about a minute on 2 loaded CPU cores
def test_two_processes_equal_one_process_with_video_latents(tmp_path):
    """accelerate launch, 2 CPU processes x batch 2 on mixed image/video buckets = 1 process x batch 4."""
    import subprocess

    from safetensors.torch import load_file
    from test_distributed import ENV, RUN, cpu_processes, launch_command
    from test_family_wan import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "wan")
    shapes = {(1, 8, 8): 6, (3, 8, 8): 4}
    video_dataset(shapes).save_to_disk(str(tmp_path / "latents"))
    reference = train_lora(str(tmp_path / "wan"), str(tmp_path / "latents"), output_dir=str(tmp_path / "one"),
                           batch_size=4, rank=4, **RUN)
    proc = subprocess.run(launch_command(cpu_processes(2), tmp_path / "two", tmp_path / "latents", batch_size=2,
                                         model=tmp_path / "wan", rank=4),
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(str(reference.lora_path)), load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert set(one) == set(two)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-6, rtol=1e-4)
