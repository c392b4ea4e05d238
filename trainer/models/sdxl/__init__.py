"""Stable Diffusion XL: a UNet2DConditionModel with ``addition_embed_type="text_time"``.

Besides the token embeddings of both text encoders (concatenated, ``prompt_embeds`` [L, 2048]),
SDXL is conditioned on the pooled embedding of the second encoder (``pooled_prompt_embeds``
[1280]) and on six "time ids": the original image size (h, w), the crop's top-left corner
(top, left) and the target size (h, w), in pixels. Rows may carry ``original_size``,
``crop_coords`` and ``target_size``; a missing one is derived as diffusers' pipelines do for an
uncropped image: sizes = latent size x the VAE scale factor, crop = (0, 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ...errors import TrainerError
from ...objectives import DDPMObjective
from ..base import FamilyEncoding, ModelFamily, has_checkpoint_key, read_json, register_family
from ..unet_names import ldm_module_spellings, unet_comfyui_names, unet_factor

CONFIGS = Path(__file__).parent / "configs"

#: SDXL's added-conditioning MLP: diffusers module -> LDM module (the name its kohya keys use)
ADDED_EMBEDDING_LDM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

#: the time-id columns, in the order the UNet reads them
TIME_ID_COLUMNS = ("original_size", "crop_coords", "target_size")


def time_ids(batch: dict[str, torch.Tensor], latent_size: tuple[int, int], vae_scale_factor: int,
             batch_size: int, device: torch.device) -> torch.Tensor:
    """[B, 6] time ids from the batch's columns, deriving absent ones from the latent size."""
    # filled on the device: no host-to-device copy per step
    pixels = torch.empty(batch_size, 2, device=device)
    pixels[:, 0], pixels[:, 1] = latent_size[0] * vae_scale_factor, latent_size[1] * vae_scale_factor
    defaults = {"original_size": pixels, "crop_coords": torch.zeros(batch_size, 2, device=device),
                "target_size": pixels}
    return torch.cat([batch[name].float() if name in batch else defaults[name] for name in TIME_ID_COLUMNS], dim=1)


def encode_text(pipe, captions, device):
    # both CLIPs' penultimate hidden states concatenated, pooled output of text_encoder_2
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@register_family
class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    denoiser_class = UNet2DConditionModel
    subfolder = "unet"
    kohya_prefix = "lora_unet_"
    # the attention projections of every transformer block (self- and cross-attention), as for SD
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")
    conditioning = {"prompt_embeds": 2, "pooled_prompt_embeds": 1}
    optional_conditioning = {name: 1 for name in TIME_ID_COLUMNS}
    encoding = FamilyEncoding(1024, unet_factor, encode_text, latent_scale=(0.13025, 0.0))

    def matches(self, config):
        return (config.get("_class_name") == "UNet2DConditionModel"
                and config.get("addition_embed_type") == "text_time")

    def matches_checkpoint(self, state_dict):
        # the LDM UNet with SDXL's added-conditioning MLP (label_emb, the size/crop embedding)
        return has_checkpoint_key(state_dict, "input_blocks.0.0.weight") and \
            has_checkpoint_key(state_dict, "label_emb.0.0.weight")

    def check_conditioning(self, model, shapes):
        config = model.config
        dim = shapes["prompt_embeds"][-1]
        if dim != config.cross_attention_dim:
            raise TrainerError(f"prompt_embeds have {dim} features per token but the model's "
                               f"cross_attention_dim is {config.cross_attention_dim}: the conditioning was "
                               "encoded for another model")
        pooled = shapes["pooled_prompt_embeds"][-1]
        expected = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        if pooled != expected:
            raise TrainerError(f"pooled_prompt_embeds have {pooled} features but this UNet takes "
                               f"{expected} besides its 6 time ids (an SDXL refiner, which takes an aesthetic "
                               "score, is not supported)")
        for name in TIME_ID_COLUMNS:
            if name in shapes and shapes[name] != (2,):
                raise TrainerError(f"'{name}' rows must hold 2 numbers (height, width / top, left in "
                                   f"pixels), got shape {shapes[name]}")

    def make_objective(self, loaded, options):
        default = CONFIGS / "sdxl" / "scheduler" / "scheduler_config.json"
        return DDPMObjective(loaded.scheduler_config or read_json(default), loaded.prediction_type, options,
                             model_inputs={"vae_scale_factor": loaded.vae_scale_factor})

    def forward(self, model, noisy, timesteps, batch, vae_scale_factor: int = 8):
        added = {
            "text_embeds": batch["pooled_prompt_embeds"],
            "time_ids": time_ids(batch, noisy.shape[-2:], vae_scale_factor, noisy.shape[0], noisy.device),
        }
        return model(noisy, timesteps, encoder_hidden_states=batch["prompt_embeds"], added_cond_kwargs=added,
                     return_dict=False)[0]

    def single_file_config(self, state_dict):
        folder = CONFIGS / "sdxl"
        return folder, read_json(folder / "scheduler" / "scheduler_config.json")

    def base_model_version(self, model):
        return "sdxl_base_v1-0"  # kohya's value for SDXL base and its fine-tunes

    def comfyui_extra_columns(self, extra):
        # the size columns (height, width order), with the defaults ComfyUI's SDXL model uses where an
        # entry is missing (comfy/model_base.py SDXL.encode_adm: 768 x 768, crop (0, 0), target = original)
        height, width = float(extra.get("height", 768)), float(extra.get("width", 768))
        return {"original_size": torch.tensor([height, width]),
                "crop_coords": torch.tensor([float(extra.get("crop_h", 0)), float(extra.get("crop_w", 0))]),
                "target_size": torch.tensor([float(extra.get("target_height", height)),
                                             float(extra.get("target_width", width))])}

    def comfyui_names(self, model):
        return unet_comfyui_names(model)

    def module_spellings(self, model):
        return ldm_module_spellings(model)

    def file_tensors(self, module, tensors):
        # diffusers' kohya converter turns lora_unet_add_embedding_linear_1 into "add.embedding..." and
        # drops it; it maps the LDM name label_emb.0.0 (kohya's own SDXL spelling) to add_embedding.
        # ComfyUI reads both.
        for diffusers_name, ldm_name in ADDED_EMBEDDING_LDM_NAMES.items():
            if module == diffusers_name:
                module = ldm_name
        return super().file_tensors(module, tensors)
