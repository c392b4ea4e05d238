"""--target_modules: ``all`` adapts every Linear/Conv layer (the node's adapter set), ``node`` adds the
node's full offsets of every norm weight (``diff``) and every bias (``diff_b``), for every family and
algorithm; the files mean what ComfyUI's loader computes from them; continuing or resuming a run
with offsets starts exactly where it stopped."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import FAST, make_dataset, unet_inputs
from test_algorithms import reference_delta
from test_families import FAMILIES, denoiser_output, family_dataset

from trainer import train_lora
from trainer.adapters import adapter_layers
from trainer.adapters.formats import read_existing_adapter
from trainer.demo import build_demo_model
from trainer.models import get_family

CONVS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
BUILDERS = {"sd": build_demo_model, **{family: spec[0] for family, spec in FAMILIES.items()}}


def data(family, rows=4):
    return make_dataset(rows=rows) if family == "sd" else family_dataset(family, rows=rows)


def census(model):
    """What the node trains on ``model``, counted here from the module types: Linear/Conv layers
    (adapters), other modules' weights (norms: diff) and every bias (diff_b)."""
    layers = {n for n, m in model.named_modules() if isinstance(m, CONVS)}
    weights = {n for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and n not in layers}
    biases = {n for n, m in model.named_modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter)}
    return layers, weights, biases


@pytest.mark.parametrize("family", BUILDERS)
def test_default_adapts_every_linear_and_conv_and_node_adds_every_offset(family, tmp_path):
    layers, weights, biases = census(BUILDERS[family]())
    assert layers and biases and (weights or family == "sd3")  # the tiny SD3 has no affine norms
    default = train_lora(BUILDERS[family](), data(family), **{**FAST, "steps": 1})
    assert set(adapter_layers(default.model_with_lora)) == layers
    assert not any(k.endswith((".diff", ".diff_b")) for k in default.lora)

    node = train_lora(BUILDERS[family](), data(family), target_modules="node", output_dir=str(tmp_path),
                      **{**FAST, "steps": 1})
    assert set(adapter_layers(node.model_with_lora)) == layers
    # the file's offsets, read back onto a fresh model (SD3/Flux write those of layers ComfyUI fuses or
    # swaps under ComfyUI's names, which the reader maps back)
    deltas = read_existing_adapter(node.lora_path, BUILDERS[family](), get_family(family)).deltas
    assert {m for m, d in deltas.items() if "diff" in d} == weights
    assert {m for m, d in deltas.items() if "diff_b" in d} == biases
    # every offset trained (moved from zero), in the file's dtype
    offsets = [t for k, t in node.lora.items() if k.endswith((".diff", ".diff_b"))]
    assert all(t.abs().max() > 0 for t in offsets)


def test_attention_and_lists_keep_their_meaning():
    res = train_lora("demo", make_dataset(), target_modules="attention", **{**FAST, "steps": 1})
    assert len(adapter_layers(res.model_with_lora)) == 32
    res = train_lora("demo", make_dataset(), target_modules="conv_in, conv_out", **{**FAST, "steps": 1})
    assert set(adapter_layers(res.model_with_lora)) == {"conv_in", "conv_out"}


def comfyui_merge(lora):
    """A fresh demo UNet with every file tensor applied by ComfyUI's rules (comfy/lora.py and
    comfy/weight_adapter): adapters as weight deltas, ``diff`` added to the weight, ``diff_b`` to the bias."""
    model = build_demo_model()
    modules = {name.replace(".", "_"): m for name, m in model.named_modules()}
    grouped = defaultdict(dict)
    for key, tensor in lora.items():
        module, suffix = key.split(".", 1)
        grouped[module.removeprefix("lora_unet_")][suffix] = tensor.float()
    with torch.no_grad():
        for name, t in grouped.items():
            module = modules[name]
            if "diff" in t:
                module.weight += t.pop("diff")
            if "diff_b" in t:
                module.bias += t.pop("diff_b")
            if "lora_down.weight" in t:
                down, up = t["lora_down.weight"].flatten(1), t["lora_up.weight"].flatten(1)
                module.weight += (float(t["alpha"]) / down.shape[0] * up @ down).reshape(module.weight.shape)
            elif t:
                module.weight += reference_delta(t, module.weight)
    return model


@pytest.mark.parametrize("algorithm, rank", [("LoRA", 4), ("LoHa", 2), ("LoKr", 2), ("OFT", 4)])
def test_node_files_mean_what_comfyui_computes(algorithm, rank):
    res = train_lora("demo", make_dataset(), target_modules="node", algorithm=algorithm, rank=rank, alpha=2.0,
                     learning_rate=1e-2, **FAST)
    with torch.no_grad():
        expected = res.model_with_lora(*unet_inputs()).sample
        base = build_demo_model()(*unet_inputs()).sample
        merged = comfyui_merge(res.lora)(*unet_inputs()).sample
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", BUILDERS)
def test_continuing_a_file_with_offsets_starts_exactly_from_it(family, tmp_path):
    """The continued run starts from the file's model (adapter + offsets) and trains the offsets on:
    with a 0 learning rate (SGD) its file equals the input file and its model the first run's."""
    first = train_lora(BUILDERS[family](), data(family), target_modules="node", learning_rate=1e-2,
                       output_dir=str(tmp_path / "a"), **FAST)
    more = train_lora(BUILDERS[family](), data(family), existing_lora=str(first.lora_path), optimizer="SGD",
                      learning_rate=1e-7, output_dir=str(tmp_path / "b"), **{**FAST, "steps": 1})
    assert more.steps == 3 and set(more.lora) == set(first.lora)
    for key, value in first.lora.items():
        torch.testing.assert_close(more.lora[key], value, atol=1e-6, rtol=0)
    if family == "sd":
        with torch.no_grad():
            a, b = first.model_with_lora(*unet_inputs()).sample, more.model_with_lora(*unet_inputs()).sample
    else:
        a, b = denoiser_output(family, first.model_with_lora), denoiser_output(family, more.model_with_lora)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    # and the offsets keep training
    trained = train_lora(BUILDERS[family](), data(family), existing_lora=str(first.lora_path),
                         learning_rate=1e-2, **{**FAST, "steps": 1})
    diffs = [k for k in first.lora if k.endswith(".diff_b")]
    assert any(not torch.equal(trained.lora[k], first.lora[k]) for k in diffs)


def test_resume_with_offsets_equals_uninterrupted(tmp_path):
    run = dict(FAST, target_modules="node", learning_rate=0.01, batch_size=2, steps=4)
    ds = make_dataset(rows=6)
    whole = train_lora("demo", ds, output_dir=str(tmp_path / "whole"), **run)
    train_lora("demo", ds, output_dir=str(tmp_path / "split"), **dict(run, steps=2, checkpointing_steps=2))
    assert (tmp_path / "split" / "checkpoints" / "step-00000002" / "offsets.safetensors").is_file()
    resumed = train_lora("demo", ds, output_dir=str(tmp_path / "split"), resume_from_checkpoint="latest", **run)
    assert set(resumed.lora) == set(whole.lora)
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=0)


def test_merged_model_keeps_the_offsets(tmp_path):
    from diffusers import UNet2DConditionModel

    res = train_lora("demo", make_dataset(), target_modules="node", learning_rate=1e-2, output_dir=str(tmp_path),
                     save_merged_model=True, **FAST)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "model_with_lora")
    with torch.no_grad():
        torch.testing.assert_close(merged(*unet_inputs()).sample, res.model_with_lora(*unet_inputs()).sample,
                                   atol=1e-5, rtol=1e-5)


def _pipeline(family):
    from conftest import make_pipeline
    from test_families import tiny_pipeline

    return make_pipeline() if family == "sd" else tiny_pipeline(family)


def _loaded_output(family, path):
    pipe = _pipeline(family)
    pipe.load_lora_weights(str(path))
    model = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    if family == "sd":
        with torch.no_grad():
            return model(*unet_inputs()).sample
    return denoiser_output(family, model)


@pytest.mark.parametrize("family", BUILDERS)
def test_what_diffusers_does_with_node_files(family, tmp_path):
    """Measured for the README's loader matrix: diffusers' SD/SDXL (kohya) loader refuses a file holding
    diff/diff_b, so does its SD3 loader (the offsets ComfyUI reads only under its own names, without
    "lora" in them); its Flux loader loads the adapter and silently ignores the offsets."""
    from safetensors.torch import load_file, save_file

    res = train_lora(BUILDERS[family](), data(family), target_modules="node", learning_rate=1e-2,
                     output_dir=str(tmp_path), **FAST)
    if family != "flux":
        match = "Invalid LoRA checkpoint" if family == "sd3" else "not been correctly renamed"
        with pytest.raises(ValueError, match=match):
            _pipeline(family).load_lora_weights(str(res.lora_path))
        return
    adapter_only = tmp_path / "adapter_only.safetensors"
    save_file({k: v for k, v in load_file(str(res.lora_path)).items() if not k.endswith((".diff", ".diff_b"))},
              adapter_only)
    # the offsets of layers ComfyUI fuses or swaps are under ComfyUI's names, which its loader reads
    assert "diffusion_model.double_blocks.0.img_attn.qkv.diff_b" in res.lora
    with_offsets = _loaded_output(family, res.lora_path)
    torch.testing.assert_close(with_offsets, _loaded_output(family, adapter_only), atol=0, rtol=0)
    trained = res.model_with_lora
    full = output_of(family, trained)
    assert (with_offsets - full).abs().max() > 1e-3  # the offsets' effect is missing


def output_of(family, model):
    if family == "sd":
        with torch.no_grad():
            return model(*unet_inputs()).sample
    return denoiser_output(family, model)
