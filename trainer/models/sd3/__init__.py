"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``) trained by rectified flow.

Conditioning: ``prompt_embeds`` [L, 4096] (CLIP-L + CLIP-G padded, concatenated with T5 along the
tokens) and ``pooled_prompt_embeds`` [2048] (both CLIP pooled outputs). The noise levels are
shifted by the scheduler config's ``shift`` (3.0 for SD3/3.5).

File layout (SPEC section 5): LoRA tensors under diffusers names,
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, which ComfyUI maps for SD3 and
diffusers' ``StableDiffusion3Pipeline.load_lora_weights`` reads. Neither reads an alpha both
understand: ComfyUI only reads ``<key>.alpha`` tensors, and diffusers' SD3 loader rejects a file
holding any key without "lora" in it, so an alpha tensor makes diffusers refuse the file. Both
apply scale 1 to a file without alpha, so ``alpha / rank`` is folded into ``lora_B`` and the file's
alpha is its rank (``ss_network_alpha``). Other algorithms keep LyCORIS tensors under
``lora_transformer_<module with _>``, a name ComfyUI maps for SD3 (OneTrainer's).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import SD3Transformer2DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import (
    FamilyEncoding,
    ModelFamily,
    checkpoint_tensor,
    denoiser_keys,
    has_checkpoint_key,
    read_json,
    register_family,
)
from ..mmdit import FoldedAlphaLoRA, check_text_conditioning, has_module

CONFIGS = Path(__file__).parent / "configs"
#: FlowMatchEulerDiscreteScheduler config of SD3 medium and SD3.5, for a model without a scheduler/ folder
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                     "shift": 3.0}


def encode_text(pipe, captions, device):
    # CLIP-L/G hidden states + T5 tokens (zeros without text_encoder_3), pooled CLIP-L + CLIP-G
    embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@register_family
class StableDiffusion3(FoldedAlphaLoRA, ModelFamily):
    name = "sd3"
    denoiser_class = SD3Transformer2DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # the joint attention's projections, image (to_*) and text (add_*) streams; "attn." keeps SD3.5
    # medium's second image attention (attn2) out, which ComfyUI's SD3 key map does not cover
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                       "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    conditioning = {"prompt_embeds": 2, "pooled_prompt_embeds": 1}
    encoding = FamilyEncoding(1024, lambda config: config["patch_size"], encode_text, latent_scale=(1.5305, 0.0609))

    def matches(self, config):
        return config.get("_class_name") == "SD3Transformer2DModel"

    def matches_checkpoint(self, state_dict):
        return has_checkpoint_key(state_dict, "joint_blocks.0.context_block.adaLN_modulation.1.bias")

    def single_file_config(self, state_dict):
        # SD3.5 medium has a second image attention (MMDiT-X) in its first blocks; SD3.5 large has qk norms
        if has_checkpoint_key(state_dict, "joint_blocks.0.x_block.attn2.qkv.weight"):
            variant = "sd35_medium"
        elif has_checkpoint_key(state_dict, "joint_blocks.0.x_block.attn.ln_q.weight"):
            variant = "sd35_large"
        else:
            variant = "sd3_medium"
        return CONFIGS / variant, read_json(CONFIGS / variant / "scheduler" / "scheduler_config.json")

    def single_file_overrides(self, state_dict):
        sd = denoiser_keys(state_dict)
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        ln_q = checkpoint_tensor(sd, "joint_blocks.0.x_block.attn.ln_q.weight")
        head_dim = ln_q.shape[0] if ln_q is not None else 64  # every SD3/3.5 release has 64-wide heads
        blocks = {int(key.split(".")[1]) for key in sd if key.startswith("joint_blocks.")}
        pos_embed = sd.get("pos_embed")
        return dict(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch),
            patch_size=patch,
            num_layers=max(blocks) + 1,
            attention_head_dim=head_dim,
            num_attention_heads=hidden // head_dim,
            caption_projection_dim=sd["context_embedder.weight"].shape[0],
            joint_attention_dim=sd["context_embedder.weight"].shape[1],
            pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1],
            pos_embed_max_size=round(pos_embed.shape[1] ** 0.5) if pos_embed is not None else None,
            qk_norm="rms_norm" if ln_q is not None else None,
            dual_attention_layers=tuple(sorted(i for i in blocks
                                               if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)),
        )

    def single_file_state_dict(self, tensors):
        return tensors  # diffusers' SD3 converter reads bare names and splits by the tensors' own shapes

    def check_conditioning(self, model, shapes):
        check_text_conditioning(model, shapes)
        p, limit = model.config.patch_size, model.config.pos_embed_max_size
        height, width = shapes["latents"][-2:]
        if height % p or width % p:
            raise TrainerError(f"--latents: latent size {height}x{width} is not a multiple of the patch "
                               f"size {p}")
        if limit is not None and max(height, width) > limit * p:
            raise TrainerError(f"--latents: latent size {height}x{width} exceeds the model's position "
                               f"embedding ({limit * p} latent pixels a side)")

    def make_objective(self, loaded, options):
        return FlowMatchObjective(loaded.scheduler_config or DEFAULT_SCHEDULER, options,
                                  patch_size=loaded.denoiser.config.patch_size)

    def forward(self, model, noisy, timesteps, batch):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                     pooled_projections=batch["pooled_prompt_embeds"], return_dict=False)[0]

    def base_model_version(self, model):
        if model.config.dual_attention_layers:
            return "sd3.5_medium"
        return "sd3.5_large" if model.config.num_layers >= 38 else "sd3"

    def comfyui_names(self, model):
        # ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py), as its key maps name it
        from ...adapters.comfyui import fused, renamed

        names = renamed("", "", {
            "context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"},
            swap=("norm_out.linear",))
        last = model.config.num_layers - 1
        for i in range(model.config.num_layers):
            block, to = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            # the last block's text stream only feeds attention: its modulation is stored swapped
            names.update(renamed(block, to, {
                "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
                "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
                "attn2.norm_k": "x_block.attn2.ln_k", "ff.net.0.proj": "x_block.mlp.fc1",
                "ff.net.2": "x_block.mlp.fc2", "norm1_context.linear": "context_block.adaLN_modulation.1",
                "attn.to_add_out": "context_block.attn.proj", "attn.norm_added_q": "context_block.attn.ln_q",
                "attn.norm_added_k": "context_block.attn.ln_k", "ff_context.net.0.proj": "context_block.mlp.fc1",
                "ff_context.net.2": "context_block.mlp.fc2"},
                swap=("norm1_context.linear",) if i == last else ()))
            for attn, stream, projections in (("attn", "x_block.attn", ("to_q", "to_k", "to_v")),
                                              ("attn", "context_block.attn", ("add_q_proj", "add_k_proj",
                                                                              "add_v_proj")),
                                              ("attn2", "x_block.attn2", ("to_q", "to_k", "to_v"))):
                members = [f"{block}{attn}.{p}" for p in projections]
                if all(has_module(model, m) for m in members):
                    names.update(fused(model, f"{to}{stream}.qkv", members))
        return {k: v for k, v in names.items() if has_module(model, k)}
