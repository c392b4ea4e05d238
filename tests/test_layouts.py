"""One round-trip matrix over the file layouts (issue 11 item 2, issue 15): every family x every
algorithm x every layout a family writes: write the adapter, read it back into a fresh model, and the
denoiser computes the same. A new family or algorithm is covered by its registration alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_comfyui_layout import BUILDERS, output

from trainer.adapters import ALGORITHMS, adapter_layers, attach_adapter, export_adapter, get_algorithm
from trainer.adapters.comfyui import FUSED_RANKS, to_comfyui
from trainer.adapters.formats import read_existing_adapter
from trainer.errors import TrainerError
from trainer.models import get_family

RANK, ALPHA = 4, 2.0


def write(model, family, algorithm, layout: str, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata as a run writes them in ``layout``."""
    if layout == "auto":
        state = export_adapter(model, algorithm, family.file_tensors, torch.float32)
        return state, family.file_metadata(state, RANK, alpha)
    modules = {name: {k: t.detach().float() for k, t in algorithm.export_layer(layer).items()}
               for name, layer in adapter_layers(model).items()}
    names = family.comfyui_names(model)
    rows = {name: module.weight.shape[0] for name, module in model.named_modules()
            if name in names and isinstance(getattr(module, "weight", None), torch.Tensor)}
    state, fused_ranks = to_comfyui(modules, {}, algorithm.name, names, rows)
    return state, {FUSED_RANKS: json.dumps(fused_ranks)}


@pytest.mark.parametrize("layout", ["auto", "comfyui"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("family_name", BUILDERS)
def test_written_adapter_reads_back_the_same(family_name, algorithm, layout, tmp_path):
    family, algo = get_family(family_name), get_algorithm(algorithm)
    # ComfyUI's layout stores alpha 1, which for OFT is the rotation's norm constraint: a run writing it
    # warns unless --alpha <= 1 (tests/test_comfyui_layout.py), so the same effect needs alpha 1 here
    alpha = 1.0 if (algorithm, layout) == ("OFT", "comfyui") else ALPHA
    model = BUILDERS[family_name]()
    attach_adapter(model, algo, rank=RANK, alpha=alpha, targets=list(family.default_targets), seed=0)
    with torch.no_grad():  # a fresh adapter is the identity (LoRA's up is 0): make every tensor count
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    expected, base = output(family_name, model), output(family_name, BUILDERS[family_name]())
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output: equality below means something

    if layout == "comfyui" and algorithm in ("LoKr", "OFT") and any(
            part.start is not None or part.swap for name, part in family.comfyui_names(model).items()
            if name in adapter_layers(model)):
        # a Kronecker product or a rotation of q, k, v apart is not one of their fused layer: refused
        with pytest.raises(TrainerError, match="cannot be written exactly"):
            write(model, family, algo, layout, alpha)
        return
    state, metadata = write(model, family, algo, layout, alpha)
    path = tmp_path / "adapter.safetensors"
    save_file(state, str(path), metadata)
    fresh = BUILDERS[family_name]()
    existing = read_existing_adapter(path, fresh, family)
    assert existing.algorithm == algorithm
    assert set(existing.modules) == set(adapter_layers(model))
    attach_adapter(fresh, algo, seed=1, **existing.attach_arguments())
    layers = adapter_layers(fresh)
    for name, tensors in existing.modules.items():
        algo.import_layer(layers[name], tensors)
    torch.testing.assert_close(output(family_name, fresh), expected, rtol=1e-4, atol=1e-5)
