"""Flux.1 (dev, schnell and their fine-tunes): ``FluxTransformer2DModel`` trained by rectified flow.

The transformer reads the latents as tokens: each 2x2 patch of the [C, H, W] latents (C = 16) is
one token of C*4 features, with a position id (0, row, column); text tokens have position id 0.
Conditioning: ``prompt_embeds`` [L, 4096] (T5) and ``pooled_prompt_embeds`` [768] (CLIP-L pooled).
Guidance-distilled models (``guidance_embeds``, FLUX.1 dev) also take the guidance value; training
feeds ``guidance`` (default 1.0, what most Flux LoRA trainers use to keep the distilled guidance
behaviour intact). The noise-level shift grows with the image's token count (``use_dynamic_shifting``).

File layout (SPEC section 5): LoRA tensors under diffusers names with real alpha tensors,
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` / ``transformer.<module>.alpha``:
ComfyUI maps these names for Flux and reads the alpha tensor; diffusers'
``FluxPipeline.load_lora_weights`` takes alpha tensors of such files as the network alphas. Other
algorithms keep LyCORIS tensors under ``lora_transformer_<module with _>`` (ComfyUI maps these).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, denoiser_keys, has_checkpoint_key, read_json, register_family
from ..mmdit import check_text_conditioning, peft_file_tensors
from ..patches import FLUX_EMBEDDER_NAMES, flux_block_comfyui_names, image_ids, pack, unpack
from .names import bfl_to_diffusers, flux_config

CONFIGS = Path(__file__).parent / "configs"

#: FlowMatchEulerDiscreteScheduler configs of FLUX.1 dev (resolution-dependent shift) and schnell
DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                     "shift": 1.0, "use_dynamic_shifting": False}


def encode_text(pipe, captions, device):
    # T5 tokens, CLIP-L pooled
    embeds, pooled, _ = pipe.encode_prompt(captions, None, device=device, num_images_per_prompt=1)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@register_family
class Flux(ModelFamily):
    name = "flux"
    denoiser_class = FluxTransformer2DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # attention projections of the double blocks (image to_*, text add_*) and of the single blocks
    # (their attn.to_q/k/v); all are in ComfyUI's Flux key map
    default_targets = ("to_q", "to_k", "to_v", "to_out.0",
                       "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    conditioning = {"prompt_embeds": 2, "pooled_prompt_embeds": 1}
    # Flux packs 2x2 latent patches into one token
    encoding = FamilyEncoding(1024, lambda config: 2 * config.get("patch_size", 1), encode_text,
                              latent_scale=(0.3611, 0.1159))

    def matches(self, config):
        return config.get("_class_name") == "FluxTransformer2DModel"

    def matches_checkpoint(self, state_dict):
        # Chroma and FLUX.2 files share these names; Chroma's approximator and FLUX.2's shared modulations
        # tell them apart (as ComfyUI's detection does)
        return (has_checkpoint_key(state_dict, "double_blocks.0.img_attn.norm.key_norm.scale")
                and not has_checkpoint_key(state_dict, "distilled_guidance_layer.in_proj.weight")
                and not has_checkpoint_key(state_dict, "single_stream_modulation.lin.weight"))

    def single_file_config(self, state_dict):
        # FLUX.1 dev is guidance-distilled (it has the guidance embedder); schnell is not
        variant = "flux_dev" if has_checkpoint_key(state_dict, "guidance_in.in_layer.weight") else "flux_schnell"
        return CONFIGS / variant, read_json(CONFIGS / variant / "scheduler" / "scheduler_config.json")

    def single_file_overrides(self, state_dict):
        return flux_config(denoiser_keys(state_dict))

    def single_file_state_dict(self, tensors):
        return bfl_to_diffusers(tensors)

    def latent_channels(self, model):
        return model.config.in_channels // 4  # the transformer sees 2x2 patches

    def check_conditioning(self, model, shapes):
        check_text_conditioning(model, shapes)
        height, width = shapes["latents"][-2:]
        if height % 2 or width % 2:
            raise TrainerError(f"--latents: Flux packs latents in 2x2 patches; latent size {height}x{width} "
                               "is odd")

    def make_objective(self, loaded, options):
        default = DEV_SCHEDULER if loaded.denoiser.config.guidance_embeds else SCHNELL_SCHEDULER
        return FlowMatchObjective(loaded.scheduler_config or default, options, patch_size=2,
                                  model_inputs={"guidance": options.guidance})

    def forward(self, model, noisy, timesteps, batch, guidance: float = 1.0):
        b, _, h, w = noisy.shape
        prompt = batch["prompt_embeds"]
        guidance_values = None
        if model.config.guidance_embeds:
            guidance_values = torch.full((b,), guidance, device=noisy.device, dtype=torch.float32)
        tokens = model(
            hidden_states=pack(noisy),
            encoder_hidden_states=prompt,
            pooled_projections=batch["pooled_prompt_embeds"],
            timestep=timesteps / 1000,  # the transformer scales by 1000 itself, as FluxPipeline assumes
            img_ids=image_ids(h // 2, w // 2, noisy.device),
            txt_ids=torch.zeros(prompt.shape[1], 3, device=noisy.device),
            guidance=guidance_values,
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)

    def base_model_version(self, model):
        return "flux1"  # kohya's value for FLUX.1 dev and schnell

    def comfyui_names(self, model):
        # ComfyUI's Flux (comfy/ldm/flux/model.py), as its key maps name it; its RMSNorms hold "scale"
        from ...adapters.comfyui import renamed

        names = renamed("", "", {
            "x_embedder": "img_in", "context_embedder": "txt_in", **FLUX_EMBEDDER_NAMES,
            "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"},
            swap=("norm_out.linear",))
        names.update(flux_block_comfyui_names(model, modulations=True))
        modules = dict(model.named_modules())
        return {k: v for k, v in names.items() if k in modules}

    def file_tensors(self, module, tensors):
        if "lora_down.weight" in tensors:
            return peft_file_tensors(module, tensors, fold_alpha=False)
        return super().file_tensors(module, tensors)
