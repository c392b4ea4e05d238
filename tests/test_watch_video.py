"""Watching a video run: --sample_prompts with Wan and HunyuanVideo (tiny pipelines built offline) writes each
prompt's clip as an animated WebP and an animated grid; --f / --sample_frames set the clip length."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image
from safetensors.torch import load_file
from test_prepare import write_tiny_pipeline
from test_prepare_video import CHANNELS, write_hunyuan_pipeline, write_wan_pipeline

from trainer import ConfigError, TrainerError, train_lora
from trainer.sampling import grid_frames, parse_prompt, save_clip

RUN = dict(FAST, learning_rate=0.02, sample_steps=2, batch_size=1)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return write_wan_pipeline(tmp_path_factory.mktemp("models") / "tiny-wan")


def video_dataset(shapes: list[tuple[int, int, int]], text_dim: int = 16, tokens: int = 8, extra=None):
    """Rows [CHANNELS, T, H, W] of the given (T, H, W), with prompt_embeds [tokens, text_dim] (nested lists)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    columns = {"latents": [torch.randn(CHANNELS, *s, generator=g).tolist() for s in shapes],
               "prompt_embeds": [torch.randn(tokens, text_dim, generator=g).tolist() for _ in shapes]}
    for name, shape in (extra or {}).items():
        columns[name] = [torch.randn(*shape, generator=g).tolist() for _ in shapes]
    return Dataset.from_dict(columns)


def frames_of(path) -> list[np.ndarray]:
    image = Image.open(path)
    out = []
    for i in range(getattr(image, "n_frames", 1)):
        image.seek(i)
        out.append(np.asarray(image.convert("RGB")))
    return out


# ----------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_frames_option_grid_and_clip_files(tmp_path):
    assert parse_prompt("a cat --f 17 --d 3", "x").frames == 17
    with pytest.raises(ConfigError, match="--f must be positive"):
        parse_prompt("a cat --f 0", "x")
    red = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(5)]
    blue = [Image.new("RGB", (16, 16), (0, 0, 40 * i)) for i in range(3)]
    grids = grid_frames([red, blue], ["red", "blue"], "step 1")
    assert len(grids) == 5
    # the shorter clip holds its last frame: grid frames 2, 3 and 4 differ only in the red cell
    # (small images are enlarged to the grid's 256-pixel cells; the second cell starts at x 268, y 28)
    for i in range(5):
        left, right = (np.asarray(grids[i])[38:274, x:x + 236] for x in (16, 278))
        assert (left == (40 * i, 0, 0)).all(), i
        assert (right == (0, 0, 40 * min(i, 2))).all(), i
    assert save_clip(red, tmp_path / "0", fps=16).name == "0.webp"
    clip = Image.open(tmp_path / "0.webp")
    clip.load()  # (the frame's duration is read with it)
    assert clip.n_frames == 5 and clip.info["loop"] == 0 and clip.info["duration"] == 62  # 1000 / 16 fps
    assert save_clip(red[:1], tmp_path / "1", fps=16).name == "1.png"  # 1 frame: a still image, as images are
    assert Image.open(tmp_path / "1.png").format == "PNG" and not (tmp_path / "1.webp").exists()


# ----------------------------------------------------------------------------- wan


def test_wan_samples_clips_reproducibly_and_leaves_the_adapter_unchanged(tmp_path, wan):
    """Clips at steps 0, 2 and 3: 5 frames by default (the data's most common T = 3 latent frames with the tiny
    VAE's temporal factor 2), 3 for the prompt with --f 3; the same pixels in a second run, changed by training;
    the adapter bit for bit the one of a run without samples."""
    data = video_dataset([(3, 8, 8)] * 3 + [(1, 8, 8)])
    watch = dict(sample_prompts=["a cat", "a dog --f 3 --d 5"], sample_every=2)
    for name in ("a", "b", "plain"):
        train_lora(str(wan), data, output_dir=str(tmp_path / name),
                   **{**RUN, "steps": 3, **(watch if name != "plain" else {})})
    a, b = tmp_path / "a" / "samples", tmp_path / "b" / "samples"
    assert sorted(p.name for p in a.iterdir()) == [f"step-{s:08d}" for s in (0, 2, 3)]
    for step in a.iterdir():
        assert sorted(p.name for p in step.iterdir()) == ["0.webp", "1.webp", "grid.webp"]
        for k in ("0.webp", "1.webp", "grid.webp"):
            assert all(np.array_equal(x, y) for x, y in zip(frames_of(step / k), frames_of(b / step.name / k)))
    start = a / "step-00000000"
    clips = {k: frames_of(start / f"{k}.webp") for k in (0, 1)}
    assert [len(clips[0]), len(clips[1])] == [5, 3]
    assert clips[0][0].shape == (16, 16, 3)  # 8x8 latents x the tiny VAE's factor 2
    assert len(frames_of(start / "grid.webp")) == 5
    for k in (0, 1):
        end = frames_of(a / "step-00000003" / f"{k}.webp")
        assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(clips[k], end)) > 0, k
    plain = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    watched = load_file(str(tmp_path / "a" / "lora.safetensors"))
    assert plain.keys() == watched.keys() and all(torch.equal(plain[k], watched[k]) for k in plain)
    assert json.loads((tmp_path / "a" / "result.json").read_text())["watch_seconds"] > 0


def test_wan_sample_frames_size_and_one_frame_clips(tmp_path, wan):
    """--sample_frames and --sample_size for every prompt, --f 1 gives a still .png; 1-frame data (images)
    default to 1-frame samples."""
    train_lora(str(wan), video_dataset([(1, 8, 8)] * 2), output_dir=str(tmp_path / "a"), sample_frames=7,
               sample_size="32x16", sample_prompts=["a cat", "a dog --f 1"], **{**RUN, "steps": 1})
    step = tmp_path / "a" / "samples" / "step-00000001"
    assert sorted(p.name for p in step.iterdir()) == ["0.webp", "1.png", "grid.webp"]
    clip = frames_of(step / "0.webp")
    assert len(clip) == 7 and clip[0].shape == (16, 32, 3)
    assert np.asarray(Image.open(step / "1.png")).shape == (16, 32, 3)
    train_lora(str(wan), video_dataset([(1, 8, 8)] * 2), output_dir=str(tmp_path / "b"), sample_prompts=["a cat"],
               **{**RUN, "steps": 1})
    assert sorted(p.name for p in (tmp_path / "b" / "samples" / "step-00000001").iterdir()) == ["0.png", "grid.png"]


def test_a_wan_pipeline_object_samples_with_its_settings(tmp_path, wan, monkeypatch):
    """A pipeline object given to the library call: its transformer is trained and sampled, its own settings
    (here expand_timesteps, Wan 2.2 TI2V-5B's per-token timesteps) kept in the sampling pipeline."""
    from diffusers import WanPipeline

    from trainer import sampling

    pipe = WanPipeline.from_pretrained(wan, expand_timesteps=True)
    made, build = [], sampling._sampling_pipeline

    def sampling_pipeline(source, loaded):
        made.append(build(source, loaded))
        return made[-1]

    monkeypatch.setattr(sampling, "_sampling_pipeline", sampling_pipeline)
    train_lora(pipe, video_dataset([(3, 8, 8)] * 2), output_dir=str(tmp_path), sample_prompts=["a cat"],
               **{**RUN, "steps": 1})
    assert made[0].config.expand_timesteps is True and made[0].transformer is pipe.transformer
    assert len(frames_of(tmp_path / "samples" / "step-00000001" / "0.webp")) == 5
    assert pipe.text_encoder is not None  # the caller's pipeline keeps its components


def test_frame_counts_the_vae_cannot_make_are_one_line_before_training(tmp_path, wan):
    data = video_dataset([(3, 8, 8)] * 2)
    with pytest.raises(TrainerError) as error:
        train_lora(str(wan), data, sample_prompts=["a cat", "a dog --f 4"], output_dir=str(tmp_path), **RUN)
    assert str(error.value) == ("--sample_prompts: prompt 1 ('a dog'): --f 4 frames cannot be made by the VAE: a "
                                "clip has 1 + a multiple of 2 frames (e.g. 3 or 5)")
    with pytest.raises(TrainerError, match=r"^--sample_prompts: --sample_frames 6 frames cannot be made by the VAE: "
                                           r"a clip has 1 \+ a multiple of 2 frames \(e.g. 5 or 7\)$"):
        train_lora(str(wan), data, sample_prompts=["a cat"], sample_frames=6, output_dir=str(tmp_path), **RUN)
    assert not (tmp_path / "lora.safetensors").exists() and not (tmp_path / "samples").exists()
    with pytest.raises(ConfigError, match="--sample_frames needs --sample_prompts"):
        train_lora(str(wan), data, sample_frames=5, **RUN)


def test_wan22_expert_runs_refuse_sampling_up_front(tmp_path, wan):
    """A pipeline with boundary_ratio and transformer_2 (Wan 2.2 A14B) samples only with both experts: either
    expert's run stops at start-up in one line."""
    model = tmp_path / "wan22"
    shutil.copytree(wan, model)
    shutil.copytree(model / "transformer", model / "transformer_2")
    index = json.loads((model / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (model / "model_index.json").write_text(json.dumps(index))
    data = video_dataset([(3, 8, 8)] * 2)
    for path in (model, model / "transformer_2"):
        with pytest.raises(TrainerError, match=r"^--sample_prompts: this is one expert of a two-expert Wan 2.2 "
                                               r"pipeline .*; sample from the saved LoRAs with both experts$"):
            train_lora(str(path), data, sample_prompts=["a cat"], output_dir=str(tmp_path / "out"), **RUN)
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_image_models_refuse_frames(tmp_path):
    pipe = write_tiny_pipeline(tmp_path / "tiny-sd")
    with pytest.raises(TrainerError, match=r"^--sample_prompts: sd is an image model; --f in prompt 1 \('a dog'\) "
                                           r"gives a clip length, which only video models"):
        train_lora(str(pipe), "demo", sample_prompts=["a cat", "a dog --f 5"], **RUN)
    with pytest.raises(TrainerError, match=r"^--sample_prompts: sd is an image model; --sample_frames gives"):
        train_lora(str(pipe), "demo", sample_prompts=["a cat"], sample_frames=5, **RUN)


# ----------------------------------------------------------------------------- hunyuan video


def test_hunyuan_video_samples_clips_and_the_tracker_gets_the_middle_frame(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = write_hunyuan_pipeline(tmp_path / "tiny-hunyuan")
    # 2 latent frames x the VAE's temporal factor 4: 5 frames; 8x8 latents x 4 = 32x32 pixels
    data = video_dataset([(2, 8, 8)] * 2, tokens=8, extra={"prompt_attention_mask": (8,),
                                                           "pooled_prompt_embeds": (32,)})
    data = data.map(lambda row: {"prompt_attention_mask": [1.0] * 8})
    train_lora(str(model), data, output_dir=str(tmp_path / "out"), report_to="tensorboard",
               sample_prompts=["a cat", "a dog --f 9"], **{**RUN, "steps": 1})
    step = tmp_path / "out" / "samples" / "step-00000001"
    assert [len(frames_of(step / f"{k}.webp")) for k in (0, 1)] == [5, 9]
    assert frames_of(step / "0.webp")[0].shape == (32, 32, 3)
    grid = frames_of(step / "grid.webp")
    assert len(grid) == 9
    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("samples")
    assert [e.step for e in logged] == [0, 1]
    import io

    image = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB")).astype(int)
    distance = [np.abs(image - frame.astype(int)).mean() for frame in grid]
    assert image.shape == grid[0].shape and int(np.argmin(distance)) == 4  # the middle of 9 frames
