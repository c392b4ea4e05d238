"""HunyuanVideo text-to-video: ``HunyuanVideoTransformer3DModel`` trained by rectified flow on video latents.

Latents are rows ``[C, T, H, W]`` (``latent_ndim`` 4, C = 16) from ``AutoencoderKLHunyuanVideo``, scaled
by its ``scaling_factor`` (0.476986) as ``HunyuanVideoPipeline`` does; images are 1-frame clips.

Conditioning, as ``HunyuanVideoPipeline.encode_prompt`` returns it: ``prompt_embeds`` [L, 4096] (the
Llama text encoder's hidden states under the pipeline's prompt template, L = 256 there),
``prompt_attention_mask`` [L] (1 for the prompt's tokens, which come first) and ``pooled_prompt_embeds``
[768] (CLIP-L pooled). The guidance embedding (HunyuanVideo is guidance-distilled) is fed ``--guidance``
x 1000, the pipeline's convention; 1.0 by default, as musubi-tuner and diffusion-pipe train it.

Objective: rectified flow shifted by the scheduler config's ``shift`` (7.0 in HunyuanVideo's).

File layout: diffusers names, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, which
``HunyuanVideoPipeline.load_lora_weights`` reads (through peft, convolutions included). Its loader
refuses a file holding a key without "lora" in it, so an alpha tensor cannot be written: ``alpha /
rank`` is folded into ``lora_B`` and the file's alpha is its rank (``ss_network_alpha``), as for SD3.
ComfyUI does not read diffusers names for HunyuanVideo (its key map knows only its own module names, under
``diffusion_model.``, ``lora_unet_`` and diffusion-pipe's ``transformer.double_blocks.0.img_attn_qkv``
spelling), so files for ComfyUI are written with ``--file_layout comfyui`` (:meth:`HunyuanVideo.comfyui_names`:
q, k, v fused into ``img_attn.qkv`` / ``txt_attn.qkv`` / the token refiner's ``self_attn.qkv``, a single
block's q, k, v and ``proj_mlp`` into ``linear1``, the final layer's AdaLN rows swapped). No one file serves
both loaders for the default targets: diffusers' converter of the original names splits the refiner's
``self_attn_qkv`` ``lora_A`` in three (a fused adapter's ranks no longer match) and a single block's ``linear1``
at a hard-coded width of 3072, and expects the embedders under the original checkpoint's names
(``time_in.mlp.0``) where ComfyUI reads its own (``time_in.in_layer``). ``--existing_lora`` reads both layouts and diffusion-pipe's and musubi-tuner's
(``lora_unet_double_blocks_0_img_attn_qkv``) files.
"""

from __future__ import annotations

from diffusers import HunyuanVideoTransformer3DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, register_family
from ..mmdit import FoldedAlphaLoRA, has_module
from ..patches import FLUX_EMBEDDER_NAMES, flux_block_comfyui_names

#: diffusers module -> ComfyUI's (comfy/ldm/hunyuan_video/model.py, the original model's names) outside the blocks
TOP_LEVEL = {
    "x_embedder.proj": "img_in.proj",
    **FLUX_EMBEDDER_NAMES,
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.in_layer",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.out_layer",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.in_layer",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
#: a token-refiner block's modules (diffusers -> ComfyUI), q/k/v aside (fused into ``self_attn.qkv``)
REFINER_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.to_out.0": "self_attn.proj", "ff.net.0.proj": "mlp.0",
                 "ff.net.2": "mlp.2", "norm_out.linear": "adaLN_modulation.1"}


def diffusion_pipe_name(comfy_module: str) -> str:
    """diffusion-pipe's spelling of a ComfyUI module (``img_attn.qkv`` -> ``img_attn_qkv``, ``img_mod.lin`` ->
    ``img_mod.linear``, ``mlp.0`` -> ``mlp.fc1``): the rewrites of ComfyUI's own HunyuanVideo key map
    (comfy/lora.py ``model_lora_keys_unet``), which reads it under ``transformer.``."""
    key = f"diffusion_model.{comfy_module}.weight"
    key = key.replace("_mod.lin.", "_mod.linear.").replace("_attn.qkv.", "_attn_qkv.").replace("_attn.proj.", "_attn_proj.")
    key = key.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
    key = key.replace(".modulation.lin.", ".modulation.linear.")
    return key[len("diffusion_model."):-len(".weight")]


#: HunyuanVideo's FlowMatchEulerDiscreteScheduler config, for a model without a scheduler/ folder
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0}


def encode_text(pipe, captions, device):
    embeds, pooled, mask = pipe.encode_prompt(captions, None, device=device, num_videos_per_prompt=1)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}


@register_family
class HunyuanVideo(FoldedAlphaLoRA, ModelFamily):
    name = "hunyuan_video"
    denoiser_class = HunyuanVideoTransformer3DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # the attention projections of the double-stream (image and text) and single-stream blocks
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    conditioning = {"prompt_embeds": 2, "prompt_attention_mask": 1, "pooled_prompt_embeds": 1}
    latent_ndim = 4
    # ComfyUI reads this model's LoRAs only under its own (fused) names: --file_layout comfyui
    comfyui_reads_default_layout = False
    # lora-prepare: clips at HunyuanVideo's 24 fps, at most its native 129 frames (5.4 s)
    encoding = FamilyEncoding(544, lambda config: config["patch_size"], encode_text, latent_scale=(0.476986, 0.0),
                              fps=24.0, frames=(1, 33, 65, 97, 129))

    def matches(self, config):
        return config.get("_class_name") == "HunyuanVideoTransformer3DModel"

    def check_conditioning(self, model, shapes):
        config = model.config
        if config.image_condition_type is not None:
            raise TrainerError("--model: this HunyuanVideo model is image-to-video (image_condition_type "
                               f"{config.image_condition_type}); only text-to-video models are trained here")
        widths = {"prompt_embeds": "text_embed_dim", "pooled_prompt_embeds": "pooled_projection_dim"}
        for name, field in widths.items():
            if shapes[name][-1] != config[field]:
                raise TrainerError(f"{name} have {shapes[name][-1]} features but the model's {field} is "
                                   f"{config[field]}: the conditioning was encoded for another model")
        if shapes["prompt_attention_mask"][0] != shapes["prompt_embeds"][0]:
            raise TrainerError(f"prompt_attention_mask has {shapes['prompt_attention_mask'][0]} tokens but "
                               f"prompt_embeds has {shapes['prompt_embeds'][0]}: one mask entry per token")
        _, frames, height, width = shapes["latents"]
        pt, p = config.patch_size_t, config.patch_size
        if frames % pt or height % p or width % p:
            raise TrainerError(f"--latents: latent size {frames}x{height}x{width} (frames x height x width) is "
                               f"not a multiple of the patch size {pt}x{p}x{p}")

    def make_objective(self, loaded, options):
        guidance = options.guidance * 1000.0 if loaded.denoiser.config.guidance_embeds else None
        return FlowMatchObjective(loaded.scheduler_config or DEFAULT_SCHEDULER, options,
                                  patch_size=loaded.denoiser.config.patch_size, model_inputs={"guidance": guidance})

    def forward(self, model, noisy, timesteps, batch, guidance=None):
        if guidance is not None:
            guidance = timesteps.new_full(timesteps.shape, guidance)
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                     encoder_attention_mask=batch["prompt_attention_mask"].long(),
                     pooled_projections=batch["pooled_prompt_embeds"], guidance=guidance, return_dict=False)[0]

    def comfyui_names(self, model):
        # ComfyUI's HunyuanVideo reuses Flux's double/single blocks (img_attn.qkv, linear1 = q, k, v and the MLP
        # input, RMSNorms holding "scale"); its final layer stores the AdaLN rows as (shift, scale) where
        # diffusers' norm_out has (scale, shift); the token refiner's gates (adaLN_modulation.1) are in the same order
        from ...adapters.comfyui import fused, renamed

        names = renamed("", "", TOP_LEVEL, swap=("norm_out.linear",))
        for i in range(len(model.context_embedder.token_refiner.refiner_blocks)):
            block, to = f"context_embedder.token_refiner.refiner_blocks.{i}.", f"txt_in.individual_token_refiner.blocks.{i}."
            names.update(renamed(block, to, REFINER_BLOCK))
            names.update(fused(model, f"{to}self_attn.qkv", [f"{block}attn.{p}" for p in ("to_q", "to_k", "to_v")]))
        names.update(flux_block_comfyui_names(model, modulations=True))
        return {k: v for k, v in names.items() if has_module(model, k)}

    def comfyui_spellings(self, model):
        # diffusion-pipe (transformer.double_blocks.0.img_attn_qkv; older files under diffusion_model.) and
        # musubi-tuner (lora_unet_double_blocks_0_img_attn_qkv), both of which ComfyUI's key map reads
        spellings = {}
        for part in self.comfyui_names(model).values():
            other = diffusion_pipe_name(part.module)
            spellings.update({f"transformer.{other}": part.module, f"diffusion_model.{other}": part.module,
                              "lora_unet_" + part.module.replace(".", "_"): part.module})
        return spellings

    def offset_tensors(self, model, offsets):
        # the default layout is diffusers' names, of which ComfyUI reads none for HunyuanVideo: every offset keeps
        # file_tensors' names (lora_transformer_...), which diffusers' loader skips while loading the adapter;
        # ComfyUI's names for fused layers' offsets would make it refuse the file (--file_layout comfyui has them)
        state = {}
        for module, tensors in offsets.items():
            state.update(self.file_tensors(module, tensors))
        return state
