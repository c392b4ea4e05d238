"""lora-prepare for video models: videos decoded with PyAV and sampled to --fps, clips bucketed by --frames,
the Wan VAE's per-channel normalisation, images as 1-frame clips, ComfyUI video .latent files, and training
on the prepared mixed dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from test_prepare import image, load, t5

from trainer.errors import ConfigError, TrainerError
from trainer.prepare import PrepareConfig, clip_frames, clip_starts, frame_times, main, prepare

av = pytest.importorskip("av", reason="PyAV is in the test extra: pip install -e '.[test]'")

CHANNELS = 4
MEAN, STD = [0.1, 0.2, 0.3, 0.4], [1.5, 2.0, 0.5, 1.0]  # not 0 / 1: proves the VAE config's statistics are used
# the tiny VAE halves space once and time once: a clip has 1 + 2k frames, 1 + k latent frames
OPTS = dict(resolution=32, bucket_step=8, batch_size=2, frames="1,5,9,17")


def write_video(path: Path, frames, rate: float = 24, codec: str = "libx264", rotation: int | None = None) -> Path:
    """``frames``: uint8 arrays [H, W, 3], written at ``rate`` frames per second."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "bgr0"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def numbered_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Frames whose pixels say their index (red = 8 x index) over a fixed random pattern."""
    pattern = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    frames = []
    for i in range(count):
        frame = pattern.copy()
        frame[..., 0] = 8 * i
        frames.append(frame)
    return frames


def write_wan_pipeline(path: Path) -> Path:
    """A WanPipeline folder: tiny UMT5 encoder, a tiny Wan VAE (2x in space and time), tiny transformer."""
    import diffusers as d
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, _ = t5(16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=8, d_ff=32,
                                              num_layers=1, num_heads=2))
        vae = d.AutoencoderKLWan(base_dim=8, z_dim=CHANNELS, dim_mult=[1, 1], num_res_blocks=1,
                                 temperal_downsample=[True], latents_mean=MEAN, latents_std=STD,
                                 scale_factor_spatial=2, scale_factor_temporal=2)
        transformer = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                              in_channels=CHANNELS, out_channels=CHANNELS, text_dim=16, freq_dim=16,
                                              ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    scheduler = d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    d.WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                  transformer=transformer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return write_wan_pipeline(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Videos in three containers and codecs, one stored rotated, one too short for any clip but a frame,
    an image; captions from .txt files and a kohya folder."""
    root = tmp_path_factory.mktemp("media")
    # lossless, at bucket size (32x32): its clip's pixels are known exactly
    write_video(root / "exact.mkv", numbered_frames(30, 32, 32), rate=24, codec="ffv1")
    (root / "exact.txt").write_text("a counting square\n")
    write_video(root / "wide.mp4", numbered_frames(20, 48, 30), rate=16)
    write_video(root / "clip.webm", numbered_frames(12, 32, 32), rate=30, codec="libvpx-vp9")
    # stored 24 wide x 40 high, shown turned by 90 degrees: 40 x 24, bucket 40x24 as stored sizes go
    (root / "2_turned").mkdir()
    write_video(root / "2_turned" / "turned.mov", numbered_frames(8, 24, 40), rate=24, codec="mpeg4", rotation=90)
    write_video(root / "single.mp4", numbered_frames(1, 32, 32))
    image(root / "still.png", 32, 32, seed=7)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, media, wan):
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    result = prepare(PrepareConfig(images=str(media), model=str(wan), output=str(out), **OPTS))
    return out, result


@pytest.mark.unit
def test_clip_length_and_sampling_times():
    # 40 frames at 24 fps cover 1.667 s; at 16 fps a 17-frame clip spans 1.0 s, a 33-frame one 2.0 s
    assert clip_frames((1, 17, 33), 16, seconds=40 / 24, rate=24) == 17
    # exactly long enough: 81 frames at 16 fps (the last one starts at 5.0 s)
    assert clip_frames((1, 17, 81), 16, seconds=81 / 16, rate=16) == 81
    assert clip_frames((1, 17, 81), 16, seconds=80 / 16, rate=16) == 17
    assert clip_frames((5, 9), 16, seconds=1 / 24, rate=24) is None
    assert frame_times(3, 16) == [0.0, 1 / 16, 2 / 16]
    assert frame_times(2, 8, start=0.5) == [0.5, 0.625]
    # 30 frames at 24 fps: the last starts at 1.208 s; 3-frame clips at 8 fps span 0.375 s, the latest start is
    # 0.958 s: three clips fit without overlapping, evenly spread; asking for 2 spreads 2 over the same range
    assert clip_starts(5, 3, 8, seconds=30 / 24, rate=24) == pytest.approx([0.0, 0.958333 / 2, 0.958333], abs=1e-5)
    assert clip_starts(2, 3, 8, seconds=30 / 24, rate=24) == pytest.approx([0.0, 0.958333], abs=1e-5)
    assert clip_starts(1, 3, 8, seconds=30 / 24, rate=24) == [0.0]
    assert clip_starts(4, 9, 8, seconds=30 / 24, rate=24) == [0.0]  # 9 frames at 8 fps leave no room for two


def test_mixed_folder_becomes_clips_bucketed_by_frames(prepared):
    out, result = prepared
    ds = load(out)
    rows = {name: i for i, name in enumerate(ds["file_name"])}
    shapes = {name: tuple(ds[i]["latent_shape"]) for name, i in rows.items()}
    # exact.mkv: 30 frames at 24 fps = 1.25 s -> 17 frames at 16 fps -> 1 + 16/2 = 9 latent frames
    assert shapes["exact.mkv"] == (CHANNELS, 9, 16, 16)
    # wide.mp4: 20 frames at 16 fps -> 17 frames; 48x30 goes to the 40x24 bucket
    assert shapes["wide.mp4"] == (CHANNELS, 9, 12, 20)
    # clip.webm: 12 frames at 30 fps = 0.4 s -> 5 frames (0.25 s); 9 would need 0.5 s
    assert shapes["clip.webm"] == (CHANNELS, 3, 16, 16)
    # turned.mov is shown 40 wide x 24 high (its rotation applied): bucket 40x24; 8 frames at 24 fps -> 5
    assert shapes["2_turned/turned.mov"] == (CHANNELS, 3, 12, 20)
    # a 1-frame video and an image are 1-frame clips
    assert shapes["single.mp4"] == shapes["still.png"] == (CHANNELS, 1, 16, 16)
    assert ds.num_rows == 7 and ds["file_name"].count("2_turned/turned.mov") == 2  # kohya repeats
    assert ds[rows["exact.mkv"]]["caption"] == "a counting square"
    assert ds[rows["2_turned/turned.mov"]]["caption"] == "turned"
    assert result.decoded_frames == 17 + 17 + 5 + 5 + 1 and result.decode_seconds > 0
    assert not result.skipped
    assert np.asarray(ds[rows["exact.mkv"]]["latents"]).shape == (CHANNELS, 9, 16, 16)


def test_clip_is_sampled_by_time_and_normalised_per_channel(prepared, wan):
    """The lossless clip's frames are the source frames on screen at k/16 s (24 fps source: 0, 1, 3, 4, 6,
    ...), and its row is the VAE's mean latents, normalised with the VAE config's mean and std."""
    from diffusers import AutoencoderKLWan

    out, _ = prepared
    ds = load(out)
    row = ds[ds["file_name"].index("exact.mkv")]
    source = numbered_frames(30, 32, 32)
    picked = [int(t * 24 + 1e-6) for t in frame_times(17, 16)]
    assert picked[:6] == [0, 1, 3, 4, 6, 7]
    pixels = torch.stack([torch.from_numpy(source[i]).permute(2, 0, 1) for i in picked], dim=1)
    pixels = pixels.float()[None] / 127.5 - 1
    vae = AutoencoderKLWan.from_pretrained(wan / "vae")
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean[0]
    expected = (raw - torch.tensor(MEAN).view(-1, 1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1, 1)
    torch.testing.assert_close(torch.tensor(np.asarray(row["latents"], dtype=np.float32)), expected, atol=2e-5, rtol=1e-4)


def test_training_on_the_prepared_clips(tmp_path, prepared, wan, caplog):
    import logging

    from trainer import train_lora

    out, _ = prepared
    with caplog.at_level(logging.INFO, logger="trainer"):
        res = train_lora(str(wan), str(out), rank=4, alpha=4.0, learning_rate=1e-3, output_dir=str(tmp_path),
                         **{**FAST, "batch_size": 1, "steps": 4})
    assert res.steps == 4 and all(np.isfinite(res.loss["loss"]))
    assert "4x9x16x16" in caplog.text and "4x1x16x16" in caplog.text  # buckets by frames, height and width


@pytest.mark.slow
def test_two_processes_prepare_the_same_clips(tmp_path, prepared, media, wan):
    """Images batched and videos one by one, dealt out to 2 processes: the same dataset as 1 process."""
    from test_prepare import prepare_in_two_processes

    out = tmp_path / "dataset"
    stdout = prepare_in_two_processes(media, wan, out, OPTS)
    assert "wrote 7 rows" in stdout and "45 video frames decoded" in stdout
    one, two = load(prepared[0]).with_format("numpy"), load(out).with_format("numpy")
    assert one["file_name"] == two["file_name"]
    for i in range(len(one)):
        # float32 sums in another thread split: equal to rounding
        np.testing.assert_allclose(two[i]["latents"], one[i]["latents"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(two[i]["prompt_embeds"], one[i]["prompt_embeds"])


def test_rerun_reuses_the_cache_and_new_frames_settings_reencode(tmp_path, media, wan, prepared):
    out, _ = prepared
    again = prepare(PrepareConfig(images=str(media), model=str(wan), output=str(tmp_path / "again"),
                                  cache_dir=f"{out}.cache", **OPTS))
    assert again.encoded == 0 and again.decoded_frames == 0
    fewer = prepare(PrepareConfig(images=str(media), model=str(wan), output=str(tmp_path / "fewer"),
                                  cache_dir=f"{out}.cache", **{**OPTS, "frames": "1,5"}))
    assert fewer.shapes[(CHANNELS, 3, 16, 16)] == 2  # exact.mkv and clip.webm, now 5 frames each
    assert fewer.encoded == 2  # exact.mkv and wide.mp4, whose clips changed; the rest came from the cache


def test_comfyui_video_latent_files_are_normalised_per_channel(tmp_path, wan):
    from safetensors.torch import save_file

    folder = tmp_path / "latents"
    folder.mkdir()
    raw = torch.randn(2, CHANNELS, 3, 8, 8)
    save_file({"latent_tensor": raw, "latent_format_version_0": torch.tensor([])}, str(folder / "clip.latent"))
    result = prepare(PrepareConfig(images=str(folder), model=str(wan), output=str(tmp_path / "out"),
                                   positive="a clip", **OPTS))
    assert result.shapes == {(CHANNELS, 3, 8, 8): 2}
    ds = load(tmp_path / "out")
    expected = (raw[1] - torch.tensor(MEAN).view(-1, 1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1, 1)
    torch.testing.assert_close(torch.tensor(np.asarray(ds[1]["latents"], dtype=np.float32)), expected)


def test_frames_and_fps_errors(tmp_path, media, wan, capsys):
    with pytest.raises(ConfigError, match=r"--frames: 4 frames cannot be encoded by this VAE: a clip has 1 \+ a "
                       r"multiple of 2 frames"):
        prepare(PrepareConfig(images=str(media), model=str(wan), output=str(tmp_path / "o"),
                              **{**OPTS, "frames": "1,4"}))
    for argv, message in ((["--frames", "1,x"], "--frames: expected comma-separated frame counts"),
                          (["--frames", "0"], "--frames: expected frame counts of at least 1"),
                          (["--fps", "0"], "--fps: expected a positive frame rate")):
        assert main(["--images", str(media), "--model", str(wan), "--output", str(tmp_path / "o"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_too_short_and_broken_videos_are_skipped_with_the_reason(tmp_path, wan, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "blink.mp4", numbered_frames(2, 32, 32), rate=24)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    write_video(folder / "fine.mp4", numbered_frames(10, 32, 32), rate=16)
    result = prepare(PrepareConfig(images=str(folder), model=str(wan), output=str(tmp_path / "out"),
                                   **{**OPTS, "frames": "5,9"}))
    reasons = {s.name: s.reason for s in result.skipped}
    assert "shorter than the shortest clip, 5 frames at 16 fps" in reasons["blink.mp4"]
    assert reasons["broken.mp4"].startswith("unreadable")
    assert result.shapes == {(CHANNELS, 5, 16, 16): 1}


def test_image_models_skip_videos_and_refuse_frames(tmp_path, media):
    from test_prepare import write_tiny_pipeline

    sd = write_tiny_pipeline(tmp_path / "sd")
    result = prepare(PrepareConfig(images=str(media), model=str(sd), output=str(tmp_path / "out"), resolution=32,
                                   bucket_step=8))
    assert result.shapes == {(4, 16, 16): 1}  # the image only
    assert {s.kind for s in result.skipped} == {"video for an image model"}
    assert "a video, but sd is an image model" in result.skipped[0].reason
    with pytest.raises(ConfigError, match="--frames: sd is an image model; --frames, --fps and --clips apply to video"):
        prepare(PrepareConfig(images=str(media), model=str(sd), output=str(tmp_path / "o"), frames="1,5"))


def test_a_missing_decoder_is_one_line(tmp_path, media, wan, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(TrainerError, match=r"reading videos needs PyAV: pip install av"):
        prepare(PrepareConfig(images=str(media), model=str(wan), output=str(tmp_path / "o"), **OPTS))


@pytest.mark.unit
def test_vae_config_factors():
    from trainer.models.base import vae_scale_factor, vae_temporal_factor

    wan21 = {"temperal_downsample": [False, True, True]}  # hub configs written before the factor fields
    assert (vae_scale_factor(wan21), vae_temporal_factor(wan21)) == (8, 4)
    wan22 = {**wan21, "scale_factor_spatial": 16, "scale_factor_temporal": 4}
    assert (vae_scale_factor(wan22), vae_temporal_factor(wan22)) == (16, 4)
    hunyuan = {"block_out_channels": [128, 256, 512, 512], "spatial_compression_ratio": 8,
               "temporal_compression_ratio": 4}
    assert (vae_scale_factor(hunyuan), vae_temporal_factor(hunyuan)) == (8, 4)
    assert vae_temporal_factor({"block_out_channels": [8, 8]}) == 1


def write_hunyuan_pipeline(path: Path) -> Path:
    """A HunyuanVideoPipeline folder: tiny Llama (its hidden states under the pipeline's prompt template) and
    CLIP (77 tokens, as the pipeline encodes them), a tiny VAE (4x in space and time), tiny transformer."""
    import diffusers as d
    from test_prepare import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, _ = t5(16)
    clip_tokens = clip_tokenizer(path.parent / "clip-tokenizer")
    clip_tokens.model_max_length = 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llama = LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=0))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1))
        vae = d.AutoencoderKLHunyuanVideo(latent_channels=CHANNELS, block_out_channels=(8, 8, 8), layers_per_block=1,
                                          norm_num_groups=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                          up_block_types=("HunyuanVideoUpBlock3D",) * 3,
                                          spatial_compression_ratio=4, temporal_compression_ratio=4)
        transformer = d.HunyuanVideoTransformer3DModel(
            in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=32, rope_axes_dim=(2, 2, 4))
    d.HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                           scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                           tokenizer_2=clip_tokens).save_pretrained(path)
    return path


def test_hunyuan_video_prepares_and_trains(tmp_path, media):
    from diffusers import AutoencoderKLHunyuanVideo

    from trainer import train_lora

    model = write_hunyuan_pipeline(tmp_path / "tiny-hunyuan")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("exact.mkv", "exact.txt", "still.png"):
        (folder / name).write_bytes((media / name).read_bytes())
    result = prepare(PrepareConfig(images=str(folder), model=str(model), output=str(tmp_path / "out"), **OPTS))
    # 30 frames at 24 fps: 17 frames at HunyuanVideo's 24 fps -> 1 + 16/4 = 5 latent frames of 32/4 pixels
    assert result.shapes == {(CHANNELS, 5, 8, 8): 1, (CHANNELS, 1, 8, 8): 1}
    ds = load(tmp_path / "out")
    row = ds[ds["file_name"].index("exact.mkv")]
    assert np.asarray(row["prompt_embeds"]).shape == (256, 16) and len(row["pooled_prompt_embeds"]) == 32
    assert sum(row["prompt_attention_mask"]) > 0
    pixels = torch.stack([torch.from_numpy(numbered_frames(30, 32, 32)[i]).permute(2, 0, 1) for i in range(17)], 1)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(model / "vae")
    vae.enable_tiling()  # as lora-prepare encodes clips: 17 frames are more than one temporal tile (16)
    with torch.no_grad():
        raw = vae.encode(pixels.float()[None] / 127.5 - 1).latent_dist.mean[0]
    torch.testing.assert_close(torch.tensor(np.asarray(row["latents"], dtype=np.float32)),
                               raw * vae.config.scaling_factor, atol=2e-5, rtol=1e-4)
    res = train_lora(str(model), str(tmp_path / "out"), rank=4, alpha=4.0, output_dir=str(tmp_path / "run"),
                     **{**FAST, "batch_size": 1})
    assert res.steps == 2 and all(np.isfinite(res.loss["loss"]))


def test_several_clips_per_video_start_where_planned(tmp_path, wan):
    """--clips: a lossless 30-frame video at 24 fps gives three 3-frame clips at 8 fps, starting at 0, 0.479 and
    0.958 s: source frames 0, 3, 6 / 11, 14, 17 / 23, 26, 29 (the frame on screen at each instant); each clip
    its own row, seeking to the key frame before it."""
    from trainer.prepare import _clip_pixels, inspect_model, plan

    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "long.mkv", numbered_frames(30, 32, 32), rate=24, codec="ffv1")
    cfg = PrepareConfig(images=str(folder), model=str(wan), output=str(tmp_path / "out"),
                        **{**OPTS, "frames": "3", "fps": 8.0, "clips": 5, "batch_size": 1})
    model = inspect_model(cfg)
    clips = plan(cfg, model).sources
    assert [round(c.start, 3) for c in clips] == [0.0, 0.479, 0.958] and len({c.key for c in clips}) == 3
    for clip, first in zip(clips, (0, 11, 23)):
        red = _clip_pixels(clip)[0, :, 0, 0]  # red = 8 x frame index, in [-1, 1]
        indices = ((red + 1) * 127.5 / 8).round().int().tolist()
        assert indices == [first, first + 3, first + 6]
    result = prepare(cfg)
    assert result.shapes == {(CHANNELS, 2, 16, 16): 3} and result.decoded_frames == 9
    assert load(tmp_path / "out")["file_name"] == ["long.mkv"] * 3


def test_ctrl_c_keeps_the_cache_and_the_same_command_continues(tmp_path, media, wan, monkeypatch, capsys):
    """Ctrl-C mid-encoding: one line, exit 130, no dataset written; the rerun encodes only what was left."""
    import trainer.prepare as prep

    real, calls = prep.encode_images, []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    argv = ["--images", str(media), "--model", str(wan), "--output", str(tmp_path / "out"),
            *[x for k, v in {**OPTS, "batch_size": 1}.items() for x in (f"--{k}", str(v))]]
    monkeypatch.setattr(prep, "encode_images", interrupted_after_two)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "lora-prepare: interrupted; what was encoded is kept in" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(prep, "encode_images", real)
    assert main(argv) == 0
    assert "encoded 4 new images and videos" in capsys.readouterr().out  # 6 files, 2 already in the cache
