"""Wan 2.1 / 2.2 text-to-video: ``WanTransformer3DModel`` trained by rectified flow on video latents.

Latents are rows ``[C, T, H, W]`` (``latent_ndim`` 4): C = 16 (Wan 2.1, Wan 2.2 A14B) or 48 (Wan 2.2
TI2V-5B), T latent frames (the VAE keeps the first frame and packs every 4 more into one), H and W the
VAE's 8x downsampled sides (16x for the 5B's VAE). Images are 1-frame clips (T = 1): ``[C, 1, H, W]``
rows, or plain ``[C, H, W]`` rows, which are read as such. The latents are the VAE's, normalised as
``WanPipeline`` does: ``(z - latents_mean) / latents_std`` per channel (``AutoencoderKLWan``'s config).

Conditioning: ``prompt_embeds`` [L, 4096], the UMT5-XXL encoder's last hidden states with the tokens
past each prompt's length zeroed, as ``WanPipeline.encode_prompt`` returns them (L = 512 there).

Objective: rectified flow with the shift of the pipeline's scheduler. Wan ships a
``UniPCMultistepScheduler`` with ``use_flow_sigmas`` whose shift is ``flow_shift`` (3.0 for 480p, 5.0
for 720p); a ``FlowMatchEulerDiscreteScheduler`` config's ``shift`` is read as well.

Wan 2.2 A14B's two experts: ``transformer`` denoises the high-noise steps (timesteps at or above
``boundary_ratio * 1000``, model_index.json) and ``transformer_2`` the low-noise ones. One LoRA is
trained per expert, as Wan's own recipes and musubi-tuner do: ``--model <pipeline>`` (or
``<pipeline>/transformer``) trains the high-noise expert, ``--model <pipeline>/transformer_2`` the
low-noise one, and the sampled noise levels are mapped linearly into that expert's range (the same
distribution, restricted). Wan 2.1 and the 5B (no ``boundary_ratio``) train over every noise level.

File layout: Wan's original module names under ``diffusion_model.`` with ``lora_A`` / ``lora_B``
(``diffusion_model.blocks.0.self_attn.q.lora_A.weight``), the layout of the LoRAs ComfyUI users share
and of ComfyUI's own saves. ComfyUI reads these names for any model and applies ``alpha / rank``;
diffusers' ``WanPipeline.load_lora_weights`` converts them (``_convert_non_diffusers_wan_lora_to_
diffusers``), applying ``alpha / rank`` for the blocks' attention and feed-forward layers but not for
the embedders and the head, so those modules' alpha is folded into ``lora_B`` (no alpha tensor: scale 1
in both). Other algorithms' tensors (LoHa, LoKr, OFT) and full offsets use the same names, which is
where ComfyUI looks for them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from diffusers import WanTransformer3DModel

from ...errors import TrainerError
from ...objectives import FlowMatchObjective
from ..base import FamilyEncoding, ModelFamily, per_channel_normalisation, read_json, register_family

logger = logging.getLogger(__name__)

#: Wan's own scheduler default (480p models; 720p uses 5.0), for a model without a scheduler/ folder
DEFAULT_SHIFT = 3.0
#: ``AutoencoderKLWan``'s (Wan 2.1 VAE's) per-channel latent statistics, as diffusers' and ComfyUI's Wan 2.1
#: latent formats hold them: the denoiser sees ``(z - mean) / std``
VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
            -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
           1.6382, 1.1253, 2.8251, 1.916)
#: WanPipeline's default prompt length
MAX_SEQUENCE_LENGTH = 512

#: diffusers module name -> Wan's original name (``wan/modules/model.py``), per block and for the rest
_BLOCK_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q",
                "attn1.norm_k": "self_attn.norm_k", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q",
                "attn2.norm_k": "cross_attn.norm_k", "attn2.add_k_proj": "cross_attn.k_img",
                "attn2.add_v_proj": "cross_attn.v_img", "attn2.norm_added_k": "cross_attn.norm_k_img",
                "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
                # diffusers' norm2 is the cross-attention's input norm, Wan's norm3 (and the other way round)
                "norm2": "norm3", "norm3": "norm2"}
_OTHER_NAMES = {"patch_embedding": "patch_embedding", "proj_out": "head.head",
                "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                "condition_embedder.time_proj": "time_projection.1",
                "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
                "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
                "condition_embedder.image_embedder.norm2": "img_emb.proj.4"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
#: the modules whose alpha diffusers' Wan converter applies (the blocks' attention and feed-forward)
_ALPHA_READ = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])")


def original_name(module: str) -> str | None:
    """Wan's original name of a diffusers module path (``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q``),
    or None for a module Wan's checkpoints have no name for."""
    match = _BLOCK.fullmatch(module)
    if match:
        inner = _BLOCK_NAMES.get(match.group(2))
        return None if inner is None else f"blocks.{match.group(1)}.{inner}"
    return _OTHER_NAMES.get(module)


def encode_text(pipe, captions, device):
    # UMT5 last hidden states, zero past each prompt's tokens, padded to WanPipeline's length
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                   max_sequence_length=MAX_SEQUENCE_LENGTH, device=device)
    return {"prompt_embeds": embeds}


def expert_range(loaded) -> tuple[float, float, str | None]:
    """(lowest, highest noise level, expert name or None) that ``loaded`` denoises: a Wan 2.2 A14B expert
    covers one side of the pipeline's ``boundary_ratio``; any other Wan model all of (0, 1]."""
    if loaded.kind == "pipeline":
        root, subfolder = Path(loaded.source), loaded.extra.get("subfolder", "transformer")
    elif loaded.kind == "folder":
        root, subfolder = Path(loaded.source).parent, Path(loaded.source).name
    else:
        return 0.0, 1.0, None
    index_file = root / "model_index.json"
    index = read_json(index_file) if index_file.is_file() else {}
    boundary = index.get("boundary_ratio")
    has_low_expert = (index.get("transformer_2") or [None])[0] is not None
    if boundary is None or not has_low_expert or subfolder not in ("transformer", "transformer_2"):
        return 0.0, 1.0, None
    if not 0.0 < float(boundary) < 1.0:
        raise TrainerError(f"--model: {index_file} has boundary_ratio {boundary}; expected a number in (0, 1)")
    if subfolder == "transformer":
        return float(boundary), 1.0, "high-noise"
    return 0.0, float(boundary), "low-noise"


class ExpertFlowMatch(FlowMatchObjective):
    """Rectified flow whose (shifted) noise levels are mapped linearly into ``[low, high]``: one Wan 2.2
    expert's share of the noise levels, with the sampling distribution's shape kept."""

    def __init__(self, scheduler_config, options, low: float, high: float, **kwargs):
        super().__init__(scheduler_config, options, **kwargs)
        self.low, self.high = low, high

    def sigmas(self, u, latents):
        sigma = super().sigmas(u, latents)
        return (self.low + (self.high - self.low) * sigma).clamp(1 / self.num_train_timesteps, 1.0)


def flow_scheduler_config(config: dict | None) -> dict:
    """The scheduler config as ``FlowMatchObjective`` reads it: Wan's UniPC config keeps its shift in
    ``flow_shift``, a flow-match Euler config in ``shift``."""
    config = dict(config or {})
    shift = config.get("flow_shift") if "flow_shift" in config else config.get("shift", DEFAULT_SHIFT)
    return {"_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": config.get("num_train_timesteps", 1000), "shift": float(shift or 1.0)}


@register_family
class Wan(ModelFamily):
    name = "wan"
    denoiser_class = WanTransformer3DModel
    subfolder = "transformer"
    kohya_prefix = "lora_unet_"  # musubi-tuner's names: lora_unet_<Wan's original module with _>
    # every Linear of the transformer blocks (self-attention, cross-attention, feed-forward), as
    # musubi-tuner and diffusion-pipe target them
    default_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
    # --target_modules all (the default) adapts every Linear; the Conv3d patch embedding is left out:
    # diffusers' Wan LoRA converter has no name for it and refuses a file holding it
    all_targets_leave_out = ("patch_embedding",)
    conditioning = {"prompt_embeds": 2}
    latent_ndim = 4
    # the Wan 2.1 VAE's per-channel normalisation (also Wan 2.2 A14B's VAE): ComfyUI LATENTs hold raw latents
    # lora-prepare: the VAE config's own statistics (16 or 48 channels); clips at Wan's 16 fps, at most its
    # native 81 frames (5 s)
    encoding = FamilyEncoding(480, lambda config: config["patch_size"][-1], encode_text,
                              latent_scale=(tuple(1 / s for s in VAE_STD), VAE_MEAN),
                              vae_normalisation=per_channel_normalisation, fps=16.0,
                              frames=(1, 17, 33, 49, 65, 81))

    def matches(self, config):
        return config.get("_class_name") == "WanTransformer3DModel"

    def check_conditioning(self, model, shapes):
        config = model.config
        if config.image_dim is not None or config.added_kv_proj_dim is not None:
            raise TrainerError("--model: this Wan model is image-to-video (it takes image embeddings); only "
                               "text-to-video Wan models are trained here")
        dim = shapes["prompt_embeds"][-1]
        if dim != config.text_dim:
            raise TrainerError(f"prompt_embeds have {dim} features but the model's text_dim is {config.text_dim}: "
                               "the conditioning was encoded for another model")
        _, frames, height, width = shapes["latents"]
        pt, ph, pw = config.patch_size
        if frames % pt or height % ph or width % pw:
            raise TrainerError(f"--latents: latent size {frames}x{height}x{width} (frames x height x width) is "
                               f"not a multiple of the patch size {pt}x{ph}x{pw}")
        longest = max(frames // pt, height // ph, width // pw)
        if longest > config.rope_max_seq_len:
            raise TrainerError(f"--latents: latent size {frames}x{height}x{width} has {longest} patches a side, "
                               f"more than the model's rope_max_seq_len {config.rope_max_seq_len}")

    def make_objective(self, loaded, options):
        low, high, expert = expert_range(loaded)
        scheduler = flow_scheduler_config(loaded.scheduler_config)
        patch = loaded.denoiser.config.patch_size[-1]
        if expert is None:
            return FlowMatchObjective(scheduler, options, patch_size=patch)
        logger.info("Wan 2.2 %s expert: training on noise levels %.3f..%.3f (boundary_ratio of the pipeline)",
                    expert, low, high)
        return ExpertFlowMatch(scheduler, options, low, high, patch_size=patch)

    def forward(self, model, noisy, timesteps, batch):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                     return_dict=False)[0]

    def base_model_version(self, model):
        return "wan2.2_ti2v_5b" if model.config.in_channels == 48 else "wan"

    def module_spellings(self, model):
        names = (name for name, _ in model.named_modules())
        return {original: name for name in names if (original := original_name(name)) is not None}

    def file_tensors(self, module, tensors):
        original = original_name(module)
        if original is None:
            raise TrainerError(f"Wan: module {module} has no name in Wan's checkpoints, so no loader would read "
                               "its tensors; leave it out of --target_modules")
        key = f"diffusion_model.{original}"
        if "lora_down.weight" not in tensors:
            return {f"{key}.{suffix}": tensor for suffix, tensor in tensors.items()}
        down, up, alpha = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors["alpha"]
        if _ALPHA_READ.fullmatch(original):
            return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": alpha}
        return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * (alpha / down.shape[0])}

    def file_metadata(self, tensors, rank, alpha):
        folded = any(key.endswith(".lora_A.weight") and key.removesuffix("lora_A.weight") + "alpha" not in tensors
                     for key in tensors)
        # modules without an alpha tensor hold alpha / rank in lora_B: read back, their alpha is their rank
        return {"ss_network_alpha": str(float(rank))} if folded else {}
