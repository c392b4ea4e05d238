"""The algorithm interface, attaching an adapter to a model, and exporting it under kohya names."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from peft import PeftConfig

from ..compat import BaseTunerLayer, adapter_names, is_no_target_error
from ..errors import TrainerError

#: the single adapter this trainer trains, as peft names it
ADAPTER_NAME = "default"

ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls()
    return cls


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise TrainerError(f"--algorithm: {name!r} is not available (known: {', '.join(ALGORITHMS)})") from None


class Algorithm:
    """One adapter method: its peft config and its tensors in LyCORIS/kohya file naming."""

    name: ClassVar[str]
    #: value of ``ss_network_module`` in the file's metadata
    network_module: ClassVar[str]
    #: the file tensors of one module, by suffix (LyCORIS/kohya spelling), besides ``alpha`` which every
    #: algorithm may have: how a file's tensors are told apart by algorithm
    tensors: ClassVar[tuple[str, ...]]
    #: what one module needs to be complete: alternatives separated by "|", tensors needed together by "+"
    required: ClassVar[tuple[str, ...]]
    #: the layer types its peft layers adapt
    layer_types: ClassVar[tuple[type[torch.nn.Module], ...]] = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d,
                                                              torch.nn.Conv3d)

    def peft_config(self, rank: int, alpha: float, targets: list[str], rank_pattern: dict[str, int] | None = None,
                    alpha_pattern: dict[str, float] | None = None) -> PeftConfig:
        """The peft config; ``*_pattern`` map module paths to per-module values (continued files)."""
        raise NotImplementedError

    def import_layer(self, layer: BaseTunerLayer, tensors: dict[str, torch.Tensor]) -> None:
        """Load file tensors (the inverse of :meth:`export_layer`) into the layer's adapter, in place."""
        raise NotImplementedError

    def export_layer(self, layer: BaseTunerLayer) -> dict[str, torch.Tensor]:
        """The layer's adapter as file tensors, keyed by suffix (``lora_down.weight``, ``alpha``, ...)."""
        raise NotImplementedError

    def is_complete(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether one module's tensors hold everything :attr:`required` asks for."""
        return all(any(all(n in tensors for n in alternative.split("+")) for alternative in need.split("|"))
                   for need in self.required)

    def update_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
        """(out features, in features x kernel) of the weight update one module's tensors make, to check
        them against the model's weight; a shorter tuple checks only the leading dims, None nothing."""
        raise NotImplementedError

    def rank_from_tensors(self, tensors: dict[str, torch.Tensor]) -> int:
        """The ``rank`` (for ``rank_pattern``) whose fresh adapter has this module's file tensor shapes."""
        raise NotImplementedError

    def network_args(self, rank: int, alpha: float) -> dict[str, str]:
        """Extra ``ss_network_args`` for the metadata (LyCORIS tools read ``algo`` from it)."""
        return {}

    def add_adapter(self, model: torch.nn.Module, config: PeftConfig) -> None:
        """Insert the adapter layers ``config`` describes into ``model``, in place (diffusers' peft
        integration by default; an algorithm whose layers peft does not have brings its own tuner)."""
        model.add_adapter(config, adapter_name=ADAPTER_NAME)


def attach_adapter(model: torch.nn.Module, algorithm: Algorithm, rank: int, alpha: float, targets: list[str],
                   seed: int, rank_pattern: dict[str, int] | None = None,
                   alpha_pattern: dict[str, float] | None = None) -> list[torch.nn.Parameter]:
    """Insert a fresh adapter into ``model`` (in place), initialised from ``seed``; freeze the rest.

    Returns the trainable parameters (fp32). Raises :class:`TrainerError` if no module matches
    ``targets``.
    """
    model.requires_grad_(False)
    config = algorithm.peft_config(rank, alpha, targets, rank_pattern, alpha_pattern)
    with torch.random.fork_rng(devices=[]):  # peft draws its init from the global RNG
        torch.manual_seed(seed)
        try:
            algorithm.add_adapter(model, config)
        except ValueError as e:
            if is_no_target_error(e):
                raise TrainerError(f"--target_modules: no module of the model matches {', '.join(targets)}") from None
            raise
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 master weights: small updates are not lost to bf16 rounding
    return params


def load_tensor(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy a file tensor into an adapter parameter, in place; trailing dims may be flattened
    (``[r, c, k, k]`` fills ``[r, c*k*k]``). Raises :class:`TrainerError` on any other shape."""
    if tensor.shape[:1] != param.shape[:1] or tensor.numel() != param.numel():
        raise TrainerError(f"{name}: the file holds shape {tuple(tensor.shape)} where the adapter has "
                           f"{tuple(param.shape)}")
    param.copy_(tensor.reshape(param.shape))


def adapter_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """Module path -> adapted layer, in model order."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in adapter_names(module)}


def export_adapter(model: torch.nn.Module, algorithm: Algorithm,
                   layout: str | Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter as a file state dict.

    ``layout`` names the tensors: a kohya prefix (``<prefix><module path with _>.<suffix>``), or a
    function (module path, {suffix: fp32 tensor}) -> {file key: tensor}, a model family's file layout
    (:meth:`~trainer.models.base.ModelFamily.file_tensors`). Weights are cast to ``dtype`` after the
    layout has seen them in fp32; ``alpha`` stays fp32 so its value is exact in every file.
    """
    def kohya(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{layout}{name.replace('.', '_')}.{suffix}": t for suffix, t in tensors.items()}

    name_tensors = kohya if isinstance(layout, str) else layout
    state = {}
    for name, layer in adapter_layers(model).items():
        tensors = {suffix: t.detach().to("cpu", torch.float32)
                   for suffix, t in algorithm.export_layer(layer).items()}
        for key, tensor in name_tensors(name, tensors).items():
            state[key] = tensor.to(torch.float32 if key.endswith(".alpha") else dtype).contiguous()
    return state
