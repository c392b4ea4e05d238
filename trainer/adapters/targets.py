"""What a run trains: ``--target_modules`` resolved against the model, and the full offsets of ``node``.

- ``all`` (default): an adapter on every Linear/Conv weight of the denoiser (2-D and up), the
  adapter set of ComfyUI's Train LoRA node, in a file every loader reads.
- ``node``: ``all`` plus what the node trains besides: a full offset of every other weight (norms,
  ``<module>.diff``) and of every bias (``<module>.diff_b``), trained with the same optimizer and
  learning rate.
- ``attention``: the family's attention projections (its ``default_targets``).
- a comma list: module-name suffixes, as peft matches them.

Offsets are trained in place: the norm weights and biases themselves become trainable fp32 master
parameters, and the offset written to the file is their change from the base model. That is the
node's ``W + diff`` with no extra layer in the forward pass, so gradient checkpointing,
``torch.compile``, FSDP and ``save_merged_model`` see an ordinary module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import TrainerError

logger = logging.getLogger(__name__)

#: the named target sets of ``--target_modules``
TARGET_SETS = ("all", "node", "attention")
#: layers that take an adapter under ``all`` (LoHa and LoKr: not Conv3d, see ``Algorithm.layer_types``)
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adaptable_modules(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = ADAPTABLE) -> list[str]:
    """Module paths of every layer of ``model`` of these types (peft's own layers are not counted)."""
    return [name for name, module in base_modules(model).items() if isinstance(module, layer_types)]


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module, where an adapted layer stands for its base layer and peft's own
    sub-layers (``base_layer``, ``lora_A``, ...) are left out: the names files use."""
    found, tuner = {}, None
    for name, module in model.named_modules():
        if tuner and name.startswith(tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner = name + "."
            module = module.get_base_layer()
        found[name] = module
    return found


def resolve_targets(spec: str, default_targets: tuple[str, ...], model: nn.Module, leave_out: tuple[str, ...] = (),
                    algorithm: str = "LoRA", layer_types: tuple[type[nn.Module], ...] = ADAPTABLE
                    ) -> tuple[list[str], bool]:
    """(peft target names, whether the node's offsets are trained) for a ``--target_modules`` value;
    ``leave_out``: module paths that ``all`` / ``node`` do not adapt (the family's loaders cannot read them);
    ``layer_types``: the layers ``algorithm`` can adapt (others are left out of ``all`` / ``node``, whose
    offsets then cover their weights, and refused by name in a list)."""
    if spec.strip().lower() in TARGET_SETS:
        spec = spec.strip().lower()
    if spec in ("all", "node"):
        targets = [name for name in adaptable_modules(model, layer_types) if name not in leave_out]
        if not targets:
            raise TrainerError(f"--target_modules {spec}: the model has no Linear or Conv layer")
        other = sorted(set(adaptable_modules(model)) - set(targets) - set(leave_out))
        if other:
            logger.info("--target_modules %s: %s cannot adapt %s, left out%s", spec, algorithm, ", ".join(other),
                        " (trained as full offsets)" if spec == "node" else "")
        return targets, spec == "node"
    if spec == "attention":
        targets = list(default_targets)
    else:
        targets = [t.strip() for t in spec.split(",") if t.strip()]
    if not targets:
        raise TrainerError("--target_modules: expected all, node, attention or a comma list of module names")
    for name, module in base_modules(model).items():  # as peft matches a name: the whole path or its end
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(module, ADAPTABLE) \
                and not isinstance(module, layer_types):
            raise TrainerError(f"--target_modules: {algorithm} cannot adapt {type(module).__name__} layers like "
                               f"{name}; leave it out, or use LoRA or OFT")
    return targets, False


def offset_parameters(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The node's offsets: module path -> {"diff": weight, "diff_b": bias} for every module whose
    weight is not adapted (norms: weights of fewer than 2 dims, or of layers peft cannot adapt) and
    every bias, adapted layers' included."""
    found: dict[str, dict[str, nn.Parameter]] = {}
    adapted = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapted.add(name)
    for name, module in base_modules(model).items():
        own = dict(module.named_parameters(recurse=False))
        weight, bias = own.get("weight"), own.get("bias")
        entry = {}
        if isinstance(weight, nn.Parameter) and name not in adapted and weight.is_floating_point():
            entry["diff"] = weight
        if isinstance(bias, nn.Parameter) and bias.is_floating_point():
            entry["diff_b"] = bias
        if entry:
            found[name] = entry
    return found


@dataclass
class Offsets:
    """Trained full offsets: the parameters made trainable, and their base values to export against."""

    #: module path -> {"diff"/"diff_b": the trainable parameter}
    params: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    #: module path -> {"diff"/"diff_b": the parameter's value in the base model (before any file's offset)}
    base: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def train(cls, model: nn.Module, modules: dict[str, set[str]]) -> Offsets:
        """Make these offsets ({module path: {"diff", "diff_b"}}) trainable in place. Call after the
        adapter is attached and before any file offset is added, so ``base`` is the base model."""
        available = offset_parameters(model)
        missing = [f"{m}.{k}" for m, keys in modules.items() for k in sorted(keys) if k not in available.get(m, {})]
        if missing:
            raise TrainerError(f"full offsets (diff/diff_b) for weights that are adapted or absent in this model: "
                               f"{', '.join(missing[:10])}")
        offsets = cls()
        for name, keys in modules.items():
            for key in sorted(keys):
                param = available[name][key]
                offsets.base.setdefault(name, {})[key] = param.detach().clone()
                param.data = param.data.float()  # fp32 master weights, as the adapter's
                param.requires_grad_(True)
                offsets.params.setdefault(name, {})[key] = param
        return offsets

    def parameters(self) -> list[nn.Parameter]:
        return [param for entry in self.params.values() for param in entry.values()]

    @torch.no_grad()
    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """module path -> {"diff"/"diff_b": trained value minus base value, fp32 on the CPU}."""
        return {name: {key: (param.float() - self.base[name][key].to(param.device, torch.float32)).cpu()
                       for key, param in entry.items()}
                for name, entry in self.params.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained values (for full-state checkpoints), keyed ``<module>.<diff|diff_b>``."""
        return {f"{name}.{key}": param.detach().float().cpu().contiguous()
                for name, entry in self.params.items() for key, param in entry.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{name}.{key}": param for name, entry in self.params.items() for key, param in entry.items()}
        if set(state) != set(expected):
            raise TrainerError("--resume_from_checkpoint: the checkpoint's full offsets are for other modules "
                               f"than this run trains ({len(state)} saved, {len(expected)} trained)")
        for key, param in expected.items():
            param.copy_(state[key])
