"""The built-in demo: a small SD-style UNet built from a config and a latent dataset generated from
a fixed seed, so ``train.py`` with no arguments runs anywhere without a download."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel

#: a scaled-down SD 1.x UNet (same block types, 2 resolutions instead of 4)
DEMO_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
DEMO_ROWS = 32
DEMO_CONCEPTS = 4
DEMO_TOKENS = 8


def build_demo_model() -> UNet2DConditionModel:
    """The demo UNet with weights drawn from a fixed seed (independent of the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return UNet2DConditionModel(**DEMO_UNET_CONFIG)


def build_demo_dataset():
    """``DEMO_ROWS`` latents of 4 concepts (smooth stripe patterns) with per-concept prompt embeddings."""
    from datasets import Array2D, Array3D, Dataset, Features, Value

    g = torch.Generator().manual_seed(4321)
    size, channels, dim = DEMO_UNET_CONFIG["sample_size"], DEMO_UNET_CONFIG["in_channels"], \
        DEMO_UNET_CONFIG["cross_attention_dim"]
    concept_embeds = torch.randn(DEMO_CONCEPTS, DEMO_TOKENS, dim, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    latents, embeds, captions = [], [], []
    for i in range(DEMO_ROWS):
        concept = i % DEMO_CONCEPTS
        angle = math.pi * concept / DEMO_CONCEPTS + 0.2 * torch.rand((), generator=g).item()
        phase = 2 * math.pi * torch.rand((), generator=g).item()
        wave = torch.sin(6.0 * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        scales = torch.tensor([1.0, -0.5, 0.8, 0.3]).view(channels, 1, 1)
        latents.append((wave * scales + 0.05 * torch.randn(channels, size, size, generator=g)).numpy())
        embeds.append((concept_embeds[concept] + 0.01 * torch.randn(DEMO_TOKENS, dim, generator=g)).numpy())
        captions.append(f"demo concept {concept}")
    features = Features({
        "latents": Array3D((channels, size, size), "float32"),
        "prompt_embeds": Array2D((DEMO_TOKENS, dim), "float32"),
        "caption": Value("string"),
    })
    return Dataset.from_dict({"latents": latents, "prompt_embeds": embeds, "caption": captions},
                             features=features)
