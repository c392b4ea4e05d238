"""Lumina-Image 2.0 (``lumina2``): a tiny ``Lumina2Transformer2DModel`` built from a config.

The family's forward is checked against what ``Lumina2Pipeline`` samples with (its reversed clock and
negated output); training lowers the loss; the saved file, loaded by ``Lumina2Pipeline.load_lora_weights``,
gives the same transformer output as ``model_with_lora``; ``--file_layout comfyui`` writes ComfyUI's
fused names with the same update; ``--existing_lora`` continues the file; the family is detected from
pipeline and bare folders; ``lora-prepare`` fills the columns with a tiny Gemma-2 and VAE.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST

from trainer import train_lora
from trainer.adapters import adapter_layers
from trainer.errors import TrainerError
from trainer.models import get_family, load_model

SIZE, TOKENS, CAPTION = 16, 8, 32  # latent side, caption tokens, caption features (Gemma's width)


def tiny_lumina2(axes=(4, 6, 6), multiple_of=16):
    from diffusers import Lumina2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Lumina2Transformer2DModel(
            sample_size=SIZE, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
            num_attention_heads=4, num_kv_heads=2, multiple_of=multiple_of, axes_dim_rope=axes,
            cap_feat_dim=CAPTION)


def masks(rows):
    """Right-padded caption masks of varying lengths (3..TOKENS real tokens), as encode_prompt makes them."""
    lengths = [3 + (i * 3) % (TOKENS - 2) for i in range(rows)]
    return torch.tensor([[1.0] * n + [0.0] * (TOKENS - n) for n in lengths])


def lumina_dataset(rows=8, seed=0):
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, 4, SIZE, SIZE, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, CAPTION, generator=g),
               "prompt_attention_mask": masks(rows)}
    features = {"latents": Array3D((4, SIZE, SIZE), "float32"), "prompt_embeds": Array2D((TOKENS, CAPTION), "float32"),
                "prompt_attention_mask": Sequence(Value("float32"), length=TOKENS)}
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def tiny_pipeline(transformer=None, shift=6.0):
    """Lumina2Pipeline around a tiny transformer (a tiny VAE, no text encoder: embeddings are given)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return Lumina2Pipeline(transformer=transformer or tiny_lumina2(), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=shift), vae=vae, text_encoder=None, tokenizer=None)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, SIZE, SIZE, generator=g), torch.randn(2, TOKENS, CAPTION, generator=g),
            masks(3)[1:])  # two rows: 6 and 3 real tokens


def transformer_output(model, seed=1):
    """The raw transformer output on fixed inputs (what a LoRA must change identically everywhere)."""
    x, text, mask = inputs(seed)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([0.2, 0.9]), encoder_hidden_states=text,
                     encoder_attention_mask=mask.bool()).sample


def probe_loss(model, rows=1):
    """Flow-matching loss at fixed noise levels, written from the pipeline's convention: the transformer
    sees ``1 - sigma`` and predicts ``x0 - eps``."""
    data = lumina_dataset(rows).with_format("torch")[:]
    x0, text, mask = data["latents"], data["prompt_embeds"], data["prompt_attention_mask"].bool()
    g = torch.Generator().manual_seed(5)
    total = 0.0
    for sigma in (0.3, 0.6, 0.9):
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - sigma) * x0 + sigma * eps
        with torch.no_grad():
            out = model(hidden_states=xt, timestep=torch.full((rows,), 1 - sigma), encoder_hidden_states=text,
                        encoder_attention_mask=mask).sample
        total += F.mse_loss(out, x0 - eps).item()
    return total


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained adapter (rank 4, alpha 3: scale 0.75), its file and its in-memory model."""
    out = tmp_path_factory.mktemp("lumina2")
    return train_lora(tiny_lumina2(), lumina_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      **{**FAST, "steps": 3})


# ----------------------------------------------------------------------------- objective and forward


def test_forward_is_what_the_pipeline_samples_with():
    """One Euler step of Lumina2Pipeline from pure noise (sigma 1 -> 0) moves the latents by the velocity the
    family's forward returns at timestep 1000: same clock reversal, same sign, same mask handling."""
    family = get_family("lumina2")
    model = tiny_lumina2()
    x, text, mask = inputs()
    pipe = tiny_pipeline(model)
    with torch.no_grad():
        out = pipe(prompt_embeds=text, prompt_attention_mask=mask.long(), latents=x.clone(), num_inference_steps=1,
                   guidance_scale=1.0, height=SIZE * 8, width=SIZE * 8, output_type="latent").images
        ours = family.forward(model, x, torch.full((2,), 1000.0), {"prompt_embeds": text,
                                                                   "prompt_attention_mask": mask})
    torch.testing.assert_close(ours, x - out, atol=1e-5, rtol=1e-5)


def test_padding_beyond_the_longest_caption_is_cut_without_changing_the_output():
    family = get_family("lumina2")
    model = tiny_lumina2()
    x, text, mask = inputs()
    padded = {"prompt_embeds": torch.cat([text, torch.randn(2, 5, CAPTION)], 1),
              "prompt_attention_mask": torch.cat([mask, torch.zeros(2, 5)], 1)}
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        full = -model(hidden_states=x, timestep=1 - t / 1000, encoder_hidden_states=padded["prompt_embeds"],
                      encoder_attention_mask=padded["prompt_attention_mask"].bool()).sample
        cut = family.forward(model, x, t, padded)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_objective_uses_the_scheduler_shift():
    family = get_family("lumina2")
    loaded = load_model(tiny_lumina2())
    from trainer.objectives import ObjectiveOptions

    objective = family.make_objective(loaded, ObjectiveOptions(timestep_sampling="uniform"))
    u = torch.tensor([0.25, 0.5])
    s = u.clamp(1e-3, 1)
    expected = 6.0 * s / (1 + 5.0 * s)  # Lumina-Image 2.0's shift 6 without a scheduler config
    torch.testing.assert_close(objective.timesteps(u, torch.zeros(2, 4, SIZE, SIZE)), expected * 1000)


def test_conditioning_that_cannot_feed_the_model_is_refused():
    family = get_family("lumina2")
    model = tiny_lumina2()
    good = {"latents": (4, SIZE, SIZE), "prompt_embeds": (TOKENS, CAPTION), "prompt_attention_mask": (TOKENS,)}
    family.check_conditioning(model, good)
    for bad, words in (({"prompt_embeds": (TOKENS, 48)}, "cap_feat_dim"),
                       ({"prompt_attention_mask": (TOKENS + 1,)}, "do not belong together"),
                       ({"latents": (4, 15, SIZE)}, "patch size")):
        with pytest.raises(TrainerError, match=words):
            family.check_conditioning(model, {**good, **bad})


# ----------------------------------------------------------------------------- training and files


def test_training_learns():
    res = train_lora(tiny_lumina2(), lumina_dataset(rows=1), rank=8, alpha=8.0, learning_rate=0.01,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = probe_loss(tiny_lumina2()), probe_loss(res.model_with_lora)
    assert after < 0.95 * before, (before, after)


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    from safetensors import safe_open

    with safe_open(str(trained.lora_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "lumina2" and meta["trainer_family"] == "lumina2"
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # alpha / rank folded into lora_B
    assert meta["ss_network_alpha"] == "4.0"
    assert {k.split(".lora_")[0].removeprefix("transformer.") for k in keys} == set(adapter_layers(
        trained.model_with_lora))
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = transformer_output(trained.model_with_lora)
    assert (expected - transformer_output(tiny_lumina2())).abs().max() > 1e-3
    got = transformer_output(pipe.transformer)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_existing_lora_continues_the_file(trained, tmp_path):
    res = train_lora(tiny_lumina2(), lumina_dataset(), existing_lora=str(trained.lora_path),
                     output_dir=str(tmp_path), **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


def test_comfyui_layout_fuses_qkv_with_the_same_update(tmp_path):
    """--file_layout comfyui: ComfyUI's NextDiT names (q, k, v fused into attention.qkv), and the file's update,
    by ComfyUI's rule (up @ down x alpha / rank), equals the trained adapters' stacked q, k, v updates."""
    from safetensors.torch import load_file

    res = train_lora(tiny_lumina2(), lumina_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(tmp_path),
                     file_layout="comfyui", **FAST)
    lora = load_file(str(res.lora_path))
    layers = adapter_layers(res.model_with_lora)
    written = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    names = get_family("lumina2").comfyui_names(res.model_with_lora)
    assert written == {"diffusion_model." + names[m].module for m in layers}  # every linear layer, in ComfyUI's names
    assert {"diffusion_model.layers.1.attention.qkv", "diffusion_model.context_refiner.0.feed_forward.w3",
            "diffusion_model.t_embedder.mlp.0", "diffusion_model.final_layer.linear"} <= written
    assert not any(".to_q" in k or ".attn." in k for k in lora)
    for stack, i in (("layers", 1), ("context_refiner", 0)):
        key = f"diffusion_model.{stack}.{i}.attention.qkv"
        down, up, alpha = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"], lora[f"{key}.alpha"]
        delta = alpha.item() / down.shape[0] * up @ down
        expected = torch.cat([layers[f"{stack}.{i}.attn.{p}"].get_delta_weight("default")
                              for p in ("to_q", "to_k", "to_v")])
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    # and the trainer reads the fused file back (split into q, k, v): the same model
    from trainer.adapters import attach_adapter, get_algorithm
    from trainer.adapters.formats import read_existing_adapter

    model = tiny_lumina2()
    existing = read_existing_adapter(res.lora_path, model, get_family("lumina2"))
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    for name, tensors in existing.modules.items():
        algorithm.import_layer(adapter_layers(model)[name], tensors)
    torch.testing.assert_close(transformer_output(model), transformer_output(res.model_with_lora), atol=1e-5,
                               rtol=1e-5)


# ----------------------------------------------------------------------------- detection and lora-prepare


def test_detected_from_pipeline_and_bare_folders(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    loaded = load_model(str(tmp_path / "pipe"))
    assert loaded.family.name == "lumina2" and loaded.kind == "pipeline"
    assert loaded.scheduler_config["shift"] == 6.0
    tiny_lumina2().save_pretrained(tmp_path / "bare")
    assert load_model(str(tmp_path / "bare")).family.name == "lumina2"


def original_state_dict(model):
    """The model's weights under the original (ComfyUI's) names: q, k, v stacked into attention.qkv."""
    names = get_family("lumina2").comfyui_names(model)
    out, fused = {}, {}
    for module, part in names.items():
        for param, tensor in model.get_submodule(module).named_parameters(recurse=False):
            key = f"{part.module}.{param}"
            if part.start is None:
                out[key] = tensor.detach().clone()
            else:
                fused.setdefault(key, []).append((part.start, tensor.detach()))
    out.update({key: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for key, parts in fused.items()})
    out["norm_final.weight"] = torch.ones(model.config.hidden_size)  # stored by the original model, never used
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_checkpoint_is_detected_and_loads(tmp_path, prefix):
    """A file in the original names (ComfyUI's diffusion_models/ or an all-in-one checkpoint) at widths other
    than Lumina-Image 2.0's: the config comes from the shapes, q/k/v are split by them."""
    from safetensors.torch import save_file

    # the rotary split, which the file cannot state, in thirds as Lumina-Image 2.0's; a feed-forward width (288)
    # that Lumina-Image 2.0's rule (4 x hidden, a multiple of 256) does not give
    model = tiny_lumina2(axes=(8, 4, 4), multiple_of=96)
    assert model.layers[0].feed_forward.linear_1.out_features == 288
    state = {prefix + k: v.contiguous() for k, v in original_state_dict(model).items()}
    assert "layers.1.attention.qkv.weight" in original_state_dict(model)
    save_file(state, str(tmp_path / "lumina.safetensors"))
    loaded = load_model(str(tmp_path / "lumina.safetensors"))
    assert loaded.family.name == "lumina2" and loaded.kind == "single_file"
    assert loaded.scheduler_config["shift"] == 6.0
    assert loaded.denoiser.config.num_kv_heads == 2 and loaded.denoiser.config.num_layers == 2
    torch.testing.assert_close(transformer_output(loaded.denoiser), transformer_output(model), atol=1e-5, rtol=1e-5)


def gemma_tokenizer(folder):
    """A Gemma tokenizer over single letters (no merges), written here: nothing is downloaded."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz<>.,"))}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    return GemmaTokenizer.from_pretrained(folder)


def write_lumina_pipeline(path):
    import diffusers as d
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer(path / "tokenizer-files")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = d.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                              scaling_factor=0.5, shift_factor=0.1)
        gemma = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=CAPTION, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16, pad_token_id=0))
        pipe = d.Lumina2Pipeline(transformer=tiny_lumina2(), scheduler=d.FlowMatchEulerDiscreteScheduler(shift=6.0),
                                 vae=vae, text_encoder=gemma, tokenizer=tokenizer)
    pipe.save_pretrained(path)
    return path


def test_lora_prepare_encodes_with_gemma_and_trains(tmp_path):
    import numpy as np
    from PIL import Image

    from trainer.prepare import PrepareConfig, prepare

    pipeline = write_lumina_pipeline(tmp_path / "model")
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "a.txt").write_text("a red square")
    result = prepare(PrepareConfig(images=str(root), model=str(pipeline), output=str(tmp_path / "dataset"),
                                   resolution=32, bucket_step=8, batch_size=2))
    assert result.shapes == {(4, 16, 16): 1}
    import datasets

    row = datasets.load_from_disk(str(tmp_path / "dataset")).with_format("torch")[0]
    from diffusers import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(pipeline, transformer=None, vae=None)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt("a red square", do_classifier_free_guidance=False)
    assert row["prompt_embeds"].shape == (256, CAPTION) and row["prompt_attention_mask"].shape == (256,)
    torch.testing.assert_close(row["prompt_attention_mask"], mask[0].float())
    torch.testing.assert_close(row["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
    assert 0 < int(row["prompt_attention_mask"].sum()) < 256
    # sampling feeds the same columns to Lumina2Pipeline (prompt_embeds, prompt_attention_mask, negative_*)
    res = train_lora(str(pipeline), str(tmp_path / "dataset"), batch_size=1, output_dir=str(tmp_path / "out"),
                     sample_prompts=["a red square"], sample_steps=2, sample_size="32", **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png") if p.name != "loss.png")


# ----------------------------------------------------------------------------- without a mask, ComfyUI's inputs


def test_a_dataset_without_masks_counts_every_token():
    full = lumina_dataset(rows=4)
    ones = full.map(lambda row: {"prompt_attention_mask": [1.0] * TOKENS})
    bare = full.remove_columns("prompt_attention_mask")
    a = train_lora(tiny_lumina2(), ones, batch_size=2, **FAST)
    b = train_lora(tiny_lumina2(), bare, batch_size=2, **FAST)
    assert a.loss == b.loss
    padded = train_lora(tiny_lumina2(), full, batch_size=2, **FAST)
    assert padded.loss["loss"] != a.loss["loss"]  # the mask is used


def test_comfyui_conditioning_with_its_attention_mask_equals_the_dataset():
    """The Train LoRA node's inputs: a raw LATENT (ComfyUI's Flux latent format, which its Lumina2 uses) and
    CONDITIONING entries whose extras hold Gemma's attention mask [1, L]."""
    from datasets import Dataset

    data = lumina_dataset(rows=4).with_format("torch")[:]
    raw = data["latents"] / 0.3611 + 0.1159
    conditioning = [[data["prompt_embeds"][i:i + 1], {"attention_mask": data["prompt_attention_mask"][i:i + 1].long()}]
                    for i in range(4)]
    node = train_lora(tiny_lumina2(), {"samples": raw}, conditioning, batch_size=2, **FAST)
    ours = train_lora(tiny_lumina2(), Dataset.from_dict({k: list(v.numpy()) for k, v in data.items()}), batch_size=2,
                      **FAST)
    assert node.loss["loss"] == pytest.approx(ours.loss["loss"], rel=1e-5)
