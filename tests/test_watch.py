"""Watching a run: sample images from a tiny pipeline built offline (tiny VAE, CLIP text encoder and
tokenizer), and the held-out loss, on 1 and 2 processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset
from PIL import Image
from safetensors.torch import load_file
from test_distributed import ENV, cpu_processes, launch_command
from test_prepare import write_tiny_pipeline

from trainer import ConfigError, TrainerError, train_lora
from trainer.config import parse_args
from trainer.evaluation import EVAL_LEVELS, HeldOutLoss
from trainer.sampling import SamplePrompt, parse_prompt, read_prompts

PROMPTS = "demo concept one\n# a comment, then a blank line\n\nsks dog --n blurry --s 3 --g 2.5 --d 7\n"
# fp32, a learning rate that moves the adapter visibly in a few steps
RUN = dict(FAST, learning_rate=0.02, sample_steps=4)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- prompts


def test_prompt_lines_and_their_options():
    assert parse_prompt("a cat", "x") == SamplePrompt("a cat")
    assert parse_prompt("a cat --n blurry, dark --w 512 --h 384 --s 20 --g 5.5 --d 42", "x") == SamplePrompt(
        "a cat", "blurry, dark", 512, 384, 20, 5.5, 42)
    assert parse_prompt("a cat --l 7", "x").guidance == 7.0  # kohya's spelling of the guidance scale
    with pytest.raises(ConfigError, match=r"line 3: unknown option --q \(known: --n"):
        parse_prompt("a cat --q 1", "line 3")
    with pytest.raises(ConfigError, match="--w expects an integer, got 'wide'"):
        parse_prompt("a cat --w wide", "x")
    with pytest.raises(ConfigError, match="--s must be positive"):
        parse_prompt("a cat --s 0", "x")
    with pytest.raises(ConfigError, match="no prompt"):
        parse_prompt("--n blurry", "x")


def test_prompt_file_yaml_list_and_bad_files(tmp_path, prompts):
    assert [p.prompt for p in read_prompts(str(prompts))] == ["demo concept one", "sks dog"]
    config = tmp_path / "run.yaml"
    config.write_text("sample_prompts:\n  - a cat --d 3\n  - a dog\nsample_every: 5\n")
    cfg = parse_args(["--config", str(config)])
    assert [(p.prompt, p.seed) for p in read_prompts(cfg.sample_prompts)] == [("a cat", 3), ("a dog", None)]
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=r"empty.txt holds no prompts"):
        read_prompts(str(empty))
    with pytest.raises(ConfigError, match=r"--sample_prompts: cannot read .*missing.txt: No such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"--sample_prompts: cannot read .*binary.txt"):
        read_prompts(str(binary))


def test_a_bad_prompt_file_fails_at_start_up_as_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = subprocess.run([sys.executable, "train.py", "--sample_prompts", str(empty), "--output_dir",
                           str(tmp_path / "out")], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: error: --sample_prompts: {empty} holds no prompts " \
        "(one per line; blank lines and lines starting with # are skipped)"
    assert not (tmp_path / "out" / "lora.safetensors").exists()


# ----------------------------------------------------------------------------- sampling


def test_samples_at_0_n_2n_and_end_reproducible_and_training_unchanged(tmp_path, pipeline, prompts):
    """Images at steps 0, 2, 4 and 5; the same pixels in a second run; the end differs from step 0; and the
    adapter (with a held-out loss on a separate set as well) is bit for bit the one trained without either."""
    eval_set = tmp_path / "eval"
    make_dataset(rows=3, seed=9).save_to_disk(str(eval_set))
    runs = {}
    for name, extra in (("a", {}), ("b", {}), ("plain", None)):
        watch = dict(sample_prompts=str(prompts), sample_every=2, eval_latents=str(eval_set), eval_every=2)
        runs[name] = train_lora(str(pipeline), "demo", output_dir=str(tmp_path / name),
                                **{**RUN, "steps": 5, **(watch if extra is not None else {})})
    a, b = tmp_path / "a" / "samples", tmp_path / "b" / "samples"
    assert sorted(p.name for p in a.iterdir()) == [f"step-{s:08d}" for s in (0, 2, 4, 5)]
    for step in a.iterdir():
        assert sorted(p.name for p in step.iterdir()) == ["0.png", "1.png", "grid.png"]
        for k in ("0.png", "1.png", "grid.png"):
            assert np.array_equal(pixels(step / k), pixels(b / step.name / k)), (step.name, k)
    assert pixels(a / "step-00000000" / "0.png").shape == (32, 32, 3)  # the demo's 16x16 latents x VAE factor 2
    for k in ("0.png", "1.png"):
        start, end = pixels(a / "step-00000000" / k), pixels(a / "step-00000005" / k)
        assert np.abs(start.astype(int) - end.astype(int)).max() > 0, k
    plain = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    watched = load_file(str(tmp_path / "a" / "lora.safetensors"))
    assert plain.keys() == watched.keys() and all(torch.equal(plain[k], watched[k]) for k in plain)
    assert runs["a"].loss["loss"] == runs["plain"].loss["loss"]
    assert runs["a"].loss["eval_step"] == [0, 2, 4, 5] and "eval_loss" not in runs["plain"].loss
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert 0 < result["watch_seconds"] < result["wall_seconds"]


def test_grid_and_tensorboard_images(tmp_path, pipeline, prompts):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_lora(str(pipeline), "demo", output_dir=str(tmp_path), report_to="tensorboard",
               sample_prompts=str(prompts), eval_fraction=0.25, **{**RUN, "steps": 1})
    grid = Image.open(tmp_path / "samples" / "step-00000001" / "grid.png")
    assert grid.width >= 2 * 256 and grid.height > 256  # two cells side by side, captions under them
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 1]
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 1]


def test_sampling_needs_a_pipeline_with_vae_and_text_encoders(tmp_path, pipeline, pipeline_dir, prompts):
    bare = tmp_path / "unet-only"
    shutil.copytree(pipeline / "unet", bare)
    with pytest.raises(TrainerError, match=r"^--sample_prompts: sampling needs a diffusers pipeline folder .*"
                                           r"--model .*unet-only is a bare unet/ folder$"):
        train_lora(str(bare), "demo", sample_prompts=str(prompts), **RUN)
    with pytest.raises(TrainerError, match=r"^--sample_prompts: sampling needs .* is the built-in demo UNet$"):
        train_lora("demo", "demo", sample_prompts=str(prompts), **RUN)
    with pytest.raises(TrainerError, match=r"needs the pipeline's VAE and text encoders, but .* has no "
                                           r"text_encoder/$"):
        train_lora(str(pipeline_dir), "demo", sample_prompts=str(prompts), **RUN)
    # the unet/ folder of a whole pipeline samples with the pipeline around it
    train_lora(str(pipeline / "unet"), "demo", sample_prompts=str(prompts), output_dir=str(tmp_path / "out"),
               **{**RUN, "steps": 1})
    assert (tmp_path / "out" / "samples" / "step-00000001" / "grid.png").is_file()


@pytest.mark.parametrize("family,dims", [("sdxl", (64, 32)), ("sd3", (64, 64)), ("flux", (32, 32))])
def test_every_family_samples_with_its_own_pipeline(tmp_path, family, dims):
    """SDXL (two CLIPs, pooled, time ids), SD3 (CLIPs + T5) and Flux (CLIP + T5, packed latents), in bf16
    with gradient checkpointing on, as a user's run would be."""
    from datasets import Dataset

    pipe = write_tiny_pipeline(tmp_path / family, family)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"latents": torch.randn(4, 4, 16, 16, generator=g).tolist(),
                              "prompt_embeds": torch.randn(4, 8, dims[0], generator=g).tolist(),
                              "pooled_prompt_embeds": torch.randn(4, dims[1], generator=g).tolist()})
    res = train_lora(str(pipe), data, output_dir=str(tmp_path / "out"), steps=2, log_every=1, eval_fraction=0.25,
                     sample_prompts=["a cat", "a dog --n ugly --g 3"], sample_steps=3)
    for step in ("step-00000000", "step-00000002"):
        images = [pixels(tmp_path / "out" / "samples" / step / f"{k}.png") for k in (0, 1)]
        assert all(image.shape == (32, 32, 3) and image.std() > 1 for image in images)
    assert res.loss["eval_step"] == [0, 2] and all(np.isfinite(res.loss["eval_loss"]))


def test_sample_size_and_pipeline_object(tmp_path, pipeline):
    """--sample_size and per-line --w/--h; a pipeline object given to the library call samples too."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, feature_extractor=None)
    train_lora(pipe, "demo", sample_prompts=["a cat", "a dog --w 16 --h 24"], sample_size="24x40",
               output_dir=str(tmp_path), **{**RUN, "steps": 1})
    assert pixels(tmp_path / "samples" / "step-00000001" / "0.png").shape == (40, 24, 3)
    assert pixels(tmp_path / "samples" / "step-00000001" / "1.png").shape == (24, 16, 3)
    assert pipe.text_encoder is not None  # the caller's pipeline keeps its components
    with pytest.raises(ConfigError, match="--sample_size: expected WIDTHxHEIGHT"):
        train_lora(pipe, "demo", sample_prompts=["a cat"], sample_size="big", **RUN)


def test_streamed_data_samples_at_its_fixed_size_or_asks_for_one(tmp_path, pipeline):
    """--streaming: the sample size comes from the rows' fixed shape (the schema says it up front); a stream of
    several shapes needs --sample_size, said in one line before training."""
    from datasets import Dataset

    make_dataset(rows=4, size=12).save_to_disk(str(tmp_path / "one"))
    train_lora(str(pipeline), str(tmp_path / "one"), streaming=True, sample_prompts=["a cat"],
               output_dir=str(tmp_path / "run"), **{**RUN, "steps": 1})
    assert pixels(tmp_path / "run" / "samples" / "step-00000001" / "0.png").shape == (24, 24, 3)  # 12 x VAE 2
    rows = [make_dataset(rows=2, size=size).with_format("numpy")[:] for size in (12, 16)]
    mixed = Dataset.from_dict({name: [x.tolist() for part in rows for x in part[name]] for name in rows[0]})
    mixed.save_to_disk(str(tmp_path / "mixed"))  # nested lists of two shapes: no fixed shape in the schema
    with pytest.raises(TrainerError, match="with --streaming and latents of several shapes .* give --sample_size"):
        train_lora(str(pipeline), str(tmp_path / "mixed"), streaming=True, sample_prompts=["a cat"],
                   output_dir=str(tmp_path / "run2"), **{**RUN, "steps": 1})
    assert not (tmp_path / "run2" / "lora.safetensors").exists()


def test_a_size_the_pipeline_refuses_stops_before_training(tmp_path, pipeline):
    with pytest.raises(TrainerError, match=r"^--sample_prompts: prompt 1 \('a dog', 30x32\): .*divisible by 8"):
        train_lora(str(pipeline), "demo", sample_prompts=["a cat", "a dog --w 30"], output_dir=str(tmp_path),
                   **RUN)
    assert not (tmp_path / "lora.safetensors").exists()


# ----------------------------------------------------------------------------- held-out loss


def test_held_out_loss_falls_on_demo_data_and_is_drawn(tmp_path):
    res = train_lora("demo", "demo", output_dir=str(tmp_path), eval_fraction=0.25, eval_every=5, alpha=None,
                     learning_rate=0.002, **{**FAST, "steps": 20, "log_every": 5})
    logged = json.loads((tmp_path / "loss.json").read_text())
    assert logged["eval_step"] == [0, 5, 10, 15, 20]
    assert logged["eval_loss"] == res.loss["eval_loss"] and len(logged["loss"]) == 20
    print("held-out loss:", [round(v, 4) for v in logged["eval_loss"]])
    # deterministic, so every drop is the adapter's doing: it falls at every evaluation
    assert all(later < earlier for earlier, later in zip(logged["eval_loss"], logged["eval_loss"][1:]))
    assert logged["eval_loss"][-1] < 0.98 * logged["eval_loss"][0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_rows_are_left_out_of_training_and_fixed():
    from trainer.data import TrainingData
    from trainer.demo import build_demo_dataset, build_demo_model
    from trainer.evaluation import hold_out
    from trainer.models import get_family

    def split(seed):
        data = TrainingData(build_demo_dataset(), None, get_family("sd"), build_demo_model())
        return data, hold_out(data, 0.25, seed)

    data, held = split(0)
    assert len(held) == 8 and held == split(0)[1] and held != split(1)[1]
    assert sorted(held + [r for b in data.buckets for r in b]) == list(range(32))
    batch = HeldOutLoss(data, held).batch(held[0])
    assert batch["latents"].shape[0] == EVAL_LEVELS and torch.equal(batch["u"].sort().values, batch["u"])
    assert torch.equal(batch["noise"], HeldOutLoss(data, held).batch(held[0])["noise"])  # fixed per row
    assert batch["u"][1] - batch["u"][0] == pytest.approx(1 / EVAL_LEVELS)  # evenly spaced over the schedule


def test_held_out_loss_survives_a_resume(tmp_path):
    """Stopped at step 2 (checkpoint) and resumed to 4: the same held-out losses as a run straight to 4."""
    params = dict(FAST, eval_fraction=0.25, eval_every=1, learning_rate=0.01)
    straight = train_lora("demo", "demo", output_dir=str(tmp_path / "straight"), **{**params, "steps": 4})
    out = str(tmp_path / "resumed")
    train_lora("demo", "demo", output_dir=out, checkpointing_steps=2, **{**params, "steps": 2})
    resumed = train_lora("demo", "demo", output_dir=out, resume_from_checkpoint="latest", **{**params, "steps": 4})
    assert resumed.loss["eval_step"] == straight.loss["eval_step"] == [0, 1, 2, 3, 4]
    assert resumed.loss["eval_loss"] == straight.loss["eval_loss"]


def test_bad_held_out_sets(tmp_path):
    wrong_channels = tmp_path / "wrong"
    make_dataset(rows=2, channels=3).save_to_disk(str(wrong_channels))
    with pytest.raises(TrainerError, match=r"^--eval_latents: latents have 3 channels but the model expects 4"):
        train_lora("demo", "demo", eval_latents=str(wrong_channels), **RUN)
    no_embeds = tmp_path / "no-embeds"
    make_dataset(rows=2, with_embeds=False).save_to_disk(str(no_embeds))
    with pytest.raises(TrainerError, match=r"^--eval_latents: the dataset has no 'prompt_embeds' column"):
        train_lora("demo", "demo", eval_latents=str(no_embeds), **RUN)
    # one --positive row conditions an eval set without embeddings; one with its own ignores --positive
    positive = {"prompt_embeds": torch.zeros(8, 32)}
    res = train_lora("demo", make_dataset(rows=4, with_embeds=False), positive, eval_latents=str(no_embeds), **RUN)
    own = tmp_path / "own"
    make_dataset(rows=3).save_to_disk(str(own))
    res2 = train_lora("demo", make_dataset(rows=4, with_embeds=False), positive, eval_latents=str(own), **RUN)
    assert len(res.loss["eval_loss"]) == len(res2.loss["eval_loss"]) == 2
    with pytest.raises(TrainerError, match=r"^--eval_latents: no such file or folder"):
        train_lora("demo", "demo", eval_latents=str(tmp_path / "missing"), **RUN)
    with pytest.raises(ConfigError, match="choose one"):
        train_lora("demo", "demo", eval_latents=str(no_embeds), eval_fraction=0.1, **RUN)
    with pytest.raises(ConfigError, match="--eval_every needs a held-out set"):
        train_lora("demo", "demo", eval_every=2, **RUN)
    with pytest.raises(ConfigError, match="--sample_every needs --sample_prompts"):
        train_lora("demo", "demo", sample_every=2, **RUN)
    with pytest.raises(TrainerError, match="holds out all 4 rows"):
        train_lora("demo", make_dataset(rows=4), eval_fraction=0.9, **RUN)


def test_two_processes_give_the_same_held_out_loss_and_samples(tmp_path, pipeline, prompts):
    """2 processes x batch 2 against 1 process x batch 4: the held-out loss at step 0 is equal to the last bit
    (later ones to the float tolerance of the training itself); the main process samples alone, the same
    pixels at step 0, and the adapter matches."""
    data = tmp_path / "latents"
    make_dataset(rows=10, seed=3).save_to_disk(str(data))
    watch = dict(sample_prompts=str(prompts), eval_fraction=0.3, eval_every=1, model=str(pipeline))
    outs = {}
    for n, batch in ((1, 4), (2, 2)):
        outs[n] = tmp_path / f"p{n}"
        proc = subprocess.run(launch_command(cpu_processes(n), outs[n], data, batch_size=batch, sample_steps=3,
                                             **watch), capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((outs[n] / "loss.json").read_text()) for n in (1, 2))
    assert one["eval_step"] == two["eval_step"] == [0, 1, 2, 3]
    assert one["eval_loss"][0] == two["eval_loss"][0]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert np.array_equal(pixels(outs[1] / "samples/step-00000000/grid.png"),
                          pixels(outs[2] / "samples/step-00000000/grid.png"))
    a, b = (load_file(str(outs[n] / "lora.safetensors")) for n in (1, 2))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    timing = json.loads((outs[2] / "result.json").read_text())
    print(f"2 processes: {timing['watch_seconds']:.2f} s of {timing['wall_seconds']:.2f} s sampling and evaluating")
