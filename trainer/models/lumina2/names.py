"""Lumina-Image 2.0's original module names (Alpha-VLLM's NextDiT, which ComfyUI keeps: ``layers.0.attention.qkv``,
``feed_forward.w1``, ``adaLN_modulation.1``) against diffusers' ``Lumina2Transformer2DModel`` names.

One table serves both directions: ComfyUI's names for ``--file_layout comfyui``, and single files in the
original names read into diffusers. diffusers' own single-file converter splits the fused ``qkv`` at
Lumina-Image 2.0's widths (2304, 768, 768), so any other width fails there; here the split sizes come
from the tensors' shapes. Tensors handed to diffusers already carry its names, which its converter's
renames leave alone.
"""

from __future__ import annotations

import torch

#: the three stacks of blocks; the context refiner has no modulation (its first norm is a plain RMSNorm)
STACKS = ("noise_refiner", "context_refiner", "layers")
#: outside the blocks: diffusers -> original
TOP_LEVEL = {
    "x_embedder": "x_embedder",
    "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_caption_embed.caption_embedder.0": "cap_embedder.0",
    "time_caption_embed.caption_embedder.1": "cap_embedder.1",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",
    "norm_out.linear_2": "final_layer.linear",
}
#: per block, diffusers -> original (q, k, v are fused into attention.qkv: :data:`QKV`)
BLOCK = {
    "attn.to_out.0": "attention.out", "attn.norm_q": "attention.q_norm", "attn.norm_k": "attention.k_norm",
    "feed_forward.linear_1": "feed_forward.w1", "feed_forward.linear_2": "feed_forward.w2",
    "feed_forward.linear_3": "feed_forward.w3", "norm2": "attention_norm2", "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
}
MODULATED = {"norm1.linear": "adaLN_modulation.1", "norm1.norm": "attention_norm1"}
PLAIN = {"norm1": "attention_norm1"}
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


def block_names(stack: str) -> dict[str, str]:
    """diffusers -> original names inside one block of ``stack`` (q, k, v excluded)."""
    return {**BLOCK, **(PLAIN if stack == "context_refiner" else MODULATED)}


def count_blocks(state_dict: dict[str, torch.Tensor], stack: str) -> int:
    indices = {int(key.split(".")[1]) for key in state_dict if key.startswith(stack + ".")}
    return max(indices) + 1 if indices else 0


def original_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-named Lumina 2 tensors (no ``model.diffusion_model.`` prefix) under diffusers names. Tensors of
    no known name are kept as they are, so diffusers reports them as unexpected; ``norm_final.weight``, which
    the original model stores but never uses, is dropped (as diffusers' converter does)."""
    hidden = tensors["x_embedder.weight"].shape[0]
    top = {v: k for k, v in TOP_LEVEL.items()}
    out = {}
    for name, tensor in tensors.items():
        module, _, param = name.rpartition(".")
        parts = name.split(".")
        if name == "norm_final.weight":
            continue
        if parts[0] in STACKS and len(parts) > 3:
            prefix, rest = ".".join(parts[:2]), ".".join(parts[2:-1])
            if rest == "attention.qkv":
                kv = (tensor.shape[0] - hidden) // 2
                for target, chunk in zip(QKV, tensor.split([hidden, kv, kv])):
                    out[f"{prefix}.{target}.{param}"] = chunk
                continue
            table = {v: k for k, v in block_names(parts[0]).items()}
            out[f"{prefix}.{table[rest]}.{param}" if rest in table else name] = tensor
        else:
            out[f"{top[module]}.{param}" if module in top else name] = tensor
    return out


def lumina2_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """``Lumina2Transformer2DModel`` config fields from an original-named checkpoint's shapes."""
    hidden, patch_features = state_dict["x_embedder.weight"].shape
    head_dim = state_dict["layers.0.attention.q_norm.weight"].shape[0]
    qkv_rows = state_dict["layers.0.attention.qkv.weight"].shape[0]
    ffn = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    patch = 2  # every Lumina 2 release; the file does not state it apart from the channel count
    side = 2 * (head_dim // 6)  # rotary dims per axis are not stored: Lumina-Image 2.0's equal thirds (32 of 96)
    if -(-4 * hidden // 256) * 256 == ffn:  # Lumina-Image 2.0's own rule (multiple of 256, no multiplier)
        feed_forward = dict(multiple_of=256, ffn_dim_multiplier=None)
    else:  # the width is ceil(multiplier * 4 * hidden / multiple_of) * multiple_of: this gives it exactly
        feed_forward = dict(multiple_of=1, ffn_dim_multiplier=(ffn + 0.5) / (4 * hidden))
    return dict(
        patch_size=patch,
        in_channels=patch_features // (patch * patch),
        hidden_size=hidden,
        num_layers=count_blocks(state_dict, "layers"),
        num_refiner_layers=count_blocks(state_dict, "noise_refiner"),
        num_attention_heads=hidden // head_dim,
        num_kv_heads=(qkv_rows - hidden) // (2 * head_dim),
        **feed_forward,
        axes_dim_rope=(head_dim - 2 * side, side, side),
        cap_feat_dim=state_dict["cap_embedder.1.weight"].shape[1],
    )
