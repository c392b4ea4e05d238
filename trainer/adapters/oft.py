"""OFT (LyCORIS "diag-oft"): each layer's weight rotated block-wise along its output dimension,
written as LyCORIS's ``oft_blocks`` tensor.

What the file means is what ComfyUI (``comfy/weight_adapter/oft.py``) computes at load time:
``Q = B - B^T`` per block (``B`` = ``oft_blocks``, ``[blocks, size, size]``), clipped to Frobenius
norm ``alpha`` over the whole layer when ``alpha > 0``, ``R = (I + Q)(I - Q)^-1`` (Cayley), and
``W'[block k] = R_k^T @ W[block k]`` with rows of ``W`` grouped in consecutive blocks; the bias is
left alone. peft's OFT rotates the input side with another parametrisation, so this module brings
its own peft layer and tuner.

``rank`` is the OFT factor of LyCORIS and of ComfyUI's training node: ``factorization(out_features,
rank)`` gives ``(block size, blocks)``, block size <= blocks (rank 8 on 320 features: 40 blocks of
8 x 8). ``alpha`` is the constraint (0: none). The exported blocks are already clipped, so LyCORIS
(whose constraint is ``alpha * out_features``) and ComfyUI apply the same rotation. No ``rescale``
tensor: ComfyUI would ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import (
    BaseTuner,
    BaseTunerLayer,
    LycorisConfig,
    PeftType,
    check_adapters_to_merge,
    conv_forward,
    mark_peft_adapter_added,
    pattern_key,
)
from ..errors import TrainerError
from .base import ADAPTER_NAME, Algorithm, load_tensor, register_algorithm


def factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into ``(m, n)``, ``m <= n``: ``factor`` itself when it divides,
    else the largest divisor up to ``sqrt(dimension)`` that is not above ``factor`` (any, if negative)."""
    if factor > 0 and dimension % factor == 0:
        m = min(factor, dimension // factor)
    else:
        m = max(d for d in range(1, math.isqrt(dimension) + 1)
                if dimension % d == 0 and (factor < 0 or d <= factor))
    return m, dimension // m


def rotations(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """The orthogonal ``R`` of every block, in fp32: Cayley transform of the (clipped) skew part."""
    with torch.autocast(blocks.device.type, enabled=False):  # R must be orthogonal to fp32 precision
        q = _skew(blocks.float(), constraint)
        eye = torch.eye(q.shape[-1], device=q.device)
        return (eye + q) @ torch.linalg.inv(eye - q)


def rotate(weight: torch.Tensor, r: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``R_k^T @ W_k`` for each block ``k`` of rows of ``weight`` (``R_k @ W_k`` if ``inverse``), fp32."""
    with torch.autocast(weight.device.type, enabled=False):
        blocks = weight.float().unflatten(0, r.shape[:2])
        pattern = "k m n, k n ... -> k m ..." if inverse else "k n m, k n ... -> k m ..."
        return torch.einsum(pattern, r, blocks).flatten(0, 1)


def _skew(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``Q = B - B^T``, scaled down to Frobenius norm ``constraint`` over the layer if above it."""
    q = blocks - blocks.transpose(1, 2)
    return q * _clip_factor(q, constraint) if constraint > 0 else q


def _clip_factor(q: torch.Tensor, constraint: float) -> torch.Tensor:
    # a clamped factor rather than ComfyUI's `if norm > constraint`: no host sync per step
    return (constraint / (torch.linalg.vector_norm(q) + 1e-8)).clamp(max=1.0)


@dataclass
class DiagOFTConfig(LycorisConfig):
    """peft config of the diagonal OFT layers below. ``peft_type`` is OFT so that peft's state-dict
    helpers (used for full-state checkpoints) find the ``oft_blocks`` parameters."""

    r: int = field(default=8, metadata={"help": "factorization(out_features, r) = (block size, blocks)"})
    alpha: float = field(default=0.0, metadata={"help": "max Frobenius norm of a layer's Q; 0: none"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "to skip"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.OFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


def compute_dtype(weight: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype the rotated weight is used in: the base weight's, unless that is only a storage dtype
    (fp8 or a quantized tensor, ``--weight_dtype``), whose layers compute in the input's dtype."""
    stored = weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or \
        type(weight) not in (torch.Tensor, nn.Parameter)
    return x.dtype if stored else weight.dtype


class DiagOFTLayer(nn.Module, BaseTunerLayer):
    """A Linear/Conv layer whose weight is used rotated by the active adapter's block rotations."""

    adapter_layer_names = ("oft_blocks",)
    other_param_names = ("oft_constraint",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.oft_blocks = nn.ParameterDict()
        self.oft_constraint: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha)

    def update_layer(self, adapter_name: str, r: int, alpha: float) -> None:
        out_features = self.base_layer.weight.shape[0]
        size, count = factorization(out_features, r)
        # zero blocks: Q = 0, R = I, the layer starts as the base layer
        self.oft_blocks[adapter_name] = nn.Parameter(torch.zeros(count, size, size))
        self.oft_constraint[adapter_name] = float(alpha)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def rotation(self, adapter_name: str) -> torch.Tensor:
        return rotations(self.oft_blocks[adapter_name], self.oft_constraint[adapter_name])

    def rotated_weight(self) -> torch.Tensor:
        """The base weight as the active adapters use it."""
        weight = self.base_layer.weight
        if type(weight) not in (torch.Tensor, nn.Parameter):  # a quantized base (--weight_dtype int8)
            weight = weight.dequantize()
        for name in self.active_adapters:
            if name in self.oft_blocks:
                weight = rotate(weight, self.rotation(name))
        return weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.oft_blocks:
                merged = rotate(weight.data, self.rotation(name).detach())
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs in the merged weights: adapter {name} is broken")
                weight.data = merged.to(weight.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = rotate(weight.data, self.rotation(name).detach(), inverse=True).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        weight = self.rotated_weight().to(compute_dtype(base.weight, x))
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        return conv_forward(base, x, weight, base.bias)

    def __repr__(self) -> str:
        return "diag_oft." + super().__repr__()


class DiagOFTModel(BaseTuner):
    """Injects :class:`DiagOFTLayer` into the modules a :class:`DiagOFTConfig` targets."""

    prefix = "oft_"
    tuner_layer_cls = DiagOFTLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        r_key = pattern_key(config.rank_pattern, current_key)
        alpha_key = pattern_key(config.alpha_pattern, current_key)
        r, alpha = config.rank_pattern.get(r_key, config.r), config.alpha_pattern.get(alpha_key, config.alpha)
        if isinstance(target, DiagOFTLayer):
            target.update_layer(adapter_name, r, alpha)
            return
        if not isinstance(target, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TrainerError(f"OFT: cannot adapt {current_key} ({type(target).__name__}); "
                               "only Linear and Conv layers")
        self._replace_module(parent, target_name, DiagOFTLayer(target, adapter_name, r, alpha), target)


@register_algorithm
class OFT(Algorithm):
    name = "OFT"
    network_module = "lycoris.kohya"
    tensors = ("oft_blocks", "rescale")  # rescale: LyCORIS' rescaled OFT (read, refused)
    required = ("oft_blocks",)

    def peft_config(self, rank, alpha, targets, rank_pattern=None, alpha_pattern=None):
        return DiagOFTConfig(r=rank, alpha=0.0 if alpha is None else alpha, target_modules=targets,
                             rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})

    def add_adapter(self, model, config):
        # what diffusers' add_adapter does, with our tuner instead of the one peft maps OFT to
        mark_peft_adapter_added(model)
        DiagOFTModel(model, config, adapter_name=ADAPTER_NAME)
        model.set_adapter(ADAPTER_NAME)

    def export_layer(self, layer):
        blocks, constraint = layer.oft_blocks[ADAPTER_NAME], layer.oft_constraint[ADAPTER_NAME]
        return {"oft_blocks": _clipped(blocks, constraint), "alpha": torch.tensor(constraint)}

    @torch.no_grad()
    def import_layer(self, layer, tensors):
        if "rescale" in tensors:
            raise TrainerError("it is a rescaled OFT (a rescale tensor, LyCORIS rescaled=True), which this trainer "
                               "cannot continue (ComfyUI ignores the rescale)")
        blocks = tensors["oft_blocks"].float()
        if blocks.ndim != 3:
            raise TrainerError(f"its oft_blocks have shape {tuple(blocks.shape)}; a diagonal OFT has "
                               "[blocks, size, size]")
        # what ComfyUI applies: the blocks clipped by the file's own constraint
        load_tensor(layer.oft_blocks[ADAPTER_NAME], _clipped(blocks, float(tensors.get("alpha", 0.0))),
                    "oft_blocks")

    def network_args(self, rank, alpha):
        return {"algo": "diag-oft"}

    def update_shape(self, tensors):
        # diagonal blocks rotate the output features only; 4-dim (BOFT) blocks are refused elsewhere
        blocks = tensors["oft_blocks"]
        return None if blocks.ndim != 3 else (blocks.shape[0] * blocks.shape[1],)

    def rank_from_tensors(self, tensors):
        return int(tensors["oft_blocks"].shape[-1])


def _clipped(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``blocks`` scaled as the constraint scales their skew part, so that loaders which clip
    differently (LyCORIS) or not at all see the same rotation."""
    return blocks * _clip_factor(blocks - blocks.transpose(1, 2), constraint) if constraint > 0 else blocks
