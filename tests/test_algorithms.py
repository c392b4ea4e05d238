"""LoHa, LoKr and OFT: they train, their files use LyCORIS tensor names under kohya module names, and
the files mean what ComfyUI's loaders compute (a reference merge written from the published formulas
reproduces the trained model), and reading a file back restores the same adapter."""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict

import pytest
import torch
from conftest import FAST, make_dataset, unet_inputs

from trainer import TrainerError, train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.demo import build_demo_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MODULES = 32  # attention projections of the demo UNet

# (algorithm, rank, alpha, tensor suffixes of every module)
CASES = {
    "LoHa": ("LoHa", 4, 2.0, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    # rank 2 < half of w2's side (8): w2 = w2_a @ w2_b, loaders scale by alpha / rank
    "LoKr-decomposed": ("LoKr", 2, 3.0, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    # rank 8: both factors full, loaders apply no scale (peft's alpha / rank is folded into lokr_w1)
    "LoKr-full": ("LoKr", 8, 2.0, {"lokr_w1", "lokr_w2", "alpha"}),
    "OFT": ("OFT", 4, 0.5, {"oft_blocks", "alpha"}),
    # a constraint far below the trained norm: the clipping is active at every step
    "OFT-constrained": ("OFT", 4, 1e-3, {"oft_blocks", "alpha"}),
}
# the factor each algorithm initialises to zero (so the adapter starts as the identity)
ZERO_INIT = {"LoHa": "hada_w2_b", "LoKr": "lokr_w1", "OFT": "oft_blocks"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train each case once per module (2 fp32 steps, files written) and share the result."""
    cache = {}

    def get(case):
        if case not in cache:
            algorithm, rank, alpha, _ = CASES[case]
            out = tmp_path_factory.mktemp(case)
            cache[case] = train_lora("demo", make_dataset(), algorithm=algorithm, rank=rank, alpha=alpha,
                                     learning_rate=1e-2, output_dir=str(out), target_modules="attention", **FAST)
        return cache[case]

    return get


def by_module(lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module key (without ``lora_unet_``) -> {suffix: fp32 tensor}."""
    grouped = defaultdict(dict)
    for key, tensor in lora.items():
        module, suffix = key.split(".", 1)
        assert module.startswith("lora_unet_")
        grouped[module.removeprefix("lora_unet_")][suffix] = tensor.float()
    return dict(grouped)


def reference_delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change ComfyUI's loaders (comfy/weight_adapter/{loha,lokr,oft}.py) and LyCORIS
    apply for one module's file tensors, written from their published formulas."""
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:  # LoHa: (w1a w1b) * (w2a w2b) * alpha / rank
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return scale * diff.reshape(weight.shape)
    if any(k.startswith("lokr_") for k in t):  # LoKr: kron(w1, w2), alpha / rank only if decomposed
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:  # a full conv factor [b, d, kh, kw]: w1 acts as [a, c, 1, 1]
            w1 = w1[:, :, None, None]
        decomposed = [t[name].shape[0] for name in ("lokr_w2_b", "lokr_w1_b") if name in t]
        scale = alpha / decomposed[0] if decomposed and alpha is not None else 1.0
        return scale * torch.kron(w1, w2).reshape(weight.shape)
    # OFT: Cayley rotation of the skew part (norm-clipped to alpha), applied as R^T to row blocks
    blocks = t["oft_blocks"]
    size = blocks.shape[-1]
    q = blocks - blocks.transpose(1, 2)
    if alpha and q.norm() + 1e-8 > alpha:
        q = q * alpha / (q.norm() + 1e-8)
    eye = torch.eye(size)
    r = torch.stack([(eye + qk) @ torch.linalg.inv(eye - qk) for qk in q])
    rotation = torch.block_diag(*r)  # [out, out], block k acting on rows k*size .. (k+1)*size
    return (rotation.T @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape) - weight


def reference_merge(lora: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh demo model with every file module's delta added to its weight."""
    model = build_demo_model()
    modules = {name.replace(".", "_"): module for name, module in model.named_modules()}
    with torch.no_grad():
        for key, tensors in by_module(lora).items():
            weight = modules[key].weight
            weight += reference_delta(tensors, weight)
    return model


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*unet_inputs()).sample


@pytest.mark.parametrize("case", CASES)
def test_trains_and_writes_lycoris_names(trained, case):
    algorithm, _, _, suffixes = CASES[case]
    res = trained(case)
    assert res.steps == 2 and all(math.isfinite(v) for v in res.loss["loss"])
    modules = by_module(res.lora)
    assert len(modules) == MODULES and all(set(t) == suffixes for t in modules.values())
    alphas = [t for k, t in res.lora.items() if k.endswith(".alpha")]
    assert len(alphas) == MODULES and all(t.dtype == torch.float32 and t.ndim == 0 for t in alphas)
    # the zero-initialised factor has moved, so the adapter now changes the output
    assert all(t[ZERO_INIT[algorithm]].abs().max() > 0 for t in modules.values())
    assert (output(res.model_with_lora) - output(build_demo_model())).abs().max() > 1e-4


@pytest.mark.parametrize("case", CASES)
def test_file_means_what_comfyui_computes(trained, case):
    """The reference merge of the file's tensors gives the trained model's output."""
    res = trained(case)
    merged = reference_merge(res.lora)
    torch.testing.assert_close(output(merged), output(res.model_with_lora), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_import_restores_the_adapter(trained, case):
    """A fresh adapter built with rank_from_tensors, filled by import_layer, is the trained one, even
    with another alpha for LoHa/LoKr (the loaders' scale is what counts)."""
    algorithm_name, _, alpha, _ = CASES[case]
    res = trained(case)
    algorithm = get_algorithm(algorithm_name)
    modules = by_module(res.lora)
    model = build_demo_model()
    paths = {name.replace(".", "_"): name for name, _ in model.named_modules()}
    ranks = {paths[key]: algorithm.rank_from_tensors(t) for key, t in modules.items()}
    attach_adapter(model, algorithm, 1, alpha if algorithm_name == "OFT" else 5.0, TARGETS, seed=1,
                   rank_pattern=ranks)
    for name, layer in adapter_layers(model).items():
        algorithm.import_layer(layer, modules[name.replace(".", "_")])
    model.eval()
    torch.testing.assert_close(output(model), output(res.model_with_lora), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["LoHa", "LoKr-decomposed", "LoKr-full", "OFT-constrained"])
def test_continuing_a_file_starts_from_it(trained, case):
    """--existing_lora with a file of ours rebuilds the adapter (algorithm, ranks, alphas from the file)
    and continues the step count; a 1e-7 learning rate keeps the model where the file left it."""
    res = trained(case)
    more = train_lora("demo", make_dataset(), existing_lora=str(res.lora_path), learning_rate=1e-7,
                      **{**FAST, "steps": 1})
    assert more.steps == 3 and set(more.lora) == set(res.lora)
    torch.testing.assert_close(output(more.model_with_lora), output(res.model_with_lora), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["LoHa", "LoKr-full", "OFT"])
def test_checkpoint_state_and_merge(trained, case):
    """peft's state-dict helpers (full-state checkpoints) and fuse_lora/unload_lora (model_with_lora/)
    work for every algorithm."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    algorithm, rank, alpha, suffixes = CASES[case]
    res = trained(case)
    expected = output(res.model_with_lora)
    state = get_peft_model_state_dict(res.model_with_lora, adapter_name="default")
    assert len(state) == MODULES * (len(suffixes) - 1)
    assert {key.rsplit(".", 1)[1] for key in state} == suffixes - {"alpha"}
    model = build_demo_model()
    attach_adapter(model, get_algorithm(algorithm), rank, alpha, TARGETS, seed=1)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    assert not result.unexpected_keys
    torch.testing.assert_close(output(model.eval()), expected, atol=1e-5, rtol=1e-5)

    merged = copy.deepcopy(res.model_with_lora)
    merged.fuse_lora()
    merged.unload_lora()
    assert not adapter_layers(merged)
    torch.testing.assert_close(output(merged), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_fresh_adapters_start_as_the_identity():
    base = output(build_demo_model())
    for algorithm in ("LoHa", "LoKr", "OFT"):
        model = build_demo_model()
        attach_adapter(model, get_algorithm(algorithm), 4, 1.0, TARGETS, seed=0)
        torch.testing.assert_close(output(model), base, atol=1e-6, rtol=1e-6)


def test_metadata_names_the_lycoris_algorithm(trained):
    from safetensors import safe_open

    for case, algo in (("LoHa", "loha"), ("LoKr-full", "lokr"), ("OFT", "diag-oft")):
        res = trained(case)
        with safe_open(str(res.lora_path), "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert keys == set(res.lora)
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert json.loads(meta["ss_network_args"])["algo"] == algo


def test_oft_constraint_is_baked_into_the_file(trained):
    """Training clips each layer's skew norm to alpha; the file holds the clipped blocks, so a loader
    that clips to alpha (ComfyUI) and one that clips to alpha * out_features (LyCORIS) agree."""
    res = trained("OFT-constrained")
    raw = [layer.oft_blocks["default"] for layer in adapter_layers(res.model_with_lora).values()]
    assert all((b - b.transpose(1, 2)).norm() > 2e-3 for b in raw)  # the constraint was active
    for tensors in by_module(res.lora).values():
        blocks = tensors["oft_blocks"]
        assert (blocks - blocks.transpose(1, 2)).norm() <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("algorithm, optimizer, training_dtype, lora_dtype, checkpointing", [
    ("LoHa", "SGD", "bf16", "bf16", True),
    ("LoKr", "RMSprop", "bf16", "fp32", True),
    ("OFT", "Adam", "fp32", "bf16", True),
    ("OFT", "AdamW", "bf16", "bf16", False),
])
def test_trains_with_every_precision_and_optimizer(algorithm, optimizer, training_dtype, lora_dtype,
                                                   checkpointing):
    res = train_lora("demo", make_dataset(), algorithm=algorithm, rank=4, learning_rate=1e-2,
                     **{**FAST, "optimizer": optimizer, "training_dtype": training_dtype,
                        "lora_dtype": lora_dtype, "gradient_checkpointing": checkpointing})
    assert all(math.isfinite(v) for v in res.loss["loss"])
    dtype = torch.bfloat16 if lora_dtype == "bf16" else torch.float32
    assert {t.dtype for k, t in res.lora.items() if not k.endswith("alpha")} == {dtype}
    # every layer learns, but OFT blocks of size 1 (4 output channels at rank 4: conv_out) have no rotation
    modules = {m: t for m, t in by_module(res.lora).items() if t[ZERO_INIT[algorithm]].shape[-1] > 1 or
               algorithm != "OFT"}
    assert len(modules) >= 82 and all(t[ZERO_INIT[algorithm]].abs().max() > 0 for t in modules.values())


@pytest.mark.unit
def test_import_rejects_tensors_that_do_not_fit():
    model = build_demo_model()
    attach_adapter(model, get_algorithm("LoKr"), 8, 1.0, TARGETS, seed=0)  # full w1, w2
    layer = next(iter(adapter_layers(model).values()))
    with pytest.raises(TrainerError, match="do not make a Kronecker product"):
        get_algorithm("LoKr").import_layer(layer, {"lokr_w1": torch.zeros(3, 3), "lokr_w2": torch.zeros(5, 5),
                                                   "alpha": torch.tensor(1.0)})

    attach_adapter(model := build_demo_model(), get_algorithm("OFT"), 4, 0.0, TARGETS, seed=0)
    layer = next(iter(adapter_layers(model).values()))
    with pytest.raises(TrainerError, match="rescale"):
        get_algorithm("OFT").import_layer(layer, {"oft_blocks": torch.zeros(8, 4, 4),
                                                  "rescale": torch.ones(32, 1)})
    with pytest.raises(TrainerError, match="shape"):
        get_algorithm("OFT").import_layer(layer, {"oft_blocks": torch.zeros(4, 8, 8)})


@pytest.mark.parametrize("algorithm, rank", [("LoHa", 4), ("LoKr", 2), ("LoKr", 8), ("OFT", 4)])
def test_convolutions_export_in_the_loaders_layout(algorithm, rank):
    """On 3x3 and 1x1 convolutions too, the file (factors flattened to [.., in * kh * kw] as ComfyUI
    reshapes them, OFT rotating output channels) means what the adapted model computes."""
    from trainer.adapters import export_adapter

    model = build_demo_model()
    params = attach_adapter(model, get_algorithm(algorithm), rank, 2.0, ["conv1", "proj_in"], seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # any adapter state, not just the initial identity
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    lora = export_adapter(model, get_algorithm(algorithm), "lora_unet_", torch.float32)
    assert all(layer.get_base_layer().weight.ndim == 4 for layer in adapter_layers(model).values())
    torch.testing.assert_close(output(reference_merge(lora)), output(model), atol=1e-5, rtol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("split", ["comfyui-node", "lycoris-factor-4"])
def test_lokr_files_split_another_way_keep_their_shapes(split):
    """LoKr files whose factors split the dimensions otherwise than ours (ComfyUI's training node: w1
    [2, 2] full at rank 2; LyCORIS with factor=4: w1 [4, 4], w2 of rank 2) are read back exactly."""
    model = build_demo_model()
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in model.named_modules():
        if name.endswith(tuple(f".{t}" for t in TARGETS)):
            out, inp = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            if split == "comfyui-node":
                factors = {"lokr_w1": (2, 2), "lokr_w2": (out // 2, inp // 2)}
            else:
                factors = {"lokr_w1": (4, 4), "lokr_w2_a": (out // 4, 2), "lokr_w2_b": (2, inp // 4)}
            lora.update({f"{key}.{k}": 0.1 * torch.randn(shape, generator=g) for k, shape in factors.items()})
            lora[f"{key}.alpha"] = torch.tensor(1.0)
    algorithm = get_algorithm("LoKr")
    modules = by_module(lora)
    paths = {name.replace(".", "_"): name for name, _ in model.named_modules()}
    ranks = {paths[key]: algorithm.rank_from_tensors(t) for key, t in modules.items()}
    params = attach_adapter(model, algorithm, 1, 1.0, TARGETS, seed=0, rank_pattern=ranks)
    for name, layer in adapter_layers(model).items():
        algorithm.import_layer(layer, modules[name.replace(".", "_")])
    assert {p.shape[0] for p in params if p.ndim == 2} >= {2 if split == "comfyui-node" else 4}
    torch.testing.assert_close(output(model), output(reference_merge(lora)), atol=1e-5, rtol=1e-5)
