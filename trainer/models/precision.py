"""How the frozen base is stored: ``--weight_dtype`` (ComfyUI's name on its model loader).

- ``default``: the training dtype (bf16 or fp32), materialised directly in it when loading.
- ``fp8_e4m3fn`` / ``fp8_e5m2``: weights stored in fp8 and each layer computed in the training dtype,
  through diffusers' layerwise casting (a hook casts one layer up before its forward and back after).
  Positional embeddings and the in/out projections stay in the training dtype (diffusers' skip
  patterns for each model, less "norm": the AdaLN modulations are stored in fp8 too), and so do
  convolutions (see :func:`apply_weight_dtype`), norm layers and the adapter's layers.
- ``int8``: int8 weight-only quantization by torchao through diffusers' ``TorchAoConfig``, applied
  tensor by tensor while loading. torchao was picked over bitsandbytes (CUDA-first, its CPU backend is
  partial) and optimum-quanto (maintenance only) because it is PyTorch's own quantization library,
  runs the same code on CPU (the tests) and CUDA (the users), and peft's LoRA/LoHa/LoKr/OFT all train
  on top of its layers.

The adapter always trains at full precision (fp32 masters) on top, and its file is the same as from a
bf16 base: the file only holds the adapter.
"""

from __future__ import annotations

import re
import types
from functools import partial

import torch

from ..errors import TrainerError

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2", "int8")
#: the one table from a dtype's name in the options (--training_dtype, --lora_dtype, prepare's --dtype) to torch's
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def quantization_config(weight_dtype: str):
    """The diffusers quantization config that ``from_pretrained``/``from_single_file`` apply while
    loading, or None. Raises :class:`TrainerError` naming the package to install when it is missing."""
    if weight_dtype != "int8":
        return None
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise TrainerError("--weight_dtype int8 needs torchao: pip install torchao "
                           "(or pip install 'lora-trainer[quant]')") from None
    from diffusers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def apply_weight_dtype(model: torch.nn.Module, weight_dtype: str, compute_dtype: torch.dtype) -> None:
    """Store a loaded model's weights as ``weight_dtype`` says (fp8: layerwise casting). ``int8`` is
    applied while loading (:func:`quantization_config`); a model handed over as an object cannot be."""
    if getattr(model, "_trainer_weight_dtype", None) == weight_dtype:
        return  # applied while loading (an fp8 single file is assigned into a model already set up)
    if weight_dtype in FP8:
        if not hasattr(model, "enable_layerwise_casting"):
            raise TrainerError(f"--weight_dtype {weight_dtype}: {type(model).__name__} is not a diffusers model")
        # before the adapter is attached: only the frozen base layers are stored in fp8, so peft's layers
        # (added afterwards, wrapping them) keep their fp32 masters.
        # Convolutions stay in the compute dtype through diffusers' layerwise casting being skipped for them:
        # autograd saves a convolution's weight parameter itself, which fp8 storage would then hand to
        # backward (and to checkpointing's recompute check) in fp8.
        # The models' own skip patterns keep every Linear under a module named "norm..." in the compute
        # dtype: for DiT families those are the AdaLN modulation projections, a quarter of Flux's weights.
        # Only Linear layers are stored in fp8 here, so leaving "norm" out changes nothing for real norm
        # layers; it stores the modulations in fp8 as ComfyUI's fp8 checkpoints do (about half the bf16
        # bytes in all).
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        patterns = {*DEFAULT_SKIP_MODULES_PATTERN, *(getattr(model, "_skip_layerwise_casting_patterns", None) or ()),
                    *(getattr(model, "_keep_in_fp32_modules", None) or ())} - {"norm"}
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and not any(re.search(p, name) for p in patterns):
                store_linear_in_fp8(module, FP8[weight_dtype], compute_dtype)
        model._trainer_weight_dtype = weight_dtype
    elif weight_dtype == "int8":
        if getattr(model, "hf_quantizer", None) is None:
            raise TrainerError("--weight_dtype int8 is applied while loading a model from a file or folder; "
                               "pass --model as a path")
        # torchao's tensors take F.linear at the __torch_function__ level, ahead of autocast, so autocast
        # never casts their inputs: a layer fed fp32 would answer in fp32 and, added to a bf16 branch,
        # turn a UNet's group norms (bf16 weights) into a dtype error. Cast the inputs as autocast would.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not is_plain(module.weight):
                module.register_forward_pre_hook(partial(_cast_inputs, dtype=compute_dtype))


class _Fp8Linear(torch.autograd.Function):
    """``F.linear`` with a frozen fp8-stored weight computed in ``dtype``.

    Why not diffusers' layerwise casting (a hook that casts a layer's weight up before its forward and
    back after): autograd keeps the up-cast copy each Linear saved for backward, so under gradient
    checkpointing every layer of the block being recomputed holds its weight in the compute dtype
    until that block's backward is done. Saving the fp8 weight and casting it again in backward holds
    one layer's copy at a time. The weight is frozen; the bias may train (``--target_modules node``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


def store_linear_in_fp8(module: torch.nn.Linear, storage: torch.dtype, compute: torch.dtype) -> None:
    """Keep ``module``'s weight in ``storage`` (fp8) and compute it in ``compute`` (:class:`_Fp8Linear`)."""
    module.weight.data = module.weight.data.to(storage)
    if module.bias is not None:
        module.bias.data = module.bias.data.to(compute)
    module.fp8_compute_dtype = compute
    module.forward = types.MethodType(_fp8_linear_forward, module)  # a bound method survives deepcopy


def _fp8_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # the base model is frozen before training (peft), so the fp8 weight never gets a gradient
    return _Fp8Linear.apply(x, module.weight, module.bias, module.fp8_compute_dtype)


def _cast_inputs(module: torch.nn.Module, args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def is_plain(tensor: torch.Tensor) -> bool:
    """Whether a tensor is an ordinary dense tensor (not a quantized tensor subclass)."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory, counting the inner tensors of a quantized tensor subclass."""
    if is_plain(tensor):
        return tensor.numel() * tensor.element_size()
    from ..compat import quantized_parts

    return sum(tensor_bytes(part) for part in quantized_parts(tensor))  # torchao's: qdata, scale, ...


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen (non-trainable) parameters and buffers of ``model``."""
    params = sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad)
    return params + sum(tensor_bytes(b) for b in model.buffers())
