"""Read the adapter files users have into one form, for ``--existing_lora``.

Formats: this trainer's own files and kohya / A1111 (``lora_unet_<module with _>`` +
``ss_*`` metadata), LyCORIS tensors (``hada_*``, ``lokr_*``, ``oft_blocks``) under kohya or
``lycoris_`` names, diffusers / PEFT (``unet.`` / ``transformer.`` / ``base_model.model.`` / no
prefix, ``lora_A``/``lora_B`` or the older ``lora.down``/``lora.up``, alpha in
``lora_adapter_metadata``), ComfyUI's Train LoRA node (``diffusion_model.<ComfyUI module>``: LDM UNet
names, MMDiT/Flux names whose fused projections are split back, see :mod:`.comfyui`; steps in the
file name), SimpleTuner (``training_state.json`` beside the file) and ai-toolkit
(``training_info`` metadata).

Choices where the formats are silent or ambiguous:

- kohya names replace every ``.`` of the module path with ``_`` (``to_q``, ``transformer_blocks``
  keep theirs), so they are matched against the model's own module names, never split by rule.
  LDM names (``input_blocks.1.1...``, used by ComfyUI and kohya's SDXL LoRAs) are accepted for
  a UNet2DConditionModel under every prefix.
- Text-encoder tensors (``lora_te*_``, ``text_encoder*.``) are skipped with a warning (this trainer
  trains the denoiser only) and handed back untouched in ``ExistingAdapter.text_encoder``.
- A module without an alpha tensor takes it from the metadata (diffusers' ``lora_adapter_metadata``,
  kohya's ``ss_network_alpha``), else ``alpha = rank`` (scale 1, what diffusers, peft and ComfyUI
  apply to such a file), with a warning. LoKr with full-matrix factors always has scale 1
  (LyCORIS ignores its alpha), so its alpha is its rank.
- ComfyUI's node also trains full offsets of every norm weight (``.diff``) and bias (``.diff_b``);
  they are returned apart in ``ExistingAdapter.deltas``, not dropped.
- OFT's alpha is a limit on the norm of each layer's skew matrix, read two ways: ComfyUI clips at
  alpha, LyCORIS (``diag_oft.py``: ``constrain * out_dim``) at alpha x out_features. A file that
  LyCORIS wrote (``ss_network_module`` ``lycoris...`` or SimpleTuner's ``lycoris_config``, and not
  this trainer's ``trainer_algorithm``) is read with LyCORIS's limit, converted to the ComfyUI meaning
  this trainer trains and writes (alpha x out_features per module), with a message. This trainer's
  own files carry blocks already clipped, so both readings agree on them.
- Ranks are read per module from the tensor shapes (through the registered algorithm's
  ``rank_from_tensors`` where it has one); metadata ranks are never trusted over them.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import TrainerError
from ..models.loading import refuse_pickle
from .base import ALGORITHMS

if TYPE_CHECKING:
    from ..models.base import ModelFamily

logger = logging.getLogger(__name__)

#: other spellings of LoRA's tensors in files (after the module path) -> the algorithms' suffixes
_LORA_SPELLINGS = {
    "lora_A.weight": "lora_down.weight",  # PEFT / diffusers
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",  # a peft model's state dict, adapter name kept
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",  # diffusers before peft
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}
#: ComfyUI's node also trains full offsets of norm weights (diff) and of every bias (diff_b)
_DELTAS = ("diff", "diff_b")


@functools.cache
def _file_tensors() -> dict[str, tuple[str, str | None]]:
    """Tensor name in a file (after the module path) -> (the algorithms' suffix, the algorithm that
    declares it, "delta" or None for alpha, which belongs to all): from each algorithm's ``tensors``."""
    names = {suffix: (suffix, algorithm.name) for algorithm in ALGORITHMS.values() for suffix in algorithm.tensors}
    names.update({spelling: names[suffix] for spelling, suffix in _LORA_SPELLINGS.items()})
    names.update({"alpha": ("alpha", None), **{d: (d, "delta") for d in _DELTAS}})
    return names


#: tensors of adapter variants this trainer cannot continue
_UNSUPPORTED = {
    "lora_mid.weight": "LoCon Tucker factors (lora_mid)",
    "dora_scale": "DoRA magnitudes (dora_scale)",
    "lora_magnitude_vector": "DoRA magnitudes (lora_magnitude_vector)",
    "lora_B.bias": "LoRA biases (lora_B.bias)",
    "oft_R.weight": "PEFT OFT rotations (oft_R)",
    "w_norm": "LyCORIS norm offsets (w_norm)",
    "b_norm": "LyCORIS norm offsets (b_norm)",
    **{f"{n}.weight": "GLoRA (a1/a2/b1/b2)" for n in ("a1", "a2", "b1", "b2")},
}
#: ``algo`` of LyCORIS' network args -> algorithm
_LYCORIS_ALGOS = {"lora": "LoRA", "locon": "LoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT",
                  "diag-oft": "OFT"}
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.",
                          "text_encoder_2.", "text_encoder_3.", "text_encoders.")
#: prefixes before a dotted module path, by the tool that writes them
_DOTTED_PREFIXES = {"base_model.model.": "diffusers", "model.diffusion_model.": "comfyui",
                    "diffusion_model.": "comfyui", "unet.": "diffusers", "transformer.": "diffusers"}
# the old diffusers attention-processor layout: <attn>.processor.to_q_lora.down.weight
_PROCESSOR_KEY = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# ComfyUI's SaveLoRA node: <prefix>_<steps>_steps_<counter>_.safetensors
_COMFY_STEPS = re.compile(r"(?:^|_)(\d+)_steps(?:_|$)")
_LIST = 10  # how many offending keys an error names


@dataclass
class ExistingAdapter:
    """An adapter file normalised to diffusers module paths and this trainer's tensor names."""

    #: "LoRA", "LoHa", "LoKr" or "OFT"
    algorithm: str
    #: diffusers module path -> tensors by our suffix (``lora_down.weight``, ``lora_up.weight``,
    #: ``hada_w1_a``, ``lokr_w1``, ``oft_blocks``, ...), each with a 0-dim fp32 ``alpha``
    modules: dict[str, dict[str, torch.Tensor]]
    #: module path -> the rank that builds an adapter of the file's shapes (the algorithm's
    #: ``rank_from_tensors``; LoRA/LoHa: the factors' inner size, OFT: the block size)
    ranks: dict[str, int]
    #: module path -> alpha, always a number (see the module docstring for how a missing one is set)
    alphas: dict[str, float]
    #: optimizer steps already trained (0, with a warning, when the file does not say)
    steps: int
    #: "trainer", "kohya", "lycoris", "diffusers", "comfyui", "simpletuner" or "ai-toolkit"
    source_format: str
    #: ComfyUI's full offsets: module path -> {"diff": weight offset, "diff_b": bias offset}
    deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: text-encoder tensors under their file keys: skipped, not loaded
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the file's safetensors metadata
    metadata: dict[str, str] = field(default_factory=dict)

    def attach_arguments(self) -> dict:
        """``rank``, ``alpha``, ``targets``, ``rank_pattern``, ``alpha_pattern`` for
        :func:`~trainer.adapters.base.attach_adapter`: the most common rank and alpha, with
        per-module exceptions as anchored peft patterns."""
        rank = Counter(self.ranks.values()).most_common(1)[0][0]
        alpha = Counter(self.alphas.values()).most_common(1)[0][0]
        return dict(rank=rank, alpha=alpha, targets=list(self.modules),
                    rank_pattern={_exact(m): r for m, r in self.ranks.items() if r != rank},
                    alpha_pattern={_exact(m): a for m, a in self.alphas.items() if a != alpha})


def read_existing_adapter(path: str | Path, model: torch.nn.Module, family: ModelFamily) -> ExistingAdapter:
    """Read the adapter file (or a folder holding one) at ``path`` for ``model``, a denoiser of
    ``family`` (a :class:`~trainer.models.base.ModelFamily`).

    Raises :class:`TrainerError` for a missing, pickle, truncated or corrupt file, keys that name no
    module of ``model`` (listed), tensors that do not fit it (a LoRA for another model), and
    adapter variants this trainer cannot continue.
    """
    path = _adapter_file(Path(path))
    tensors, metadata = _load_safetensors(path)
    if not tensors:
        raise TrainerError(f"--existing_lora: {path} holds no tensors")
    tensors = _from_comfyui_names(tensors, metadata, model, family)
    names = _ModuleNames(model, family)
    parsed = _parse(tensors, names, path)
    algorithm = _algorithm(parsed.modules, metadata, path)
    ranks, alphas = {}, {}
    metadata_alpha = _metadata_alpha(metadata, family)
    defaulted = []
    lycoris_oft = algorithm == "OFT" and _written_by_lycoris(metadata)
    for module, group in parsed.modules.items():
        ranks[module] = _rank(algorithm, group)
        alpha = _alpha(algorithm, group, ranks[module])
        if alpha is None and lycoris_oft:  # LyCORIS's own name for it; its default is no constraint
            alpha = _number(_network_args(metadata).get("constraint")) or 0.0
        if alpha is None:
            alpha = metadata_alpha(module, names.weights[module][0])
        if lycoris_oft and alpha:
            blocks = group["oft_blocks"]
            alpha *= blocks.shape[0] * blocks.shape[1]  # LyCORIS: a norm limit of constraint x out_features
        if alpha is None:
            alpha = 0.0 if algorithm == "OFT" else float(ranks[module])  # OFT: no norm constraint
            defaulted.append(module)
        alphas[module] = alpha
        group["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if lycoris_oft and any(alphas.values()):
        logger.info("--existing_lora: %s was written by LyCORIS, whose OFT constraint limits each layer's norm to "
                    "constraint x out_features (ComfyUI reads constraint alone): using LyCORIS's limit, "
                    "written as alpha per module", path.name)
    if defaulted:
        logger.warning("--existing_lora: %s has no alpha for %d modules (e.g. %s); using %s, as diffusers, "
                       "peft and ComfyUI do for such files", path.name, len(defaulted), defaulted[0],
                       "0 (no OFT constraint)" if algorithm == "OFT" else "alpha = rank (scale 1)")
    if parsed.text_encoder:
        logger.warning("--existing_lora: skipping %d text-encoder tensors of %s (this trainer trains the "
                       "denoiser only); they are not loaded", len(parsed.text_encoder), path.name)
    steps, step_source = _steps(path, metadata)
    if steps is None:
        logger.warning("--existing_lora: %s records no step count; counting its steps as 0", path.name)
        steps = 0
    source = _source_format(metadata, parsed.style, step_source)
    return ExistingAdapter(algorithm, parsed.modules, ranks, alphas, steps, source, parsed.deltas,
                           parsed.text_encoder, metadata)


def _from_comfyui_names(tensors: dict[str, torch.Tensor], metadata: dict[str, str], model: torch.nn.Module,
                        family: ModelFamily) -> dict[str, torch.Tensor]:
    """ComfyUI's own module names (``diffusion_model.<ComfyUI module>``, the Train LoRA node's files and
    ``--file_layout comfyui``) as diffusers module names: fused projections split, swapped rows restored."""
    from .comfyui import FUSED_RANKS, from_comfyui

    tensors = _respell(tensors, family.comfyui_spellings(model))
    if not any(k.removeprefix("model.").startswith("diffusion_model.") for k in tensors):
        return tensors
    try:
        names = family.comfyui_names(model)
    except TrainerError:
        return tensors  # a family without ComfyUI names: the keys are matched as they are
    rows = {name: module.weight.shape[0] for name, module in model.named_modules()
            if name in names and isinstance(getattr(module, "weight", None), torch.Tensor)}
    fused_ranks = _json(metadata.get(FUSED_RANKS))
    return from_comfyui(tensors, names, rows, fused_ranks if isinstance(fused_ranks, dict) else None)


#: peft's tensor names -> the names ComfyUI-named keys are read with
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _respell(tensors: dict[str, torch.Tensor], spellings: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keys whose module part is another tool's spelling of a ComfyUI module (``spellings``, the family's
    :meth:`comfyui_spellings`) as ``diffusion_model.<ComfyUI module>.<tensor>``, peft's ``lora_A/B`` as
    ``lora_down/up``; other keys as they are."""
    if not spellings:
        return tensors
    out = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        module = next((m for m in (".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1)) if m in spellings),
                      None)
        if module is None:
            out[key] = tensor
            continue
        name = key[len(module) + 1:]
        out[f"diffusion_model.{spellings[module]}.{_PEFT_TO_KOHYA.get(name, name)}"] = tensor
    return out


def _adapter_file(path: Path) -> Path:
    if not path.exists():
        raise TrainerError(f"--existing_lora: no such file or folder: {path}")
    if path.is_dir():
        # a diffusers / SimpleTuner output folder holds pytorch_lora_weights.safetensors
        standard = path / "pytorch_lora_weights.safetensors"
        found = [standard] if standard.is_file() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise TrainerError(f"--existing_lora: folder {path} holds {len(found)} .safetensors files "
                               f"({', '.join(p.name for p in found) or 'none'}); pass the file itself")
        path = found[0]
    refuse_pickle(path, "--existing_lora")
    return path


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainerError(f"--existing_lora: cannot read {path} as safetensors (truncated or corrupt?): "
                           f"{e}") from None


class _ModuleNames:
    """The model's module paths, with the spellings files use for them."""

    def __init__(self, model: torch.nn.Module, family: ModelFamily):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.family = family
        self.model_name = type(model).__name__
        #: module path -> (weight shape, bias shape or None)
        self.weights: dict[str, tuple[torch.Size, torch.Size | None]] = {}
        tuner = None
        for name, module in model.named_modules():
            if tuner and name.startswith(tuner):
                continue  # peft's own sub-layers (base_layer, lora_A, ...) are not targets
            if isinstance(module, BaseTunerLayer):
                tuner = name + "."
                module = module.get_base_layer()
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor):
                self.weights[name] = (weight.shape, bias.shape if isinstance(bias, torch.Tensor) else None)
        #: every accepted dotted spelling -> module path
        self.dotted = {name: name for name in self.weights}
        self.dotted.update({other: name for other, name in family.module_spellings(model).items()
                            if name in self.weights})
        # kohya spells a module path with every "." as "_"; the model's own names disambiguate
        self.underscored = {k.replace(".", "_"): v for k, v in self.dotted.items()}

    def resolve(self, ref: str) -> tuple[str | None, str]:
        """(module path or None, the naming style) for the module part of a file key."""
        for prefix, style in ((self.family.kohya_prefix, "kohya"), ("lycoris_", "lycoris")):
            if ref.startswith(prefix):
                return self.underscored.get(ref[len(prefix):]), style
        style = None
        while True:
            for candidate in (ref, ref.replace(".processor.", ".")):
                if candidate in self.dotted:
                    return self.dotted[candidate], style or "diffusers"
            prefixes = (*_DOTTED_PREFIXES, f"{self.family.subfolder}.")
            prefix = next((p for p in prefixes if ref.startswith(p)), None)
            if prefix is None:
                return None, style or "diffusers"
            style = style or _DOTTED_PREFIXES.get(prefix, "diffusers")  # the outermost prefix names the tool
            ref = ref[len(prefix):]


@dataclass
class _Parsed:
    modules: dict[str, dict[str, torch.Tensor]]
    deltas: dict[str, dict[str, torch.Tensor]]
    text_encoder: dict[str, torch.Tensor]
    style: str


def _split(key: str) -> tuple[str, str] | None:
    """(module part, tensor name) of a file key, or None when the tensor name is unknown."""
    match = _PROCESSOR_KEY.match(key)
    if match:
        attn, proj, kind = match.groups()
        module = f"{attn}.{'to_out.0' if proj == 'to_out' else proj}"
        return module, f"lora.{kind}.weight"
    best = None
    for name in (*_file_tensors(), *_UNSUPPORTED):
        if key.endswith("." + name) and (best is None or len(name) > len(best)):
            best = name
    return None if best is None else (key[: -len(best) - 1], best)


def _parse(tensors: dict[str, torch.Tensor], names: _ModuleNames, path: Path) -> _Parsed:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    text_encoder, unmatched, unsupported, styles = {}, [], {}, Counter()
    origin: dict[tuple[str, str], str] = {}
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder[key] = tensor
            continue
        split = _split(key)
        module, style = names.resolve(split[0]) if split else (None, "")
        if module is None:
            unmatched.append(key)
            continue
        name = split[1]
        if name in _UNSUPPORTED:
            unsupported.setdefault(_UNSUPPORTED[name], key)
            continue
        styles[style] += 1
        suffix, kind = _file_tensors()[name]
        if (module, suffix) in origin:
            raise TrainerError(f"--existing_lora: {path.name} holds two tensors for {module}.{suffix}: "
                               f"{origin[module, suffix]} and {key}")
        origin[module, suffix] = key
        (deltas if kind == "delta" else modules).setdefault(module, {})[suffix] = tensor
    if unsupported:
        raise TrainerError(f"--existing_lora: {path.name} holds {', '.join(unsupported)} (e.g. "
                           f"{next(iter(unsupported.values()))}), which this trainer cannot continue")
    if unmatched:
        if not modules and not deltas:
            what = "only text-encoder tensors and " if text_encoder else ""
            raise TrainerError(f"--existing_lora: {path.name} holds {what}no tensor that names a module of "
                               f"this {names.model_name} ({names.family.name}); is it a LoRA for another "
                               f"model? Keys: {_listing(unmatched)}")
        raise TrainerError(f"--existing_lora: {len(unmatched)} tensors of {path.name} name no module of "
                           f"this {names.model_name}: {_listing(unmatched)}")
    for module in [m for m, group in modules.items() if set(group) == {"alpha"}]:
        logger.warning("--existing_lora: %s has an alpha but no weights for %s; ignoring it", path.name,
                       module)
        del modules[module]
    if not modules:
        what = "text-encoder tensors" if text_encoder and not deltas else "full offsets (diff, diff_b)"
        raise TrainerError(f"--existing_lora: {path.name} holds no adapter weights for the denoiser, "
                           f"only {what}")
    _check_shapes(modules, deltas, names, path, origin)
    style = styles.most_common(1)[0][0] if styles else "diffusers"
    return _Parsed(modules, deltas, text_encoder, style)


def _check_shapes(modules, deltas, names: _ModuleNames, path: Path, origin) -> None:
    """Raise if a module's tensors would not make an update of its weight's shape."""
    misfits = []
    for module, group in modules.items():
        algorithm = _group_algorithm(group)
        weight, _ = names.weights[module]
        if algorithm is None or not ALGORITHMS[algorithm].is_complete(group):
            raise TrainerError(f"--existing_lora: {path.name} has incomplete or mixed adapter tensors for "
                               f"{module}: {', '.join(sorted(group))}")
        if len(weight) < 2:
            misfits.append(f"{module} (a {len(weight)}-dim weight cannot take {algorithm})")
            continue
        if algorithm == "LoRA" and group["lora_up.weight"].shape[1] != group["lora_down.weight"].shape[0]:
            misfits.append(f"{module}: lora_up has rank {group['lora_up.weight'].shape[1]}, lora_down "
                           f"{group['lora_down.weight'].shape[0]}")
            continue
        made = ALGORITHMS[algorithm].update_shape(group)
        wanted = (weight[0], weight[1:].numel()) if algorithm != "OFT" else (weight[0],)
        if made is not None and tuple(made[: len(wanted)]) != wanted:
            misfits.append(f"{module}: file makes {tuple(made)}, model has {tuple(weight)}")
    for module, group in deltas.items():
        weight, bias = names.weights[module]
        for suffix, shape in (("diff", weight), ("diff_b", bias)):
            if suffix in group and (shape is None or group[suffix].shape != shape):
                misfits.append(f"{origin[module, suffix]}: file {tuple(group[suffix].shape)}, model "
                               f"{None if shape is None else tuple(shape)}")
    if misfits:
        raise TrainerError(f"--existing_lora: {path.name} does not fit this model (a LoRA for another "
                           f"model?): {len(misfits)} modules differ in shape: {_listing(misfits)}")


def _group_algorithm(group: dict[str, torch.Tensor]) -> str | None:
    """The one algorithm a module's tensors belong to (our suffixes are also file names), else None."""
    kinds = {_file_tensors()[suffix][1] for suffix in group} - {None}
    return kinds.pop() if len(kinds) == 1 else None


def _algorithm(modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], path: Path) -> str:
    found = Counter(_group_algorithm(group) for group in modules.values())
    if len(found) != 1:
        raise TrainerError(f"--existing_lora: {path.name} mixes {', '.join(sorted(map(str, found)))} "
                           "modules; this trainer continues one algorithm per file")
    algorithm = next(iter(found))
    if algorithm == "OFT" and any(g["oft_blocks"].ndim != 3 for g in modules.values()):
        raise TrainerError(f"--existing_lora: {path.name} holds 4-dim oft_blocks (BOFT), which this "
                           "trainer cannot continue")
    declared = _network_args(metadata).get("algo")
    if declared and _LYCORIS_ALGOS.get(str(declared).lower(), algorithm) != algorithm:
        logger.warning("--existing_lora: %s declares algo=%s but its tensors are %s; using %s", path.name,
                       declared, algorithm, algorithm)
    return algorithm


def _rank(algorithm: str, t: dict[str, torch.Tensor]) -> int:
    """The rank to build this module's adapter with: the registered algorithm decides, so that a
    fresh adapter of that rank has the file's shapes (e.g. full-matrix LoKr factors)."""
    return int(ALGORITHMS[algorithm].rank_from_tensors(t))


def _alpha(algorithm: str, group: dict[str, torch.Tensor], rank: int) -> float | None:
    """The module's alpha from its own tensors, or None."""
    if algorithm == "LoKr" and "lokr_w1_b" not in group and "lokr_w2_b" not in group:
        return float(rank)  # LyCORIS applies scale 1 to full-matrix factors whatever alpha says
    if "alpha" in group:
        return float(group["alpha"].float().item())
    return None


def _metadata_alpha(metadata: dict[str, str], family: ModelFamily):
    """A function (module path, weight shape) -> alpha from the file's metadata, or None."""
    diffusers = _json(metadata.get("lora_adapter_metadata"))
    if isinstance(diffusers, dict):
        # a pipeline's save_lora_weights prefixes every entry with its component ("unet.lora_alpha")
        for component in (family.subfolder, "unet", "transformer"):
            scoped = {k[len(component) + 1:]: v for k, v in diffusers.items()
                      if k.startswith(component + ".")}
            if scoped:
                diffusers = scoped
                break
        default = diffusers.get("lora_alpha", diffusers.get("alpha"))
        pattern = diffusers.get("alpha_pattern") or {}
        if default is not None or pattern:
            from ..compat import pattern_key  # peft's own rule for matching pattern keys

            def from_diffusers(module, _shape):
                key = pattern_key(pattern, module)
                value = pattern.get(key, default)
                return None if value is None else float(value)

            return from_diffusers
    kohya = _number(metadata.get("ss_network_alpha"))
    conv = _number(_network_args(metadata).get("conv_alpha"))

    def from_kohya(_module, shape):
        # kohya trains 3x3 convolutions (LoCon) with their own conv_alpha
        return conv if conv is not None and len(shape) == 4 and shape[2:].numel() > 1 else kohya

    return from_kohya


def _steps(path: Path, metadata: dict[str, str]) -> tuple[int | None, str]:
    """(steps already trained, where that came from)."""
    for key in ("ss_steps", "global_step"):  # kohya and this trainer; a plain global_step elsewhere
        steps = _integer(metadata.get(key))
        if steps is not None:
            return steps, key
    info = _json(metadata.get("training_info"))  # ai-toolkit: {"step": ..., "epoch": ...}
    if isinstance(info, dict) and _integer(info.get("step")) is not None:
        return _integer(info["step"]), "training_info"
    state_file = path.parent / "training_state.json"  # SimpleTuner writes it beside each checkpoint
    if state_file.is_file():
        state = _json(state_file.read_text(errors="replace"))
        if isinstance(state, dict) and _integer(state.get("global_step")) is not None:
            return _integer(state["global_step"]), "training_state.json"
    matches = _COMFY_STEPS.findall(path.stem)  # ComfyUI keeps the count only in the file name
    if matches:
        return int(matches[-1]), "file name"
    return None, ""


def _source_format(metadata: dict[str, str], style: str, step_source: str) -> str:
    if "trainer_algorithm" in metadata:
        return "trainer"
    software = _json(metadata.get("software"))
    if "training_info" in metadata or (isinstance(software, dict) and software.get("name") == "ai-toolkit"):
        return "ai-toolkit"
    if step_source == "training_state.json" or "lycoris_config" in metadata:
        return "simpletuner"
    return style


def _written_by_lycoris(metadata: dict[str, str]) -> bool:
    """Whether LyCORIS made the file (kohya's sd-scripts with LyCORIS's network module, or SimpleTuner's
    LyCORIS wrapper), not this trainer (which also names LyCORIS's network module)."""
    if "trainer_algorithm" in metadata:
        return False
    return str(metadata.get("ss_network_module", "")).startswith("lycoris") or "lycoris_config" in metadata


def _network_args(metadata: dict[str, str]) -> dict:
    args = _json(metadata.get("ss_network_args"))
    return args if isinstance(args, dict) else {}


def _json(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # absent, or kohya's "Dynamic"


def _integer(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() and number >= 0 else None


def _exact(module: str) -> str:
    """A peft rank/alpha pattern that matches exactly this module path."""
    return "^" + re.escape(module)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST])
    return shown if len(items) <= _LIST else f"{shown}, ... ({len(items)} in all)"
