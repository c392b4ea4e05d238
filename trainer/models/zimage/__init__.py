"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream DiT (``ZImageTransformer2DModel``)
trained by rectified flow, with Qwen3 as its text encoder and the Flux VAE (16 channels).

The transformer takes a list of per-image inputs: latents [C, 1, H, W] (a frame axis of 1) and the
caption's hidden states [L_i, D] of that caption's own length (``ZImagePipeline.encode_prompt`` returns
a list of variable-length tensors: the real tokens of each caption, the padding cut off). A dataset row
needs one shape, so the columns are ``prompt_embeds`` [L, D] padded to ``MAX_TOKENS`` (the pipeline's
``max_sequence_length``) with ``prompt_attention_mask`` [L] (1 = a real token); :meth:`ZImage.forward`
cuts each row back to its real tokens, so the transformer sees what the pipeline gives it. The mask is
optional: without it every token is real (a ComfyUI CONDITIONING, or embeddings saved unpadded).

Time: the pipeline steps the scheduler's timesteps ``t = sigma * 1000`` but feeds the transformer
``(1000 - t) / 1000 = 1 - sigma`` (1 = clean), and negates its output before the Euler step: the
transformer predicts ``x0 - noise``. Training feeds the same time and compares ``-output`` with the
usual flow-matching target ``noise - x0``, so the loss is the one of the sampler's velocity. The noise
levels are shifted by the scheduler config's ``shift`` (3.0 for Z-Image-Turbo, no dynamic shift).

File layout (SPEC section 5): LoRA tensors under diffusers module names with real alpha tensors and
the ``diffusion_model.`` prefix, ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` /
``diffusion_model.<module>.alpha``: the layout of the common Z-Image LoRAs (ai-toolkit's), which
diffusers' ``ZImageLoraLoaderMixin`` reads (it folds the alpha tensors into the weights, scale
``alpha / rank``; a ``transformer.`` prefix next to alpha tensors it would double) and ComfyUI's Z-Image
key map names (``diffusion_model.<diffusers module>``, alpha from ``<key>.alpha``). Other algorithms
keep LyCORIS tensors under ``lycoris_<module with _>``, the name ComfyUI's Z-Image key map gives them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel

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
from ..mmdit import peft_file_tensors

CONFIGS = Path(__file__).parent / "configs"
#: FlowMatchEulerDiscreteScheduler config of Z-Image-Turbo, for a model without a scheduler/ folder
DEFAULT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                     "shift": 3.0, "use_dynamic_shifting": False}
#: caption tokens kept: ZImagePipeline's default max_sequence_length (it cuts longer captions there too)
MAX_TOKENS = 512
#: the transformer pads each caption to a multiple of this many tokens (diffusers' SEQ_MULTI_OF)
CAPTION_MULTIPLE = 32


def encode_text(pipe, captions, device):
    # Qwen3's second-to-last hidden states of each caption's real tokens (a list of [L_i, D]), padded to
    # MAX_TOKENS with a mask: a dataset row holds one shape
    embeds, _ = pipe.encode_prompt(list(captions), device=device, do_classifier_free_guidance=False,
                                   max_sequence_length=MAX_TOKENS)
    padded = embeds[0].new_zeros(len(embeds), MAX_TOKENS, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), MAX_TOKENS, dtype=torch.int64, device=padded.device)
    for i, e in enumerate(embeds):
        padded[i, :len(e)] = e
        mask[i, :len(e)] = 1
    return {"prompt_embeds": padded, "prompt_attention_mask": mask}


def _count(state_dict, prefix: str) -> int:
    """Number of ``<prefix>.<i>.*`` blocks in an original-layout checkpoint."""
    indices = {int(key.split(".")[1]) for key in state_dict if key.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0


def caption_list(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's caption embeddings cut to its real tokens (all of them without a mask column)."""
    embeds = batch["prompt_embeds"]
    mask = batch.get("prompt_attention_mask")
    if mask is None:
        return list(embeds.unbind(0))
    captions = [e[m > 0.5] for e, m in zip(embeds, mask)]
    if any(len(c) == 0 for c in captions):
        raise TrainerError("prompt_attention_mask: a row marks no token as real; Z-Image needs at least one "
                           "caption token per row (prepared captions always have the chat template's)")
    return captions


@register_family
class ZImage(ModelFamily):
    name = "zimage"
    denoiser_class = ZImageTransformer2DModel
    subfolder = "transformer"
    kohya_prefix = "lora_unet_"  # kohya-style Z-Image files, as diffusers' Z-Image converter reads them
    # the attention projections of the main layers and of the noise and caption refiners; ComfyUI's
    # Z-Image key map covers all of them (q, k, v into its fused qkv)
    default_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    conditioning = {"prompt_embeds": 2}
    optional_conditioning = {"prompt_attention_mask": 1}
    # the transformer patches 2x2 latent pixels into one token (all_patch_size)
    encoding = FamilyEncoding(1024, lambda config: config.get("all_patch_size", [2])[0], encode_text,
                              latent_scale=(0.3611, 0.1159))

    def matches(self, config):
        return config.get("_class_name") == "ZImageTransformer2DModel"

    def matches_checkpoint(self, state_dict):
        # the original layout (ComfyUI's diffusion_models files): a block's modulation is one Linear
        # (Lumina 2's, otherwise alike, is SiLU + Linear: adaLN_modulation.1); diffusers keys on this too
        return has_checkpoint_key(state_dict, "layers.0.adaLN_modulation.0.weight") and has_checkpoint_key(
            state_dict, "cap_embedder.1.weight")

    def single_file_config(self, state_dict):
        variant = CONFIGS / "zimage_turbo"
        return variant, read_json(variant / "scheduler" / "scheduler_config.json")

    def single_file_overrides(self, state_dict):
        sd = denoiser_keys(state_dict)
        dim, patch_features = sd["x_embedder.weight"].shape
        norm = checkpoint_tensor(sd, "layers.0.attention.q_norm.weight")
        head_dim = norm.shape[0] if norm is not None else 128  # Z-Image's heads are 128 wide
        # the rotary split is not stored: Z-Image's (32, 48, 48) at 128, the same proportions elsewhere
        side = 2 * int(head_dim * 3 / 8 / 2)
        heads = dim // head_dim
        return dict(
            dim=dim,
            in_channels=patch_features // 4,  # 2x2 patches of one frame
            n_layers=_count(sd, "layers"),
            n_refiner_layers=_count(sd, "noise_refiner"),
            n_heads=heads,
            n_kv_heads=heads,
            qk_norm=norm is not None,
            cap_feat_dim=sd["cap_embedder.1.weight"].shape[1],
            axes_dims=[head_dim - 2 * side, side, side],
        )

    def check_conditioning(self, model, shapes):
        config = model.config
        embeds = shapes["prompt_embeds"]
        if embeds[-1] != config.cap_feat_dim:
            raise TrainerError(f"prompt_embeds have {embeds[-1]} features but the model's cap_feat_dim is "
                               f"{config.cap_feat_dim}: the conditioning was encoded for another model")
        mask = shapes.get("prompt_attention_mask")
        if mask is not None and mask[-1] != embeds[-2]:
            raise TrainerError(f"prompt_attention_mask has {mask[-1]} entries per row but prompt_embeds have "
                               f"{embeds[-2]} tokens: they must come from the same encoding")
        # rotary positions: captions take 1..L (padded to a multiple of 32), image rows/columns 0..side-1
        caption_positions = embeds[-2] + (-embeds[-2]) % CAPTION_MULTIPLE + 1
        if caption_positions >= config.axes_lens[0]:
            raise TrainerError(f"prompt_embeds hold {embeds[-2]} tokens, more than the model's rotary "
                               f"positions allow (axes_lens[0] = {config.axes_lens[0]})")
        p = config.all_patch_size[0]
        height, width = shapes["latents"][-2:]
        if height % p or width % p:
            raise TrainerError(f"--latents: latent size {height}x{width} is not a multiple of the patch size {p}")
        if max(height, width) // p > min(config.axes_lens[1:]):
            raise TrainerError(f"--latents: latent size {height}x{width} exceeds the model's rotary positions "
                               f"({min(config.axes_lens[1:]) * p} latent pixels a side)")

    def make_objective(self, loaded, options):
        objective = FlowMatchObjective(loaded.scheduler_config or DEFAULT_SCHEDULER, options,
                                       patch_size=loaded.denoiser.config.all_patch_size[0])
        objective.model_inputs["num_train_timesteps"] = objective.num_train_timesteps
        return objective

    def forward(self, model, noisy, timesteps, batch, num_train_timesteps: int = 1000):
        images = list(noisy.unsqueeze(2).unbind(0))  # [C, 1, H, W] each: one frame
        # ZImagePipeline's time: (1000 - t) / 1000 = 1 - sigma, 1 = clean (the transformer scales it by t_scale)
        time = 1 - timesteps / num_train_timesteps
        out = model(images, time, caption_list(batch), return_dict=False)[0]
        # the transformer predicts x0 - noise; the pipeline negates it into the velocity it steps with
        return -torch.stack(out).squeeze(2)

    def base_model_version(self, model):
        return "zimage"

    def file_tensors(self, module, tensors):
        if "lora_down.weight" in tensors:
            # diffusers' Z-Image loader adds "transformer." itself to files holding alpha tensors
            return {"diffusion_model." + key.removeprefix("transformer."): tensor
                    for key, tensor in peft_file_tensors(module, tensors, fold_alpha=False).items()}
        key = "lycoris_" + module.replace(".", "_")
        return {f"{key}.{suffix}": tensor for suffix, tensor in tensors.items()}

    def sampling_arguments(self, embeds):
        # ZImagePipeline takes lists of [L_i, D] embeddings, each cut to its caption's real tokens
        arguments = {}
        for prefix in ("", "negative_"):
            columns = {name: embeds[prefix + name] for name in ("prompt_embeds", "prompt_attention_mask")
                       if prefix + name in embeds}
            if "prompt_embeds" in columns:
                arguments[prefix + "prompt_embeds"] = caption_list(columns)
        return arguments
