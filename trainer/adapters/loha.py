"""LoHa: ``W + (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product of two rank-``rank``
products), LyCORIS's ``hada_*`` tensors.

peft's LoHa computes exactly what ComfyUI (``comfy/weight_adapter/loha.py``) and LyCORIS apply at
load time: same factor shapes (``hada_w1_a`` ``[out, rank]``, ``hada_w1_b`` ``[rank, in * kernel]``),
scale ``alpha / hada_w1_b.shape[0]``, so the tensors are written as they are.
"""

from __future__ import annotations

import torch
from peft import LoHaConfig

from ..errors import TrainerError
from .base import ADAPTER_NAME, Algorithm, load_tensor, register_algorithm

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@register_algorithm
class LoHa(Algorithm):
    name = "LoHa"
    network_module = "lycoris.kohya"
    # peft's layers for it have no 3-D convolution (video models' patch embeddings stay untrained)
    layer_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    tensors = (*FACTORS, "hada_t1", "hada_t2")  # t1/t2: LyCORIS' Tucker convolutions (read, refused)
    required = FACTORS

    def peft_config(self, rank, alpha, targets, rank_pattern=None, alpha_pattern=None):
        return LoHaConfig(r=rank, alpha=rank if alpha is None else alpha, target_modules=targets,
                          rank_dropout=0.0, module_dropout=0.0, init_weights=True, use_effective_conv2d=False,
                          rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})

    def export_layer(self, layer):
        tensors = {name: getattr(layer, name)[ADAPTER_NAME] for name in FACTORS}
        tensors["alpha"] = torch.tensor(float(layer.alpha[ADAPTER_NAME]))
        return tensors

    @torch.no_grad()
    def import_layer(self, layer, tensors):
        if "hada_t1" in tensors:
            raise TrainerError("it is a LoHa convolution stored as a Tucker decomposition (hada_t1/hada_t2, "
                               "LyCORIS use_tucker), which this trainer cannot continue")
        # the file means (alpha / rank) as ComfyUI reads it (1 without an alpha tensor); should the layer
        # have been built with another alpha, fold the ratio into w1_a so the product is unchanged
        rank = tensors["hada_w1_b"].shape[0]
        file_scale = float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0
        ratio = file_scale / layer.scaling[ADAPTER_NAME]
        for name in FACTORS:
            tensor = tensors[name].float() * (ratio if name == "hada_w1_a" else 1.0)
            load_tensor(getattr(layer, name)[ADAPTER_NAME], tensor, name)

    def network_args(self, rank, alpha):
        return {"algo": "loha"}

    def update_shape(self, tensors):
        if "hada_t1" in tensors:  # Tucker: t1 (r, r, kh, kw), w1_a (r, out), w1_b (r, in)
            return tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1] * tensors["hada_t1"][0, 0].numel()
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]

    def rank_from_tensors(self, tensors):
        return int(tensors["hada_w1_b"].shape[0])

