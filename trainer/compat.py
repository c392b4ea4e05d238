"""Every private or version-dependent use of torch, accelerate, peft, diffusers and torchao, in one place.

The rest of the trainer calls only the public APIs of its dependencies, and these functions. Each one
has a test in ``tests/test_compat.py`` that fails when the upstream behaviour it relies on changes, so
an upgrade breaks one named test here instead of a training run somewhere else. pyproject.toml bounds
each dependency below its next major version and ``constraints.txt`` pins the versions CI tests with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# peft's extension points for a tuner of our own (OFT's layer and model, trainer/adapters/oft.py):
# peft documents no public interface for third-party tuners, so these internal modules are the one
# way; tests/test_compat.py checks the members DiagOFTModel overrides and calls.
from peft.tuners.lycoris_utils import LycorisConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType

__all__ = [
    "BaseTuner", "BaseTunerLayer", "LycorisConfig", "PeftType", "adapter_names", "check_adapters_to_merge",
    "conv_forward", "infer_single_file_type", "is_no_target_error", "mark_peft_adapter_added",
    "pattern_key", "quantized_parts", "reset_single_process_state", "single_file_converter", "unwrap",
]


# --- accelerate ---------------------------------------------------------------------------------

def reset_single_process_state() -> bool:
    """Forget accelerate's process-wide state when this process runs alone, so that a library caller
    can train several times in one process with different precisions or accumulation settings
    (``Accelerator()`` would otherwise keep the first run's). Returns whether it reset anything.

    accelerate keeps its state in class-level dictionaries (``_shared_state``) and offers only the
    private ``_reset_state`` to clear them (it uses that in its own tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if not PartialState._shared_state or PartialState().num_processes != 1:
        return False
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return True


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without accelerate's wrappers (DDP, FSDP, ``torch.compile``): the module whose
    parameter names are the ones peft and the files use. ``keep_torch_compile`` is accelerate >= 1.3."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# --- peft ---------------------------------------------------------------------------------------

def mark_peft_adapter_added(model: torch.nn.Module) -> None:
    """Tell diffusers' peft integration (``PeftAdapterMixin``) that ``model`` holds a peft adapter,
    as its ``add_adapter`` does, when our own tuner inserted the layers: ``set_adapter``,
    ``disable_adapters`` and friends refuse to work otherwise. There is no public setter."""
    model._hf_peft_config_loaded = True


def adapter_names(layer: BaseTunerLayer) -> list[str]:
    """The names of every adapter a peft layer holds, active or not (peft has no public accessor)."""
    return layer._all_available_adapter_names()


def is_no_target_error(error: ValueError) -> bool:
    """Whether ``error`` is peft's "no module matches target_modules" error. peft raises a plain
    ValueError for it, so its message is the only way to tell it from the others."""
    text = str(error)
    return "not found in the base model" in text or "Target modules" in text


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """peft's rule for which ``rank_pattern``/``alpha_pattern`` key applies to ``module`` (the key
    itself when none matches), from ``peft.utils.other``."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), module)


# --- torch --------------------------------------------------------------------------------------

def conv_forward(conv: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``conv`` (a Conv1d/2d/3d) applied with another ``weight``: its stride, padding, padding mode,
    dilation and groups, through torch's private ``_conv_forward`` (the one method that takes all of
    them, padding modes other than zeros included)."""
    return conv._conv_forward(x, weight, bias)


def quantized_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The inner tensors of a tensor subclass (torchao's quantized weights: data, scales, ...) through
    the subclass protocol's ``__tensor_flatten__``."""
    names, _ = tensor.__tensor_flatten__()
    return [getattr(tensor, name) for name in names]


# --- diffusers ----------------------------------------------------------------------------------

def infer_single_file_type(state_dict: dict[str, torch.Tensor]) -> str:
    """diffusers' guess of a single-file checkpoint's model type (``"v1"``, ``"v2"``, ``"xl_base"``, ...),
    from ``diffusers.loaders.single_file_utils`` (not re-exported at the top level)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type(state_dict)


def single_file_converter(class_name: str) -> Callable[..., dict[str, torch.Tensor]]:
    """diffusers' function that renames an original single-file state dict into the names of the
    diffusers class ``class_name`` (called as ``convert(config=..., checkpoint=...)``)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"]
