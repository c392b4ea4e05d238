"""Qwen-Image: ``QwenImageTransformer2DModel`` (a double-stream MMDiT) trained by rectified flow.

Latents: the Qwen-Image VAE (``AutoencoderKLQwenImage``) is a video VAE, [B, C, frames, H, W] with
one frame for an image; dataset rows are [C, H, W] (C = 16) and the frame axis exists only inside
the VAE calls of ``lora-prepare`` (:func:`encode_pixels`). Its latents are normalised per channel,
``(z - latents_mean) / latents_std`` (the VAE config's lists), as ``QwenImagePipeline`` undoes before
decoding. The transformer reads 2x2 latent patches as tokens, packed as Flux packs them, and gets
the image's token grid as ``img_shapes`` [(1, H/2, W/2)] for its rotary positions.

Conditioning: ``prompt_embeds`` [L, 3584], the last hidden states of Qwen2.5-VL over the caption
(the pipeline's system template dropped), and ``prompt_embeds_mask`` [L], 1 for caption tokens and 0
for padding. The pipeline pads a batch to its longest caption; ``lora-prepare`` pads every caption to
``TEXT_TOKENS`` (rows of a dataset have one shape) and training cuts each batch back to its longest
caption, so the transformer sees what the pipeline gives it (the mask keeps padding out of attention).

Noise levels: the scheduler's dynamic shift (``use_dynamic_shifting``), ``mu`` linear in the image's
token count between (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``).

Single files: ComfyUI's ``qwen_image_*.safetensors`` hold the transformer under diffusers' names (bare,
or under ``model.diffusion_model.``), which diffusers' ``from_single_file`` takes as they are; the
built-in config (``configs/qwen_image``) gets its depth and widths from the file's shapes.

File layout: LoRA tensors under ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` with an
``alpha`` tensor per module. ComfyUI's Qwen-Image model has diffusers' module names and its key map
takes ``diffusion_model.<module>`` (reading ``<key>.alpha``); diffusers'
``QwenImagePipeline.load_lora_weights`` strips that prefix and folds the alpha. Under the
``transformer.`` prefix the same file would not load in diffusers: its Qwen converter runs for any
file holding ``.alpha`` tensors and prefixes the keys with ``transformer.`` once more. Other algorithms
keep LyCORIS tensors under kohya names, ``lora_unet_<module with _>``, which ComfyUI maps for every
model from its ``diffusion_model.`` weights. Full offsets (``--target_modules node``) go under
``diffusion_model.<module>.diff`` / ``diff_b``, which ComfyUI applies; diffusers' Qwen loader refuses a
file holding them (it reads LoRA tensors only).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import (
    FamilyEncoding,
    ModelFamily,
    denoiser_keys,
    has_checkpoint_key,
    per_channel_normalisation,
    read_json,
    register_family,
)

CONFIGS = Path(__file__).parent / "configs"
#: FlowMatchEulerDiscreteScheduler config of Qwen-Image (its scheduler/ folder), for a bare transformer
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
                     "base_image_seq_len": 256, "max_image_seq_len": 8192, "time_shift_type": "exponential"}
#: caption tokens per ``lora-prepare`` row (the pipeline's default ``max_sequence_length``)
TEXT_TOKENS = 512
#: Qwen-Image VAE's per-channel latent statistics (its config.json), for ComfyUI LATENT inputs
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: one token per 2x2 patch, row-major, features (c, dy, dx)
    (``QwenImagePipeline._pack_latents`` without the frame axis)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def encode_pixels(vae, pixels: torch.Tensor):
    """The VAE's latent distribution of images [B, 3, H, W], over [B, C, h, w]: the video VAE sees one frame."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = vae.encode(pixels.unsqueeze(2)).latent_dist
    return DiagonalGaussianDistribution(dist.parameters.squeeze(2))


def encode_text(pipe, captions, device):
    """Qwen2.5-VL's hidden states and mask through the pipeline, padded to ``TEXT_TOKENS``."""
    embeds, mask = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                      max_sequence_length=TEXT_TOKENS)
    if mask is None:  # the pipeline drops a mask that is all ones
        mask = torch.ones(embeds.shape[:2], device=embeds.device)
    pad = TEXT_TOKENS - embeds.shape[1]
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask.to(embeds.dtype), (0, pad))
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


@register_family
class QwenImage(ModelFamily):
    name = "qwenimage"
    denoiser_class = QwenImageTransformer2DModel
    subfolder = "transformer"
    # ComfyUI maps kohya names from its diffusion_model.* weights for every model (lora_unet_...)
    kohya_prefix = "lora_unet_"
    # the joint attention's projections, image (to_*) and text (add_*) streams
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                       "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    conditioning = {"prompt_embeds": 2}
    # without a mask (e.g. ComfyUI's CONDITIONING, which holds the caption's tokens only) every token counts
    optional_conditioning = {"prompt_embeds_mask": 1}
    # 2x2 patches; the VAE's per-channel statistics replace a single scaling factor
    encoding = FamilyEncoding(1024, lambda config: config.get("patch_size", 2), encode_text,
                              latent_scale=([1.0 / s for s in LATENTS_STD], list(LATENTS_MEAN)),
                              vae_normalisation=per_channel_normalisation, encode_pixels=encode_pixels)

    def matches(self, config):
        return config.get("_class_name") == "QwenImageTransformer2DModel"

    def matches_checkpoint(self, state_dict):
        # ComfyUI's detection key for Qwen-Image; its files (qwen_image_bf16.safetensors) use diffusers' names
        return (has_checkpoint_key(state_dict, "txt_norm.weight")
                and has_checkpoint_key(state_dict, "transformer_blocks.0.img_mod.1.weight"))

    def single_file_config(self, state_dict):
        return CONFIGS / "qwen_image", read_json(CONFIGS / "qwen_image" / "scheduler" / "scheduler_config.json")

    def single_file_overrides(self, state_dict):
        """Depth and widths from the shapes; the rotary axes are not in the weights (Qwen-Image's
        (16, 56, 56) needs heads of 128)."""
        tensors = denoiser_keys(state_dict)
        img_in, head = tensors["img_in.weight"], tensors["transformer_blocks.0.attn.norm_q.weight"]
        if head.shape[0] != 128:
            raise TrainerError(f"--model: a Qwen-Image file with attention heads of {head.shape[0]} (not 128) needs "
                               "--model_config: its rotary axes are not in the weights")
        blocks = {int(m.group(1)) for key in tensors if (m := re.match(r"transformer_blocks\.(\d+)\.", key))}
        return {"in_channels": img_in.shape[1], "attention_head_dim": head.shape[0],
                "num_attention_heads": img_in.shape[0] // head.shape[0], "num_layers": max(blocks) + 1,
                "joint_attention_dim": tensors["txt_in.weight"].shape[1],
                "out_channels": tensors["proj_out.weight"].shape[0] // 4}  # one 2x2 patch per token

    def single_file_state_dict(self, tensors):
        return tensors  # diffusers' from_single_file takes Qwen-Image files under their own (diffusers) names

    def latent_channels(self, model):
        return model.config.in_channels // 4  # the transformer sees 2x2 patches

    def check_conditioning(self, model, shapes):
        embeds, mask = shapes["prompt_embeds"], shapes.get("prompt_embeds_mask")
        width = model.config.joint_attention_dim
        if embeds[-1] != width:
            raise TrainerError(f"prompt_embeds have {embeds[-1]} features but the model's joint_attention_dim is "
                               f"{width}: the conditioning was encoded for another model")
        if mask is not None and tuple(mask) != tuple(embeds[:-1]):
            raise TrainerError(f"prompt_embeds_mask rows are {list(mask)} but prompt_embeds rows hold "
                               f"{embeds[0]} tokens: the mask needs one value per token")
        height, width = shapes["latents"][-2:]
        if height % 2 or width % 2:
            raise TrainerError(f"--latents: Qwen-Image packs latents in 2x2 patches; latent size {height}x{width} "
                               "is odd")

    def make_objective(self, loaded, options):
        return FlowMatchObjective(loaded.scheduler_config or DEFAULT_SCHEDULER, options, patch_size=2)

    def forward(self, model, noisy, timesteps, batch):
        b, _, h, w = noisy.shape
        embeds, mask = batch["prompt_embeds"], batch.get("prompt_embeds_mask")
        length = embeds.shape[1]
        if mask is not None:
            # cut the padding every row of the batch has: the pipeline pads to the batch's longest caption
            used = mask.ne(0).any(0).nonzero()
            length = int(used.max()) + 1 if len(used) else length
            mask = mask[:, :length]
        tokens = model(
            hidden_states=pack(noisy),
            encoder_hidden_states=embeds[:, :length],
            encoder_hidden_states_mask=mask,
            timestep=timesteps / 1000,  # the transformer scales by 1000 itself, as QwenImagePipeline assumes
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)

    def base_model_version(self, model):
        return "qwen_image"

    def comfyui_names(self, model):
        # ComfyUI's Qwen-Image (comfy/ldm/qwen_image/model.py) keeps diffusers' module names and row order
        from ...adapters.comfyui import ComfyPart

        return {name: ComfyPart(name) for name, module in model.named_modules()
                if isinstance(getattr(module, "weight", None), torch.Tensor)}

    def file_tensors(self, module, tensors):
        key = f"diffusion_model.{module}"
        if "lora_down.weight" in tensors:
            return {f"{key}.lora_A.weight": tensors["lora_down.weight"],
                    f"{key}.lora_B.weight": tensors["lora_up.weight"], f"{key}.alpha": tensors["alpha"]}
        if set(tensors) <= {"diff", "diff_b"}:  # full offsets (--target_modules node): ComfyUI reads them here too
            return {f"{key}.{suffix}": tensor for suffix, tensor in tensors.items()}
        return super().file_tensors(module, tensors)
