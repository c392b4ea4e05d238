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
"""

from __future__ import annotations

from diffusers import HunyuanVideoTransformer3DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, register_family
from ..mmdit import peft_file_tensors

#: HunyuanVideo's FlowMatchEulerDiscreteScheduler config, for a model without a scheduler/ folder
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0}


def encode_text(pipe, captions, device):
    embeds, pooled, mask = pipe.encode_prompt(captions, None, device=device, num_videos_per_prompt=1)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}


@register_family
class HunyuanVideo(ModelFamily):
    name = "hunyuan_video"
    denoiser_class = HunyuanVideoTransformer3DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # the attention projections of the double-stream (image and text) and single-stream blocks
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    conditioning = {"prompt_embeds": 2, "prompt_attention_mask": 1, "pooled_prompt_embeds": 1}
    latent_ndim = 4
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

    def file_tensors(self, module, tensors):
        if "lora_down.weight" in tensors:
            return peft_file_tensors(module, tensors, fold_alpha=True)
        return super().file_tensors(module, tensors)

    def file_metadata(self, tensors, rank, alpha):
        if any(key.endswith(".alpha") for key in tensors):
            return {}
        return {"ss_network_alpha": str(float(rank))}  # alpha / rank is folded into lora_B
