"""Model families SDXL, SD3/3.5 and Flux.1: tiny models built from configs (diffusers' own test sizes).

For each family: training runs and the adapter learns; the first loss equals an independent
computation of the family's objective (noising, target, timestep sampling, shift, packing, time ids,
loss weights) written out here; the saved file, loaded by diffusers' own pipeline loader, gives the
same denoiser output as ``model_with_lora``; the file means the same under ComfyUI's key rules (as
read in ``comfy/lora.py``: ``<key>.lora_A/B.weight`` with scale ``alpha / rank`` from a ``<key>.alpha``
tensor, else 1); ``--existing_lora`` reads it back; the family is detected from a pipeline folder, a
bare folder and a single-file checkpoint.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.models.flux import pack, unpack
from trainer.objectives import noise_fraction

SIZE, TOKENS = 16, 8  # latent side, text tokens

# ----------------------------------------------------------------------------- tiny models


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_sdxl():
    from diffusers import UNet2DConditionModel

    return _seeded(lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=SIZE, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4))


def tiny_flux(guidance_embeds=True):
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds))


#: family -> (tiny model builder, prompt_embeds width, pooled width)
FAMILIES = {"sdxl": (tiny_sdxl, 64, 32), "sd3": (tiny_sd3, 32, 64), "flux": (tiny_flux, 32, 32)}


def family_dataset(family, rows=8, seed=0, size=SIZE, extra=None):
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    _, dim, pooled = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, 4, size, size, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, dim, generator=g),
               "pooled_prompt_embeds": torch.randn(rows, pooled, generator=g), **(extra or {})}
    features = {"latents": Array3D((4, size, size), "float32"), "prompt_embeds": Array2D((TOKENS, dim), "float32"),
                "pooled_prompt_embeds": Sequence(Value("float32"), length=pooled)}
    features.update({name: Sequence(Value("float32"), length=2) for name in (extra or {})})
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def scheduler_for(family):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sdxl":
        return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def tiny_pipeline(family, denoiser=None):
    """The family's diffusers pipeline around a tiny denoiser (a tiny VAE, no text encoders)."""
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    denoiser = denoiser or FAMILIES[family][0]()
    vae = _seeded(lambda: AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                        norm_num_groups=8))
    scheduler = scheduler_for(family)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=denoiser, scheduler=scheduler)
    if family == "sd3":
        return StableDiffusion3Pipeline(transformer=denoiser, scheduler=scheduler, vae=vae, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=denoiser)


def denoiser_output(family, model, seed=1):
    """The denoiser's raw output on fixed inputs (what a LoRA must change identically everywhere)."""
    from trainer.models.flux import image_ids

    g = torch.Generator().manual_seed(seed)
    _, dim, pooled = FAMILIES[family]
    x = torch.randn(2, 4, SIZE, SIZE, generator=g)
    text, vector = torch.randn(2, TOKENS, dim, generator=g), torch.randn(2, pooled, generator=g)
    with torch.no_grad():
        if family == "sdxl":
            added = {"text_embeds": vector, "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
            return model(x, torch.tensor([10, 700]), text, added_cond_kwargs=added).sample
        if family == "sd3":
            return model(hidden_states=x, timestep=torch.tensor([10.0, 700.0]), encoder_hidden_states=text,
                         pooled_projections=vector).sample
        return model(hidden_states=pack(x), timestep=torch.tensor([0.01, 0.7]), encoder_hidden_states=text,
                     pooled_projections=vector, img_ids=image_ids(SIZE // 2, SIZE // 2),
                     txt_ids=torch.zeros(TOKENS, 3), guidance=torch.ones(2)).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained adapter per family (rank 4, alpha 3: scale 0.75), its file and its in-memory model."""
    results = {}

    def get(family):
        if family not in results:
            out = tmp_path_factory.mktemp(family)
            results[family] = train_lora(FAMILIES[family][0](), family_dataset(family), rank=4, alpha=3.0,
                                         learning_rate=0.02, output_dir=str(out), **{**FAST, "steps": 3})
        return results[family]

    return get


# ----------------------------------------------------------------------------- training and files


@pytest.mark.parametrize("family", FAMILIES)
def test_training_learns(family):
    """On a single row the loss of a fixed (noise, timestep) probe falls: the adapter learns the data."""
    res = train_lora(FAMILIES[family][0](), family_dataset(family, rows=1), rank=8, alpha=8.0, learning_rate=0.01,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before = first_loss(family, FAMILIES[family][0](), rows=1)
    after = first_loss(family, res.model_with_lora, rows=1)
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_file_loads_in_diffusers_with_the_same_effect(trained, family):
    res = trained(family)
    pipe = tiny_pipeline(family)
    pipe.load_lora_weights(str(res.lora_path))
    loaded = pipe.unet if family == "sdxl" else pipe.transformer
    expected = denoiser_output(family, res.model_with_lora)
    assert (expected - denoiser_output(family, FAMILIES[family][0]())).abs().max() > 1e-3
    torch.testing.assert_close(denoiser_output(family, loaded), expected, atol=1e-5, rtol=1e-5)


def comfyui_deltas(family, lora):
    """module path -> weight delta, by ComfyUI's rule for this family's keys (``load_lora`` in
    comfy/lora.py: up @ down times alpha / rank, alpha from ``<key>.alpha`` only, else 1)."""
    if family == "sdxl":
        prefix, down, up = "lora_unet_", "lora_down.weight", "lora_up.weight"
    else:
        prefix, down, up = "transformer.", "lora_A.weight", "lora_B.weight"
    deltas, used = {}, set()
    for key in [k for k in lora if k.endswith("." + down)]:
        x = key[: -len(down) - 1]
        a, b = lora[key].float(), lora[f"{x}.{up}"].float()
        alpha = lora.get(f"{x}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / a.shape[0]
        deltas[x[len(prefix):]] = scale * b.flatten(1) @ a.flatten(1)  # a conv's [out, in * kh * kw]
        used |= {key, f"{x}.{up}", f"{x}.alpha"}
    assert set(lora) <= used, set(lora) - used  # ComfyUI would warn "lora key not loaded" for the rest
    return deltas


@pytest.mark.parametrize("family", FAMILIES)
def test_file_means_what_comfyui_computes(trained, family):
    from safetensors.torch import load_file

    res = trained(family)
    lora = load_file(str(res.lora_path))
    deltas = comfyui_deltas(family, lora)
    layers = adapter_layers(res.model_with_lora)
    if family == "sdxl":  # kohya names: "." -> "_" in the module path; LDM names for the added embedding
        from trainer.models.sdxl import ADDED_EMBEDDING_LDM_NAMES

        layers = {ADDED_EMBEDDING_LDM_NAMES.get(name, name).replace(".", "_"): layer
                  for name, layer in layers.items()}
    assert set(deltas) == set(layers)
    for name, layer in layers.items():
        torch.testing.assert_close(deltas[name], layer.get_delta_weight("default").flatten(1), atol=1e-6,
                                   rtol=1e-5)


def test_file_layouts_and_metadata(trained):
    from safetensors import safe_open

    expected = {"sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
    for family, version in expected.items():
        with safe_open(str(trained(family).lora_path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["ss_base_model_version"] == version and meta["trainer_family"] == family
        if family == "sdxl":
            assert all(k.startswith("lora_unet_") for k in keys) and meta["ss_network_alpha"] == "3.0"
        elif family == "sd3":  # alpha / rank folded into lora_B; the file's alpha is its rank
            assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
            assert meta["ss_network_alpha"] == "4.0"
        else:
            alphas = [k for k in keys if k.endswith(".alpha")]
            assert alphas and len(alphas) * 3 == len(keys) and meta["ss_network_alpha"] == "3.0"


@pytest.mark.parametrize("family", FAMILIES)
def test_existing_lora_reads_our_file_back(trained, family):
    res = trained(family)
    model = FAMILIES[family][0]()
    existing = read_existing_adapter(res.lora_path, model, get_family(family))
    assert existing.source_format == "trainer" and existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(family, model), denoiser_output(family, res.model_with_lora),
                               atol=1e-5, rtol=1e-5)


def test_continuing_a_flux_file_counts_its_steps(trained, tmp_path):
    res = train_lora(tiny_flux(), family_dataset("flux"), existing_lora=str(trained("flux").lora_path),
                     output_dir=str(tmp_path), **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr"])
def test_lycoris_algorithms_use_comfyui_transformer_names(algorithm):
    res = train_lora(tiny_sd3(), family_dataset("sd3"), algorithm=algorithm, rank=4, **FAST)
    modules = {name.replace(".", "_") for name in adapter_layers(res.model_with_lora)}
    assert len(modules) == 33  # every Linear/Conv layer of the tiny SD3, the embedders and conv included
    assert {k.split(".")[0] for k in res.lora} == {"lora_transformer_" + m for m in modules}


# ----------------------------------------------------------------------------- objectives, checked independently


def first_batch(family, dataset, model, seed=0, batch_size=2, step=0):
    """The batch of ``step`` as the data pipeline draws it (rows, per-sample noise and uniform draw)."""
    data = TrainingData(dataset, None, get_family(family), model)
    sampler = StepBatchSampler(data.num_rows, batch_size, 1, 1, seed, step, step + 1)
    return LatentBatches(data, seed).__getitems__(next(iter(sampler)))


def reference_pack(x):
    """[B, C, H, W] -> [B, tokens, C*4] written from Flux's definition: token (r, c) holds the 2x2 patch at
    rows 2r..2r+1, columns 2c..2c+1, features ordered (channel, dy, dx)."""
    b, c, h, w = x.shape
    patches = torch.stack([x[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=2)  # B, C, 4, H/2, W/2
    return patches.permute(0, 3, 4, 1, 2).reshape(b, (h // 2) * (w // 2), c * 4)


def reference_sigmas(u, sampling, shift, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    if sampling == "logit_normal":
        s = torch.sigmoid(torch.distributions.Normal(logit_mean, logit_std).icdf(u))
    elif sampling == "mode":
        s = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        s = u
    s = s.clamp(1e-3, 1.0)
    return shift * s / (1 + (shift - 1) * s)


def first_loss(family, model, rows=8, step=0, dataset=None, loss_weighting="none", objective="native",
               timestep_sampling="auto", prediction_type="epsilon", vae_scale_factor=8, min_snr_gamma=5.0):
    """The loss of one batch, computed from the papers' formulas rather than the trainer's objective code."""
    dataset = dataset if dataset is not None else family_dataset(family, rows=rows)
    batch = first_batch(family, dataset, model, batch_size=min(rows, 2), step=step)
    x0, eps, u = batch["latents"], batch["noise"], batch["u"]
    text, vector = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    b = x0.shape[0]
    weights = torch.ones(b)
    if family == "sdxl":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0).float()
        t = (u * 1000).long()
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        px = SIZE * vae_scale_factor
        ids = torch.tensor([[px, px, 0.0, 0.0, px, px]] * b)
        for i, name in enumerate(("original_size", "crop_coords", "target_size")):
            if name in batch:
                ids[:, 2 * i:2 * i + 2] = batch[name]
        with torch.no_grad():
            out = model(xt, t, text, added_cond_kwargs={"text_embeds": vector, "time_ids": ids}).sample
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        pred, target = out, (eps if prediction_type == "epsilon" else v)
        snr = abar[t] / (1 - abar[t])
        if loss_weighting == "min_snr":
            weights = snr.clamp(max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    else:
        sampling = "logit_normal" if timestep_sampling == "auto" else timestep_sampling
        if family == "sd3":
            shift = 3.0
        else:  # FLUX.1 dev's dynamic shift: mu linear in the token count, shift factor e^mu
            tokens = (SIZE // 2) ** 2
            shift = math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))
        sigma = reference_sigmas(u, sampling, shift)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        with torch.no_grad():
            if family == "sd3":
                out = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text,
                            pooled_projections=vector).sample
            else:
                ids = torch.tensor([[0.0, r, c] for r in range(SIZE // 2) for c in range(SIZE // 2)])
                tokens = model(hidden_states=reference_pack(xt), timestep=sigma, encoder_hidden_states=text,
                               pooled_projections=vector, img_ids=ids, txt_ids=torch.zeros(TOKENS, 3),
                               guidance=torch.ones(b)).sample
                out = torch.zeros_like(xt)
                for i, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                    out[:, :, dy::2, dx::2] = tokens.view(b, SIZE // 2, SIZE // 2, 4, 4)[..., i].permute(0, 3, 1, 2)
        pred, target = (xt - s * out, x0) if objective == "x0" else (out, eps - x0)
        if loss_weighting == "sigma_sqrt":
            weights = sigma**-2
        elif loss_weighting == "cosmap":
            weights = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if objective == "x0" and family == "sdxl":
        pred, target = (xt - (1 - a).sqrt() * out) / a.sqrt(), x0
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    return (per_sample * weights).mean().item()


@pytest.mark.parametrize("family, options", [
    ("sdxl", {}),
    ("sdxl", {"prediction_type": "v_prediction", "loss_weighting": "min_snr"}),
    ("sdxl", {"objective": "x0"}),
    ("sd3", {}),
    ("sd3", {"objective": "x0", "loss_weighting": "cosmap"}),
    ("sd3", {"timestep_sampling": "mode"}),
    ("flux", {}),
    ("flux", {"timestep_sampling": "uniform", "loss_weighting": "sigma_sqrt"}),
    ("flux", {"objective": "x0"}),
])
def test_first_loss_matches_an_independent_computation(family, options):
    res = train_lora(FAMILIES[family][0](), family_dataset(family), batch_size=2, **{**FAST, "steps": 1}, **options)
    assert res.loss["loss"][0] == pytest.approx(first_loss(family, FAMILIES[family][0](), **options), rel=1e-4)


def test_sdxl_time_ids_from_columns_and_from_the_vae(tmp_path):
    """Columns win over derived time ids; derived ones use the pipeline VAE's scale factor (2 here)."""
    sizes = {"original_size": torch.tensor([[512.0, 768.0]] * 8), "crop_coords": torch.tensor([[16.0, 32.0]] * 8)}
    dataset = family_dataset("sdxl", extra=sizes)
    res = train_lora(tiny_sdxl(), dataset, batch_size=2, **{**FAST, "steps": 1})
    assert res.loss["loss"][0] == pytest.approx(first_loss("sdxl", tiny_sdxl(), dataset=dataset), rel=1e-4)
    assert res.loss["loss"][0] != pytest.approx(first_loss("sdxl", tiny_sdxl()), rel=1e-4)  # the columns matter
    tiny_pipeline("sdxl").save_pretrained(tmp_path / "pipe")
    res = train_lora(str(tmp_path / "pipe"), family_dataset("sdxl"), batch_size=2, **{**FAST, "steps": 1})
    assert res.loss["loss"][0] == pytest.approx(first_loss("sdxl", tiny_sdxl(), vae_scale_factor=2), rel=1e-4)


@pytest.mark.unit
def test_packing_and_sampling_match_their_definitions():
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(pack(x), reference_pack(x)) and torch.equal(unpack(pack(x), 6, 4), x)
    u = torch.linspace(0.01, 0.99, 99)
    expected = torch.sigmoid(torch.distributions.Normal(0.5, 0.8).icdf(u))
    torch.testing.assert_close(noise_fraction(u, "logit_normal", 0.5, 0.8, 0.0), expected)
    mode = noise_fraction(u, "mode", 0.0, 1.0, 1.29)
    assert mode.min() >= 0 and mode.max() <= 1 and torch.all(mode[1:] < mode[:-1])  # a density on [0, 1]
    assert torch.allclose(noise_fraction(u, "mode", 0.0, 1.0, 0.0), 1 - u)  # scale 0: uniform


def test_scheduler_shift_comes_from_the_pipeline(tmp_path):
    """A pipeline folder's scheduler config (here shift 1.0 instead of SD3's 3.0) sets the noise levels."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline("sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.save_pretrained(tmp_path / "pipe")
    res = train_lora(str(tmp_path / "pipe"), family_dataset("sd3"), batch_size=2, **{**FAST, "steps": 1})
    batch = first_batch("sd3", family_dataset("sd3"), tiny_sd3())
    sigma = reference_sigmas(batch["u"], "logit_normal", 1.0).view(-1, 1, 1, 1)
    xt = (1 - sigma) * batch["latents"] + sigma * batch["noise"]
    with torch.no_grad():
        out = tiny_sd3()(hidden_states=xt, timestep=sigma.flatten() * 1000,
                         encoder_hidden_states=batch["prompt_embeds"],
                         pooled_projections=batch["pooled_prompt_embeds"]).sample
    assert res.loss["loss"][0] == pytest.approx(F.mse_loss(out, batch["noise"] - batch["latents"]).item(), rel=1e-4)


@pytest.mark.unit
def test_weighted_loss_keeps_accumulation_equal_to_a_bigger_batch():
    """Per-sample weights are averaged per sample, so a global batch split into micro-batches (or
    processes) gives the same update as one batch."""
    def vector(res):
        return torch.cat([t.flatten() for _, t in sorted(res.lora.items())])

    common = dict(optimizer="SGD", learning_rate=0.05, loss_weighting="cosmap", **FAST)
    a = train_lora(tiny_sd3(), family_dataset("sd3"), batch_size=2, grad_accumulation_steps=1, **common)
    b = train_lora(tiny_sd3(), family_dataset("sd3"), batch_size=1, grad_accumulation_steps=2, **common)
    torch.testing.assert_close(vector(a), vector(b), atol=1e-6, rtol=1e-5)
    assert a.loss["loss"] == pytest.approx(b.loss["loss"], rel=1e-5)


def test_flux_without_guidance_embedding_trains():
    res = train_lora(tiny_flux(guidance_embeds=False), family_dataset("flux"), **FAST)
    assert res.steps == 2 and all(math.isfinite(v) for v in res.loss["loss"])


# ----------------------------------------------------------------------------- detection and loading


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_from_pipeline_and_bare_folders(family, tmp_path):
    tiny_pipeline(family).save_pretrained(tmp_path)
    subfolder = "unet" if family == "sdxl" else "transformer"
    for path, kind in ((tmp_path, "pipeline"), (tmp_path / subfolder, "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == family and loaded.kind == kind
        assert loaded.scheduler_config["_class_name"] == type(scheduler_for(family)).__name__
        assert loaded.vae_scale_factor == 2


def sd3_original_state_dict(model):
    """An SD3 transformer's weights under the original (SAI) checkpoint names, written from the layout
    diffusers' single-file converter reads: fused qkv, (shift, scale) order in the final modulations."""
    sd, last = model.state_dict(), model.config.num_layers - 1
    renames = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    block = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
    fused = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}

    def swap(t):
        first, second = t.chunk(2)
        return torch.cat([second, first])

    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for p in ("weight", "bias"):
        out.update({f"{old}.{p}": sd[f"{new}.{p}"] for new, old in renames.items()})
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
        for i in range(last + 1):
            for new, old in block.items():
                if f"transformer_blocks.{i}.{new}.{p}" in sd:
                    value = sd[f"transformer_blocks.{i}.{new}.{p}"]
                    out[f"joint_blocks.{i}.{old}.{p}"] = swap(value) if i == last and "context" in new else value
            for old, names in fused.items():
                out[f"joint_blocks.{i}.{old}.{p}"] = torch.cat([sd[f"transformer_blocks.{i}.{n}.{p}"]
                                                                for n in names])
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_single_file_checkpoint_is_detected_and_loads(family, tmp_path):
    from ldm import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    from trainer.models.loading import checkpoint_family

    model = FAMILIES[family][0]()
    state = diffusers_to_ldm_state_dict(model) if family == "sdxl" else sd3_original_state_dict(model)
    assert checkpoint_family(state).name == family
    save_file(state, str(tmp_path / "model.safetensors"))
    tiny_pipeline(family).save_pretrained(tmp_path / "pipe")
    loaded = load_model(str(tmp_path / "model.safetensors"), model_config=str(tmp_path / "pipe"))
    assert loaded.family.name == family and loaded.kind == "single_file"
    torch.testing.assert_close(denoiser_output(family, loaded.denoiser), denoiser_output(family, model))


def test_incomplete_flux_single_file_is_refused_in_one_line(tmp_path):
    """A file recognised as Flux from BFL's key names but missing the tensors its config is read from."""
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(TrainerError, match=r"looks like a flux checkpoint but has no tensor 'img_in.weight'"):
        load_model(str(tmp_path / "flux.safetensors"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("family, dataset, options, message", [
    ("flux", lambda: family_dataset("flux", size=15), {}, "2x2 patches"),
    ("sdxl", lambda: family_dataset("sd3"), {}, "prompt_embeds have 32 features"),
    ("sd3", lambda: family_dataset("sd3"), {"loss_weighting": "min_snr"}, "--loss_weighting min_snr"),
    ("sdxl", lambda: family_dataset("sdxl"), {"loss_weighting": "cosmap"}, "--loss_weighting cosmap"),
])
def test_bad_input_names_the_problem(family, dataset, options, message):
    with pytest.raises(TrainerError, match=message):
        train_lora(FAMILIES[family][0](), dataset(), **{**FAST, **options})
