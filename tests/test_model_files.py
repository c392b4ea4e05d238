"""The files users have (issue 14): ComfyUI/BFL/SAI/A1111 single files in every storage dtype, the
shipped configs of the real variants, and bases stored as --weight_dtype."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_families import FAST, family_dataset, sd3_original_state_dict, tiny_pipeline

from trainer.api import train_lora
from trainer.errors import TrainerError
from trainer.models import load_model
from trainer.models.flux import image_ids, pack

PREFIX = "model.diffusion_model."
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def flux_model(guidance_embeds=True):
    """A tiny Flux whose rotary split is the one derived from its head size (16: 4, 6, 6), as a file
    does not store it."""
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds))


def sd3_model():
    """A tiny SD3 with the 64-wide heads of every SD3 release (the head size is not in a file without
    qk norms)."""
    from diffusers import SD3Transformer2DModel

    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=1,
        caption_projection_dim=64, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32))


def bfl_state_dict(model) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer's weights under Black Forest Labs' names (as ComfyUI keeps them in
    models/diffusion_models/), written from ComfyUI's flux_to_diffusers key map: fused qkv, single
    blocks' fused linear1 (q, k, v, mlp), (shift, scale) order of the final modulation."""
    sd = model.state_dict()
    out = {}

    def put(bfl, diffusers_names):
        for p in ("weight", "bias"):
            parts = [sd[f"{n}.{p}"] for n in diffusers_names if f"{n}.{p}" in sd]
            if parts:
                out[f"{bfl}.{p}"] = torch.cat(parts)

    for i in range(model.config.num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        put(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        put(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        for bfl, dif in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
            put(f"{b}.{bfl}", [f"{d}.{dif}"])
        for bfl, dif in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                         ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{b}.{bfl}.scale"] = sd[f"{d}.{dif}.weight"]
    for i in range(model.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        put(f"{b}.linear2", [f"{d}.proj_out"])
        put(f"{b}.modulation.lin", [f"{d}.norm.linear"])
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    for bfl, dif in (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                     ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        put(bfl, [dif])
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return out


def write(path, state, storage="fp32", prefixed=False, extra=None):
    """Save a single file as ComfyUI users have it: stored in ``storage``, under ``model.diffusion_model.``
    (an all-in-one file, with ``extra`` tensors of other components) or bare."""
    tensors = {(PREFIX if prefixed else "") + k: v.to(STORAGE[storage]).contiguous() for k, v in state.items()}
    save_file({**tensors, **(extra or {})}, str(path))
    return path


def stored_as(model, storage):
    """The model with every floating weight rounded through ``storage``: what a file of that dtype holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(STORAGE[storage]).float())
        for b in model.buffers():
            b.copy_(b.to(STORAGE[storage]).float())
    return model


def flux_output(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    vector = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=pack(x).to(model.dtype), timestep=torch.tensor([0.4]),
                     encoder_hidden_states=text.to(model.dtype), pooled_projections=vector.to(model.dtype),
                     img_ids=image_ids(4, 4), txt_ids=torch.zeros(8, 3), guidance=torch.ones(1)).sample


def sd3_output(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([300.0]),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                     pooled_projections=torch.randn(1, 64, generator=g)).sample


# ----------------------------------------------------------------------------- single files


@pytest.mark.parametrize(("storage", "prefixed"), [("fp32", False), ("bf16", True), ("fp16", False),
                                                   ("fp8_e4m3fn", True), ("fp8_e5m2", False)])
def test_flux_bfl_file_loads_without_a_config(tmp_path, storage, prefixed):
    """A ComfyUI diffusion_models/ Flux file in BFL names, any storage dtype, with or without the prefix:
    detected, its config read from the shapes over the shipped dev config, the same model."""
    path = write(tmp_path / "flux1-dev.safetensors", bfl_state_dict(flux_model()), storage, prefixed)
    loaded = load_model(str(path), dtype=torch.float32)
    assert loaded.family.name == "flux" and loaded.kind == "single_file"
    config = loaded.denoiser.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (1, 2, 2)
    assert config.guidance_embeds and loaded.scheduler_config["use_dynamic_shifting"]  # FLUX.1 dev's
    torch.testing.assert_close(flux_output(loaded.denoiser), flux_output(stored_as(flux_model(), storage)),
                               atol=1e-5, rtol=1e-5)


def test_flux_schnell_file_gets_the_schnell_schedule(tmp_path):
    path = write(tmp_path / "flux1-schnell.safetensors", bfl_state_dict(flux_model(guidance_embeds=False)), "bf16")
    loaded = load_model(str(path), dtype=torch.bfloat16)
    assert not loaded.denoiser.config.guidance_embeds
    assert loaded.scheduler_config["shift"] == 1.0 and not loaded.scheduler_config["use_dynamic_shifting"]
    assert {p.dtype for p in loaded.denoiser.parameters()} == {torch.bfloat16}  # materialised in bf16


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "bf16"])
def test_flux_file_trains_one_step(tmp_path, storage):
    path = write(tmp_path / "flux.safetensors", bfl_state_dict(flux_model()), storage, prefixed=True)
    res = train_lora(str(path), family_dataset("flux", size=8), output_dir=str(tmp_path / "out"),
                     **{**FAST, "steps": 1, "training_dtype": "bf16"})
    assert res.steps == 1 and math.isfinite(res.loss["loss"][0]) and res.lora_path.is_file()


@pytest.mark.parametrize(("storage", "prefixed"), [("bf16", False), ("fp8_e4m3fn", True), ("fp16", True)])
def test_sd3_file_loads_without_a_config(tmp_path, storage, prefixed):
    state = {k.removeprefix(PREFIX): v for k, v in sd3_original_state_dict(sd3_model()).items()}
    path = write(tmp_path / "sd3_medium.safetensors", state, storage, prefixed)
    loaded = load_model(str(path), dtype=torch.float32)
    assert loaded.family.name == "sd3" and loaded.denoiser.config.num_layers == 2
    assert loaded.denoiser.config.qk_norm is None and loaded.scheduler_config["shift"] == 3.0
    torch.testing.assert_close(sd3_output(loaded.denoiser), sd3_output(stored_as(sd3_model(), storage)),
                               atol=1e-5, rtol=1e-5)
    res = train_lora(str(path), family_dataset("sd3", size=8), output_dir=str(tmp_path / "out"),
                     **{**FAST, "steps": 1})
    assert res.steps == 1 and math.isfinite(res.loss["loss"][0])


@pytest.mark.parametrize(("storage", "prefixed"), [("fp16", True), ("fp8_e5m2", True), ("bf16", False)])
def test_sdxl_all_in_one_checkpoint_reads_only_the_unet(tmp_path, storage, prefixed):
    """An A1111/ComfyUI checkpoints/ file: the UNet under model.diffusion_model. next to the VAE and the
    text encoders, stored fp16 or fp8; only the UNet is read, in the training dtype. Bare: a UNet-only
    file as ComfyUI keeps it in diffusion_models/."""
    from ldm import diffusers_to_ldm_state_dict
    from test_families import tiny_sdxl

    unet_state = {k.removeprefix(PREFIX): v for k, v in diffusers_to_ldm_state_dict(tiny_sdxl()).items()}
    others = {"first_stage_model.decoder.conv_in.weight": torch.ones(4, 4, 3, 3),
              "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.ones(8, 4)}
    path = write(tmp_path / "sdxl.safetensors", unet_state, storage, prefixed, extra=others if prefixed else None)
    tiny_pipeline("sdxl").save_pretrained(tmp_path / "pipe")
    loaded = load_model(str(path), model_config=str(tmp_path / "pipe"), dtype=torch.bfloat16)
    assert loaded.family.name == "sdxl"
    assert {p.dtype for p in loaded.denoiser.parameters()} == {torch.bfloat16}
    res = train_lora(str(path), family_dataset("sdxl"), model_config=str(tmp_path / "pipe"),
                     output_dir=str(tmp_path / "out"), **{**FAST, "steps": 1})
    assert res.steps == 1 and math.isfinite(res.loss["loss"][0])


def test_unknown_single_file_layout_is_refused_in_one_line(tmp_path):
    path = write(tmp_path / "mystery.safetensors", {"blocks.0.attn.wq.weight": torch.ones(4, 4),
                                                    "blocks.1.attn.wq.weight": torch.ones(4, 4),
                                                    "head.weight": torch.ones(2, 4)})
    with pytest.raises(TrainerError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "\n" not in message and "mystery.safetensors" in message and "3 tensors: blocks.* x2" in message


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("variant", ["flux_dev", "flux_schnell"])
def test_shipped_flux_configs_match_full_size_files(variant):
    """At full size (meta tensors: no memory), a BFL file of each shipped variant is detected as that
    variant, its shape-derived config equals the shipped one, and the key map covers every weight."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from trainer.models import FAMILIES
    from trainer.models.flux.names import bfl_to_diffusers

    folder_config = json.loads((FAMILIES["flux"].single_file_config({})[0].parent / variant / "transformer"
                                / "config.json").read_text())
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(folder_config)
    header = {PREFIX + k: v for k, v in bfl_state_dict(model).items()}
    folder, _ = FAMILIES["flux"].single_file_config(header)
    assert folder.name == variant
    derived = FAMILIES["flux"].single_file_overrides(header)
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in derived.items()} == \
        {k: folder_config[k] if k != "out_channels" else 64 for k in derived}
    converted = bfl_to_diffusers({k.removeprefix(PREFIX): v for k, v in header.items()})
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_shipped_sd3_medium_config_matches_a_full_size_file():
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from trainer.models import FAMILIES

    sd3 = FAMILIES["sd3"]
    folder = sd3.single_file_config({"joint_blocks.0.context_block.adaLN_modulation.1.bias": None})[0]
    assert folder.name == "sd3_medium"
    config = json.loads((folder / "transformer" / "config.json").read_text())
    with init_empty_weights(include_buffers=True):
        model = SD3Transformer2DModel.from_config(config)
    derived = sd3.single_file_overrides(sd3_original_state_dict(model))
    assert {k: v for k, v in derived.items() if k in config} == {k: config[k] for k in derived if k in config}


# ----------------------------------------------------------------------------- --weight_dtype


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_pipe")
    tiny_pipeline("flux", denoiser=flux_model()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("algorithm", ["LoRA", "OFT"])
def test_weight_dtype_trains_and_writes_the_same_kind_of_file(flux_folder, tmp_path, weight_dtype, algorithm):
    if weight_dtype == "int8":
        pytest.importorskip("torchao", reason="the optional quant extra (torchao) is not installed")
    from trainer.models.precision import frozen_bytes

    common = dict(algorithm=algorithm, rank=4, alpha=4.0, learning_rate=0.01, steps=2, log_every=1,
                  gradient_checkpointing=True)
    base = train_lora(str(flux_folder), family_dataset("flux", size=8), output_dir=str(tmp_path / "bf16"), **common)
    low = train_lora(str(flux_folder), family_dataset("flux", size=8), output_dir=str(tmp_path / "low"),
                     weight_dtype=weight_dtype, **common)
    assert all(math.isfinite(v) for v in low.loss["loss"])
    assert frozen_bytes(low.model_with_lora) < 0.8 * frozen_bytes(base.model_with_lora)
    trainable = [p for p in low.model_with_lora.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # full-precision adapter
    with safe_open(str(base.lora_path), "pt") as a, safe_open(str(low.lora_path), "pt") as b:
        assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
        assert {a.get_slice(k).get_dtype() for k in a.keys()} == {b.get_slice(k).get_dtype() for k in b.keys()}
    # the file goes onto the bf16 model in diffusers, and moves it the way training moved the low-precision one
    if algorithm == "LoRA":
        pipe = tiny_pipeline("flux", denoiser=flux_model()).to(torch.bfloat16)
        before = flux_output(pipe.transformer).float()
        pipe.load_lora_weights(str(low.lora_path))
        assert (flux_output(pipe.transformer).float() - before).abs().max() > 0


def test_int8_without_torchao_names_the_package(monkeypatch):
    import sys

    from trainer.models.precision import quantization_config

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(TrainerError, match=r"needs torchao: pip install torchao"):
        quantization_config("int8")


def test_weight_dtype_fp8_on_an_object_and_int8_refused_there():
    res = train_lora(flux_model(), family_dataset("flux", size=8), weight_dtype="fp8_e4m3fn",
                     **{**FAST, "steps": 1, "training_dtype": "bf16"})
    assert math.isfinite(res.loss["loss"][0])
    with pytest.raises(TrainerError, match="pass --model as a path"):
        train_lora(flux_model(), family_dataset("flux", size=8), weight_dtype="int8", **FAST)


# ----------------------------------------------------------------------------- FSDP


def test_fsdp_ram_efficient_loading_reads_the_weights_on_local_rank_zero_only(flux_folder, tmp_path, monkeypatch):
    """Under accelerate's FSDP CPU-RAM-efficient loading (its launcher sets these variables), the other
    local ranks build the model on the meta device (FSDP broadcasts rank 0's weights when wrapping)."""
    single_file = write(tmp_path / "flux.safetensors", bfl_state_dict(flux_model()), "bf16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    for rank, device in (("0", "cpu"), ("1", "meta")):
        monkeypatch.setenv("LOCAL_RANK", rank)
        for source in (flux_folder, flux_folder / "transformer", single_file):
            model = load_model(str(source), dtype=torch.bfloat16).denoiser
            assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device, torch.bfloat16)}, source
            assert model.config.num_single_layers == 2


@pytest.mark.parametrize("algorithm", ["LoRA", "LoKr"])
def test_fp8_unet_trains_with_gradient_checkpointing(algorithm):
    """A UNet (convolutions and Linear layers) stored in fp8 trains with checkpointing's recompute."""
    from test_families import tiny_sdxl

    res = train_lora(tiny_sdxl(), family_dataset("sdxl"), weight_dtype="fp8_e4m3fn", algorithm=algorithm,
                     **{**FAST, "steps": 2, "training_dtype": "bf16", "gradient_checkpointing": True})
    assert all(math.isfinite(v) for v in res.loss["loss"])
    dtypes = {m.weight.dtype for m in res.model_with_lora.modules() if isinstance(m, torch.nn.Linear)}
    assert torch.float8_e4m3fn in dtypes


def test_int8_unet_trains(tmp_path):
    """A UNet quantized to int8 (its convolutions stay bf16) trains under bf16 autocast."""
    pytest.importorskip("torchao", reason="the optional quant extra (torchao) is not installed")
    from test_families import tiny_sdxl

    tiny_pipeline("sdxl", denoiser=tiny_sdxl()).save_pretrained(tmp_path / "pipe")
    res = train_lora(str(tmp_path / "pipe"), family_dataset("sdxl"), weight_dtype="int8", output_dir=str(tmp_path),
                     **{**FAST, "steps": 2, "training_dtype": "bf16", "gradient_checkpointing": True})
    assert all(math.isfinite(v) for v in res.loss["loss"])


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])
def test_fp8_file_under_fp8_weight_dtype_is_held_once_in_fp8(tmp_path, family):
    """An fp8 single file with --weight_dtype fp8 is assigned in fp8 (never upcast as a whole): the same
    model as reading it in bf16 and casting afterwards, through diffusers' converter where it applies."""
    from ldm import diffusers_to_ldm_state_dict
    from test_families import tiny_sdxl

    from trainer.models.precision import apply_weight_dtype

    if family == "flux":
        state, output, config = bfl_state_dict(flux_model()), flux_output, None
    elif family == "sd3":
        state, output, config = sd3_original_state_dict(sd3_model()), sd3_output, None
    else:
        state, output, config = diffusers_to_ldm_state_dict(tiny_sdxl()), None, tmp_path / "pipe"
        tiny_pipeline("sdxl").save_pretrained(config)
    path = write(tmp_path / "model.safetensors", {k.removeprefix(PREFIX): v for k, v in state.items()},
                 "fp8_e4m3fn", prefixed=family != "flux")
    kwargs = dict(model_config=str(config) if config else None, dtype=torch.bfloat16)
    direct = load_model(str(path), weight_dtype="fp8_e4m3fn", **kwargs).denoiser
    via_bf16 = load_model(str(path), **kwargs).denoiser
    apply_weight_dtype(via_bf16, "fp8_e4m3fn", torch.bfloat16)
    a, b = direct.state_dict(), via_bf16.state_dict()
    assert a.keys() == b.keys() and any(t.dtype == torch.float8_e4m3fn for t in a.values())
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=0)
    if output is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(output(direct), output(via_bf16))


@pytest.mark.parametrize(("keys", "variant"), [
    ((), "sd3_medium"),
    (("joint_blocks.0.x_block.attn.ln_q.weight",), "sd35_large"),
    (("joint_blocks.0.x_block.attn.ln_q.weight", "joint_blocks.0.x_block.attn2.qkv.weight"), "sd35_medium"),
])
def test_sd3_variant_is_told_from_its_keys(keys, variant):
    from trainer.models.base import FAMILIES

    header = {PREFIX + k: torch.empty(1, device="meta")
              for k in ("joint_blocks.0.context_block.adaLN_modulation.1.bias", *keys)}
    folder, scheduler = FAMILIES["sd3"].single_file_config(header)
    assert folder.name == variant and scheduler["shift"] == 3.0
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert bool(config.get("qk_norm")) == bool(keys) and bool(config.get("dual_attention_layers")) == (len(keys) == 2)
