"""LoKr: ``W + scale * kron(w1, w2)``, LyCORIS's ``lokr_*`` tensors.

``rank`` means what LyCORIS's ``network_dim`` means for LoKr (and peft's ``r``): each dimension is
split near its square root (LyCORIS ``factor=-1``: 320 = 16 x 20), ``w1`` is the small full
``[a, c]`` factor and ``w2`` ``[b, d]`` is the product ``w2_a @ w2_b`` of rank ``rank`` unless
``rank >= max(b, d) / 2``, where ``w2`` is a full matrix (on SD 1.x at rank 8 every attention
layer is decomposed; on the tiny demo model every layer is full).

A file split differently (another LyCORIS ``factor``, or ComfyUI's training node, which splits by
its rank with full matrices) is read back with its own factor shapes, and a file that decomposes
``w1`` too (LyCORIS ``decompose_both``: ``lokr_w1_a @ lokr_w1_b``) with its own factors: the layer
takes the file's set of factors, which peft's ``get_delta_weight`` reads by presence.

Scale: ComfyUI (``comfy/weight_adapter/lokr.py``) and LyCORIS apply ``alpha / rank`` only when a
factor is decomposed and 1 when both are full matrices, while peft always applies
``alpha / rank``. A full-matrix layer is therefore written with peft's scale folded into
``lokr_w1`` (and read back by dividing it out), so the file means exactly what the loaders compute.
"""

from __future__ import annotations

import torch
from peft import LoKrConfig

from ..errors import TrainerError
from .base import ADAPTER_NAME, Algorithm, register_algorithm

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@register_algorithm
class LoKr(Algorithm):
    name = "LoKr"
    network_module = "lycoris.kohya"
    # peft's layers for it have no 3-D convolution (video models' patch embeddings stay untrained)
    layer_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    tensors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    # each Kronecker factor full or as a low-rank pair
    required = ("lokr_w1|lokr_w1_a+lokr_w1_b", "lokr_w2|lokr_w2_a+lokr_w2_b")

    def peft_config(self, rank, alpha, targets, rank_pattern=None, alpha_pattern=None):
        return LoKrConfig(r=rank, alpha=rank if alpha is None else alpha, target_modules=targets,
                          rank_dropout=0.0, module_dropout=0.0, init_weights=True, use_effective_conv2d=False,
                          decompose_both=False, decompose_factor=-1, rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {})

    def export_layer(self, layer):
        tensors = {name: getattr(layer, name)[ADAPTER_NAME] for name in FACTORS
                   if ADAPTER_NAME in getattr(layer, name)}
        if _full(tensors):
            tensors["lokr_w1"] = tensors["lokr_w1"] * layer.scaling[ADAPTER_NAME]
        tensors["alpha"] = torch.tensor(float(layer.alpha[ADAPTER_NAME]))
        return tensors

    @torch.no_grad()
    def import_layer(self, layer, tensors):
        if "lokr_t2" in tensors:
            raise TrainerError("it is a LoKr convolution stored as a Tucker decomposition (lokr_t2, LyCORIS "
                               "use_tucker), which this trainer cannot continue")
        present = {name for name in FACTORS if ADAPTER_NAME in getattr(layer, name)}
        given = {name for name in FACTORS if name in tensors}
        device = layer.get_base_layer().weight.device
        for name in present - given:  # e.g. a full w1 where the file decomposes it (decompose_both)
            del getattr(layer, name)[ADAPTER_NAME]
        for name in given - present:  # fp32 trainable, like the rest of the adapter; shaped below
            getattr(layer, name)[ADAPTER_NAME] = torch.nn.Parameter(torch.empty(0, 0, device=device))
        # the loaders' scale: alpha over the decomposed factor's rank (1 without alpha), or 1 when both
        # factors are full; fold its ratio to the layer's peft scale into w1 so kron(w1, w2) is unchanged
        file_scale = 1.0
        if not _full(tensors) and "alpha" in tensors:
            rank = tensors["lokr_w2_b" if "lokr_w2_b" in tensors else "lokr_w1_b"].shape[0]
            file_scale = float(tensors["alpha"]) / rank
        ratio = file_scale / layer.scaling[ADAPTER_NAME]
        for name in given:
            tensor = tensors[name].float() * (ratio if name in ("lokr_w1", "lokr_w1_a") else 1.0)
            param = getattr(layer, name)[ADAPTER_NAME]
            if param.ndim == 2:
                tensor = tensor.flatten(1)  # LyCORIS's [r, d, kh, kw] conv factor is peft's [r, d * kh * kw]
            if tensor.shape != param.shape:
                # another split of the dimensions (a LyCORIS factor; ComfyUI's node splits by its rank):
                # take the file's. The Parameter object stays (a factor the layer did not have is new:
                # the caller collects the trainable parameters after importing).
                param.data = torch.empty(tensor.shape, dtype=param.dtype, device=param.device)
            param.copy_(tensor)
        try:
            layer.get_delta_weight(ADAPTER_NAME)
        except RuntimeError:
            shapes = {name: tuple(tensors[name].shape) for name in sorted(given)}
            raise TrainerError(f"its LoKr factors {shapes} do not make a Kronecker product of the layer's weight "
                               f"shape {tuple(layer.get_base_layer().weight.shape)} (a file for another model?)") \
                from None

    def network_args(self, rank, alpha):
        return {"algo": "lokr", "factor": "-1"}

    def update_shape(self, tensors):
        t = tensors  # a Kronecker product: out = out1 * out2, in = in1 * in2
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = (t["lokr_w2"].shape[0], t["lokr_w2"][0].numel())
        elif "lokr_t2" in t:  # Tucker: t2 (r, r, kh, kw), w2_a (r, out2), w2_b (r, in2)
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * t["lokr_t2"][0, 0].numel())
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        return w1[0] * w2[0], w1[1] * w2[1]

    def rank_from_tensors(self, tensors):
        if "lokr_w2_a" in tensors:
            return int(tensors["lokr_w2_a"].shape[1])
        # full w2 [b, d]: peft keeps it full for any rank >= max(b, d) / 2
        return int(max(tensors["lokr_w2"].shape[:2]))


def _full(tensors: dict) -> bool:
    return "lokr_w1" in tensors and "lokr_w2" in tensors
