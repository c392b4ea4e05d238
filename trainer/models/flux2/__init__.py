"""Flux.2 (dev, and klein, which shares the transformer class): ``Flux2Transformer2DModel`` trained by
rectified flow.

Latents: the training data holds the VAE's (``AutoencoderKLFlux2``, 32 channels) latents normalised the
way ``Flux2Pipeline`` normalises them: each 2x2 patch of the raw latents is one 128-feature vector
(features ordered (channel, dy, dx)), standardised by the VAE's batch-norm running statistics
(``vae.bn``), and the result is stored back in the [32, H, W] layout, so a row's shape is the VAE's and
the diffusion runs in exactly the pipeline's space. :func:`normalize_latents` does this in
``lora-prepare``; the normalisation lives in the VAE's weights, not in its config, so ``.latent``
imports (raw latents) are refused there.

The transformer reads each 2x2 patch as one token with 4-D position ids (t, h, w, l) = (0, row, col, 0);
text tokens are (0, 0, 0, index). Conditioning: ``prompt_embeds`` [L, 3 * D], the Mistral text encoder's
hidden states of layers 10, 20 and 30 side by side (``Flux2Pipeline.encode_prompt``). FLUX.2 dev is
guidance-distilled (``guidance_embeds``): training feeds ``--guidance`` like the Flux.1 family. The noise
level shift grows with the token count (the scheduler's ``use_dynamic_shifting``).

File layout: LoRA tensors under diffusers names, ``transformer.<module>.lora_A.weight`` /
``lora_B.weight``, which ``Flux2Pipeline.load_lora_weights`` (``Flux2LoraLoaderMixin``) reads. That
loader passes no network alphas and refuses a file with any key lacking "lora", so ``alpha / rank`` is
folded into ``lora_B`` (the file's alpha is its rank). Other algorithms keep LyCORIS tensors under
``lycoris_<module path with _>``, LyCORIS's own names, which the same loader reads for LoKr.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, denoiser_keys, has_checkpoint_key, read_json, register_family
from ..mmdit import FoldedAlphaLoRA

#: FLUX.2 dev's diffusers configs (transformer and scheduler), for single-file checkpoints
CONFIGS = Path(__file__).parent / "configs"
#: FlowMatchEulerDiscreteScheduler config of FLUX.2 dev, for a model without a scheduler/ folder
DEFAULT_SCHEDULER = read_json(CONFIGS / "flux2_dev" / "scheduler" / "scheduler_config.json")


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*4, H/2, W/2], features (c, dy, dx): ``Flux2Pipeline._patchify_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    b, c4, h, w = latents.shape
    return latents.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), C*4] tokens, row-major (the pipeline's patchify, then pack)."""
    patches = patchify(latents)
    return patches.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    return unpatchify(tokens.transpose(1, 2).reshape(b, features, height // 2, width // 2))


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows*cols, 4] position ids (t, h, w, l) = (0, row, column, 0), as ``_prepare_latent_ids``."""
    ids = torch.zeros(rows, cols, 4, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 4)


def text_ids(length: int, device=None) -> torch.Tensor:
    """[length, 4] position ids (0, 0, 0, index), as ``_prepare_text_ids``."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, 32, H, W] -> the latents the transformer is trained on (same shape): patchified,
    standardised by the VAE's batch-norm statistics as ``Flux2Pipeline._encode_vae_image``, unpatchified."""
    if latents.shape[-1] % 2 or latents.shape[-2] % 2:
        raise TrainerError(f"Flux.2 needs latents of even size, got {latents.shape[-2]}x{latents.shape[-1]}")
    patches = patchify(latents)
    mean, std = _bn_stats(vae, patches)
    return unpatchify((patches - mean) / std)


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalize_latents` (what ``Flux2Pipeline`` does before ``vae.decode``)."""
    patches = patchify(latents)
    mean, std = _bn_stats(vae, patches)
    return unpatchify(patches * std + mean)


def encode_text(pipe, captions, device):
    # the Mistral encoder's hidden states of layers (10, 20, 30), concatenated per token
    embeds, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1)
    return {"prompt_embeds": embeds}


@register_family
class Flux2(FoldedAlphaLoRA, ModelFamily):
    name = "flux2"
    denoiser_class = Flux2Transformer2DModel
    subfolder = "transformer"
    # LyCORIS's names for the modules of a diffusers model it wraps: lycoris_<path with _>
    kohya_prefix = "lycoris_"
    # the double blocks' attention projections (image to_*, text add_*) and the single blocks' fused
    # q/k/v/MLP input; the single blocks' output (attn.to_out, fused with the MLP's output) shares its
    # suffix with the double blocks' to_out ModuleList, so it is trained under "all" only
    default_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "to_qkv_mlp_proj")
    conditioning = {"prompt_embeds": 2}
    # the pipeline packs 2x2 latent patches into one token
    encoding = FamilyEncoding(1024, lambda config: 2 * config.get("patch_size", 1), encode_text,
                              latent_scale=(1.0, 0.0), normalize_latents=normalize_latents)

    def matches(self, config):
        return config.get("_class_name") == "Flux2Transformer2DModel"

    def matches_checkpoint(self, state_dict):
        # the key diffusers' own single-file detection uses for Flux.2 (Flux.1 has per-block modulations)
        return has_checkpoint_key(state_dict, "single_stream_modulation.lin.weight")

    def single_file_config(self, state_dict):
        return CONFIGS / "flux2_dev", dict(DEFAULT_SCHEDULER)

    def single_file_overrides(self, state_dict):
        sd = denoiser_keys(state_dict)
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        return dict(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0],
            num_layers=len({key.split(".")[1] for key in sd if key.startswith("double_blocks.")}),
            num_single_layers=len({key.split(".")[1] for key in sd if key.startswith("single_blocks.")}),
            attention_head_dim=head_dim,
            num_attention_heads=hidden // head_dim,
            joint_attention_dim=sd["txt_in.weight"].shape[1],
            timestep_guidance_channels=sd["time_in.in_layer.weight"].shape[1],
            # the double blocks' MLP input is SwiGLU: gate and value, each mlp_ratio * hidden wide
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / (2 * hidden),
            guidance_embeds="guidance_in.in_layer.weight" in sd,
            axes_dims_rope=(head_dim // 4,) * 4,  # FLUX.2: four equal rotary axes (t, h, w, l)
        )

    def single_file_state_dict(self, tensors):
        return tensors  # diffusers' Flux.2 converter reads the bare BFL names (and splits the fused qkv)

    def latent_channels(self, model):
        return model.config.in_channels // 4  # the transformer sees 2x2 patches

    def check_conditioning(self, model, shapes):
        dim, expected = shapes["prompt_embeds"][-1], model.config.joint_attention_dim
        if dim != expected:
            raise TrainerError(f"prompt_embeds have {dim} features but the model's joint_attention_dim is "
                               f"{expected}: the conditioning was encoded for another model")
        height, width = shapes["latents"][-2:]
        if height % 2 or width % 2:
            raise TrainerError(f"--latents: Flux.2 packs latents in 2x2 patches; latent size {height}x{width} "
                               "is odd")

    def make_objective(self, loaded, options):
        return FlowMatchObjective(loaded.scheduler_config or DEFAULT_SCHEDULER, options, patch_size=2,
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
            timestep=timesteps / 1000,  # the transformer scales by 1000 itself, as Flux2Pipeline assumes
            img_ids=image_ids(h // 2, w // 2, noisy.device).expand(b, -1, -1),
            txt_ids=text_ids(prompt.shape[1], noisy.device).expand(b, -1, -1),
            guidance=guidance_values,
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)

    def base_model_version(self, model):
        return "flux2_dev" if model.config.guidance_embeds else "flux2_klein"
