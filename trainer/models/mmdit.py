"""Pieces the MMDiT families share (SD3, Flux): diffusers/PEFT file keys, conditioning widths.

Families import these; a family never imports another family.
"""

from __future__ import annotations

import torch

from ..errors import TrainerError


def peft_file_tensors(module: str, tensors: dict[str, torch.Tensor],
                      fold_alpha: bool) -> dict[str, torch.Tensor]:
    """A LoRA module's tensors under diffusers/PEFT names (``transformer.<module>.lora_A.weight``);
    ``fold_alpha`` multiplies ``lora_B`` by ``alpha / rank`` and drops the alpha tensor."""
    down, up, alpha = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors["alpha"]
    key = f"transformer.{module}"
    if fold_alpha:
        return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * (alpha / down.shape[0])}
    return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": alpha}


class FoldedAlphaLoRA:
    """Mixin of a family whose LoRA files use diffusers/PEFT names with ``alpha / rank`` folded into ``lora_B``
    (the loaders of SD3, Flux.2, Lumina 2 and HunyuanVideo refuse an alpha tensor): the file's alpha is then
    its rank. Other algorithms' tensors keep the family's default keys. List it before ``ModelFamily``."""

    def file_tensors(self, module, tensors):
        if "lora_down.weight" in tensors:
            return peft_file_tensors(module, tensors, fold_alpha=True)
        return super().file_tensors(module, tensors)

    def file_metadata(self, tensors, rank, alpha):
        if any(key.endswith(".alpha") for key in tensors):
            return {}
        return {"ss_network_alpha": str(float(rank))}  # alpha / rank is folded into lora_B


def has_module(model, module: str) -> bool:
    try:
        model.get_submodule(module)
        return True
    except AttributeError:
        return False


def check_text_conditioning(model, shapes: dict[str, tuple[int, ...]]) -> None:
    """prompt_embeds / pooled_prompt_embeds widths against an MMDiT's config (SD3 and Flux)."""
    config = model.config
    widths = {"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"}
    for name, field in widths.items():
        dim = shapes[name][-1]
        if dim != config[field]:
            raise TrainerError(f"{name} have {dim} features but the model's {field} is {config[field]}: "
                               "the conditioning was encoded for another model")
