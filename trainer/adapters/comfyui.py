"""ComfyUI's own file layout (``--file_layout comfyui``): what its Train LoRA node saves and continues.

Keys are ``diffusion_model.<ComfyUI module path>.<tensor>``: ``lora_up.weight``/``lora_down.weight``
(or LyCORIS ``hada_*``, ``lokr_*``, ``oft_blocks``), ``alpha``, and the full offsets ``diff``/``diff_b``.
The file name is ``<output_name>_<steps>_steps_00001_.safetensors``, the only place the node reads a
step count from.

Alpha: the node looks an existing file's alpha up under ``<module>.weight.alpha``, a key no writer
produces (``comfy_extras/nodes_train.py``), so it always continues at alpha 1.0: scale 1/rank. A file
meant for the node therefore carries its scale in the weights (``lora_up``, ``hada_w1_a``, ``lokr_w1``
multiplied by alpha/rank x the file's rank) and alpha 1, which ComfyUI's LoRA loader reads the same way.

ComfyUI's module names differ from diffusers' (each family's :meth:`comfyui_names`): SD/SDXL use the LDM
UNet's names; SD3 and Flux fuse projections (``qkv``, Flux's ``linear1`` = q, k, v and the MLP input) and
store some modulation layers with their (scale, shift) halves swapped. Separate q/k/v adapters of
rank r become one fused adapter of rank 3r, block-diagonal (LoRA, LoHa): exactly the same update.
Reading splits a fused adapter back: a block-diagonal one into its blocks (rank r each, as written), any
other (the node trains one rank-r adapter on the fused layer) into one adapter per projection with the
fused rank and the rows of its projection, which is exact too. LoKr and OFT cannot be fused or
swapped exactly and are refused on those layers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..errors import TrainerError

logger = logging.getLogger(__name__)

PREFIX = "diffusion_model."
#: metadata key of this trainer's fused adapters: {ComfyUI module: [rank of each part, in row order]}
FUSED_RANKS = "trainer_comfyui_fused_ranks"
#: tensors whose first dimension is the layer's output rows (split/fused/swapped along it), and
#: tensors whose first dimension is the adapter rank (concatenated when fusing)
_ROW_TENSORS = ("lora_up.weight", "hada_w1_a", "hada_w2_a")
_RANK_TENSORS = ("lora_down.weight", "hada_w1_b", "hada_w2_b")


@dataclass(frozen=True)
class ComfyPart:
    """Where a diffusers module's weight lives in ComfyUI's model."""

    #: ComfyUI module path (without ``diffusion_model.``)
    module: str
    #: name of the weight parameter there (``weight``; Flux's RMSNorms call theirs ``scale``)
    param: str = "weight"
    #: first output row in a fused layer (q, k, v, ... stacked), or None
    start: int | None = None
    #: whether ComfyUI stores the rows as (shift, scale) where diffusers has (scale, shift)
    swap: bool = False


def fused(model: torch.nn.Module, target: str, members: list[str]) -> dict[str, ComfyPart]:
    """Parts of ComfyUI's fused layer ``target``: the diffusers ``members``' rows stacked in this order."""
    parts, start = {}, 0
    for member in members:
        parts[member] = ComfyPart(target, start=start)
        start += model.get_submodule(member).weight.shape[0]
    return parts


def renamed(prefix_from: str, prefix_to: str, pairs: dict[str, str], swap: tuple[str, ...] = (),
            params: dict[str, str] | None = None) -> dict[str, ComfyPart]:
    """Plain renames ``prefix_from + diffusers`` -> ``prefix_to + ComfyUI`` (``swap``: diffusers names whose
    rows ComfyUI stores swapped; ``params``: ComfyUI weight names other than ``weight``)."""
    return {prefix_from + a: ComfyPart(prefix_to + b, param=(params or {}).get(a, "weight"), swap=a in swap)
            for a, b in pairs.items()}


def file_name(output_name: str, steps: int) -> str:
    """The node's SaveLoRA file name, which carries the step count (the node reads it from there only)."""
    return f"{output_name}_{steps}_steps_00001_.safetensors"


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fold(algorithm: str, tensors: dict[str, torch.Tensor], file_rank: int) -> dict[str, torch.Tensor]:
    """The module's tensors with its scale moved into the weights, for a file alpha of 1 and ``file_rank``
    (the loaders then apply 1 / file_rank). Conv factors are flattened to 2-D, as the node's train
    adapters hold them."""
    t = {k: v.flatten(1) if v.ndim > 2 and k != "oft_blocks" else v for k, v in tensors.items()}
    alpha = float(t.pop("alpha"))
    if algorithm == "LoRA":
        t["lora_up.weight"] = t["lora_up.weight"] * (alpha / t["lora_down.weight"].shape[0] * file_rank)
    elif algorithm == "LoHa":
        t["hada_w1_a"] = t["hada_w1_a"] * (alpha / t["hada_w1_b"].shape[0] * file_rank)
    elif algorithm == "LoKr" and ("lokr_w2_b" in t or "lokr_w1_b" in t):
        rank = t["lokr_w2_b" if "lokr_w2_b" in t else "lokr_w1_b"].shape[0]
        w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        t[w1] = t[w1] * (alpha / rank * file_rank)
    elif algorithm == "OFT":
        # the node continues OFT with a norm constraint of 1 (its alpha): exact when the clipped
        # blocks are within it, which they are whenever this run's constraint (alpha) is in (0, 1]
        blocks = t["oft_blocks"]
        if torch.linalg.vector_norm(blocks - blocks.transpose(1, 2)) > 1 + 1e-6:
            logger.warning("--file_layout comfyui: an OFT layer's rotation exceeds the norm constraint 1 that "
                           "ComfyUI applies to this file; train with --alpha 1 (or less) for the same effect")
    t["alpha"] = torch.tensor(1.0)
    return t


def _rank(tensors: dict[str, torch.Tensor]) -> int:
    """The rank the loaders divide alpha by (LoKr: of its decomposed factor; 1 for full-matrix LoKr, OFT)."""
    for name in (*_RANK_TENSORS, "lokr_w2_b", "lokr_w1_b"):
        if name in tensors:
            return tensors[name].shape[0]
    return 1


def to_comfyui(modules: dict[str, dict[str, torch.Tensor]], offsets: dict[str, dict[str, torch.Tensor]],
               algorithm: str, names: dict[str, ComfyPart],
               out_rows: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The file's tensors in ComfyUI's layout, and the ranks of each part of every fused adapter
    (for the file's metadata, :data:`FUSED_RANKS`).

    ``modules``: diffusers module -> the algorithm's exported tensors (fp32, with ``alpha``);
    ``offsets``: module -> {"diff", "diff_b"}; ``names``: the family's :meth:`comfyui_names`;
    ``out_rows``: module -> output rows of its weight (to place parts of a fused layer).
    Raises :class:`TrainerError` for a module ComfyUI has no name for, or LoKr/OFT on a fused or
    swapped layer.
    """
    unnamed = [m for m in (*modules, *offsets) if m not in names]
    if unnamed:
        raise TrainerError(f"--file_layout comfyui: ComfyUI has no module for {', '.join(unnamed[:5])}; use "
                           "--file_layout auto")
    state: dict[str, torch.Tensor] = {}
    fused_ranks: dict[str, list[int]] = {}
    fused: dict[str, list[str]] = defaultdict(list)  # ComfyUI module -> its diffusers parts
    for module, part in names.items():
        if part.start is not None:
            fused[part.module].append(module)
    groups: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        groups[names[module].module].append(module)
    for target, members in groups.items():
        key = PREFIX + target
        parts = sorted(fused.get(target, members), key=lambda m: names[m].start or 0)
        exotic = len(parts) > 1 or names[members[0]].swap
        if exotic and algorithm not in ("LoRA", "LoHa"):
            raise TrainerError(f"--file_layout comfyui: {algorithm} on {', '.join(members)} cannot be written "
                               f"exactly as ComfyUI's {target} (a fused or swapped layer); LoRA and LoHa can, or "
                               "use --file_layout auto")
        if len(parts) == 1:
            tensors = _fold(algorithm, modules[members[0]], _rank(modules[members[0]]))
            if names[members[0]].swap:
                tensors = {k: _swap(v) if k in _ROW_TENSORS else v for k, v in tensors.items()}
            state.update({f"{key}.{k}": v for k, v in tensors.items()})
            continue
        file_rank = sum(_rank(modules[m]) for m in members)
        folded = {m: _fold(algorithm, modules[m], file_rank) for m in members}
        # where each part's ranks sit, so that reading splits it back even where a block is still zero
        fused_ranks[target] = [_rank(folded[m]) if m in folded else 0 for m in parts]
        rows = sum(out_rows[m] for m in parts)
        first = folded[members[0]]
        for name in [n for n in _ROW_TENSORS if n in first]:  # block-diagonal: part i's rows x its ranks
            block = torch.zeros(rows, file_rank)
            column = 0
            for m in [p for p in parts if p in folded]:
                start, r = names[m].start, _rank(folded[m])
                block[start:start + out_rows[m], column:column + r] = folded[m][name]
                column += r
            state[f"{key}.{name}"] = block
        for name in [n for n in _RANK_TENSORS if n in first]:
            state[f"{key}.{name}"] = torch.cat([folded[m][name] for m in parts if m in folded])
        state[f"{key}.alpha"] = torch.tensor(1.0)
    for target, members in _group_offsets(offsets, names).items():
        key = PREFIX + target
        for module in members:
            part = names[module]
            if "diff" in offsets[module]:
                if part.start is not None:
                    raise TrainerError(f"--file_layout comfyui: a full weight offset on {module}, part of ComfyUI's "
                                       f"fused {target}, cannot be written; use --file_layout auto")
                diff = _swap(offsets[module]["diff"]) if part.swap else offsets[module]["diff"]
                state[f"{key}.diff" if part.param == "weight" else f"{key}.{part.param}.diff"] = diff
        biased = [m for m in members if "diff_b" in offsets[m]]
        if biased:
            parts = sorted(fused.get(target, biased), key=lambda m: names[m].start or 0)
            if len(parts) == 1:
                bias = offsets[parts[0]]["diff_b"]
                state[f"{key}.diff_b"] = _swap(bias) if names[parts[0]].swap else bias
            else:  # a fused bias: each part's rows, zero where a part has no offset
                pieces = [offsets[m]["diff_b"] if m in biased else torch.zeros(out_rows[m]) for m in parts]
                state[f"{key}.diff_b"] = torch.cat(pieces)
    return state, fused_ranks


def _group_offsets(offsets, names) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for module in offsets:
        groups[names[module].module].append(module)
    return groups


def from_comfyui(tensors: dict[str, torch.Tensor], names: dict[str, ComfyPart], out_rows: dict[str, int],
                 fused_ranks: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """``diffusion_model.<ComfyUI module>`` keys rewritten as ``diffusion_model.<diffusers module>`` keys
    (fused layers split, swapped rows put back); other keys are returned as they are. ``fused_ranks``
    (this trainer's metadata) says which ranks of a fused adapter belong to which part."""
    by_target: dict[str, list[str]] = defaultdict(list)  # ComfyUI module -> diffusers modules, in row order
    params: dict[str, str] = {}  # ComfyUI "module.scale" spellings of norm weights -> diffusers module
    for module, part in names.items():
        by_target[part.module].append(module)
        if part.param != "weight":
            params[f"{part.module}.{part.param}"] = module
    for members in by_target.values():
        members.sort(key=lambda m: names[m].start or 0)
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        stripped = key.removeprefix("model.")
        if not stripped.startswith(PREFIX):
            out[key] = tensor
            continue
        rest = stripped[len(PREFIX):]
        parts = rest.split(".")
        # the longest module path that leaves a tensor name (at most 3 dots: "scale.diff", "lora_up.weight")
        target = next((c for c in (".".join(parts[:cut]) for cut in range(len(parts) - 1, max(len(parts) - 4, 0), -1))
                       if c in params or c in by_target), None)
        if target is None:
            out[key] = tensor
            continue
        if target in params:  # Flux's RMSNorm "scale": only a full offset can name it
            out[f"{PREFIX}{params[target]}.{rest[len(target) + 1:]}"] = tensor
            continue
        grouped[target][rest[len(target) + 1:]] = tensor
    for target, group in grouped.items():
        out.update(_split(target, group, by_target[target], names, out_rows, (fused_ranks or {}).get(target)))
    return out


def _split(target, group, members, names, out_rows, ranks=None) -> dict[str, torch.Tensor]:
    """One ComfyUI module's tensors as tensors of its diffusers modules."""
    if len(members) == 1:
        module, part = members[0], names[members[0]]
        swap = {*_ROW_TENSORS, "diff", "diff_b"} if part.swap else set()
        return {f"{PREFIX}{module}.{k}": _swap(v) if k in swap else v for k, v in group.items()}
    out = {}
    if "diff" in group:
        raise TrainerError(f"--existing_lora: a full weight offset (diff) on ComfyUI's fused {target}, which this "
                           "trainer adapts as separate projections, cannot be continued")
    if "diff_b" in group:
        for m in members:
            start = names[m].start
            out[f"{PREFIX}{m}.diff_b"] = group["diff_b"][start:start + out_rows[m]]
    row_names = [n for n in _ROW_TENSORS if n in group]
    rank_names = [n for n in _RANK_TENSORS if n in group]
    if not row_names:
        unsupported = sorted(k for k in group if k not in ("diff_b", "alpha"))
        if unsupported:
            raise TrainerError(f"--existing_lora: {', '.join(unsupported)} on ComfyUI's fused {target} cannot be "
                               "split into this trainer's separate projections (LoRA and LoHa can)")
        return out
    rank = group[rank_names[0]].shape[0]
    alpha = float(group["alpha"]) if "alpha" in group else float(rank)
    rows = {m: [group[n][names[m].start:names[m].start + out_rows[m]] for n in row_names] for m in members}
    # the ranks each projection uses; disjoint (block-diagonal, as this trainer writes) -> keep them apart
    if ranks is not None and len(ranks) == len(members) and sum(ranks) == rank:
        offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        used = {m: set(range(o, o + r)) for m, o, r in zip(members, offsets, ranks)}
    else:
        used = {m: set(torch.nonzero(torch.stack([r.abs().sum(0) for r in rows[m]]).sum(0)).flatten().tolist())
                for m in members}
    disjoint = all(not (used[a] & used[b]) for i, a in enumerate(members) for b in members[i + 1:])
    for m in members:
        columns = sorted(used[m]) if disjoint else list(range(rank))
        if not columns:
            continue  # a projection the fused adapter does not change
        index = torch.tensor(columns)
        for n, r in zip(row_names, rows[m]):
            out[f"{PREFIX}{m}.{n}"] = r[:, index]
        for n in rank_names:
            out[f"{PREFIX}{m}.{n}"] = group[n][index]
        # the same scale alpha / rank as the fused adapter, at this projection's rank
        out[f"{PREFIX}{m}.alpha"] = torch.tensor(alpha * len(columns) / rank)
    return out


def warn_oft_on_swapped_layers(names: dict[str, ComfyPart], adapted: list[str]) -> None:
    """ComfyUI applies OFT to a layer it stores with swapped rows in its own row order (measured with its
    code): say so before training."""
    swapped = [m for m in adapted if m in names and names[m].swap]
    if swapped:
        logger.warning("ComfyUI applies OFT on %s in its own (shift, scale) row order, which is not what was trained; "
                       "for ComfyUI leave these layers out of --target_modules or use another algorithm",
                       ", ".join(swapped))


def split_offsets(model: torch.nn.Module, names: dict[str, ComfyPart],
                  offsets: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(offsets left for the family's own names, offsets of the layers ComfyUI fuses or swaps under
    ComfyUI's own keys). ComfyUI's loader reads a bias offset of such a layer only under its own name:
    under a diffusers name it builds a broken key (``().bias``) and drops it."""
    special = {m: o for m, o in offsets.items() if m in names and (names[m].start is not None or names[m].swap)}
    if not special:
        return offsets, {}
    rows = {m: model.get_submodule(m).weight.shape[0] for m, part in names.items()
            if part.module in {names[s].module for s in special}}
    state, _ = to_comfyui({}, special, "LoRA", names, rows)
    return {m: o for m, o in offsets.items() if m not in special}, state
