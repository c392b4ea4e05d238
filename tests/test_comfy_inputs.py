"""The library call takes the Train LoRA node's own inputs: a LATENT (raw VAE latents, scaled with the
family's latent format as ComfyUI's model does) and a CONDITIONING list; the run equals the same run
from a dataset of pre-scaled latents."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST
from test_families import FAMILIES, TOKENS

from trainer import TrainerError, train_lora
from trainer.demo import DEMO_UNET_CONFIG, build_demo_model

#: ComfyUI's latent formats (comfy/latent_formats.py: SD15, SDXL, SD3, Flux): (scale, shift)
FORMATS = {"sd": (0.18215, 0.0), "sdxl": (0.13025, 0.0), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
WIDTHS = {"sd": (DEMO_UNET_CONFIG["cross_attention_dim"], None),
          **{family: (spec[1], spec[2]) for family, spec in FAMILIES.items()}}
BUILDERS = {"sd": build_demo_model, **{family: spec[0] for family, spec in FAMILIES.items()}}


def node_inputs(family, rows, entries, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = 3 * torch.randn(rows, 4, 16, 16, generator=g) + 0.5  # VAE latents: unscaled, off-centre
    dim, pooled = WIDTHS[family]
    conditioning = []
    for _ in range(entries):
        extra = {"pooled_output": torch.randn(1, pooled or 768, generator=g)}
        if family == "flux":
            extra["guidance"] = 3.5  # ComfyUI's FluxGuidance entry: the run's --guidance decides
        conditioning.append([torch.randn(1, TOKENS, dim, generator=g), extra])
    return raw, conditioning


def dataset_of(family, raw, conditioning, sizes=None):
    from datasets import Dataset

    scale, shift = FORMATS[family]
    rows = len(raw)
    pick = (lambda i: conditioning[i]) if len(conditioning) == rows else (lambda i: conditioning[0])
    columns = {"latents": ((raw - shift) * scale).numpy(),
               "prompt_embeds": torch.stack([pick(i)[0][0] for i in range(rows)]).numpy()}
    if WIDTHS[family][1]:
        columns["pooled_prompt_embeds"] = torch.stack([pick(i)[1]["pooled_output"][0] for i in range(rows)]).numpy()
    if family == "sdxl":  # ComfyUI's SDXL defaults when the conditioning has no sizes: 768 x 768, no crop
        sizes = sizes or {"original_size": [768.0, 768.0], "crop_coords": [0.0, 0.0], "target_size": [768.0, 768.0]}
        columns.update({name: [value] * rows for name, value in sizes.items()})
    return Dataset.from_dict({k: list(v) for k, v in columns.items()})


@pytest.mark.parametrize("family", FORMATS)
@pytest.mark.parametrize("entries", [1, 4])
def test_latent_and_conditioning_equal_the_prescaled_dataset(family, entries):
    raw, conditioning = node_inputs(family, 4, entries)
    node = train_lora(BUILDERS[family](), {"samples": raw}, conditioning, batch_size=2, **FAST)
    ours = train_lora(BUILDERS[family](), dataset_of(family, raw, conditioning), batch_size=2, **FAST)
    assert node.loss == ours.loss
    assert set(node.lora) == set(ours.lora)
    for key, value in ours.lora.items():
        torch.testing.assert_close(node.lora[key], value, rtol=0, atol=0)


def test_sdxl_size_entries_become_the_time_ids():
    raw, conditioning = node_inputs("sdxl", 2, 1)
    conditioning[0][1].update(width=1024, height=896, crop_w=16, crop_h=8, target_width=1024, target_height=1024)
    node = train_lora(BUILDERS["sdxl"](), {"samples": raw}, conditioning, **FAST)
    sizes = {"original_size": [896.0, 1024.0], "crop_coords": [8.0, 16.0], "target_size": [1024.0, 1024.0]}
    ours = train_lora(BUILDERS["sdxl"](), dataset_of("sdxl", raw, conditioning, sizes), **FAST)
    assert node.loss == ours.loss


@pytest.mark.unit
def test_conditioning_count_must_be_one_or_one_per_latent():
    raw, conditioning = node_inputs("sd", 4, 2)
    with pytest.raises(TrainerError, match="2 CONDITIONING entries but --latents has 4 latents"):
        train_lora("demo", {"samples": raw}, conditioning, **FAST)


@pytest.mark.unit
def test_missing_pooled_output_is_named():
    raw, conditioning = node_inputs("sd3", 2, 1)
    del conditioning[0][1]["pooled_output"]
    with pytest.raises(TrainerError, match="no pooled_output"):
        train_lora(BUILDERS["sd3"](), {"samples": raw}, conditioning, **FAST)
