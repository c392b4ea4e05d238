"""HunyuanVideo: detection, training on 5-D latents with a text mask and pooled embeddings, the diffusers
round trip, ComfyUI's layout (``--file_layout comfyui``: fused qkv/linear1, the final layer's swapped rows),
continuing our own files and diffusion-pipe/musubi spellings of ComfyUI's names, the scheduler's shift and the
guidance input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, block_calls_in_one_step

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.objectives import ObjectiveOptions

CHANNELS, FRAMES, SIZE, TOKENS, TEXT_DIM, POOLED = 4, 2, 8, 8, 16, 8


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_hunyuan(**overrides):
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8,
                  num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                  text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED, rope_axes_dim=(2, 2, 4))
    return _seeded(lambda: HunyuanVideoTransformer3DModel(**{**config, **overrides}))


def tiny_pipeline(transformer=None, shift=7.0):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = _seeded(lambda: AutoencoderKLHunyuanVideo(
        latent_channels=CHANNELS, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 2, up_block_types=("HunyuanVideoUpBlock3D",) * 2))
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer or tiny_hunyuan(),
                                vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=None,
                                tokenizer_2=None)


def hunyuan_dataset(rows=8, seed=0):
    from datasets import Array2D, Array4D, Dataset, Features, Sequence, Value

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, TOKENS)
    for i in range(rows):
        mask[i, :3 + i % (TOKENS - 3)] = 1  # prompts of different lengths, tokens first
    columns = {"latents": torch.randn(rows, CHANNELS, FRAMES, SIZE, SIZE, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, TEXT_DIM, generator=g) * mask[..., None],
               "prompt_attention_mask": mask, "pooled_prompt_embeds": torch.randn(rows, POOLED, generator=g)}
    features = Features({"latents": Array4D((CHANNELS, FRAMES, SIZE, SIZE), "float32"),
                         "prompt_embeds": Array2D((TOKENS, TEXT_DIM), "float32"),
                         "prompt_attention_mask": Sequence(Value("float32"), length=TOKENS),
                         "pooled_prompt_embeds": Sequence(Value("float32"), length=POOLED)})
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=features)


def denoiser_output(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, FRAMES, SIZE, SIZE, generator=g)
    text, pooled = torch.randn(2, TOKENS, TEXT_DIM, generator=g), torch.randn(2, POOLED, generator=g)
    mask = torch.tensor([[1] * TOKENS, [1] * 5 + [0] * (TOKENS - 5)])
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([10.0, 700.0]), encoder_hidden_states=text,
                     encoder_attention_mask=mask, pooled_projections=pooled,
                     guidance=torch.tensor([1000.0, 1000.0])).sample


def probe_loss(model, dataset):
    rows = dataset.with_format("torch")[:1]
    g = torch.Generator().manual_seed(5)
    total = 0.0
    with torch.no_grad():
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(rows["latents"].shape, generator=g)
            noisy = (1 - sigma) * rows["latents"] + sigma * noise
            pred = model(hidden_states=noisy, timestep=torch.tensor([sigma * 1000]),
                         encoder_hidden_states=rows["prompt_embeds"],
                         encoder_attention_mask=rows["prompt_attention_mask"].long(),
                         pooled_projections=rows["pooled_prompt_embeds"], guidance=torch.tensor([1000.0])).sample
            total += torch.nn.functional.mse_loss(pred, noise - rows["latents"]).item()
    return total


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hunyuan")
    return train_lora(tiny_hunyuan(), hunyuan_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      batch_size=2, **{**FAST, "steps": 3})


def test_training_lowers_the_loss():
    data = hunyuan_dataset(rows=1)
    res = train_lora(tiny_hunyuan(), data, rank=8, alpha=8.0, learning_rate=0.01, **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = probe_loss(tiny_hunyuan(), data), probe_loss(res.model_with_lora, data)
    assert after < 0.95 * before, (before, after)


def test_gradient_checkpointing_is_on_by_default_and_recomputes_every_block():
    """Issue 18: checkpointing is the default; the double-stream and single-stream blocks' forwards run
    again in backward in the trainer's loop (diffusers' own checkpointing engaged)."""
    assert TrainConfig().gradient_checkpointing is True

    def blocks(model):
        return [model.transformer_blocks[0], model.single_transformer_blocks[0]]

    model = tiny_hunyuan()
    assert block_calls_in_one_step(model, blocks(model), hunyuan_dataset(rows=1)) == [2, 2]
    assert model.is_gradient_checkpointing
    model = tiny_hunyuan()
    assert block_calls_in_one_step(model, blocks(model), hunyuan_dataset(rows=1),
                                   gradient_checkpointing=False) == [1, 1]


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    from safetensors.torch import load_file

    tensors = load_file(str(trained.lora_path))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_hunyuan())).abs().max() > 1e-3
    torch.testing.assert_close(denoiser_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


def test_existing_lora_reads_our_file_back_and_continues(trained, tmp_path):
    model = tiny_hunyuan()
    existing = read_existing_adapter(trained.lora_path, model, get_family("hunyuan_video"))
    assert existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora), atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_hunyuan(), hunyuan_dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path),
                     batch_size=2, **FAST)
    assert res.steps == 5


def test_node_targets_offsets_keep_adapter_names_and_diffusers_loads_the_adapter(tmp_path):
    """Offsets (--target_modules node) stay under lora_transformer_ names in the default layout, fused layers'
    too: diffusers' loader skips them and loads the adapter, and --existing_lora reads them back."""
    from safetensors.torch import load_file

    res = train_lora(tiny_hunyuan(), hunyuan_dataset(), target_modules="node", output_dir=str(tmp_path), batch_size=2,
                     **FAST)
    tensors = load_file(str(res.lora_path))
    offsets = [k for k in tensors if k.endswith((".diff", ".diff_b"))]
    assert "lora_transformer_transformer_blocks_0_attn_to_q.diff_b" in offsets
    assert all(k.startswith("lora_transformer_") for k in offsets)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(res.lora_path))
    assert (denoiser_output(pipe.transformer) - denoiser_output(tiny_hunyuan())).abs().max() > 1e-4
    existing = read_existing_adapter(res.lora_path, tiny_hunyuan(), get_family("hunyuan_video"))
    torch.testing.assert_close(existing.deltas["transformer_blocks.0.attn.to_q"]["diff_b"],
                               tensors["lora_transformer_transformer_blocks_0_attn_to_q.diff_b"])


@pytest.fixture(scope="module")
def trained_comfyui(tmp_path_factory):
    out = tmp_path_factory.mktemp("hunyuan_comfyui")
    return train_lora(tiny_hunyuan(), hunyuan_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      batch_size=2, target_modules="all", file_layout="comfyui", **{**FAST, "steps": 3})


def comfyui_weights(model):
    """The model's weights and biases under ComfyUI's HunyuanVideo names, by the family's comfyui_names: fused
    layers' parts stacked in row order, swapped layers' halves exchanged."""
    names = get_family("hunyuan_video").comfyui_names(model)
    modules, state, parts = dict(model.named_modules()), {}, {}
    for module, part in names.items():
        for name, param in modules[module].named_parameters(recurse=False):
            t = param.detach().float()
            t = torch.cat(t.chunk(2)[::-1]) if part.swap else t
            key = f"{part.module}.{part.param if name == 'weight' else name}"
            if part.start is None:
                state[key] = t
            else:
                parts.setdefault(key, []).append((part.start, t))
    state.update({k: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) for k, v in parts.items()})
    return state


def test_comfyui_rule_gives_the_same_deltas(trained_comfyui):
    """ComfyUI's rule for ``diffusion_model.<ComfyUI module>.lora_up/lora_down.weight`` + ``.alpha``:
    delta = up @ down * alpha / rank on its (fused) weight; compared with our merged weights under ComfyUI's
    names. Every layer has a ComfyUI name, and its parameters' sizes match ComfyUI's fused layers."""
    import copy

    from safetensors.torch import load_file

    base = tiny_hunyuan()
    names = get_family("hunyuan_video").comfyui_names(base)
    assert set(names) == {n for n, m in base.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    before = comfyui_weights(base)
    hidden = base.config.num_attention_heads * base.config.attention_head_dim
    # what ComfyUI's own forward confirmed on these names (outside the tests): the row order of the fused layers,
    # and only the final layer's AdaLN rows swapped
    assert [names[f"single_transformer_blocks.0.{p}"].start for p in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                        "proj_mlp")] == [0, hidden, 2 * hidden, 3 * hidden]
    assert [m for m, part in names.items() if part.swap] == ["norm_out.linear"]
    assert before["double_blocks.0.img_attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert before["single_blocks.0.linear1.weight"].shape == (3 * hidden + 4 * hidden, hidden)
    assert before["txt_in.individual_token_refiner.blocks.0.self_attn.qkv.bias"].shape == (3 * hidden,)
    merged = copy.deepcopy(trained_comfyui.model_with_lora)
    merged.fuse_lora()
    merged.unload_lora()
    after = comfyui_weights(merged)
    tensors = load_file(str(trained_comfyui.lora_path))
    modules = {k.removeprefix("diffusion_model.").removesuffix(".lora_up.weight") for k in tensors
               if k.endswith(".lora_up.weight")}
    assert "double_blocks.0.img_attn.qkv" in modules and "final_layer.adaLN_modulation.1" in modules
    assert len(modules) == len({p.module for p in names.values() if p.param == "weight"}) - 2  # all but 2 norms
    for module in modules:
        key = f"diffusion_model.{module}"
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = (up @ down.flatten(1)) * tensors[f"{key}.alpha"].item() / down.shape[0]
        want = after[f"{module}.weight"] - before[f"{module}.weight"]
        torch.testing.assert_close(delta.reshape(want.shape), want, atol=1e-6, rtol=1e-5)
    changed = [k for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in modules)


def other_tools_spelling(tensors, tool):
    """Our comfyui file as diffusion-pipe (``transformer.`` + ComfyUI's key-map rewrites, peft's lora_A/B, no alpha:
    scale 1) or musubi-tuner (``lora_unet_<ComfyUI module with _>``, alpha kept) would write it."""
    out = {}
    for key, tensor in tensors.items():
        module, _, name = key.removeprefix("diffusion_model.").rpartition(".lora_")
        module, name = (module, "lora_" + name) if module else key.removeprefix("diffusion_model.").rsplit(".", 1)
        if tool == "musubi":
            out[f"lora_unet_{module.replace('.', '_')}.{name}"] = tensor
        elif name != "alpha":  # ComfyUI's own rewrites of its HunyuanVideo key map (comfy/lora.py)
            spelled = f"{module}.".replace("_mod.lin.", "_mod.linear.").replace("_attn.qkv.", "_attn_qkv.")
            spelled = spelled.replace("_attn.proj.", "_attn_proj.").replace("mlp.0.", "mlp.fc1.")
            spelled = spelled.replace("mlp.2.", "mlp.fc2.").replace(".modulation.lin.", ".modulation.linear.")
            rank = tensors[f"diffusion_model.{module}.lora_down.weight"].shape[0]
            alpha = tensors[f"diffusion_model.{module}.alpha"].item()
            if name == "lora_up.weight":
                out[f"transformer.{spelled}lora_B.weight"] = tensor * alpha / rank
            else:
                out[f"transformer.{spelled}lora_A.weight"] = tensor
    return out


def test_existing_lora_reads_comfyui_diffusion_pipe_and_musubi_files(trained_comfyui, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(trained_comfyui.lora_path))
    expected = denoiser_output(trained_comfyui.model_with_lora)
    assert (expected - denoiser_output(tiny_hunyuan())).abs().max() > 1e-3
    files = {"comfyui": trained_comfyui.lora_path}
    for tool in ("diffusion-pipe", "musubi"):
        files[tool] = tmp_path / f"{tool}.safetensors"
        save_file({k: v.contiguous() for k, v in other_tools_spelling(tensors, tool).items()}, str(files[tool]),
                  {"ss_steps": "3"})
    assert "transformer.double_blocks.0.img_attn_qkv.lora_A.weight" in load_file(str(files["diffusion-pipe"]))
    assert "transformer.single_blocks.0.modulation.linear.lora_B.weight" in load_file(str(files["diffusion-pipe"]))
    assert "lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv.alpha" in load_file(str(files["musubi"]))
    for tool, path in files.items():
        model = tiny_hunyuan()
        existing = read_existing_adapter(path, model, get_family("hunyuan_video"))
        assert existing.steps == 3 and existing.algorithm == "LoRA", tool
        assert "transformer_blocks.0.attn.to_q" in existing.modules and "norm_out.linear" in existing.modules, tool
        algorithm = get_algorithm("LoRA")
        attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
        layers = adapter_layers(model)
        for name, module_tensors in existing.modules.items():
            algorithm.import_layer(layers[name], module_tensors)
        torch.testing.assert_close(denoiser_output(model), expected, atol=1e-5, rtol=1e-5, msg=tool)
    res = train_lora(tiny_hunyuan(), hunyuan_dataset(), existing_lora=str(trained_comfyui.lora_path),
                     output_dir=str(tmp_path / "continued"), file_layout="comfyui", batch_size=2, **FAST)
    assert res.steps == 5


def test_detection_shift_and_guidance(tmp_path):
    tiny_pipeline(shift=5.0).save_pretrained(tmp_path)
    for path, kind in ((tmp_path, "pipeline"), (tmp_path / "transformer", "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == "hunyuan_video" and loaded.kind == kind
        objective = loaded.family.make_objective(loaded, ObjectiveOptions(guidance=6.0))
        assert objective.shift.shift == 5.0 and objective.model_inputs == {"guidance": 6000.0}


def test_mask_length_must_match_the_tokens():
    data = hunyuan_dataset().remove_columns("prompt_attention_mask")
    data = data.add_column("prompt_attention_mask", [[1.0] * 4] * len(data))
    with pytest.raises(TrainerError, match="prompt_attention_mask has 4 tokens but prompt_embeds has 8"):
        train_lora(tiny_hunyuan(), data, **FAST)


def test_loha_and_lokr_leave_the_conv3d_patch_embedding_out(tmp_path, caplog):
    """peft's LoHa and LoKr layers have no Conv3d: ``all`` leaves the patch embedding out (saying so), a list
    naming it is one line."""
    import logging

    with caplog.at_level(logging.INFO, logger="trainer"):
        res = train_lora(tiny_hunyuan(), hunyuan_dataset(), algorithm="LoHa", output_dir=str(tmp_path / "loha"),
                         batch_size=2, **FAST)
    layers = adapter_layers(res.model_with_lora)
    assert "x_embedder.proj" not in layers and "proj_out" in layers
    assert "LoHa cannot adapt x_embedder.proj, left out" in caplog.text
    with pytest.raises(TrainerError, match=r"--target_modules: LoKr cannot adapt Conv3d layers like x_embedder.proj"):
        train_lora(tiny_hunyuan(), hunyuan_dataset(), algorithm="LoKr", target_modules="x_embedder.proj,to_q",
                   output_dir=str(tmp_path / "lokr"), batch_size=2, **FAST)
    res = train_lora(tiny_hunyuan(), hunyuan_dataset(), algorithm="LoRA", target_modules="x_embedder.proj",
                     output_dir=str(tmp_path / "lora"), batch_size=2, **FAST)
    assert list(adapter_layers(res.model_with_lora)) == ["x_embedder.proj"]


def test_a_default_layout_run_says_comfyui_needs_the_comfyui_layout(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trainer"):
        train_lora(tiny_hunyuan(), hunyuan_dataset(), output_dir=str(tmp_path / "auto"), batch_size=2,
                   target_modules="attention", **{**FAST, "steps": 1})
    assert "ComfyUI's LoRA loader does not read for this model; --file_layout comfyui" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_lora(tiny_hunyuan(), hunyuan_dataset(), output_dir=str(tmp_path / "comfyui"), batch_size=2,
                   target_modules="attention", file_layout="comfyui", **{**FAST, "steps": 1})
    assert "ComfyUI's LoRA loader does not read" not in caplog.text
