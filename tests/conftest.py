"""Shared fixtures: tiny SD-style models and latent datasets built offline from fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trainer.demo import DEMO_UNET_CONFIG, build_demo_model


@pytest.hookimpl(tryfirst=True)  # before -m selects: "-m e2e" sees the markers set here
def pytest_collection_modifyitems(config, items):
    """Two tiers in one run: the unit tier (tests marked ``unit``: pure functions, seconds) first, so a
    broken config parser or layout fails before any training run starts; then the end-to-end tier
    (every other test, marked ``e2e`` here). Within a tier the files keep their order."""
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.e2e)
    items.sort(key=lambda item: item.get_closest_marker("unit") is None)


#: fast defaults for library calls in tests: fp32, so results compare tightly
FAST = dict(steps=2, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, log_every=1)


def make_dataset(rows: int = 8, seed: int = 0, channels: int = 4, size: int = 16, tokens: int = 8,
                 dim: int = DEMO_UNET_CONFIG["cross_attention_dim"], with_embeds: bool = True,
                 fixed_shape: bool = True):
    """A latents dataset in the SPEC schema with random values."""
    from datasets import Array2D, Array3D, Dataset, Features

    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, channels, size, size, generator=g).numpy()}
    if with_embeds:
        columns["prompt_embeds"] = torch.randn(rows, tokens, dim, generator=g).numpy()
    if not fixed_shape:
        return Dataset.from_dict({k: v.tolist() for k, v in columns.items()})
    features = {"latents": Array3D((channels, size, size), "float32")}
    if with_embeds:
        features["prompt_embeds"] = Array2D((tokens, dim), "float32")
    return Dataset.from_dict({k: list(v) for k, v in columns.items()}, features=Features(features))


def make_pipeline(unet=None, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline around a tiny UNet (a tiny VAE, no text encoder: latents come precomputed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet or build_demo_model(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def unet_inputs(batch: int = 2, seed: int = 0, size: int = 16):
    """Fixed (sample, timestep, encoder_hidden_states) for comparing UNet outputs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 500, 900, 250][:batch]),
            torch.randn(batch, 8, DEMO_UNET_CONFIG["cross_attention_dim"], generator=g))


@pytest.fixture
def dataset():
    return make_dataset()


@pytest.fixture
def pipeline_dir(tmp_path):
    path = tmp_path / "pipeline"
    make_pipeline().save_pretrained(path)
    return path


def block_calls_in_one_step(model, blocks, dataset, **params) -> list[int]:
    """How many times each module of ``blocks`` runs its forward in one training step of ``model`` on
    ``dataset`` (``FAST`` but with the trainer's default ``gradient_checkpointing`` unless ``params`` sets
    it): 1 without gradient checkpointing, 2 with it (the forward, then its recomputation in backward).
    Counted as the forward starts: torch stops a recomputation early, once it has the tensors backward needs."""
    from trainer import train_lora

    calls = [0] * len(blocks)

    def counter(i):
        def hook(module, args):
            calls[i] += 1
        return hook

    handles = [block.register_forward_pre_hook(counter(i)) for i, block in enumerate(blocks)]
    try:
        fast = {k: v for k, v in FAST.items() if k != "gradient_checkpointing"}
        res = train_lora(model, dataset, write_outputs=False, **{**fast, "steps": 1, **params})
    finally:
        for handle in handles:
            handle.remove()
    assert res.model_with_lora is model or any(m is blocks[0] for m in res.model_with_lora.modules())
    return calls
