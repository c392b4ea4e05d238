"""Stable Diffusion 1.x / 2.x: a UNet2DConditionModel conditioned on CLIP hidden states."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ...errors import TrainerError
from ...objectives import DDPMObjective
from ..base import (
    CHECKPOINT_PREFIX,
    FamilyEncoding,
    ModelFamily,
    denoiser_keys,
    has_checkpoint_key,
    read_json,
    register_family,
)
from ..unet_names import ldm_module_spellings, unet_comfyui_names, unet_factor

CONFIGS = Path(__file__).parent / "configs"


def with_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's denoiser keys under ``model.diffusion_model.``, where diffusers' detection looks,
    also for a UNet-only file (ComfyUI's diffusion_models/) that has them bare."""
    return {CHECKPOINT_PREFIX + key: t for key, t in denoiser_keys(state_dict).items()}


def encode_text(pipe, captions, device):
    embeds, _ = pipe.encode_prompt(captions, device, 1, False)  # CLIP last hidden state [B, 77, D]
    return {"prompt_embeds": embeds}


@register_family
class StableDiffusion(ModelFamily):
    name = "sd"
    denoiser_class = UNet2DConditionModel
    subfolder = "unet"
    kohya_prefix = "lora_unet_"
    # the attention projections of every transformer block (self- and cross-attention)
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")
    conditioning = {"prompt_embeds": 2}
    encoding = FamilyEncoding(512, unet_factor, encode_text, latent_scale=(0.18215, 0.0))

    def matches(self, config):
        return config.get("_class_name") == "UNet2DConditionModel" and config.get("addition_embed_type") is None

    def check_conditioning(self, model, shapes):
        dim = shapes["prompt_embeds"][-1]
        if dim != model.config.cross_attention_dim:
            raise TrainerError(f"prompt_embeds have {dim} features per token but the model's "
                               f"cross_attention_dim is {model.config.cross_attention_dim}: "
                               "the conditioning was encoded for another model")

    def matches_checkpoint(self, state_dict):
        from ...compat import infer_single_file_type

        # diffusers calls any unknown layout "v1": the LDM UNet's own key is required too, and SDXL's
        # added-conditioning MLP (label_emb) rules it out
        return (has_checkpoint_key(state_dict, "input_blocks.0.0.weight")
                and not has_checkpoint_key(state_dict, "label_emb.0.0.weight")
                and infer_single_file_type(with_prefix(state_dict)) in ("v1", "v2"))

    def make_objective(self, loaded, options):
        default = CONFIGS / "sd1" / "scheduler" / "scheduler_config.json"
        return DDPMObjective(loaded.scheduler_config or read_json(default), loaded.prediction_type, options)

    def forward(self, model, noisy, timesteps, batch):
        return model(noisy, timesteps, encoder_hidden_states=batch["prompt_embeds"], return_dict=False)[0]

    def single_file_config(self, state_dict):
        from ...compat import infer_single_file_type

        model_type = infer_single_file_type(with_prefix(state_dict))
        if model_type not in ("v1", "v2"):
            raise TrainerError(f"single-file checkpoint looks like {model_type!r}, not SD 1.x/2.x; "
                               "pass --model_config with its diffusers config folder")
        folder = CONFIGS / ("sd1" if model_type == "v1" else "sd2")
        return folder, read_json(folder / "scheduler" / "scheduler_config.json")

    def base_model_version(self, model):
        return "sd_v2" if model.config.cross_attention_dim == 1024 else "sd_v1"

    def comfyui_names(self, model):
        return unet_comfyui_names(model)

    def module_spellings(self, model):
        return ldm_module_spellings(model)

