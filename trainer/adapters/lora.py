"""LoRA: ``W + (alpha / rank) * up @ down``, kohya's ``lora_down``/``lora_up``/``alpha`` tensors."""

from __future__ import annotations

import torch
from peft import LoraConfig

from .base import ADAPTER_NAME, Algorithm, register_algorithm


@register_algorithm
class LoRA(Algorithm):
    name = "LoRA"
    network_module = "networks.lora"
    tensors = ("lora_down.weight", "lora_up.weight")
    required = tensors

    def peft_config(self, rank, alpha, targets, rank_pattern=None, alpha_pattern=None):
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=True, rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {})

    def export_layer(self, layer):
        return {
            "lora_down.weight": layer.lora_A[ADAPTER_NAME].weight,
            "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight,
            "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER_NAME])),
        }

    def update_shape(self, tensors):
        # down is (r, in), (r, in, kh, kw) or ComfyUI's flattened (r, in*kh*kw)
        return tensors["lora_up.weight"].shape[0], tensors["lora_down.weight"][0].numel()

    def rank_from_tensors(self, tensors):
        return tensors["lora_down.weight"].shape[0]

    @torch.no_grad()
    def import_layer(self, layer, tensors):
        down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        down.copy_(tensors["lora_down.weight"].reshape(down.shape))
        up.copy_(tensors["lora_up.weight"].reshape(up.shape))
