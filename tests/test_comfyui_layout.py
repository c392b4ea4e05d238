"""--file_layout comfyui: the Train LoRA node's own keys, shapes and file name for every family; the file
means what ComfyUI computes from it (its LoRA/LoHa formulas at alpha 1 on its fused layers, applied here
independently of the trainer's reader); this trainer continues it exactly, and continues the node's own
files (a general rank-r adapter on a fused layer, no metadata, steps in the file name)."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
from conftest import FAST, make_dataset, unet_inputs
from safetensors.torch import load_file, save_file
from test_families import FAMILIES, denoiser_output, family_dataset

from trainer import TrainerError, train_lora
from trainer.adapters import adapter_layers
from trainer.demo import build_demo_model
from trainer.models import get_family

BUILDERS = {"sd": build_demo_model, **{family: spec[0] for family, spec in FAMILIES.items()}}
RANK = 4


def data(family):
    return make_dataset() if family == "sd" else family_dataset(family)


def output(family, model):
    if family == "sd":
        with torch.no_grad():
            return model(*unet_inputs()).sample
    return denoiser_output(family, model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = {}

    def get(family, algorithm="LoRA"):
        if (family, algorithm) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{algorithm}")
            cache[family, algorithm] = train_lora(
                BUILDERS[family](), data(family), target_modules="node", file_layout="comfyui", algorithm=algorithm,
                rank=RANK, alpha=0.5, learning_rate=1e-2, output_dir=str(out), output_name="mine", **FAST)
        return cache[family, algorithm]

    return get


#: ComfyUI module names (comfy/utils.py key maps, comfy/ldm model classes) with the rows of their weight,
#: from each tiny model's config: hidden sizes 32 (SD3: 4 heads x 8), 32 (Flux: 2 x 16), Flux MLP 4 x 32
EXPECTED = {
    "sd": {"input_blocks.0.0": 32, "time_embed.0": 128, "out.2": 4, "middle_block.1.proj_in": 64},
    "sdxl": {"input_blocks.0.0": 32, "label_emb.0.0": 128, "out.2": 4},
    "sd3": {"joint_blocks.0.x_block.attn.qkv": 96, "joint_blocks.0.context_block.attn.qkv": 96,
            "joint_blocks.1.x_block.attn.qkv": 96, "x_embedder.proj": 32, "final_layer.adaLN_modulation.1": 64,
            "final_layer.linear": 4, "t_embedder.mlp.0": 32, "y_embedder.mlp.0": 32, "context_embedder": 32},
    "flux": {"double_blocks.0.img_attn.qkv": 96, "double_blocks.0.txt_attn.qkv": 96,
             "single_blocks.0.linear1": 96 + 128, "single_blocks.0.linear2": 32, "img_in": 32, "txt_in": 32,
             "final_layer.adaLN_modulation.1": 64, "double_blocks.0.img_mod.lin": 192,
             "guidance_in.in_layer": 32},
}


@pytest.mark.parametrize("family", BUILDERS)
def test_keys_shapes_and_file_name_are_the_nodes(trained, family):
    res = trained(family)
    assert re.fullmatch(r"mine_2_steps_00001_\.safetensors", res.lora_path.name)
    lora = load_file(str(res.lora_path))
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert all(float(t) == 1.0 for k, t in lora.items() if k.endswith(".alpha"))  # what the node continues at
    for module, rows in EXPECTED[family].items():
        up, down = lora[f"diffusion_model.{module}.lora_up.weight"], lora[f"diffusion_model.{module}.lora_down.weight"]
        assert up.ndim == down.ndim == 2 and up.shape[0] == rows and up.shape[1] == down.shape[0]
        assert lora[f"diffusion_model.{module}.diff_b"].shape == (rows,)
    if family in ("sd3", "flux"):  # q, k, v (Flux single blocks: and the MLP input) fused: rank 3r / 4r
        fused = "joint_blocks.0.x_block.attn.qkv" if family == "sd3" else "single_blocks.0.linear1"
        assert lora[f"diffusion_model.{fused}.lora_down.weight"].shape[0] == RANK * (3 if family == "sd3" else 4)
    if family == "flux":  # its RMSNorms hold "scale": the offset names that parameter
        assert "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff" in lora


def comfyui_merge(family, lora):
    """A fresh model with the file applied by ComfyUI's rules, computed here: per ComfyUI module the
    update (alpha / rank) up @ down (LoRA) or (alpha / rank) (w1a w1b) * (w2a w2b) (LoHa), ``diff`` and
    ``diff_b`` added; then its rows given back to the diffusers modules they came from."""
    model = BUILDERS[family]()
    names = get_family(family).comfyui_names(model)
    groups = defaultdict(dict)
    for key, tensor in lora.items():
        rest = key.removeprefix("diffusion_model.")
        for suffix in ("lora_up.weight", "lora_down.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                       "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "oft_blocks",
                       "alpha", "scale.diff", "diff_b", "diff"):
            if rest.endswith("." + suffix):
                groups[rest[: -len(suffix) - 1]][suffix] = tensor.float()
                break
    by_target = defaultdict(list)
    for module, part in names.items():
        by_target[part.module].append(module)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for target, t in groups.items():
            members = sorted(by_target[target], key=lambda m: names[m].start or 0)
            weight_delta = None
            if "lora_up.weight" in t:
                rank = t["lora_down.weight"].shape[0]
                weight_delta = float(t["alpha"]) / rank * t["lora_up.weight"] @ t["lora_down.weight"]
            elif "hada_w1_a" in t:
                rank = t["hada_w1_b"].shape[0]
                weight_delta = float(t["alpha"]) / rank * ((t["hada_w1_a"] @ t["hada_w1_b"]) *
                                                            (t["hada_w2_a"] @ t["hada_w2_b"]))
            elif any(k.startswith(("lokr_", "oft_")) for k in t):  # unfused layers only (SD, SDXL)
                from test_algorithms import reference_delta

                weight = modules[members[0]].weight
                weight_delta = reference_delta({k: v for k, v in t.items() if "diff" not in k}, weight)
            for key, attr in (("diff", "weight"), ("scale.diff", "weight"), ("diff_b", "bias")):
                if key in t:
                    assert len(members) == 1 or key == "diff_b"
                    for m in members:
                        start, rows = names[m].start or 0, getattr(modules[m], attr).shape[0]
                        piece = t[key][start:start + rows] if len(members) > 1 else t[key]
                        if names[m].swap:
                            piece = torch.cat(piece.chunk(2)[::-1])
                        getattr(modules[m], attr).add_(piece)
            if weight_delta is not None:
                for m in members:
                    weight = modules[m].weight
                    start = names[m].start or 0
                    piece = weight_delta[start:start + weight.shape[0]]
                    if names[m].swap:
                        piece = torch.cat(piece.chunk(2)[::-1])
                    weight.add_(piece.reshape(weight.shape))
    return model


CASES = [(family, algorithm) for family in BUILDERS for algorithm in ("LoRA", "LoHa")]
CASES += [(family, algorithm) for family in ("sd", "sdxl") for algorithm in ("LoKr", "OFT")]


@pytest.mark.parametrize("family, algorithm", CASES)
def test_file_means_what_comfyui_computes(trained, family, algorithm):
    res = trained(family, algorithm)
    expected = output(family, res.model_with_lora)
    assert (expected - output(family, BUILDERS[family]())).abs().max() > 1e-3
    torch.testing.assert_close(output(family, comfyui_merge(family, load_file(str(res.lora_path)))), expected,
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa"])
@pytest.mark.parametrize("family", BUILDERS)
def test_continuing_our_comfyui_file_is_exact(trained, family, algorithm, tmp_path):
    res = trained(family, algorithm)
    more = train_lora(BUILDERS[family](), data(family), existing_lora=str(res.lora_path), file_layout="comfyui",
                      optimizer="SGD", learning_rate=1e-7, output_dir=str(tmp_path), output_name="mine",
                      **{**FAST, "steps": 1})
    assert more.steps == 3 and more.lora_path.name == "mine_3_steps_00001_.safetensors"
    assert set(more.lora) == set(res.lora)
    for key, value in res.lora.items():  # ranks kept: a block-diagonal fused adapter splits back exactly
        torch.testing.assert_close(more.lora[key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(output(family, more.model_with_lora), output(family, res.model_with_lora),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_continuing_the_nodes_fused_adapter(trained, family, tmp_path):
    """The node trains one rank-r LoRA on each fused layer (not block-diagonal) and writes no metadata:
    each projection continues with the fused rank and its rows, the same model."""
    lora = load_file(str(trained(family).lora_path))
    g = torch.Generator().manual_seed(0)
    fused = [k[: -len(".lora_up.weight")] for k in lora if k.endswith(("qkv.lora_up.weight", "linear1.lora_up.weight"))]
    for key in fused:
        up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
        lora[f"{key}.lora_up.weight"] = 0.1 * torch.randn(up.shape[0], RANK, generator=g)
        lora[f"{key}.lora_down.weight"] = 0.1 * torch.randn(RANK, down.shape[1], generator=g)
    path = tmp_path / "ComfyUI_trained_lora_40_steps_00001_.safetensors"
    save_file(lora, path)  # no metadata, as the node's SaveLoRA
    more = train_lora(BUILDERS[family](), data(family), existing_lora=str(path), optimizer="SGD",
                      learning_rate=1e-7, **{**FAST, "steps": 1})
    assert more.steps == 41
    q = "transformer_blocks.0.attn.to_q"
    assert adapter_layers(more.model_with_lora)[q].lora_A["default"].weight.shape[0] == RANK
    torch.testing.assert_close(output(family, more.model_with_lora), output(family, comfyui_merge(family, lora)),
                               atol=2e-5, rtol=1e-5)


def test_lokr_on_a_fused_layer_is_refused_before_training():
    with pytest.raises(TrainerError, match="LoKr on transformer_blocks.0.attn.to_q.*fused"):
        train_lora(BUILDERS["flux"](), data("flux"), algorithm="LoKr", file_layout="comfyui", **FAST)


def test_metadata_records_alpha_one_and_the_fused_ranks(trained):
    from safetensors import safe_open

    with safe_open(str(trained("sd3").lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_alpha"] == "1.0" and meta["ss_steps"] == "2"
    assert json.loads(meta["trainer_comfyui_fused_ranks"])["joint_blocks.0.x_block.attn.qkv"] == [RANK] * 3
