"""lora-prepare: an image folder (captions, repeats, two aspect ratios, bad files) and ComfyUI .latent
files become a latents dataset, encoded with a tiny pipeline saved to disk; the trainer trains on it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image
from test_distributed import ENV, ROOT, free_port

from trainer.errors import TrainerError
from trainer.prepare import PrepareConfig, closest_bucket, fit_plan, main, make_buckets, prepare

SCALE, SHIFT = 0.5, 0.25  # not SD's: proves the VAE's own config is used
OPTS = dict(resolution=32, bucket_step=8, batch_size=2)  # buckets 16x64, 24x40, 32x32, 40x24, 64x16


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer over single letters (vocab.json and merges.txt written here), 8 tokens long."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def clip(dim: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=54, hidden_size=dim, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=dim)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5(dim: int):
    """A tiny T5 encoder and a unigram tokenizer over single letters."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    config = T5Config(vocab_size=len(pieces), d_model=dim, d_kv=8, d_ff=37, num_layers=1, num_heads=2)
    return T5Tokenizer(vocab=pieces, extra_ids=0), T5EncoderModel(config)


def write_tiny_pipeline(path: Path, family: str = "sd", vae: bool = True) -> Path:
    """A pipeline folder of the family: tiny VAE (2x downsampling, own scaling/shift), tiny text encoders
    and tokenizers, tiny denoiser (the demo UNet for SD)."""
    import diffusers as d

    from trainer.demo import build_demo_model

    tokenizer = clip_tokenizer(path / "tokenizer-files")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        autoencoder = d.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                      norm_num_groups=8, scaling_factor=SCALE, shift_factor=SHIFT)
        autoencoder = autoencoder if vae else None
        flow = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
        if family == "sd":
            scheduler = d.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, steps_offset=1)
            pipe = d.StableDiffusionPipeline(vae=autoencoder, text_encoder=clip(32), tokenizer=tokenizer,
                                             unet=build_demo_model(), scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
        elif family == "sdxl":
            unet = d.UNet2DConditionModel(
                sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)
            pipe = d.StableDiffusionXLPipeline(vae=autoencoder, text_encoder=clip(32), tokenizer=tokenizer,
                                               text_encoder_2=clip(32, projection=True),
                                               tokenizer_2=tokenizer, unet=unet,
                                               scheduler=d.EulerDiscreteScheduler())
        elif family == "sd3":
            t5_tokenizer, t5_encoder = t5(64)  # 64 = the two CLIPs' 32 + 32, which SD3 pads to T5's width
            transformer = d.SD3Transformer2DModel(
                sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=32)
            pipe = d.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=flow, vae=autoencoder,
                text_encoder=clip(32, projection=True), tokenizer=tokenizer,
                text_encoder_2=clip(32, projection=True), tokenizer_2=tokenizer,
                text_encoder_3=t5_encoder, tokenizer_3=t5_tokenizer)
        else:
            t5_tokenizer, t5_encoder = t5(32)
            transformer = d.FluxTransformer2DModel(  # 16 = 4 latent channels x a 2x2 patch
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                axes_dims_rope=(4, 6, 6))
            pipe = d.FluxPipeline(scheduler=flow, vae=autoencoder, text_encoder=clip(32), tokenizer=tokenizer,
                                  text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer,
                                  transformer=transformer)
    pipe.save_pretrained(path)
    shutil.rmtree(path / "tokenizer-files")
    return path


def image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Square 32x32 images (at bucket size) and 48x30 ones (bucket 40x24), captions three ways, repeats."""
    root = tmp_path_factory.mktemp("images")
    image(root / "square.png", 32, 32, seed=1)
    (root / "square.txt").write_text("a red square\n")
    image(root / "wide.jpg", 48, 30, seed=2)
    image(root / "3_sks dog" / "dog.webp", 32, 32, seed=3)  # caption from the folder name, 3 repeats
    image(root / "3_sks dog" / "dog wide.png", 60, 36, seed=4)
    image(root / "2_misc" / "tall.png", 30, 48, seed=5)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.jpg", "text": "a wide view"}) + "\n")
    (root / "2_misc" / "metadata.csv").write_text("file_name,text\ntall.png,\"a tall, thin tower\"\n")
    return root


def config(images, pipeline, output, **extra) -> PrepareConfig:
    return PrepareConfig(images=str(images), model=str(pipeline), output=str(output), **{**OPTS, **extra})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, images, pipeline):
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    result = prepare(config(images, pipeline, out))
    return out, result


def load(path):
    import datasets

    return datasets.load_from_disk(str(path))


@pytest.mark.unit
def test_buckets():
    assert make_buckets(512, 64, 4) == [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
                                        (576, 448), (640, 384), (768, 320), (1024, 256)]
    buckets = make_buckets(1024, 64, 4)
    assert (1024, 1024) in buckets and (1216, 832) in buckets and all(w * h <= 1024 ** 2 for w, h in buckets)
    assert closest_bucket(1920, 1080, make_buckets(512, 64, 4)) == (640, 384)
    assert closest_bucket(512, 512, make_buckets(512, 64, 4)) == (512, 512)
    assert fit_plan(512, 512, (512, 512)) == ((512, 512), (0, 0))  # already at bucket size: untouched
    assert fit_plan(1000, 500, (640, 384)) == ((768, 384), (0, 64))  # cover, then center-crop the excess
    assert fit_plan(640, 400, (640, 384)) == ((640, 400), (8, 0))  # only a crop


def test_folder_becomes_a_dataset_with_two_shapes_and_repeats(prepared):
    out, result = prepared
    ds = load(out)
    rows = ds.select_columns(["file_name", "caption", "original_size", "crop_coords",
                              "target_size"]).to_list()
    by_name = {}
    for row in rows:
        by_name.setdefault(row.pop("file_name"), []).append(row)
    assert {k: len(v) for k, v in by_name.items()} == {"square.png": 1, "wide.jpg": 1, "2_misc/tall.png": 2,
                                                       "3_sks dog/dog.webp": 3, "3_sks dog/dog wide.png": 3}
    assert by_name["square.png"][0]["caption"] == "a red square"
    assert by_name["wide.jpg"][0]["caption"] == "a wide view"
    assert by_name["2_misc/tall.png"][0]["caption"] == "a tall, thin tower"
    assert by_name["3_sks dog/dog.webp"][0]["caption"] == "sks dog"
    # 48x30 covers 40x24 at scale 5/6: resized to 40x25, one row cropped off the bottom
    assert by_name["wide.jpg"][0] == {"caption": "a wide view", "original_size": [30, 48],
                                      "crop_coords": [0, 0], "target_size": [24, 40]}
    # 60x36 -> 40x24 without a crop; 30x48 -> 24x40 (a tall bucket)
    assert by_name["3_sks dog/dog wide.png"][0]["target_size"] == [24, 40]
    assert by_name["2_misc/tall.png"][0]["target_size"] == [40, 24]
    assert result.shapes == {(4, 16, 16): 4, (4, 12, 20): 4, (4, 20, 12): 2} and result.rows == len(ds) == 10
    assert result.skipped == [] and result.encoded == 5
    shapes = {tuple(np.asarray(r).shape) for r in ds.with_format("numpy")[:]["latents"]}
    assert shapes == {(4, 16, 16), (4, 12, 20), (4, 20, 12)}


def test_latents_are_the_vaes_mean_scaled_and_embeddings_the_clip_output(prepared, images, pipeline):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    ds = load(prepared[0]).with_format("numpy")
    row = ds[list(ds[:]["file_name"]).index("square.png")]
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    pixels = torch.from_numpy(np.asarray(Image.open(images / "square.png").convert("RGB"), dtype=np.float32))
    with torch.no_grad():
        mean = vae.encode(pixels.permute(2, 0, 1)[None] / 127.5 - 1).latent_dist.mean[0]
    torch.testing.assert_close(torch.from_numpy(row["latents"]), (mean - SHIFT) * SCALE, atol=1e-6, rtol=1e-5)

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    ids = tokenizer("a red square", padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = encoder(ids.input_ids).last_hidden_state[0]
    torch.testing.assert_close(torch.from_numpy(row["prompt_embeds"]), expected, atol=1e-6, rtol=1e-5)


def test_training_on_the_prepared_buckets(prepared, pipeline, caplog):
    from trainer import train_lora

    caplog.set_level(logging.INFO, logger="trainer.data")
    result = train_lora(str(pipeline), str(prepared[0]), batch_size=2, **{**FAST, "steps": 4})
    assert len(result.loss["loss"]) == 4 and all(np.isfinite(result.loss["loss"]))
    assert "latents come in 3 shapes" in caplog.text


def prepare_in_two_processes(folder: Path, model: Path, out: Path, options: dict) -> str:
    """``lora-prepare`` under ``accelerate launch`` with 2 CPU processes; returns its standard output."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch_configs" / "cpu.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "trainer.prepare", "--images", str(folder), "--model", str(model),
               "--output", str(out), *[x for k, v in options.items() for x in (f"--{k}", str(v))]]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_prepare_the_same_dataset(tmp_path, prepared, images, pipeline):
    out = tmp_path / "dataset"
    stdout = prepare_in_two_processes(images, pipeline, out, OPTS)
    assert "wrote 10 rows" in stdout and "encoded 5 new images" in stdout
    one, two = load(prepared[0]).with_format("numpy"), load(out).with_format("numpy")
    assert one.column_names == two.column_names and len(one) == len(two)
    for i in range(len(one)):
        for name in one.column_names:
            a, b = one[i][name], two[i][name]
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
            else:
                assert np.array_equal(a, b), name


def test_rerun_encodes_only_what_is_new(tmp_path, pipeline):
    root = tmp_path / "images"
    image(root / "a.png", 32, 32, seed=1)
    image(root / "b.png", 48, 30, seed=2)
    cfg = config(root, pipeline, tmp_path / "dataset")
    first = prepare(cfg)
    before = load(cfg.output).with_format("numpy")[:]["latents"]
    again = prepare(cfg)
    assert (first.encoded, again.encoded) == (2, 0)
    after = load(cfg.output).with_format("numpy")[:]["latents"]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    image(root / "c.png", 30, 48, seed=3)
    os.utime(root / "a.png", ns=(1, 1))  # a changed file is encoded again
    third = prepare(cfg)
    assert third.encoded == 2 and third.rows == 3


def test_bad_inputs_are_reported_and_the_rest_prepared(tmp_path, pipeline, capsys, caplog):
    root = tmp_path / "images"
    image(root / "good.png", 32, 32)
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    whole = (image(root / "truncated.png", 64, 64, seed=9)).read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not
    image(root / "small.png", 12, 40)
    (root / "lonely.txt").write_text("a caption without its image")
    (root / "notes.gif").write_bytes(b"GIF89a")
    out = tmp_path / "dataset"
    code = main(["--images", str(root), "--model", str(pipeline), "--output", str(out),
                 *[x for k, v in OPTS.items() for x in (f"--{k}", str(v))]])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 1 rows" in printed
    assert "6 skipped" in printed and "2 unreadable" in printed and "1 too small" in printed
    for name, why in [("empty.png", "empty file"), ("garbage.jpg", "unreadable"),
                      ("truncated.png", "unreadable"), ("lonely.txt", "caption file without an image"),
                      ("small.png", "12x40 is smaller than the smallest bucket side (16 px"),
                      ("notes.gif", "not a png/jpg/webp image")]:
        assert f"skipped {name}: {why}" in caplog.text
    assert load(out)[:]["file_name"] == ["good.png"]


def test_model_without_a_vae_still_imports_latent_files(tmp_path, capsys, caplog):
    from safetensors.torch import save_file

    pipeline = write_tiny_pipeline(tmp_path / "no-vae", vae=False)
    root = tmp_path / "images"
    image(root / "photo.png", 32, 32)
    root.mkdir(exist_ok=True)
    raw = torch.randn(2, 4, 8, 12)
    # ComfyUI's SaveLatent: raw VAE latents plus a format marker; older files hold SD-scaled latents
    save_file({"latent_tensor": raw, "latent_format_version_0": torch.tensor([])}, str(root / "new.latent"))
    save_file({"latent_tensor": raw[:1] * 0.18215}, str(root / "old.latent"))
    (root / "old.txt").write_text("an old latent")
    code = main(["--images", str(root), "--model", str(pipeline), "--output", str(tmp_path / "dataset"),
                 "--positive", "a comfy latent", "--resolution", "32", "--bucket_step", "16"])
    assert code == 0, capsys.readouterr().err
    assert f"skipped photo.png: the model {pipeline} has no VAE" in caplog.text
    ds = load(tmp_path / "dataset").with_format("numpy")
    assert ds[:]["caption"].tolist() == ["a comfy latent", "a comfy latent", "an old latent"]
    # no VAE config: the SD family's own factor 8 and scaling factor
    assert ds[:]["target_size"].tolist() == [[64, 96]] * 3
    scale = 0.18215
    for row, expected in zip(ds, [raw[0], raw[1], raw[0]]):
        np.testing.assert_allclose(row["latents"], (expected * scale).numpy(), rtol=1e-5, atol=1e-6)


def test_sampled_latents_are_seeded_per_image(tmp_path, images, pipeline, prepared):
    base = dict(sample_latents=True, seed=3)
    a = prepare(config(images, pipeline, tmp_path / "a", **base, cache_dir=str(tmp_path / "ca")))
    b = prepare(config(images, pipeline, tmp_path / "b", **{**base, "batch_size": 1},
                       cache_dir=str(tmp_path / "cb")))
    assert a.encoded == b.encoded == 5
    mean = load(prepared[0]).with_format("numpy")[:]["latents"]
    first, second = (load(tmp_path / x).with_format("numpy")[:]["latents"] for x in "ab")
    for m, x, y in zip(mean, first, second):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # the batch does not change an image's sample
        assert not np.allclose(m, x)


def test_parameter_and_model_errors(tmp_path, images, pipeline, capsys):
    assert main(["--images", str(tmp_path / "nowhere"), "--model", str(pipeline), "--output", "x"]) == 2
    assert "--images: no such file or folder" in capsys.readouterr().err
    assert main(["--images", str(images), "--model", str(pipeline), "--output", str(tmp_path / "x"),
                 "--resolution", "32", "--bucket_step", "6"]) == 2
    assert "--bucket_step: 6 is not a multiple of 4 pixels" in capsys.readouterr().err
    with pytest.raises(TrainerError, match="not a diffusers pipeline folder"):
        prepare(config(images, pipeline / "unet", tmp_path / "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainerError, match="nothing to prepare .* no images, videos or .latent files found"):
        prepare(config(empty, pipeline, tmp_path / "x"))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families_prepare_and_train(tmp_path, family):
    """Each family's own text encoders fill its conditioning columns; the trainer trains on them."""
    from trainer import train_lora
    from trainer.models import FAMILIES

    assert family in FAMILIES, f"no {family} family registered in trainer.models"  # a failure, never a skip
    pipeline = write_tiny_pipeline(tmp_path / family, family)
    root = tmp_path / "images"
    image(root / "a.png", 32, 32, seed=1)
    (root / "a.txt").write_text("a red square")
    image(root / "2_wide" / "b.png", 48, 30, seed=2)
    result = prepare(config(root, pipeline, tmp_path / "dataset"))
    assert result.shapes == {(4, 16, 16): 1, (4, 12, 20): 2}
    ds = load(tmp_path / "dataset").with_format("numpy")
    width = {"sdxl": (64, 32), "sd3": (64, 64), "flux": (32, 32)}[family]  # prompt_embeds, pooled
    row = ds[list(ds[:]["file_name"]).index("a.png")]
    assert (row["prompt_embeds"].shape[-1], row["pooled_prompt_embeds"].shape[-1]) == width
    if family == "sdxl":  # both CLIPs' penultimate states side by side, pooled from the second
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
        ids = tokenizer("a red square", padding="max_length", max_length=8, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            one = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
            two = CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2")
            one, two = one(ids, output_hidden_states=True), two(ids, output_hidden_states=True)
        expected = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)[0]
        torch.testing.assert_close(torch.from_numpy(row["prompt_embeds"]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(row["pooled_prompt_embeds"]), two.text_embeds[0],
                                   atol=1e-5, rtol=1e-5)
    trained = train_lora(str(pipeline), str(tmp_path / "dataset"), batch_size=1, **FAST)
    assert all(np.isfinite(trained.loss["loss"]))
