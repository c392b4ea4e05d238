"""Flux.1 single files in Black Forest Labs' names (``double_blocks.*``, ``single_blocks.*``, fused
``qkv``), the layout ComfyUI keeps in ``models/diffusion_models/``, as diffusers'
``FluxTransformer2DModel`` names them.

diffusers has a converter for this layout, but it assumes FLUX.1's width (3072) and MLP width when it
splits the fused projections, so any other width (pruned models, the tests' tiny ones) fails. Here
every split size is read from the tensors' shapes instead, and the config fields from the shapes too.
"""

from __future__ import annotations

import torch

#: per double block: BFL name -> diffusers name (unfused tensors)
DOUBLE_BLOCK = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
#: per double block: fused BFL projection -> the diffusers projections it holds, in order
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_BLOCK = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
#: outside the blocks
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def _rename(name: str, table: dict[str, str]) -> str | None:
    """``name`` (``<module>.weight``/``.bias`` or a full tensor name) under ``table``, or None."""
    if name in table:
        return table[name]
    module, _, param = name.rpartition(".")
    return f"{table[module]}.{param}" if module in table else None


def bfl_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-named Flux tensors (no ``model.diffusion_model.`` prefix) under diffusers names. Tensors of
    no known name are kept as they are, so diffusers reports them as unexpected."""
    hidden = tensors["img_in.weight"].shape[0]
    out = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            rest = ".".join(parts[2:])
            prefix = ("transformer_blocks." if parts[0] == "double_blocks" else "single_transformer_blocks.") + parts[1]
            module, _, param = rest.rpartition(".")
            if parts[0] == "double_blocks" and module in DOUBLE_FUSED:
                for target, chunk in zip(DOUBLE_FUSED[module], tensor.split(hidden)):
                    out[f"{prefix}.{target}.{param}"] = chunk
                continue
            if parts[0] == "single_blocks" and module == "linear1":
                # q, k, v (hidden each), then the MLP's input projection (the rest)
                chunks = tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden])
                for target, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), chunks):
                    out[f"{prefix}.{target}.{param}"] = chunk
                continue
            renamed = _rename(rest, DOUBLE_BLOCK if parts[0] == "double_blocks" else SINGLE_BLOCK)
            out[f"{prefix}.{renamed}" if renamed else name] = tensor
        elif name.startswith("final_layer.adaLN_modulation.1."):
            # BFL stores (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)
            shift, scale = tensor.chunk(2)
            out["norm_out.linear." + name.rpartition(".")[2]] = torch.cat([scale, shift])
        else:
            out[_rename(name, TOP_LEVEL) or name] = tensor
    return out


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of ``<prefix>.<i>.*`` blocks in a checkpoint (bare names)."""
    indices = {int(key.split(".")[1]) for key in state_dict if key.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims of the (text, row, column) axes for a head size: FLUX.1's (16, 56, 56) at 128, and
    the same proportions, each even, at other sizes (the rotary split is not stored in the file)."""
    side = 2 * int(head_dim * 7 / 16 / 2)
    return head_dim - 2 * side, side, side


def flux_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """``FluxTransformer2DModel`` config fields from a BFL checkpoint's shapes (bare names)."""
    hidden, in_channels = state_dict["img_in.weight"].shape
    head_dim = state_dict["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return dict(
        in_channels=in_channels,
        out_channels=state_dict["final_layer.linear.weight"].shape[0],
        num_layers=count_blocks(state_dict, "double_blocks"),
        num_single_layers=count_blocks(state_dict, "single_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=state_dict["txt_in.weight"].shape[1],
        pooled_projection_dim=state_dict["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state_dict,
        axes_dims_rope=rope_axes(head_dim),
    )
