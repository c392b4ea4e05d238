"""Qwen-Image (``trainer/models/qwenimage``): tiny models built from configs (diffusers' own test sizes).

Training learns, and its first loss equals the objective written out here (dynamic shift from the token
count, 2x2 packing, masked text); the file loads in diffusers' ``QwenImagePipeline`` with the same effect
and means the same under ComfyUI's key rules; ``--existing_lora`` continues it; every algorithm and
layout reads back; detection from pipeline and bare folders; ``lora-prepare`` with the family's own VAE
(a video VAE, per-channel statistics) and Qwen2.5-VL text encoder; bad input in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST

from trainer import train_lora
from trainer.adapters import ALGORITHMS, adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.models.qwenimage import DEFAULT_SCHEDULER, TEXT_TOKENS, pack, unpack

SIZE, TOKENS, WIDTH, CHANNELS = 16, 8, 32, 4  # latent side, text tokens, text width, latent channels
#: the tiny VAE's statistics: not 0 / 1, so the per-channel normalisation is seen
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return QwenImageTransformer2DModel(patch_size=2, in_channels=CHANNELS * 4, out_channels=CHANNELS,
                                           num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                           joint_attention_dim=WIDTH, axes_dims_rope=(4, 6, 6))


def qwen_mask(rows):
    """Every other row's caption is 5 tokens long, the rest 8: the last 3 tokens of those are padding."""
    mask = torch.ones(rows, TOKENS)
    mask[::2, 5:] = 0
    return mask


def qwen_dataset(rows=8, seed=0, size=SIZE, mask=True):
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    g = torch.Generator().manual_seed(seed)
    m = qwen_mask(rows)
    columns = {"latents": torch.randn(rows, CHANNELS, size, size, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, WIDTH, generator=g) * m[..., None]}
    features = {"latents": Array3D((CHANNELS, size, size), "float32"),
                "prompt_embeds": Array2D((TOKENS, WIDTH), "float32")}
    if mask:
        columns["prompt_embeds_mask"] = m
        features["prompt_embeds_mask"] = Sequence(Value("float32"), length=TOKENS)
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(DEFAULT_SCHEDULER)


def tiny_vae():
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLQwenImage(base_dim=8, z_dim=CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True], latents_mean=MEAN, latents_std=STD)


def tiny_pipeline(denoiser=None, text_encoder=None, tokenizer=None):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=denoiser or tiny_qwen())


def denoiser_output(model, seed=1):
    """The raw output on fixed inputs, the second row's caption padded (what a LoRA must change identically)."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, CHANNELS, SIZE, SIZE, generator=g), torch.randn(2, TOKENS, WIDTH, generator=g)
    mask = torch.ones(2, TOKENS)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(hidden_states=pack(x), encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                     timestep=torch.tensor([0.01, 0.7]), img_shapes=[[(1, SIZE // 2, SIZE // 2)]] * 2).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained adapter (rank 4, alpha 3: scale 0.75), its file and its in-memory model."""
    out = tmp_path_factory.mktemp("qwenimage")
    return train_lora(tiny_qwen(), qwen_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      **{**FAST, "steps": 3})


# ----------------------------------------------------------------------------- the objective, written out


def first_loss(model, dataset, step=0, batch_size=2):
    """The loss of one batch from the definitions: Qwen-Image's dynamic shift (mu linear in the token count,
    factor e^mu), x_s = (1 - s) x0 + s eps, target eps - x0, the transformer given the whole padded text
    and its mask."""
    from trainer.data import LatentBatches, StepBatchSampler, TrainingData

    data = TrainingData(dataset, None, get_family("qwenimage"), model)
    sampler = StepBatchSampler(data.num_rows, batch_size, 1, 1, 0, step, step + 1)
    batch = LatentBatches(data, 0).__getitems__(next(iter(sampler)))
    x0, eps, u = batch["latents"], batch["noise"], batch["u"]
    b, _, h, w = x0.shape
    tokens = (h // 2) * (w // 2)
    shift = math.exp(0.5 + (0.9 - 0.5) * (tokens - 256) / (8192 - 256))
    s = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)).clamp(1e-3, 1.0)
    sigma = shift * s / (1 + (shift - 1) * s)
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    patches = torch.stack([xt[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=2)
    packed = patches.permute(0, 3, 4, 1, 2).reshape(b, tokens, -1)
    with torch.no_grad():
        out = model(hidden_states=packed, encoder_hidden_states=batch["prompt_embeds"],
                    encoder_hidden_states_mask=batch.get("prompt_embeds_mask"), timestep=sigma,
                    img_shapes=[[(1, h // 2, w // 2)]] * b).sample
    pred = torch.zeros_like(xt)
    for i, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        pred[:, :, dy::2, dx::2] = out.view(b, h // 2, w // 2, -1, 4)[..., i].permute(0, 3, 1, 2)
    return ((pred - (eps - x0)) ** 2).mean().item()


@pytest.mark.parametrize("batch_size", [2, 4])
def test_first_loss_matches_an_independent_computation(batch_size):
    res = train_lora(tiny_qwen(), qwen_dataset(), batch_size=batch_size, **{**FAST, "steps": 1})
    expected = first_loss(tiny_qwen(), qwen_dataset(), batch_size=batch_size)
    assert res.loss["loss"][0] == pytest.approx(expected, rel=1e-4)


def test_packing_is_the_pipelines():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, CHANNELS, 6, 4)
    assert torch.equal(pack(x), QwenImagePipeline._pack_latents(x, 2, CHANNELS, 6, 4))
    assert torch.equal(unpack(pack(x), 6, 4), x)


def test_padding_is_neutral_and_a_dataset_without_mask_trains():
    """The mask keeps padding out: the same captions padded to more tokens give the same output. Without a
    mask column (ComfyUI's CONDITIONING: the caption's tokens only) every token counts."""
    model = tiny_qwen()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, CHANNELS, SIZE, SIZE, generator=g), torch.randn(1, 5, WIDTH, generator=g)
    family = get_family("qwenimage")
    longer = torch.cat([text, torch.randn(1, 3, WIDTH, generator=g)], 1)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3])
    with torch.no_grad():
        short = family.forward(model, x, torch.tensor([300.0]), {"prompt_embeds": text})
        padded = family.forward(model, x, torch.tensor([300.0]), {"prompt_embeds": longer, "prompt_embeds_mask": mask})
        # the transformer given all 8 tokens and the mask, as the pipeline would (forward cuts the padding)
        whole = unpack(model(hidden_states=pack(x), encoder_hidden_states=longer, encoder_hidden_states_mask=mask,
                             timestep=torch.tensor([0.3]), img_shapes=[[(1, SIZE // 2, SIZE // 2)]]).sample,
                       SIZE, SIZE)
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, whole, atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_qwen(), qwen_dataset(mask=False), **FAST)
    assert res.steps == 2 and all(math.isfinite(v) for v in res.loss["loss"])


def test_training_learns():
    """On a single row the loss of a fixed (noise, timestep) probe falls: the adapter learns the data."""
    res = train_lora(tiny_qwen(), qwen_dataset(rows=1), rank=8, alpha=8.0, learning_rate=0.01,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before = first_loss(tiny_qwen(), qwen_dataset(rows=1), batch_size=1)
    after = first_loss(res.model_with_lora, qwen_dataset(rows=1), batch_size=1)
    assert after < 0.95 * before, (before, after)


# ----------------------------------------------------------------------------- the file


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_qwen())).abs().max() > 1e-3
    got = denoiser_output(pipe.transformer)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    print("diffusers max relative difference", ((got - expected).abs().max() / expected.abs().max()).item())


def test_file_means_what_comfyui_computes(trained):
    """ComfyUI's Qwen-Image key map takes ``diffusion_model.<module>`` (its modules have diffusers' names):
    ``load_lora`` gives up @ down x alpha / rank, alpha from ``<key>.alpha``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora = load_file(str(trained.lora_path))
    deltas, used = {}, set()
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        x = key.removesuffix(".lora_A.weight")
        a, b = lora[key], lora[f"{x}.lora_B.weight"]
        deltas[x.removeprefix("diffusion_model.")] = lora[f"{x}.alpha"].item() / a.shape[0] * b @ a
        used |= {key, f"{x}.lora_B.weight", f"{x}.alpha"}
    assert set(lora) == used and all(k.startswith("diffusion_model.") for k in lora)
    layers = adapter_layers(trained.model_with_lora)
    assert set(deltas) == set(layers)
    for name, layer in layers.items():
        torch.testing.assert_close(deltas[name], layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    with safe_open(str(trained.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "qwen_image" and meta["trainer_family"] == "qwenimage"
    assert meta["ss_network_alpha"] == "3.0"


def test_existing_lora_reads_the_file_back_and_continues(trained, tmp_path):
    model = tiny_qwen()
    existing = read_existing_adapter(trained.lora_path, model, get_family("qwenimage"))
    assert existing.source_format == "trainer" and existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    for name, tensors in existing.modules.items():
        algorithm.import_layer(adapter_layers(model)[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora), atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_qwen(), qwen_dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path),
                     **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


@pytest.mark.parametrize("layout", ["auto", "comfyui"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_and_layout_reads_back(algorithm, layout, tmp_path):
    """tests/test_layouts.py's round trip for this family (its matrix lists the families of test_families)."""
    from safetensors.torch import save_file
    from test_layouts import write

    family, algo = get_family("qwenimage"), get_algorithm(algorithm)
    alpha = 1.0 if (algorithm, layout) == ("OFT", "comfyui") else 2.0
    model = tiny_qwen()
    attach_adapter(model, algo, rank=4, alpha=alpha, targets=list(family.default_targets), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    expected = denoiser_output(model)
    assert (expected - denoiser_output(tiny_qwen())).abs().max() > 1e-3
    state, metadata = write(model, family, algo, layout, alpha)
    if layout == "auto" and algorithm != "LoRA":  # LyCORIS tensors under kohya names, which ComfyUI maps
        assert all(k.startswith("lora_unet_") for k in state)
    save_file(state, str(tmp_path / "adapter.safetensors"), metadata)
    fresh = tiny_qwen()
    existing = read_existing_adapter(tmp_path / "adapter.safetensors", fresh, family)
    assert existing.algorithm == algorithm and set(existing.modules) == set(adapter_layers(model))
    attach_adapter(fresh, algo, seed=1, **existing.attach_arguments())
    for name, tensors in existing.modules.items():
        algo.import_layer(adapter_layers(fresh)[name], tensors)
    torch.testing.assert_close(denoiser_output(fresh), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- detection and loading


def test_detection_from_pipeline_and_bare_folders(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    for path, kind in ((tmp_path, "pipeline"), (tmp_path / "transformer", "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == "qwenimage" and loaded.kind == kind
        assert loaded.scheduler_config["use_dynamic_shifting"] and loaded.scheduler_config["max_shift"] == 0.9
        assert loaded.vae_scale_factor == 4  # 2 ** len(temperal_downsample) of the tiny VAE


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_is_detected_and_loads(prefix, tmp_path):
    """ComfyUI's diffusion-model file (qwen_image_bf16.safetensors: diffusers' names) or an all-in-one one;
    depth and widths come from the shapes (heads of 128, as Qwen-Image's rotary axes need)."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(in_channels=CHANNELS * 4, out_channels=CHANNELS, num_layers=1,
                                            attention_head_dim=128, num_attention_heads=1, joint_attention_dim=WIDTH)
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "q.safetensors"))
    loaded = load_model(str(tmp_path / "q.safetensors"))
    assert loaded.family.name == "qwenimage" and loaded.kind == "single_file"
    assert loaded.scheduler_config["max_image_seq_len"] == 8192
    assert {k: loaded.denoiser.config[k] for k in ("num_layers", "num_attention_heads", "in_channels")} == {
        "num_layers": 1, "num_attention_heads": 1, "in_channels": CHANNELS * 4}
    torch.testing.assert_close(denoiser_output(loaded.denoiser), denoiser_output(model))
    small = {k: v.contiguous() for k, v in tiny_qwen().state_dict().items()}  # heads of 16
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(TrainerError, match="heads of 16 .* needs --model_config"):
        load_model(str(tmp_path / "small.safetensors"))


# ----------------------------------------------------------------------------- lora-prepare


def tiny_text_encoder(folder):
    """Qwen2.5-VL from a tiny config, and a byte-level BPE tokenizer (no merges) written to ``folder``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    folder.mkdir(parents=True)
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = Qwen2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": WIDTH, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": 300, "bos_token_id": 256, "eos_token_id": 256,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": WIDTH},
        vocab_size=300, image_token_id=296, video_token_id=295, vision_start_token_id=297, vision_end_token_id=298,
        vision_token_id=299)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tokenizer, Qwen2_5_VLForConditionalGeneration(config).eval()


def test_prepare_with_the_familys_vae_and_text_encoder_then_train(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    from trainer.prepare import PrepareConfig, prepare

    tokenizer, encoder = tiny_text_encoder(tmp_path / "tokenizer-files")
    pipe = tiny_pipeline(text_encoder=encoder, tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path / "pipe")
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    (root / "a.txt").write_text("a red square")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "b.png")
    (root / "b.txt").write_text("a wide and much longer caption")
    result = prepare(PrepareConfig(images=str(root), model=str(tmp_path / "pipe"), output=str(tmp_path / "data"),
                                   resolution=32, bucket_step=8, batch_size=2))
    assert result.shapes == {(CHANNELS, 8, 8): 1, (CHANNELS, 6, 10): 1}  # the VAE's 4x, [C, H, W] rows
    ds = datasets.load_from_disk(str(tmp_path / "data")).with_format("numpy")
    row = ds[list(ds[:]["file_name"]).index("a.png")]
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(image[:, :, None]).latent_dist.mean[:, :, 0]
        embeds, _ = pipe.encode_prompt(["a red square"], device="cpu")
    expected = (z[0] - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    torch.testing.assert_close(torch.from_numpy(row["latents"]), expected, atol=1e-5, rtol=1e-5)
    length = embeds.shape[1]
    assert row["prompt_embeds"].shape == (TEXT_TOKENS, WIDTH) and row["prompt_embeds_mask"].shape == (TEXT_TOKENS,)
    assert row["prompt_embeds_mask"][:length].all() and not row["prompt_embeds_mask"][length:].any()
    torch.testing.assert_close(torch.from_numpy(row["prompt_embeds"][:length]), embeds[0], atol=1e-5, rtol=1e-5)
    assert not row["prompt_embeds"][length:].any()
    res = train_lora(str(tmp_path / "pipe"), str(tmp_path / "data"), batch_size=1, **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])


def test_comfyui_latent_with_a_frame_axis_is_normalised_per_channel():
    from trainer.comfy_inputs import latents_dataset
    from trainer.models.qwenimage import LATENTS_MEAN, LATENTS_STD

    raw = torch.randn(2, 16, 1, 4, 6)
    ds = latents_dataset({"samples": raw}, "qwenimage")
    got = torch.from_numpy(ds[:]["latents"])
    mean, std = torch.tensor(LATENTS_MEAN).view(-1, 1, 1), torch.tensor(LATENTS_STD).view(-1, 1, 1)
    torch.testing.assert_close(got, (raw[:, :, 0] - mean) / std)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dataset, message", [
    (lambda: qwen_dataset(size=15), "2x2 patches"),
    (lambda: qwen_dataset().rename_column("prompt_embeds", "x").add_column(
        "prompt_embeds", [[[0.0] * 16] * TOKENS] * 8), "prompt_embeds have 16 features"),
    (lambda: qwen_dataset().remove_columns("prompt_embeds_mask").add_column(
        "prompt_embeds_mask", [[1.0] * 3] * 8), r"prompt_embeds_mask rows are \[3\]"),
])
def test_bad_input_names_the_problem(dataset, message):
    with pytest.raises(TrainerError, match=message):
        train_lora(tiny_qwen(), dataset(), **FAST)


def test_samples_with_its_own_pipeline(tmp_path):
    """--sample_prompts: QwenImagePipeline from the folder, fed the encoded prompts and masks."""
    import numpy as np
    from PIL import Image

    tokenizer, encoder = tiny_text_encoder(tmp_path / "tokenizer-files")
    tiny_pipeline(text_encoder=encoder, tokenizer=tokenizer).save_pretrained(tmp_path / "pipe")
    train_lora(str(tmp_path / "pipe"), qwen_dataset(), output_dir=str(tmp_path / "out"), steps=1, log_every=1,
               sample_prompts=["a cat", "a dog --n ugly"], sample_steps=2, sample_size="32x32", training_dtype="fp32")
    for step in ("step-00000000", "step-00000001"):
        for k in (0, 1):
            image = np.asarray(Image.open(tmp_path / "out" / "samples" / step / f"{k}.png"))
            assert image.shape == (32, 32, 3) and image.std() > 1


def test_node_targets_write_offsets_under_comfyuis_names_and_read_back(tmp_path):
    """--target_modules node: the full offsets (biases, norms) go under diffusion_model.<module>.diff/diff_b,
    next to the LoRA tensors, and --existing_lora reads them back."""
    res = train_lora(tiny_qwen(), qwen_dataset(), target_modules="node", output_dir=str(tmp_path), **FAST)
    keys = list(res.lora)
    assert all(k.startswith("diffusion_model.") for k in keys)
    offsets = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".diff", ".diff_b"))}
    assert offsets
    existing = read_existing_adapter(res.lora_path, tiny_qwen(), get_family("qwenimage"))
    assert {f"diffusion_model.{m}" for m in existing.deltas} == offsets
