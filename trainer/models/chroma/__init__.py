"""Chroma (Chroma1-Base, Chroma1-HD and their fine-tunes): ``ChromaTransformer2DModel``, a FLUX.1
schnell derivative trained by rectified flow.

Differences from Flux that matter here: one text encoder (T5, no CLIP pooled vector); the blocks'
modulations come from one "distilled guidance" approximator fed with the timestep instead of per-block
AdaLN linears; the T5 padding is masked. The latents are packed as Flux packs them (2x2 patches, position
ids (0, row, column); text tokens have position id 0); the VAE is Flux's (scale 0.3611, shift 0.1159).

Conditioning, as ``ChromaPipeline.encode_prompt`` returns it: ``prompt_embeds`` [L, 4096] and
``prompt_attention_mask`` [L] (1 for the caption's tokens and the first padding token, 0 for the rest of
the padding). The mask column is optional: without it every text token is attended, as for a ComfyUI
CONDITIONING (ComfyUI's Chroma text encoder drops the padding instead of masking it).

File layout (SPEC section 5): Flux's, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` /
``transformer.<module>.alpha``. ``ChromaPipeline`` loads LoRAs with diffusers' ``FluxLoraLoaderMixin``,
which takes the alpha tensors as network alphas; ComfyUI's ``Chroma`` model is a subclass of its ``Flux``
model, so its Flux key map (``comfy/lora.py``) reads the same names and the alpha tensor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, has_checkpoint_key, register_family
from ..mmdit import peft_file_tensors
from ..patches import flux_block_comfyui_names, image_ids, pack, unpack

#: diffusers' name of the approximator that makes every block's modulation from the timestep
APPROXIMATOR = "distilled_guidance_layer."
#: Chroma1-HD's scheduler (FLUX.1 dev's): the shift grows with the image's token count
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
             "base_image_seq_len": 256, "max_image_seq_len": 4096}


# Flux's 2x2 packing and position ids, written here because a family never imports another family
def attention_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """The transformer's [B, text + image] boolean mask from a ``prompt_attention_mask`` batch [B, L], or
    None when every token is attended (no mask: SDPA's fastest path).

    Boolean, not the pipeline's float: the transformer passes its mask to SDPA, which adds a float mask
    to the scores (a 0/1 float mask masks nothing) and masks only with a boolean one."""
    if text_mask is None:
        return None
    keep = text_mask > 0.5
    if bool(keep.all()):
        return None
    image = torch.ones(keep.shape[0], image_tokens, dtype=torch.bool, device=keep.device)
    return torch.cat([keep, image], dim=1)


@contextmanager
def masked_checkpointed_single_blocks(model, mask: torch.Tensor | None):
    """Give the single blocks the mask under gradient checkpointing too.

    diffusers' ``ChromaTransformer2DModel.forward`` (0.35 to at least 0.42) calls its checkpointed single
    blocks with (hidden_states, temb, image_rotary_emb) only, so they would attend to the padding that
    the same step without checkpointing (and inference) masks. The checkpoint function is wrapped for the
    duration of one forward call to append the mask to exactly those calls."""
    func = getattr(model, "_gradient_checkpointing_func", None)
    if mask is None or func is None or not getattr(model, "gradient_checkpointing", False):
        yield
        return

    def with_mask(block, *args):
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            args = (*args, mask)
        return func(block, *args)

    model._gradient_checkpointing_func = with_mask
    try:
        yield
    finally:
        model._gradient_checkpointing_func = func


def encode_text(pipe, captions, device):
    # T5 states of the padded captions and the pipeline's mask (the first padding token stays visible)
    embeds, _, mask, *_ = pipe.encode_prompt(captions, None, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask.to(embeds.dtype)}


@register_family
class Chroma(ModelFamily):
    name = "chroma"
    denoiser_class = ChromaTransformer2DModel
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    # attention projections of the double blocks (image to_*, text add_*) and of the single blocks (their
    # attn.to_q/k/v); all are in ComfyUI's Flux key map, which its Chroma uses
    default_targets = ("to_q", "to_k", "to_v", "to_out.0",
                       "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    conditioning = {"prompt_embeds": 2}
    optional_conditioning = {"prompt_attention_mask": 1}
    # Chroma packs 2x2 latent patches into one token; its VAE is Flux's
    encoding = FamilyEncoding(1024, lambda config: 2 * config.get("patch_size", 1), encode_text,
                              latent_scale=(0.3611, 0.1159))

    def matches(self, config):
        return config.get("_class_name") == "ChromaTransformer2DModel"

    def matches_checkpoint(self, state_dict):
        # BFL names like Flux's, plus the approximator (ComfyUI's test for Chroma, comfy/model_detection.py)
        return has_checkpoint_key(state_dict, "distilled_guidance_layer.in_proj.weight")

    def latent_channels(self, model):
        return model.config.in_channels // 4  # the transformer sees 2x2 patches

    def check_conditioning(self, model, shapes):
        dim, width = shapes["prompt_embeds"][-1], model.config.joint_attention_dim
        if dim != width:
            raise TrainerError(f"prompt_embeds have {dim} features but the model's joint_attention_dim is {width}: "
                               "the conditioning was encoded for another model")
        if "prompt_attention_mask" in shapes and shapes["prompt_attention_mask"][-1] != shapes["prompt_embeds"][0]:
            raise TrainerError(f"prompt_attention_mask has {shapes['prompt_attention_mask'][-1]} entries per row but "
                               f"prompt_embeds have {shapes['prompt_embeds'][0]} tokens: they were not encoded "
                               "together")
        height, width = shapes["latents"][-2:]
        if height % 2 or width % 2:
            raise TrainerError(f"--latents: Chroma packs latents in 2x2 patches; latent size {height}x{width} "
                               "is odd")

    def make_objective(self, loaded, options):
        return FlowMatchObjective(loaded.scheduler_config or SCHEDULER, options, patch_size=2)

    def forward(self, model, noisy, timesteps, batch):
        h, w = noisy.shape[-2:]
        prompt = batch["prompt_embeds"]
        mask = attention_mask(batch.get("prompt_attention_mask"), (h // 2) * (w // 2))
        with masked_checkpointed_single_blocks(model, mask):
            tokens = model(
                hidden_states=pack(noisy),
                encoder_hidden_states=prompt,
                timestep=timesteps / 1000,  # the transformer scales by 1000 itself, as ChromaPipeline assumes
                img_ids=image_ids(h // 2, w // 2, noisy.device),
                txt_ids=torch.zeros(prompt.shape[1], 3, device=noisy.device),
                attention_mask=mask,
                return_dict=False,
            )[0]
        return unpack(tokens, h, w)

    def offset_tensors(self, model, offsets):
        from ...adapters.comfyui import to_comfyui

        # ComfyUI's Flux key map has no names for the approximator, so its offsets go under ComfyUI's generic
        # names (diffusion_model.<its module>), which its loader reads; diffusers reads no offsets at all
        approximator = {m: o for m, o in offsets.items() if m.startswith(APPROXIMATOR)}
        own, _ = to_comfyui({}, approximator, "LoRA", self.comfyui_names(model), {})
        rest = {m: o for m, o in offsets.items() if m not in approximator}
        return {**super().offset_tensors(model, rest), **own}

    def comfyui_names(self, model):
        # ComfyUI's Chroma (comfy/ldm/chroma/model.py, Flux's blocks without their modulation linears); its
        # RMSNorms hold "scale"
        from ...adapters.comfyui import renamed

        names = renamed("", "", {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
                                 "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
                                 "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"})
        approximator = model.distilled_guidance_layer
        for i in range(len(approximator.layers)):
            names.update(renamed(f"distilled_guidance_layer.layers.{i}.", f"distilled_guidance_layer.layers.{i}.",
                                 {"linear_1": "in_layer", "linear_2": "out_layer"}))
            names.update(renamed("distilled_guidance_layer.", "distilled_guidance_layer.",
                                 {f"norms.{i}": f"norms.{i}"}, params={f"norms.{i}": "scale"}))
        names.update(flux_block_comfyui_names(model, modulations=False))
        modules = dict(model.named_modules())
        return {k: v for k, v in names.items() if k in modules}

    def file_tensors(self, module, tensors):
        if "lora_down.weight" in tensors:
            return peft_file_tensors(module, tensors, fold_alpha=False)
        return super().file_tensors(module, tensors)
