"""What the Flux-style transformers share (FLUX.1, Chroma): 2x2 latent patches as tokens with
(0, row, column) position ids, and ComfyUI's names of their double and single blocks (which HunyuanVideo's
blocks share too). Not a family: a module families import."""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: one token per 2x2 patch, row-major, features (c, dy, dx)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows*cols, 3] position ids of the image tokens: (0, row, column)."""
    grid = torch.zeros(rows, cols, 3, device=device)
    grid[..., 1] = torch.arange(rows, device=device)[:, None]
    grid[..., 2] = torch.arange(cols, device=device)[None, :]
    return grid.reshape(rows * cols, 3)


#: ComfyUI's names (comfy/ldm/flux/layers.py MLPEmbedder: in_layer, out_layer) of the timestep, pooled-text and
#: guidance embedders that Flux and HunyuanVideo share, by diffusers module path
FLUX_EMBEDDER_NAMES = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def flux_block_comfyui_names(model, modulations: bool) -> dict:
    """ComfyUI's names (comfy/ldm/flux/model.py) of the double and single blocks of a Flux-style
    transformer, with its fused q/k/v (``img_attn.qkv``, ``txt_attn.qkv``) and ``linear1`` (q, k, v and the
    MLP's input); ``modulations``: the blocks have their own AdaLN linears (FLUX.1; Chroma's come from its
    approximator). Its RMSNorms hold "scale"."""
    from ..adapters.comfyui import fused, renamed

    names = {}
    norms = {"attn.norm_q": "scale", "attn.norm_k": "scale", "attn.norm_added_q": "scale",
             "attn.norm_added_k": "scale"}
    for i in range(len(model.transformer_blocks)):
        block, to = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        own = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"} if modulations else {}
        names.update(renamed(block, to, {
            **own, "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2", "attn.norm_q": "img_attn.norm.query_norm",
            "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
            "attn.norm_added_k": "txt_attn.norm.key_norm"}, params=norms))
        names.update(fused(model, f"{to}img_attn.qkv", [f"{block}attn.{p}" for p in ("to_q", "to_k", "to_v")]))
        names.update(fused(model, f"{to}txt_attn.qkv",
                           [f"{block}attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj")]))
    for i in range(len(model.single_transformer_blocks)):
        block, to = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        own = {"norm.linear": "modulation.lin"} if modulations else {}
        names.update(renamed(block, to, {**own, "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                                         "attn.norm_k": "norm.key_norm"}, params=norms))
        names.update(fused(model, f"{to}linear1",
                           [f"{block}attn.to_q", f"{block}attn.to_k", f"{block}attn.to_v", f"{block}proj_mlp"]))
    return names
