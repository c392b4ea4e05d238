"""Lumina-Image 2.0: ``Lumina2Transformer2DModel`` (a unified "NextDiT": caption and image tokens in one
sequence) trained by rectified flow.

Conditioning: ``prompt_embeds`` [L, cap_feat_dim] (Gemma-2's second-to-last hidden states, 2304 wide
for Lumina-Image 2.0, right-padded to ``max_sequence_length`` = 256 tokens) and ``prompt_attention_mask``
[L] (1 for a real token, 0 for padding), both as ``Lumina2Pipeline.encode_prompt`` returns them (its
system prompt and ``<Prompt Start>`` included). The transformer only looks at the first
``mask.sum()`` caption tokens of each row, so :meth:`Lumina2.forward` cuts the padding common to the
whole batch before calling it (the same output, fewer tokens). Without a mask column every token is a
caption token (unpadded embeddings); ComfyUI's CONDITIONING gives its mask in the ``attention_mask`` extra.

Noise and time: the same rectified flow as SD3/Flux, ``x_s = (1 - s) x0 + s eps`` with the scheduler
config's shift (6.0 for Lumina-Image 2.0), but the transformer's clock runs the other way:
``Lumina2Pipeline`` feeds it ``1 - sigma`` (1 = clean image) and negates its output before the Euler step,
so the model predicts ``x0 - eps``. :meth:`Lumina2.forward` does both, and the trainer's velocity
target ``eps - x0`` is what the pipeline samples with. (The pipeline computes a dynamic-shift ``mu``,
which its scheduler only uses with ``use_dynamic_shifting``; Lumina-Image 2.0's config does not set it.)

File layout (SPEC section 5): LoRA tensors under diffusers names,
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, which ``Lumina2Pipeline.load_lora_weights``
reads. Its loader passes no alphas and rejects a file with keys lacking "lora", so, as for SD3,
``alpha / rank`` is folded into ``lora_B`` and the file's alpha is its rank. ComfyUI has no diffusers
key map for Lumina 2 (``comfy/lora.py`` maps only its own names: ``diffusion_model.<module>`` and
``lora_unet_<module with _>``), so files for ComfyUI are written with ``--file_layout comfyui``
(:meth:`Lumina2.comfyui_names`: q, k, v fused into ``attention.qkv``). Other algorithms keep LyCORIS
tensors under ``lora_transformer_<module with _>``.

Single files in the original names (ComfyUI's ``diffusion_models/`` files and all-in-one checkpoints under
``model.diffusion_model.``) load with a built-in Lumina-Image 2.0 config whose widths and depths are read
from the file's shapes (:mod:`.names`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import Lumina2Transformer2DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, denoiser_keys, has_checkpoint_key, read_json, register_family
from ..mmdit import FoldedAlphaLoRA, has_module
from .names import QKV, STACKS, TOP_LEVEL, block_names, lumina2_config, original_to_diffusers

CONFIGS = Path(__file__).parent / "configs"
#: Lumina-Image 2.0's scheduler (shift 6.0, as ComfyUI's Lumina2 model samples too), for a model without one
DEFAULT_SCHEDULER = CONFIGS / "lumina_image_2" / "scheduler" / "scheduler_config.json"


def encode_text(pipe, captions, device):
    # Gemma-2's second-to-last hidden states behind the pipeline's system prompt, and their padding mask
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


@register_family
class Lumina2(FoldedAlphaLoRA, ModelFamily):
    name = "lumina2"
    denoiser_class = Lumina2Transformer2DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # the attention projections of every block (refiners and main layers); ComfyUI fuses q, k, v
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    conditioning = {"prompt_embeds": 2}
    # ComfyUI reads this model's LoRAs only under its own (fused) names: --file_layout comfyui
    comfyui_reads_default_layout = False
    # lora-prepare always writes the mask; without one every token is a caption token (unpadded embeddings,
    # such as ComfyUI's Gemma encoder makes)
    optional_conditioning = {"prompt_attention_mask": 1}
    # the transformer patches 2x2 latent pixels into one token; the VAE is FLUX.1's (16 channels)
    encoding = FamilyEncoding(1024, lambda config: config.get("patch_size", 2), encode_text,
                              latent_scale=(0.3611, 0.1159))

    def matches(self, config):
        return config.get("_class_name") == "Lumina2Transformer2DModel"

    def matches_checkpoint(self, state_dict):
        # ComfyUI's own test for Lumina 2 (cap_embedder), and its blocks' modulation as SiLU + Linear
        # (adaLN_modulation.1): Z-Image's otherwise alike blocks hold one Linear (adaLN_modulation.0)
        return has_checkpoint_key(state_dict, "cap_embedder.1.weight") and has_checkpoint_key(
            state_dict, "layers.0.adaLN_modulation.1.weight")

    def single_file_config(self, state_dict):
        return CONFIGS / "lumina_image_2", read_json(DEFAULT_SCHEDULER)

    def single_file_overrides(self, state_dict):
        return lumina2_config(denoiser_keys(state_dict))

    def single_file_state_dict(self, tensors):
        return original_to_diffusers(tensors)

    def check_conditioning(self, model, shapes):
        config = model.config
        tokens, width = shapes["prompt_embeds"][-2:]
        if width != config.cap_feat_dim:
            raise TrainerError(f"prompt_embeds have {width} features but the model's cap_feat_dim is "
                               f"{config.cap_feat_dim}: the conditioning was encoded for another model")
        if "prompt_attention_mask" in shapes and shapes["prompt_attention_mask"][-1] != tokens:
            raise TrainerError(f"prompt_attention_mask has {shapes['prompt_attention_mask'][-1]} entries per row "
                               f"but prompt_embeds have {tokens} tokens: the columns do not belong together")
        p = config.patch_size
        height, width = shapes["latents"][-2:]
        if height % p or width % p:
            raise TrainerError(f"--latents: latent size {height}x{width} is not a multiple of the patch size {p}")

    def make_objective(self, loaded, options):
        return FlowMatchObjective(loaded.scheduler_config or read_json(DEFAULT_SCHEDULER), options,
                                  patch_size=loaded.denoiser.config.patch_size)

    def forward(self, model, noisy, timesteps, batch):
        prompt = batch["prompt_embeds"]
        mask = batch.get("prompt_attention_mask")
        # stored as numbers; the transformer counts the True entries of each row
        mask = mask > 0.5 if mask is not None else torch.ones(prompt.shape[:2], dtype=torch.bool, device=prompt.device)
        # padding after the longest caption of the batch changes nothing the transformer computes: cut it
        keep = max(int(mask.sum(dim=1).max()), 1)
        velocity = model(hidden_states=noisy, timestep=1 - timesteps / 1000,  # Lumina's clock: 1 = clean
                         encoder_hidden_states=prompt[:, :keep],
                         encoder_attention_mask=mask[:, :keep], return_dict=False)[0]
        return -velocity  # Lumina2Pipeline negates it too: the model points from noise to data

    def comfyui_extra_columns(self, extra):
        # ComfyUI's Lumina 2 text encoders return their attention mask with the embeddings
        mask = extra.get("attention_mask")
        return {"prompt_attention_mask": mask.float().reshape(-1)} if isinstance(mask, torch.Tensor) else {}

    def base_model_version(self, model):
        return "lumina2"

    def comfyui_names(self, model):
        # ComfyUI's NextDiT (comfy/ldm/lumina/model.py): the original model's names
        from ...adapters.comfyui import fused, renamed

        names = renamed("", "", TOP_LEVEL)
        for stack in STACKS:
            for i in range(len(getattr(model, stack))):
                block = f"{stack}.{i}."
                names.update(renamed(block, block, block_names(stack)))
                names.update(fused(model, f"{block}attention.qkv", [block + p for p in QKV]))
        return {k: v for k, v in names.items() if has_module(model, k)}
