"""Wan 2.1 / 2.2 text-to-video: detection, training on 5-D latents, the diffusers round trip, the
file layout ComfyUI reads, continuing our own file, the scheduler's flow_shift and Wan 2.2's experts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FAST, block_calls_in_one_step

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.objectives import ObjectiveOptions

CHANNELS, FRAMES, SIZE, TOKENS, TEXT_DIM = 4, 3, 8, 8, 16


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_wan(**overrides):
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=CHANNELS,
                  out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
                  rope_max_seq_len=32)
    return _seeded(lambda: WanTransformer3DModel(**{**config, **overrides}))


def tiny_vae():
    from diffusers import AutoencoderKLWan

    return _seeded(lambda: AutoencoderKLWan(base_dim=8, z_dim=CHANNELS, dim_mult=[1, 1], num_res_blocks=1,
                                            temperal_downsample=[False], latents_mean=[0.0] * CHANNELS,
                                            latents_std=[1.0] * CHANNELS))


def tiny_pipeline(transformer=None, transformer_2=None, boundary_ratio=None, flow_shift=3.0):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=scheduler,
                       transformer=transformer or tiny_wan(), transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio)


def wan_dataset(rows=8, seed=0, frames=FRAMES):
    from datasets import Array2D, Array4D, Dataset, Features

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows, CHANNELS, frames, SIZE, SIZE, generator=g)
    embeds = torch.randn(rows, TOKENS, TEXT_DIM, generator=g)
    features = Features({"latents": Array4D((CHANNELS, frames, SIZE, SIZE), "float32"),
                         "prompt_embeds": Array2D((TOKENS, TEXT_DIM), "float32")})
    return Dataset.from_dict({"latents": list(latents.numpy()), "prompt_embeds": list(embeds.numpy())},
                             features=features)


def denoiser_output(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, FRAMES, SIZE, SIZE, generator=g)
    text = torch.randn(2, TOKENS, TEXT_DIM, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([10.0, 700.0]), encoder_hidden_states=text).sample


def probe_loss(model, dataset):
    """Flow-matching loss on fixed noise at fixed noise levels (independent of the trainer's draws)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.as_tensor(dataset.with_format("numpy")["latents"][:1])
    text = torch.as_tensor(dataset.with_format("numpy")["prompt_embeds"][:1])
    total = 0.0
    with torch.no_grad():
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(x0.shape, generator=g)
            noisy = (1 - sigma) * x0 + sigma * noise
            pred = model(hidden_states=noisy, timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=text).sample
            total += torch.nn.functional.mse_loss(pred, noise - x0).item()
    return total


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan")
    return train_lora(tiny_wan(), wan_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      batch_size=2, **{**FAST, "steps": 3})


def test_training_lowers_the_loss():
    data = wan_dataset(rows=1)
    res = train_lora(tiny_wan(), data, rank=8, alpha=8.0, learning_rate=0.01, **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = probe_loss(tiny_wan(), data), probe_loss(res.model_with_lora, data)
    assert after < 0.95 * before, (before, after)


def test_gradient_checkpointing_is_on_by_default_and_recomputes_every_block():
    """Issue 18: video activations are large, so checkpointing is the default; the diffusers model's own
    checkpointing engages in the trainer's loop (each block's forward runs again in backward)."""
    assert TrainConfig().gradient_checkpointing is True
    model = tiny_wan()
    assert block_calls_in_one_step(model, list(model.blocks), wan_dataset(rows=1)) == [2, 2]
    assert model.is_gradient_checkpointing
    model = tiny_wan()
    assert block_calls_in_one_step(model, list(model.blocks), wan_dataset(rows=1),
                                   gradient_checkpointing=False) == [1, 1]


def test_default_targets_are_every_linear(trained):
    model = tiny_wan()
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(adapter_layers(trained.model_with_lora)) == linears


def test_file_uses_wan_names_and_loads_in_diffusers_with_the_same_effect(trained):
    from safetensors.torch import load_file

    tensors = load_file(str(trained.lora_path))
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in tensors
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in tensors
    assert tensors["diffusion_model.blocks.0.cross_attn.o.alpha"].item() == 3.0
    assert "diffusion_model.head.head.lora_A.weight" in tensors and "diffusion_model.head.head.alpha" not in tensors
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_wan())).abs().max() > 1e-3
    torch.testing.assert_close(denoiser_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


def test_comfyui_rule_gives_the_same_deltas(trained):
    """ComfyUI's rule for ``<key>.lora_A/B.weight`` + ``<key>.alpha`` (comfy/lora.py, weight_adapter/lora.py):
    delta = up @ down * alpha / rank, alpha absent = scale 1; compared with the trained layers' deltas."""
    from safetensors.torch import load_file

    from trainer.models.wan import original_name

    tensors = load_file(str(trained.lora_path))
    layers = adapter_layers(trained.model_with_lora)
    for module, layer in layers.items():
        key = f"diffusion_model.{original_name(module)}"
        down, up = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        alpha = tensors.get(f"{key}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        ours = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(up @ down * scale, ours.detach(), atol=1e-6, rtol=1e-5)


def test_non_block_modules_fold_alpha_and_load_in_diffusers(tmp_path):
    res = train_lora(tiny_wan(), wan_dataset(), rank=4, alpha=2.0, learning_rate=0.02, output_dir=str(tmp_path),
                     target_modules="proj_out,condition_embedder.time_proj,attn1.to_q", batch_size=2, **FAST)
    from safetensors.torch import load_file

    tensors = load_file(str(res.lora_path))
    assert "diffusion_model.head.head.lora_B.weight" in tensors and "diffusion_model.head.head.alpha" not in tensors
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(res.lora_path))
    torch.testing.assert_close(denoiser_output(pipe.transformer), denoiser_output(res.model_with_lora),
                               atol=1e-5, rtol=1e-5)


def test_existing_lora_reads_our_file_back_and_continues(trained, tmp_path):
    model = tiny_wan()
    existing = read_existing_adapter(trained.lora_path, model, get_family("wan"))
    assert existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora), atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_wan(), wan_dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path),
                     batch_size=2, **FAST)
    assert res.steps == 5


def test_detection_flow_shift_and_expert_ranges(tmp_path):
    from trainer.models.wan import ExpertFlowMatch

    tiny_pipeline(flow_shift=5.0).save_pretrained(tmp_path / "wan21")
    for path, kind in ((tmp_path / "wan21", "pipeline"), (tmp_path / "wan21" / "transformer", "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == "wan" and loaded.kind == kind
        objective = loaded.family.make_objective(loaded, ObjectiveOptions())
        assert objective.shift.shift == 5.0 and not isinstance(objective, ExpertFlowMatch)
    tiny_pipeline(transformer_2=tiny_wan(), boundary_ratio=0.875).save_pretrained(tmp_path / "wan22")
    u = torch.linspace(0, 0.999, 101)
    latents = torch.zeros(101, CHANNELS, FRAMES, SIZE, SIZE)
    for path, (low, high) in ((tmp_path / "wan22", (0.875, 1.0)), (tmp_path / "wan22" / "transformer", (0.875, 1.0)),
                              (tmp_path / "wan22" / "transformer_2", (0.0, 0.875))):
        loaded = load_model(str(path))
        t = loaded.family.make_objective(loaded, ObjectiveOptions(timestep_sampling="uniform")).timesteps(u, latents)
        assert t.min() >= low * 1000 - 1e-3 and t.max() <= high * 1000 + 1e-3
        assert t.max() - t.min() > 0.9 * (high - low) * 1000  # the whole range is used
    res = train_lora(str(tmp_path / "wan22" / "transformer_2"), wan_dataset(), batch_size=2, **FAST)
    assert res.steps == 2


def test_image_to_video_models_are_refused():
    with pytest.raises(TrainerError, match="image-to-video"):
        train_lora(tiny_wan(image_dim=16, added_kv_proj_dim=16), wan_dataset(), **FAST)


def test_sampling_a_bare_model_object_is_refused_up_front():
    # video sampling itself is tested in test_watch_video.py; a model object has no VAE or text encoder
    with pytest.raises(TrainerError, match=r"^--sample_prompts: sampling needs a diffusers pipeline folder .* is a "
                                           r"model object, not a pipeline$"):
        train_lora(tiny_wan(), wan_dataset(), sample_prompts=["a cat"], **FAST)


def test_comfyui_video_latent_is_normalised_per_channel():
    """A ComfyUI LATENT [N, C, T, H, W] of raw Wan VAE latents becomes (z - latents_mean) / latents_std, as
    ComfyUI's Wan21 latent format and WanPipeline compute it."""
    import inspect

    from diffusers import AutoencoderKLWan

    from trainer.comfy_inputs import latents_dataset

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    mean = torch.tensor(params["latents_mean"].default).view(1, -1, 1, 1, 1)
    std = torch.tensor(params["latents_std"].default).view(1, -1, 1, 1, 1)
    raw = torch.randn(2, 16, FRAMES, SIZE, SIZE) * 2 + 1
    got = torch.as_tensor(np.asarray(latents_dataset({"samples": raw}, "wan")["latents"]))
    torch.testing.assert_close(got, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    with pytest.raises(TrainerError, match=r"LATENT samples must be \[N, C, T, H, W\] for wan"):
        latents_dataset({"samples": torch.randn(2, 16, SIZE, SIZE)}, "wan")
    res = train_lora(tiny_wan(in_channels=16, out_channels=16), {"samples": raw},
                     [[torch.randn(1, TOKENS, TEXT_DIM), {}]], batch_size=2, **FAST)
    assert res.steps == 2
