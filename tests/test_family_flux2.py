"""The Flux.2 family (``flux2``): tiny ``Flux2Transformer2DModel``, ``AutoencoderKLFlux2`` and Mistral 3
text encoder built from configs, with a tiny tokenizer written here.

Checked against diffusers' ``Flux2Pipeline`` itself: token packing, 4-D position ids and the VAE's
batch-norm latent normalisation equal the pipeline's own static methods; the first training loss equals
the rectified-flow loss computed here from the pipeline's way of calling the transformer; the saved file,
loaded by ``Flux2Pipeline.load_lora_weights``, gives the same transformer output as ``model_with_lora``;
``lora-prepare`` fills ``latents`` and ``prompt_embeds`` as the pipeline encodes them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FAST
from safetensors import safe_open

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.models.flux2 import denormalize_latents, image_ids, normalize_latents, pack, text_ids, unpack

SIZE, TOKENS, CHANNELS, TEXT_DIM = 16, 8, 4, 16  # latent side, text tokens, VAE latent channels, Mistral width
JOINT = 3 * TEXT_DIM  # the pipeline stacks three hidden layers per token


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_flux2(guidance_embeds=True):
    from diffusers import Flux2Transformer2DModel

    return _seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), mlp_ratio=2.0, guidance_embeds=guidance_embeds))


def tiny_vae():
    """A tiny AutoencoderKLFlux2 whose batch-norm statistics are not the identity (so using them shows)."""
    from diffusers import AutoencoderKLFlux2

    def build():
        vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=CHANNELS,
                                 norm_num_groups=8, sample_size=32)
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 4 * CHANNELS))
        vae.bn.running_var.copy_(torch.linspace(0.25, 4.0, 4 * CHANNELS))
        return vae

    return _seeded(build)


def tiny_tokenizer():
    """A word-level tokenizer over single letters with a chat template (what apply_chat_template needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}"
                               "{% endfor %}{{ eos_token }}{% endfor %}")
    return tokenizer, len(vocab)


def tiny_mistral(vocab_size):
    """A tiny Mistral3ForConditionalGeneration: 30 text layers, since the pipeline stacks layers 10, 20, 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, pad_token_id=0),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=8))
    return _seeded(lambda: Mistral3ForConditionalGeneration(config))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_pipeline(denoiser=None, text=False):
    from diffusers import Flux2Pipeline

    tokenizer, vocab = tiny_tokenizer() if text else (None, 0)
    return Flux2Pipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=tiny_mistral(vocab) if text else None,
                         tokenizer=tokenizer, transformer=denoiser or tiny_flux2())


def family_dataset(rows=8, seed=0, size=SIZE, dim=JOINT):
    from datasets import Array2D, Array3D, Dataset, Features

    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, CHANNELS, size, size, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, dim, generator=g)}
    features = {"latents": Array3D((CHANNELS, size, size), "float32"),
                "prompt_embeds": Array2D((TOKENS, dim), "float32")}
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def pipeline_call(model, x, t, text, guidance):
    """The transformer's velocity for [B, C, H, W] latents, called as ``Flux2Pipeline.__call__`` calls it, with
    the pipeline's own static methods for patches, tokens and position ids."""
    from diffusers import Flux2Pipeline as P

    patches = P._patchify_latents(x)
    latent_ids = P._prepare_latent_ids(patches)
    kwargs = {}
    if model.config.guidance_embeds:
        kwargs["guidance"] = torch.full([x.shape[0]], guidance, dtype=torch.float32)
    out = model(hidden_states=P._pack_latents(patches), timestep=t / 1000, encoder_hidden_states=text,
                txt_ids=P._prepare_text_ids(text), img_ids=latent_ids, return_dict=False, **kwargs)[0]
    return P._unpatchify_latents(P._unpack_latents_with_ids(out, latent_ids))


def denoiser_output(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, SIZE, SIZE, generator=g)
    text = torch.randn(2, TOKENS, JOINT, generator=g)
    with torch.no_grad():
        return pipeline_call(model, x, torch.tensor([10.0, 700.0]), text, 1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained adapter (rank 4, alpha 3: scale 0.75), its file and its in-memory model."""
    out = tmp_path_factory.mktemp("flux2")
    return train_lora(tiny_flux2(), family_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      **{**FAST, "steps": 3})


# ----------------------------------------------------------------------------- the pipeline's definitions


def test_tokens_ids_and_latent_normalisation_match_the_pipeline():
    from diffusers import Flux2Pipeline as P

    x = torch.randn(2, CHANNELS, 6, 10)
    patches = P._patchify_latents(x)
    assert torch.equal(pack(x), P._pack_latents(patches))
    assert torch.equal(unpack(pack(x), 6, 10), x)
    assert torch.equal(image_ids(3, 5), P._prepare_latent_ids(patches)[0].float())
    assert torch.equal(text_ids(7), P._prepare_text_ids(torch.zeros(1, 7, 4))[0].float())
    # the pipeline's _encode_vae_image (mode of the posterior, patchified, batch-norm standardised)
    pipe = tiny_pipeline()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = pipe._encode_vae_image(image, None)
        raw = pipe.vae.encode(image).latent_dist.mean
    ours = normalize_latents(pipe.vae, raw)
    torch.testing.assert_close(P._patchify_latents(ours), expected)
    assert not torch.allclose(ours, raw, atol=1e-2)  # the statistics were applied
    torch.testing.assert_close(denormalize_latents(pipe.vae, ours), raw, atol=1e-5, rtol=1e-5)


def first_batch(dataset, model, batch_size=2):
    data = TrainingData(dataset, None, get_family("flux2"), model)
    sampler = StepBatchSampler(data.num_rows, batch_size, 1, 1, 0, 0, 1)
    return LatentBatches(data, 0).__getitems__(next(iter(sampler)))


@pytest.mark.parametrize("guidance_embeds, guidance", [(True, 1.0), (True, 3.5), (False, 1.0)])
def test_first_loss_is_rectified_flow_through_the_pipelines_call(guidance_embeds, guidance):
    """x_s = (1 - s) x0 + s eps, target eps - x0, s logit-normal shifted by e^mu with mu linear in the token
    count (the scheduler's dynamic shift); the transformer called as the pipeline calls it."""
    model, dataset = tiny_flux2(guidance_embeds), family_dataset()
    batch = first_batch(dataset, model)
    x0, eps, u = batch["latents"], batch["noise"], batch["u"]
    tokens = (SIZE // 2) ** 2
    k = math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))
    s = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)).clamp(1e-3, 1.0)
    sigma = (k * s / (1 + (k - 1) * s)).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = pipeline_call(model, (1 - sigma) * x0 + sigma * eps, sigma.flatten() * 1000, batch["prompt_embeds"],
                            guidance)
    expected = torch.nn.functional.mse_loss(out, eps - x0).item()
    # the first loss is taken before the first update
    res = train_lora(model, dataset, steps=1, batch_size=2, guidance=guidance,
                     **{k: v for k, v in FAST.items() if k != "steps"})
    assert res.loss["loss"][0] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- training and files


def probe_loss(model, rows=1):
    """The loss on fixed noise and noise levels (what learning must lower)."""
    g = torch.Generator().manual_seed(5)
    data = family_dataset(rows=rows).with_format("torch")[:]
    x0, text = data["latents"], data["prompt_embeds"]
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.3, 0.6, 0.9]).view(-1, 1, 1, 1)
    x0, text, eps = x0.expand(3, -1, -1, -1), text.expand(3, -1, -1), eps.expand(3, -1, -1, -1)
    with torch.no_grad():
        out = pipeline_call(model, (1 - sigma) * x0 + sigma * eps, sigma.flatten() * 1000, text, 1.0)
    return torch.nn.functional.mse_loss(out, eps - x0).item()


def test_training_learns():
    res = train_lora(tiny_flux2(), family_dataset(rows=1), rank=8, alpha=8.0, learning_rate=0.01,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = probe_loss(tiny_flux2()), probe_loss(res.model_with_lora)
    assert after < 0.95 * before, (before, after)


def test_file_layout_and_metadata(trained):
    keys = set(trained.lora)
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)  # no alpha tensors: Flux2LoraLoaderMixin refuses keys without "lora"
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in keys
    with safe_open(str(trained.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "flux2_dev"


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_flux2())).abs().max() > 1e-3
    loaded = denoiser_output(pipe.transformer)
    relative = ((loaded - expected).abs().max() / expected.abs().max()).item()
    print(f"flux2 diffusers round trip: max relative difference {relative:.2e}")
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_lokr_file_loads_in_diffusers_with_the_same_effect(tmp_path):
    """LyCORIS names (lycoris_<path with _>), which Flux2LoraLoaderMixin converts for LoKr."""
    res = train_lora(tiny_flux2(), family_dataset(), algorithm="LoKr", rank=4, target_modules="attention",
                     learning_rate=0.1, output_dir=str(tmp_path), **{**FAST, "steps": 3})
    assert all(k.startswith("lycoris_") for k in res.lora)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(res.lora_path))
    expected = denoiser_output(res.model_with_lora)
    assert (expected - denoiser_output(tiny_flux2())).abs().max() > 1e-3
    torch.testing.assert_close(denoiser_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)


def test_existing_lora_reads_our_file_back_and_continues(trained, tmp_path):
    model = tiny_flux2()
    existing = read_existing_adapter(trained.lora_path, model, get_family("flux2"))
    assert existing.source_format == "trainer" and existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora),
                               atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_flux2(), family_dataset(), existing_lora=str(trained.lora_path),
                     output_dir=str(tmp_path), **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


# ----------------------------------------------------------------------------- detection and bad input


def test_detection_from_pipeline_and_bare_folders(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    for path, kind in ((tmp_path, "pipeline"), (tmp_path / "transformer", "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == "flux2" and loaded.kind == kind
        assert loaded.scheduler_config["use_dynamic_shifting"] is True
        assert loaded.vae_scale_factor == 2
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert not get_family("flux").matches(config)
    assert not get_family("flux2").matches({"_class_name": "FluxTransformer2DModel", "guidance_embeds": True})


def bfl_state_dict(model):
    """The tiny model's tensors under FLUX.2's original (BFL) names, written from the architecture: fused
    q/k/v, RMSNorm "scale", the final modulation stored (shift, scale) where diffusers holds (scale, shift)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"img_in.weight": sd.pop("x_embedder.weight"), "txt_in.weight": sd.pop("context_embedder.weight"),
           "final_layer.linear.weight": sd.pop("proj_out.weight")}
    scale, shift = sd.pop("norm_out.linear.weight").chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for ours, theirs in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in")):
        for i, layer in (("1", "in_layer"), ("2", "out_layer")):
            out[f"{theirs}.{layer}.weight"] = sd.pop(f"time_guidance_embed.{ours}.linear_{i}.weight")
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        out[f"{name}.lin.weight"] = sd.pop(f"{name}.linear.weight")
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        for side, q, k, v in (("img", "to_q", "to_k", "to_v"), ("txt", "add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"double_blocks.{i}.{side}_attn.qkv.weight"] = torch.cat([sd.pop(f"{b}attn.{p}.weight") for p in (q, k, v)])
        for ours, theirs in (("attn.norm_q", "img_attn.norm.query_norm.scale"), ("attn.norm_k", "img_attn.norm.key_norm.scale"),
                             ("attn.norm_added_q", "txt_attn.norm.query_norm.scale"),
                             ("attn.norm_added_k", "txt_attn.norm.key_norm.scale"), ("attn.to_out.0", "img_attn.proj.weight"),
                             ("attn.to_add_out", "txt_attn.proj.weight"), ("ff.linear_in", "img_mlp.0.weight"),
                             ("ff.linear_out", "img_mlp.2.weight"), ("ff_context.linear_in", "txt_mlp.0.weight"),
                             ("ff_context.linear_out", "txt_mlp.2.weight")):
            out[f"double_blocks.{i}.{theirs}"] = sd.pop(f"{b}{ours}.weight")
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}."
        for ours, theirs in (("attn.to_qkv_mlp_proj", "linear1.weight"), ("attn.to_out", "linear2.weight"),
                             ("attn.norm_q", "norm.query_norm.scale"), ("attn.norm_k", "norm.key_norm.scale")):
            out[f"single_blocks.{i}.{theirs}"] = sd.pop(f"{b}{ours}.weight")
    assert not sd, sorted(sd)  # every tensor renamed
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_checkpoint_is_detected_and_loads(tmp_path, prefix):
    from safetensors.torch import save_file

    model = tiny_flux2()
    save_file({prefix + k: v.contiguous() for k, v in bfl_state_dict(model).items()}, str(tmp_path / "f2.safetensors"))
    loaded = load_model(str(tmp_path / "f2.safetensors"))
    assert loaded.family.name == "flux2" and loaded.kind == "single_file"
    assert loaded.scheduler_config["use_dynamic_shifting"] is True
    assert {k: loaded.denoiser.config[k] for k in ("num_layers", "num_single_layers", "mlp_ratio", "axes_dims_rope")} \
        == {"num_layers": 1, "num_single_layers": 1, "mlp_ratio": 2.0, "axes_dims_rope": (4, 4, 4, 4)}
    torch.testing.assert_close(denoiser_output(loaded.denoiser), denoiser_output(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dataset, message", [
    (lambda: family_dataset(size=15), "2x2 patches"),
    (lambda: family_dataset(dim=32), "prompt_embeds have 32 features but the model's joint_attention_dim is 48"),
])
def test_bad_input_names_the_problem(dataset, message):
    with pytest.raises(TrainerError, match=message):
        train_lora(tiny_flux2(), dataset(), **FAST)


# ----------------------------------------------------------------------------- lora-prepare


def test_prepare_encodes_with_the_pipelines_vae_and_mistral_then_trains(tmp_path):
    import datasets
    from PIL import Image

    from trainer.prepare import PrepareConfig, prepare

    pipe = tiny_pipeline(text=True)
    pipe.save_pretrained(tmp_path / "model")
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    (root / "a.txt").write_text("a red square")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 48, 3), dtype=np.uint8)).save(root / "b.png")
    (root / "b.txt").write_text("a wide view")
    from safetensors.torch import save_file

    # raw VAE latents from ComfyUI cannot be normalised without the VAE's batch-norm statistics
    save_file({"latent_tensor": torch.zeros(1, CHANNELS, 4, 4)}, str(root / "c.latent"))
    result = prepare(PrepareConfig(images=str(root), model=str(tmp_path / "model"), output=str(tmp_path / "data"),
                                   resolution=32, bucket_step=8, batch_size=2))
    assert result.shapes == {(CHANNELS, 16, 16): 1, (CHANNELS, 12, 20): 1}
    assert [(s.name, s.reason) for s in result.skipped] == [
        ("c.latent", "flux2's latent normalisation is in its VAE's weights; import images, not .latent files")]
    ds = datasets.load_from_disk(str(tmp_path / "data")).with_format("numpy")
    row = ds[list(ds[:]["file_name"]).index("a.png")]
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe._encode_vae_image(image, None)  # patchified and standardised
        embeds, _ = pipe.encode_prompt(["a red square"], device=torch.device("cpu"))
    from diffusers import Flux2Pipeline as P

    torch.testing.assert_close(P._patchify_latents(torch.from_numpy(row["latents"])[None]), latents,
                               atol=1e-5, rtol=1e-5)
    assert row["prompt_embeds"].shape == (512, JOINT)  # the pipeline's 512 tokens, three layers side by side
    torch.testing.assert_close(torch.from_numpy(row["prompt_embeds"]), embeds[0], atol=1e-5, rtol=1e-5)
    res = train_lora(str(tmp_path / "model"), str(tmp_path / "data"), batch_size=1, **FAST)
    assert all(np.isfinite(res.loss["loss"]))


# ----------------------------------------------------------------------------- sampling


def test_samples_through_flux2pipeline_and_a_negative_prompt_is_refused(tmp_path):
    """Flux2Pipeline takes no negative embeddings (guidance-distilled, no true CFG): samples are made
    without them, and a prompt's own negative text is refused rather than dropped."""
    from PIL import Image

    tiny_pipeline(text=True).save_pretrained(tmp_path / "model")
    res = train_lora(str(tmp_path / "model"), family_dataset(), sample_prompts=["a cat --g 3.5", "a dog"],
                     sample_steps=2, sample_size="32", output_dir=str(tmp_path / "out"), **FAST)
    assert res.steps == 2
    for step in ("step-00000000", "step-00000002"):
        assert Image.open(tmp_path / "out" / "samples" / step / "0.png").size == (32, 32)
    with pytest.raises(TrainerError, match=r"prompt 0 \('a cat'\) has a negative prompt \(--n\) but Flux2Pipeline"):
        train_lora(str(tmp_path / "model"), family_dataset(), sample_prompts=["a cat --n blurry"], sample_steps=2,
                   sample_size="32", output_dir=str(tmp_path / "out2"), **FAST)
