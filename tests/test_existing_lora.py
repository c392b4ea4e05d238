"""--existing_lora: each tool's file layout, written here the way that tool writes it, read back.

One tiny adapter is trained once; every format test re-keys it (or hands it to the tool's own
writer, where that writer is a library we have) and checks the reader returns the same tensors,
ranks, alphas and step count. The LDM <-> diffusers name mapping is checked against diffusers'
own single-file converter.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from conftest import FAST, make_dataset, unet_inputs
from ldm import diffusers_to_ldm_state_dict
from safetensors.torch import save_file

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.demo import DEMO_UNET_CONFIG, build_demo_model
from trainer.errors import TrainerError
from trainer.models import get_family
from trainer.models.unet_names import ldm_to_diffusers_names

SD = get_family("sd")
RANK, ALPHA = 4, 2.0
TO_LDM = {name: ldm for ldm, name in ldm_to_diffusers_names(DEMO_UNET_CONFIG).items()}
INPUTS = unet_inputs(batch=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained adapter: the trainer's file, its in-memory model, and its tensors by module path."""
    out = tmp_path_factory.mktemp("trained")
    # the attention projections: Linear layers only, which every format below can spell
    res = train_lora("demo", make_dataset(), rank=RANK, alpha=ALPHA, learning_rate=1e-2, output_dir=str(out),
                     target_modules="attention", **FAST)
    layers = {name: (layer.lora_A["default"].weight.detach().clone(),
                     layer.lora_B["default"].weight.detach().clone())
              for name, layer in adapter_layers(res.model_with_lora).items()}
    with torch.no_grad():
        reference = res.model_with_lora(*INPUTS, return_dict=False)[0]
    return res, layers, reference


def read(path):
    return read_existing_adapter(path, build_demo_model(), SD)


def assert_same_lora(adapter, layers, alpha=ALPHA, rank=RANK):
    assert adapter.algorithm == "LoRA"
    assert set(adapter.modules) == set(layers)
    for name, (down, up) in layers.items():
        assert torch.equal(adapter.modules[name]["lora_down.weight"].float(), down)
        assert torch.equal(adapter.modules[name]["lora_up.weight"].float(), up)
        assert adapter.modules[name]["alpha"].item() == alpha
    assert set(adapter.ranks.values()) == {rank}
    assert set(adapter.alphas.values()) == {alpha}


def rekey(layers, module_key, down="lora_down.weight", up="lora_up.weight", alpha=ALPHA):
    """A state dict with ``module_key(path)`` module names; alpha tensors unless ``alpha`` is None."""
    state = {}
    for name, (d, u) in layers.items():
        key = module_key(name)
        state[f"{key}.{down}"], state[f"{key}.{up}"] = d.contiguous(), u.contiguous()
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def kohya(name):
    return "lora_unet_" + name.replace(".", "_")


def diffusers_pipeline_file(model, folder):
    """What diffusers' training scripts (and SimpleTuner) save: the pipeline's ``save_lora_weights``
    with the peft config as ``lora_adapter_metadata``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(model),
                                              **_collate_lora_metadata({"unet": model}))


# ------------------------------------------------------------------ formats


def test_trainer_file(trained):
    res, layers, _ = trained
    adapter = read(res.lora_path)
    assert_same_lora(adapter, layers)
    assert adapter.steps == res.steps == FAST["steps"]
    assert adapter.source_format == "trainer"


def test_kohya_file_with_text_encoder_keys(trained, tmp_path, caplog):
    _, layers, _ = trained
    state = rekey(layers, kohya)
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 8),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, RANK),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(ALPHA)}
    path = tmp_path / "kohya.safetensors"
    save_file({**state, **te}, path, metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
        "ss_network_args": "null", "ss_steps": "123", "ss_base_model_version": "sd_v1"})
    with caplog.at_level(logging.WARNING):
        adapter = read(path)
    assert_same_lora(adapter, layers)
    assert (adapter.steps, adapter.source_format) == (123, "kohya")
    assert set(adapter.text_encoder) == set(te)  # skipped, not loaded, handed back untouched
    assert "text-encoder" in caplog.text


def test_kohya_names_of_the_ldm_unet(trained, tmp_path):
    # kohya's SDXL LoRAs (and ComfyUI's key map) spell UNet modules the LDM way under lora_unet_
    _, layers, _ = trained
    path = tmp_path / "kohya_ldm.safetensors"
    save_file(rekey(layers, lambda name: "lora_unet_" + TO_LDM[name].replace(".", "_")), path,
              metadata={"ss_steps": "7"})
    adapter = read(path)
    assert_same_lora(adapter, layers)
    assert adapter.steps == 7


@pytest.mark.unit
def test_kohya_locon_convolutions_take_alphas_from_metadata(tmp_path, caplog):
    # kohya's LoCon: Conv2d factors (r, in, k, k) and (out, r, 1, 1); 3x3 layers use conv_dim/conv_alpha
    model = build_demo_model()
    convs = ["down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.0.proj_in"]
    state = {}
    for name, rank in zip(convs, (8, 4)):
        weight = model.get_submodule(name).weight
        state[kohya(name) + ".lora_down.weight"] = torch.randn(rank, *weight.shape[1:])
        state[kohya(name) + ".lora_up.weight"] = torch.randn(weight.shape[0], rank, 1, 1)
    path = tmp_path / "locon.safetensors"
    save_file(state, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "1.0", "ss_steps": "5",
                                     "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "3.0"})})
    with caplog.at_level(logging.WARNING):
        adapter = read_existing_adapter(path, model, SD)
    assert adapter.ranks == dict(zip(convs, (8, 4)))
    assert adapter.alphas == dict(zip(convs, (3.0, 1.0)))  # 3x3: conv_alpha; 1x1: network_alpha
    assert "no alpha" not in caplog.text


def test_diffusers_pipeline_writer_with_adapter_metadata(trained, tmp_path, caplog):
    res, layers, _ = trained
    diffusers_pipeline_file(res.model_with_lora, tmp_path)
    with caplog.at_level(logging.WARNING):
        adapter = read(tmp_path)  # the folder: its pytorch_lora_weights.safetensors is found
    assert_same_lora(adapter, layers)  # alpha 2 from lora_adapter_metadata, not rank
    assert (adapter.steps, adapter.source_format) == (0, "diffusers")
    assert "no step count" in caplog.text


def test_diffusers_model_writer(trained, tmp_path):
    res, layers, _ = trained
    res.model_with_lora.save_lora_adapter(tmp_path)  # no prefix, metadata without a component prefix
    assert_same_lora(read(tmp_path / "pytorch_lora_weights.safetensors"), layers)


def test_diffusers_alpha_pattern_and_per_module_rank(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, layers, _ = trained
    first = min(layers)
    state = rekey(layers, lambda name: name, "lora_A.weight", "lora_B.weight", alpha=None)
    state[f"{first}.lora_A.weight"] = torch.ones(2, layers[first][0].shape[1])
    state[f"{first}.lora_B.weight"] = torch.ones(layers[first][1].shape[0], 2)
    metadata = {"r": RANK, "lora_alpha": ALPHA, "rank_pattern": {f"^{first}": 2},
                "alpha_pattern": {f"^{first}": 8.0}}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=metadata)
    adapter = read(tmp_path)
    assert (adapter.ranks[first], adapter.alphas[first]) == (2, 8.0)
    assert {adapter.alphas[m] for m in layers if m != first} == {ALPHA}
    args = adapter.attach_arguments()
    assert (args["rank"], args["alpha"]) == (RANK, ALPHA)
    assert list(args["rank_pattern"].values()) == [2] and list(args["alpha_pattern"].values()) == [8.0]


@pytest.mark.parametrize("prefix", ["unet.", "transformer.", "base_model.model.", ""])
def test_peft_names_without_alpha_take_alpha_equal_to_rank(trained, tmp_path, caplog, prefix):
    _, layers, _ = trained
    path = tmp_path / "peft.safetensors"
    save_file(rekey(layers, lambda name: prefix + name, "lora_A.weight", "lora_B.weight", alpha=None), path)
    with caplog.at_level(logging.WARNING):
        adapter = read(path)
    assert_same_lora(adapter, layers, alpha=float(RANK))  # peft / diffusers convention: scale 1
    assert "alpha = rank" in caplog.text


def test_old_diffusers_layouts(trained, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers

    _, layers, _ = trained
    peft_state = rekey(layers, lambda name: name, "lora_A.weight", "lora_B.weight", alpha=None)
    # LoRACompatibleLinear's unet.<module>.lora.down.weight
    compatible = {"unet." + k: v for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    processors = {}  # attention processors: attn1.processor.to_q_lora.down.weight, to_out.0 as to_out
    for name, (down, up) in layers.items():
        attn, proj = name.split(".to_")
        proj = "to_" + proj.removesuffix(".0")
        processors[f"{attn}.processor.{proj}_lora.down.weight"] = down
        processors[f"{attn}.processor.{proj}_lora.up.weight"] = up
    for i, state in enumerate((compatible, processors)):
        assert any(".lora.down.weight" in k or "_lora.down.weight" in k for k in state)
        save_file(state, tmp_path / f"old{i}.safetensors")
        assert_same_lora(read(tmp_path / f"old{i}.safetensors"), layers, alpha=float(RANK))


def test_comfyui_node_file_of_the_trained_adapter(trained, tmp_path):
    _, layers, _ = trained
    path = tmp_path / "ComfyUI_trained_lora_10_steps_00001_.safetensors"
    save_file(rekey(layers, lambda name: "diffusion_model." + TO_LDM[name]), path)
    adapter = read(path)
    assert_same_lora(adapter, layers)
    assert (adapter.steps, adapter.source_format) == (10, "comfyui")


def comfy_node_output(model, rank=2, seed=0):
    """What ComfyUI's Train LoRA node saves: a LoRA (2-D factors, alpha 1) on every Linear/Conv
    weight, a full offset ``diff`` on every 1-D weight and ``diff_b`` on every bias, under
    ``diffusion_model.<LDM module>``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = "diffusion_model." + TO_LDM[name]
        if weight.ndim >= 2:
            state[f"{key}.lora_up.weight"] = 0.1 * torch.randn(weight.shape[0], rank, generator=g)
            state[f"{key}.lora_down.weight"] = 0.1 * torch.randn(rank, weight[0].numel(), generator=g)
            state[f"{key}.alpha"] = torch.tensor(1.0)
        else:
            state[f"{key}.diff"] = 0.01 * torch.randn(weight.shape, generator=g)
        if getattr(module, "bias", None) is not None:
            state[f"{key}.diff_b"] = 0.01 * torch.randn(module.bias.shape, generator=g)
    return state


@pytest.mark.unit
def test_comfyui_node_output_on_every_layer_applies_as_comfyui_does(tmp_path):
    model = build_demo_model()
    state = comfy_node_output(model)
    path = tmp_path / "ComfyUI_trained_lora_300_steps_00002_.safetensors"
    save_file(state, path)
    adapter = read_existing_adapter(path, model, SD)
    weighted = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    assert set(adapter.modules) == {n for n in weighted if model.get_submodule(n).weight.ndim >= 2}
    assert {n for n, g in adapter.deltas.items() if "diff" in g} == weighted - set(adapter.modules)
    assert adapter.steps == 300
    assert set(adapter.ranks.values()) == {2} and set(adapter.alphas.values()) == {1.0}

    # reference: ComfyUI's merge, W + alpha / rank * (up @ down) in W's shape (convolutions included)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensors in adapter.modules.items():
            weight = merged.get_submodule(name).weight
            weight += 0.5 * (tensors["lora_up.weight"] @ tensors["lora_down.weight"]).reshape(weight.shape)
        expected = merged(*INPUTS, return_dict=False)[0]
    assert_attached_output(adapter, expected)


def assert_attached_output(adapter, expected):
    """The adapter attached with peft (as the training loop will) gives ``expected``."""
    model = build_demo_model()
    lora = get_algorithm("LoRA")
    attach_adapter(model, lora, seed=0, **adapter.attach_arguments())
    layers = adapter_layers(model)
    assert set(layers) == set(adapter.modules)
    for name, layer in layers.items():
        lora.import_layer(layer, adapter.modules[name])
    with torch.no_grad():
        got = model(*INPUTS, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_read_adapter_attaches_to_the_trained_function(trained):
    res, _, reference = trained
    assert_attached_output(read(res.lora_path), reference)


def test_simpletuner_checkpoint_folder(trained, tmp_path):
    res, layers, _ = trained
    folder = tmp_path / "checkpoint-30"
    diffusers_pipeline_file(res.model_with_lora, folder)  # SimpleTuner saves PEFT LoRAs through diffusers
    # SimpleTuner's save hook writes its StateTracker beside the weights
    (folder / "training_state.json").write_text(json.dumps(
        {"global_step": 30, "epoch_step": 6, "epoch": 2, "exhausted_backends": [], "repeats": {}}))
    adapter = read(folder)
    assert_same_lora(adapter, layers)
    assert (adapter.steps, adapter.source_format) == (30, "simpletuner")


def test_simpletuner_comfyui_export(trained, tmp_path):
    # SimpleTuner's ComfyUI export: diffusion_model.<diffusers module>.lora_A/lora_B + .alpha
    _, layers, _ = trained
    path = tmp_path / "comfy_export.safetensors"
    save_file(rekey(layers, lambda name: "diffusion_model." + name, "lora_A.weight", "lora_B.weight"), path)
    assert_same_lora(read(path), layers)


def test_ai_toolkit_file(trained, tmp_path):
    _, layers, _ = trained
    path = tmp_path / "my_lora_000000250.safetensors"
    save_file(rekey(layers, kohya), path, metadata={
        "name": "my_lora", "training_info": json.dumps({"step": 250, "epoch": 3}),
        "software": json.dumps({"name": "ai-toolkit", "url": "https://github.com/ostris/ai-toolkit"})})
    adapter = read(path)
    assert_same_lora(adapter, layers)
    assert (adapter.steps, adapter.source_format) == (250, "ai-toolkit")


def lycoris_tensors(algo, shape, g):
    """One module's LyCORIS tensors for a Linear weight of ``shape`` (out, in)."""
    out, inp = shape
    if algo == "loha":  # (w1_a @ w1_b) * (w2_a @ w2_b), rank 4
        return {"hada_w1_a": torch.randn(out, 4, generator=g), "hada_w1_b": torch.randn(4, inp, generator=g),
                "hada_w2_a": torch.randn(out, 4, generator=g), "hada_w2_b": torch.randn(4, inp, generator=g),
                "alpha": torch.tensor(2.0)}
    if algo == "lokr":  # kron(w1, w2_a @ w2_b), w2 of rank 2
        return {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(out // 4, 2, generator=g),
                "lokr_w2_b": torch.randn(2, inp // 4, generator=g), "alpha": torch.tensor(1.0)}
    return {"oft_blocks": torch.randn(out // 4, 4, 4, generator=g),  # blocks of 4 x 4
            "alpha": torch.tensor(1e-3)}


@pytest.mark.parametrize("algo, algorithm, rank, alpha", [("loha", "LoHa", 4, 2.0), ("lokr", "LoKr", 2, 1.0),
                                                          ("oft", "OFT", 4, 1e-3)])
@pytest.mark.parametrize("prefix", ["lora_unet_", "lycoris_"])
def test_lycoris_tensors(trained, tmp_path, algo, algorithm, rank, alpha, prefix):
    _, layers, _ = trained
    model = build_demo_model()
    g = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    for name in layers:
        tensors = lycoris_tensors(algo, tuple(model.get_submodule(name).weight.shape), g)
        expected[name] = tensors
        state.update({f"{prefix}{name.replace('.', '_')}.{k}": v for k, v in tensors.items()})
    path = tmp_path / f"{algo}.safetensors"
    save_file(state, path, metadata={"ss_network_module": "lycoris.kohya",
                                     "ss_network_args": json.dumps({"algo": algo})})
    adapter = read_existing_adapter(path, model, SD)
    assert adapter.algorithm == algorithm
    assert set(adapter.ranks.values()) == {rank}
    for name, a in adapter.alphas.items():  # stored as fp32; LyCORIS's OFT limit is alpha x out_features
        out = model.get_submodule(name).weight.shape[0] if algorithm == "OFT" else 1
        assert a == pytest.approx(alpha * out)
    for name, tensors in expected.items():
        assert set(adapter.modules[name]) == set(tensors)
        assert all(torch.equal(adapter.modules[name][k], v) for k, v in tensors.items() if k != "alpha")


# ------------------------------------------------------------------ bad files


@pytest.mark.unit
def test_missing_file(tmp_path):
    with pytest.raises(TrainerError, match="no such file"):
        read(tmp_path / "nope.safetensors")


class _Trap:
    """Unpickling this creates the sentinel file: proof that a reader ran pickle."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (str(self.sentinel), "w")


@pytest.mark.unit
@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "lora.pth", "lora.bin", "disguised.safetensors"])
def test_pickle_is_never_unpickled(tmp_path, name):
    sentinel = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Trap(sentinel)))
    with pytest.raises(TrainerError, match="pickle.*safetensors"):
        read(path)
    assert not sentinel.exists()


def test_truncated_file(trained, tmp_path):
    res, _, _ = trained
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(res.lora_path.read_bytes()[:-100])
    with pytest.raises(TrainerError, match="truncated or corrupt"):
        read(path)


def test_unmatched_keys_are_listed(trained, tmp_path):
    _, layers, _ = trained
    state = rekey(layers, kohya)
    bogus = [f"lora_unet_down_blocks_0_no_such_layer_{i}" for i in range(12)]
    for key in bogus:
        state[f"{key}.lora_down.weight"] = torch.zeros(4, 8)
        state[f"{key}.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(TrainerError, match=r"24 tensors .* name no module") as err:
        read(tmp_path / "extra.safetensors")
    message = str(err.value)
    assert "\n" not in message and "(24 in all)" in message
    assert sum(key in message for key in bogus) >= 5


def test_lora_for_another_model(trained, tmp_path):
    _, layers, _ = trained
    state = rekey(layers, kohya)
    # an SD 2.x LoRA: its cross-attention keys/values read 1024-dim text features
    for key in [k for k in state if "attn2_to_k.lora_down" in k or "attn2_to_v.lora_down" in k]:
        state[key] = torch.zeros(RANK, 1024)
    save_file(state, tmp_path / "sd2.safetensors")
    with pytest.raises(TrainerError, match="another model.*attn2.to_k: file makes \\(32, 1024\\), model has"):
        read(tmp_path / "sd2.safetensors")

    flux = {f"transformer.single_transformer_blocks.{i}.attn.to_q.lora_A.weight": torch.zeros(4, 8)
            for i in range(3)}
    save_file(flux, tmp_path / "flux.safetensors")
    with pytest.raises(TrainerError, match="no tensor that names a module.*another model"):
        read(tmp_path / "flux.safetensors")


@pytest.mark.unit
def test_text_encoder_only_and_unsupported_variants(tmp_path):
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
              tmp_path / "te.safetensors")
    with pytest.raises(TrainerError, match="denoiser"):
        read(tmp_path / "te.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4),
               f"{name}.dora_scale": torch.ones(1, 32)}, tmp_path / "dora.safetensors")
    with pytest.raises(TrainerError, match="DoRA"):
        read(tmp_path / "dora.safetensors")
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(TrainerError, match="incomplete"):
        read(tmp_path / "half.safetensors")


# ------------------------------------------------------------------ LDM <-> diffusers names


@pytest.mark.parametrize("config", [
    DEMO_UNET_CONFIG,
    dict(DEMO_UNET_CONFIG, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4,
         attention_head_dim=4,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    dict(DEMO_UNET_CONFIG, addition_embed_type="text_time", addition_time_embed_dim=8,
         projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True),
], ids=["demo", "three-blocks", "sdxl-like"])
@pytest.mark.unit
def test_ldm_names_agree_with_diffusers_single_file_converter(config):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    ldm = diffusers_to_ldm_state_dict(unet)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    state = unet.state_dict()
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


@pytest.mark.unit
def test_ldm_names_of_sd1():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from trainer.models.sd import CONFIGS

    config = json.loads((CONFIGS / "sd1" / "unet" / "config.json").read_text())
    names = ldm_to_diffusers_names(config)
    assert names["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert names["middle_block.2.emb_layers.1"] == "mid_block.resnets.1.time_emb_proj"
    # every tensor of the full-size UNet has an LDM name that diffusers maps back (shapes only: meta tensors)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    converted = convert_ldm_unet_checkpoint(diffusers_to_ldm_state_dict(unet), config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
