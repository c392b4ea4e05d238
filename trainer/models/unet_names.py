"""Module names of the original Stable Diffusion (LDM) UNet and their diffusers counterparts.

Single-file checkpoints, ComfyUI and kohya's SDXL LoRAs name UNet modules the LDM way
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q``); diffusers names the same module
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. The mapping is derived from the
UNet config (block types, ``layers_per_block``), so it holds for any UNet2DConditionModel layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: LDM ResBlock layer -> diffusers ResnetBlock2D attribute (parameter-free layers have no entry)
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
#: how the inside of each kind of block is renamed, diffusers -> LDM
_INNER = {
    "same": {},  # transformer blocks, linear layers: identical names below the block
    "resnet": {v: k for k, v in _RESNET.items()},
    "downsample": {"conv": "op"},
    "upsample": {"conv": "conv"},
}


def ldm_to_diffusers_names(unet_config: Mapping) -> dict[str, str]:
    """LDM module path -> diffusers module path for every module of a UNet2DConditionModel
    built from ``unet_config`` (the module paths have no ``model.diffusion_model.`` prefix)."""
    from diffusers import UNet2DConditionModel

    blocks = _block_prefixes(unet_config)
    with torch.device("meta"):  # only the module tree is needed: no memory, no init time
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    names = {}
    for name, _ in unet.named_modules():
        ldm = _to_ldm(name, blocks)
        if ldm is not None:
            names[ldm] = name
    return names


def _block_prefixes(config: Mapping) -> dict[str, tuple[str, str]]:
    """diffusers block prefix -> (LDM block prefix, kind of block), counted from the config."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    blocks = {
        "conv_in": ("input_blocks.0.0", "same"),
        "time_embedding.linear_1": ("time_embed.0", "same"),
        "time_embedding.linear_2": ("time_embed.2", "same"),
        "conv_norm_out": ("out.0", "same"),
        "conv_out": ("out.2", "same"),
    }
    # an extra embedding MLP lives in label_emb.0 in LDM, whichever diffusers attribute holds it
    if config.get("class_embed_type") in ("timestep", "projection"):
        blocks["class_embedding.linear_1"] = ("label_emb.0.0", "same")
        blocks["class_embedding.linear_2"] = ("label_emb.0.2", "same")
    elif config.get("addition_embed_type") == "text_time":
        blocks["add_embedding.linear_1"] = ("label_emb.0.0", "same")
        blocks["add_embedding.linear_2"] = ("label_emb.0.2", "same")
    elif config.get("num_class_embeds") is not None:
        blocks["class_embedding"] = ("label_emb", "same")

    # input_blocks.0 is conv_in; then each down block holds layers_per_block (resnet, attention)
    # entries, and every block but the last ends with an entry holding only its downsampler
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", "resnet")
            if "CrossAttn" in block_type:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", "same")
            index += 1
        if i < len(down_types) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{index}.0", "downsample")
            index += 1

    # the middle block alternates resnet, attention, resnet
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        with_attention = "CrossAttn" in mid_type
        blocks["mid_block.resnets.0"] = ("middle_block.0", "resnet")
        if with_attention:
            blocks["mid_block.attentions.0"] = ("middle_block.1", "same")
        blocks["mid_block.resnets.1"] = (f"middle_block.{2 if with_attention else 1}", "resnet")

    # up blocks take layers_per_block + 1 entries each (reversed per-block counts); the last
    # entry of every block but the final one also holds the upsampler, after the attention
    up_layers = list(reversed(layers))
    index = 0
    for i, block_type in enumerate(up_types):
        attention = "CrossAttn" in block_type
        for j in range(up_layers[i] + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", "resnet")
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", "same")
            if j == up_layers[i] and i < len(up_types) - 1:
                blocks[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{index}.{2 if attention else 1}",
                                                         "upsample")
            index += 1
    return blocks


def _to_ldm(name: str, blocks: dict[str, tuple[str, str]]) -> str | None:
    """The LDM path of diffusers module ``name``, or None where LDM has no such module."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            ldm_prefix, kind = blocks[prefix]
            rest = parts[cut:]
            if not rest:
                return ldm_prefix
            renames = _INNER[kind]
            if renames:
                if rest[0] not in renames:
                    return None  # e.g. a resnet's shared SiLU: LDM spells one per use
                rest = [renames[rest[0]], *rest[1:]]
            return ".".join([ldm_prefix, *rest])
    return None


def unet_comfyui_names(model) -> dict:
    """ComfyUI names a UNet's modules as the original LDM UNet does (SD 1.x/2.x and SDXL)."""
    from ..adapters.comfyui import ComfyPart

    return {name: ComfyPart(ldm) for ldm, name in ldm_to_diffusers_names(model.config).items()}


def ldm_module_spellings(model) -> dict[str, str]:
    """The original LDM UNet names files (kohya's SD/SDXL LoRAs) use for a UNet's modules -> module path."""
    return ldm_to_diffusers_names(model.config)


def unet_factor(config: dict) -> int:
    """A UNet's downsampling in latent pixels: one downsampler between each pair of blocks."""
    return 2 ** (len(config["block_out_channels"]) - 1)
