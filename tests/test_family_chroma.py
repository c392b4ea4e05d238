"""The Chroma family: a tiny ``ChromaTransformer2DModel`` built from a config.

Detection (pipeline folder, bare folder, single-file keys, not confused with Flux); training learns; the
first loss equals an independent computation (Flux's packing and dynamic shift, the T5 padding masked,
written here as each row's text truncated to its unmasked tokens); gradient checkpointing masks the same
tokens; the saved file loads in ``ChromaPipeline.load_lora_weights`` with the same effect, and means the
same under ComfyUI's rule for its Flux/Chroma key map; ``--existing_lora`` reads it back and continues;
``lora-prepare`` fills the columns with the pipeline's own T5 and VAE.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.models.chroma import image_ids, pack, unpack

SIZE, TOKENS, DIM = 16, 8, 32  # latent side, text tokens, T5 width
#: caption tokens + the one visible padding token, per row of the random datasets (the rest is masked)
LENGTHS = (3, 8, 5, 1, 6, 2, 7, 4)


def tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=DIM, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
            approximator_hidden_dim=32, approximator_layers=1)


def chroma_dataset(rows=8, seed=0, size=SIZE, mask=True, tokens=TOKENS):
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, 4, size, size, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, DIM, generator=g)}
    features = {"latents": Array3D((4, size, size), "float32"), "prompt_embeds": Array2D((TOKENS, DIM), "float32")}
    if mask:
        lengths = torch.tensor([LENGTHS[i % len(LENGTHS)] for i in range(rows)])
        columns["prompt_attention_mask"] = (torch.arange(tokens)[None] < lengths[:, None]).float()
        features["prompt_attention_mask"] = Sequence(Value("float32"), length=tokens)
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def tiny_vae():
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             scaling_factor=0.3611, shift_factor=0.1159)


def tiny_pipeline(denoiser=None, text_encoder=None, tokenizer=None):
    from diffusers import ChromaPipeline

    return ChromaPipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=denoiser or tiny_chroma())


def denoiser_output(model, seed=1):
    """The raw output on fixed inputs, the second row's last 3 text tokens masked (a boolean mask)."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, SIZE, SIZE, generator=g), torch.randn(2, TOKENS, DIM, generator=g)
    mask = torch.ones(2, TOKENS + (SIZE // 2) ** 2, dtype=torch.bool)
    mask[1, TOKENS - 3:TOKENS] = False
    with torch.no_grad():
        return model(hidden_states=pack(x), timestep=torch.tensor([0.01, 0.7]), encoder_hidden_states=text,
                     img_ids=image_ids(SIZE // 2, SIZE // 2), txt_ids=torch.zeros(TOKENS, 3),
                     attention_mask=mask).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained adapter (rank 4, alpha 3: scale 0.75), its file and its in-memory model."""
    out = tmp_path_factory.mktemp("chroma")
    return train_lora(tiny_chroma(), chroma_dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      **{**FAST, "steps": 3})


# ----------------------------------------------------------------------------- the objective, independently


def first_batch(dataset, model):
    data = TrainingData(dataset, None, get_family("chroma"), model)
    batch_size = min(data.num_rows, 2)
    sampler = StepBatchSampler(data.num_rows, batch_size, 1, 1, 0, 0, 1)
    return LatentBatches(data, 0).__getitems__(next(iter(sampler)))


def reference_loss(model, dataset):
    """The first batch's loss from the definitions: logit-normal noise level with FLUX.1 dev's dynamic
    shift (e^mu, mu linear in the token count), x_t = (1 - s) x0 + s eps, target eps - x0, the 2x2 patches
    packed by index, and each row's text cut to its unmasked tokens (what masking the padding means)."""
    batch = first_batch(dataset, model)
    x0, eps, u = batch["latents"], batch["noise"], batch["u"]
    shift = math.exp(0.5 + (1.15 - 0.5) * ((SIZE // 2) ** 2 - 256) / (4096 - 256))
    s = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)).clamp(1e-3, 1.0)
    sigma = shift * s / (1 + (shift - 1) * s)
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    ids = torch.tensor([[0.0, r, c] for r in range(SIZE // 2) for c in range(SIZE // 2)])
    losses = []
    for i in range(x0.shape[0]):
        patches = torch.stack([xt[i:i + 1, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=2)
        tokens_in = patches.permute(0, 3, 4, 1, 2).reshape(1, (SIZE // 2) ** 2, 16)
        text = batch["prompt_embeds"][i:i + 1]
        if "prompt_attention_mask" in batch:
            text = text[:, batch["prompt_attention_mask"][i] > 0]
        with torch.no_grad():
            tokens = model(hidden_states=tokens_in, timestep=sigma[i:i + 1], encoder_hidden_states=text,
                           img_ids=ids, txt_ids=torch.zeros(text.shape[1], 3)).sample
        out = torch.zeros_like(xt[i:i + 1])
        for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[:, :, dy::2, dx::2] = tokens.view(1, SIZE // 2, SIZE // 2, 4, 4)[..., k].permute(0, 3, 1, 2)
        losses.append(((out - (eps[i:i + 1] - x0[i:i + 1])) ** 2).mean())
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("mask", [True, False])
def test_first_loss_matches_an_independent_computation(mask):
    dataset = chroma_dataset(mask=mask)
    res = train_lora(tiny_chroma(), dataset, batch_size=2, **{**FAST, "steps": 1})
    assert res.loss["loss"][0] == pytest.approx(reference_loss(tiny_chroma(), dataset), rel=1e-4)
    if mask:  # the mask matters: the same rows with every token visible give another loss
        assert res.loss["loss"][0] != pytest.approx(reference_loss(tiny_chroma(), chroma_dataset(mask=False)),
                                                    rel=1e-4)


def test_gradient_checkpointing_masks_the_same_tokens():
    """diffusers drops the mask of checkpointed single blocks; the family hands it back, so checkpointing
    changes nothing: same losses and same trained tensors."""
    family, model = get_family("chroma"), tiny_chroma()
    batch = first_batch(chroma_dataset(), model)
    inputs = (batch["latents"], torch.tensor([300.0, 800.0]), batch)
    plain = family.forward(model, *inputs)
    model.enable_gradient_checkpointing()
    checkpointed = family.forward(model, *inputs)
    assert checkpointed.requires_grad  # the checkpointed path ran
    torch.testing.assert_close(checkpointed, plain, atol=1e-7, rtol=1e-7)
    common = dict(rank=4, learning_rate=0.02, **{**FAST, "steps": 2})
    plain = train_lora(tiny_chroma(), chroma_dataset(), **common)
    checkpointed = train_lora(tiny_chroma(), chroma_dataset(), **{**common, "gradient_checkpointing": True})
    assert checkpointed.loss["loss"] == pytest.approx(plain.loss["loss"], rel=1e-5)
    for key, tensor in plain.lora.items():
        torch.testing.assert_close(checkpointed.lora[key], tensor, atol=1e-6, rtol=1e-5)


def test_packing_matches_its_definition():
    x = torch.randn(2, 3, 6, 4)
    patches = torch.stack([x[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=2)
    assert torch.equal(pack(x), patches.permute(0, 3, 4, 1, 2).reshape(2, 6, 12))
    assert torch.equal(unpack(pack(x), 6, 4), x)


# ----------------------------------------------------------------------------- training and files


def test_training_learns():
    """On a single row the loss of a fixed (noise, timestep) probe falls: the adapter learns the data."""
    dataset = chroma_dataset(rows=1)
    res = train_lora(tiny_chroma(), dataset, rank=8, alpha=8.0, learning_rate=0.01, batch_size=1,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = reference_loss(tiny_chroma(), dataset), reference_loss(res.model_with_lora, dataset)
    assert after < 0.95 * before, (before, after)


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_chroma())).abs().max() > 1e-3
    got = denoiser_output(pipe.transformer)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_file_layout_and_what_comfyui_computes(trained):
    """``transformer.<module>.lora_A/lora_B.weight`` + ``.alpha``, each key one that ComfyUI's Flux key map
    (``comfy/utils.py flux_to_diffusers``, used for its Chroma) names, with ComfyUI's delta rule: up @ down
    times alpha / rank."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(trained.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["trainer_family"] == "chroma" and meta["ss_network_alpha"] == "3.0"
    lora = load_file(str(trained.lora_path))
    layers = adapter_layers(trained.model_with_lora)
    assert set(lora) == {f"transformer.{m}.{s}" for m in layers for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    comfy_modules = set(get_family("chroma").comfyui_names(trained.model_with_lora))
    for name, layer in layers.items():
        assert name in comfy_modules
        a, b, alpha = (lora[f"transformer.{name}.{s}"] for s in ("lora_A.weight", "lora_B.weight", "alpha"))
        torch.testing.assert_close(alpha.item() / a.shape[0] * b @ a, layer.get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)


def test_existing_lora_reads_our_file_back_and_continues(trained, tmp_path):
    model = tiny_chroma()
    existing = read_existing_adapter(trained.lora_path, model, get_family("chroma"))
    assert existing.source_format == "trainer" and existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora), atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_chroma(), chroma_dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path),
                     **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


def test_node_targets_write_offsets_where_comfyui_reads_them(tmp_path):
    """``--target_modules node``: offsets of the approximator (which ComfyUI's Flux key map does not name)
    and of the layers ComfyUI fuses go under ComfyUI's own names; the rest under the ``lora_transformer_``
    names its Flux key map reads; our reader takes the file back."""
    res = train_lora(tiny_chroma(), chroma_dataset(), target_modules="node", output_dir=str(tmp_path), **FAST)
    keys = set(res.lora)
    assert {"diffusion_model.distilled_guidance_layer.norms.0.scale.diff",
            "diffusion_model.distilled_guidance_layer.layers.0.in_layer.diff_b",
            "diffusion_model.double_blocks.0.img_attn.qkv.diff_b",
            "lora_transformer_transformer_blocks_0_attn_norm_q.diff",
            "transformer.distilled_guidance_layer.layers.0.linear_1.lora_A.weight"} <= keys
    assert not [k for k in keys if k.startswith("lora_transformer_distilled")]
    existing = read_existing_adapter(res.lora_path, tiny_chroma(), get_family("chroma"))
    assert {"distilled_guidance_layer.norms.0", "distilled_guidance_layer.in_proj",
            "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.norm_q"} <= set(existing.deltas)
    torch.testing.assert_close(existing.deltas["distilled_guidance_layer.norms.0"]["diff"],
                               res.lora["diffusion_model.distilled_guidance_layer.norms.0.scale.diff"])


# ----------------------------------------------------------------------------- detection


def test_detection_from_pipeline_and_bare_folders(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    for path, kind in ((tmp_path, "pipeline"), (tmp_path / "transformer", "folder")):
        loaded = load_model(str(path))
        assert loaded.family.name == "chroma" and loaded.kind == kind
        assert loaded.scheduler_config["use_dynamic_shifting"] is True and loaded.vae_scale_factor == 2
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert not get_family("flux").matches(config)


def test_single_file_keys_tell_chroma_from_flux():
    """Chroma files use Flux's BFL names (double_blocks.*) plus the approximator, which ComfyUI also
    detects Chroma by; Flux no longer claims them."""
    from trainer.models.loading import checkpoint_family

    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2), "img_in.weight": torch.ones(2, 2)}
    chroma = {**flux, "distilled_guidance_layer.in_proj.weight": torch.ones(2, 2)}
    assert checkpoint_family(flux).name == "flux"
    assert checkpoint_family(chroma).name == "chroma"
    assert checkpoint_family({"model.diffusion_model." + k: v for k, v in chroma.items()}).name == "chroma"
    assert not get_family("flux").matches_checkpoint(chroma)


# ----------------------------------------------------------------------------- lora-prepare


def test_prepare_encodes_with_the_pipelines_t5_and_vae_then_trains(tmp_path):
    import datasets
    from test_prepare import image, t5

    from trainer.prepare import PrepareConfig, prepare

    tokenizer, encoder = t5(DIM)
    pipeline = tmp_path / "pipe"
    tiny_pipeline(text_encoder=encoder, tokenizer=tokenizer).save_pretrained(pipeline)
    root = tmp_path / "images"
    image(root / "a.png", 32, 32, seed=1)
    (root / "a.txt").write_text("a red square")
    image(root / "2_wide" / "b.png", 48, 30, seed=2)
    result = prepare(PrepareConfig(images=str(root), model=str(pipeline), output=str(tmp_path / "dataset"),
                                   resolution=32, bucket_step=8, batch_size=2))
    assert result.shapes == {(4, 16, 16): 1, (4, 12, 20): 2}
    ds = datasets.load_from_disk(str(tmp_path / "dataset")).with_format("torch")
    row = ds[list(ds["file_name"]).index("a.png")]
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(pipeline)  # the saved tokenizer, as lora-prepare reads it
    with torch.no_grad():
        embeds, _, mask, *_ = pipe.encode_prompt(["a red square"], None, device=torch.device("cpu"),
                                                 do_classifier_free_guidance=False)
    torch.testing.assert_close(row["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
    # the caption's tokens, its end token and one padding token are visible; the rest of the 512 is not
    length = len(pipe.tokenizer("a red square").input_ids)
    assert row["prompt_attention_mask"].shape == (512,) and row["prompt_attention_mask"].sum() == length + 1
    torch.testing.assert_close(row["prompt_attention_mask"], mask[0])
    # sampling feeds the same columns to ChromaPipeline (prompt_embeds, prompt_attention_mask, negative_*)
    res = train_lora(str(pipeline), str(tmp_path / "dataset"), batch_size=1, output_dir=str(tmp_path / "run"),
                     sample_prompts=["a red square --n a blue circle --s 2"], **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000000", "step-00000002"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dataset, message", [
    (lambda: chroma_dataset(size=15), "2x2 patches"),
    (lambda: chroma_dataset(tokens=6), "prompt_attention_mask has 6 entries per row but prompt_embeds have 8"),
])
def test_bad_input_names_the_problem(dataset, message):
    with pytest.raises(TrainerError, match=message):
        train_lora(tiny_chroma(), dataset(), **FAST)


def test_conditioning_of_another_width_is_refused():
    with pytest.raises(TrainerError, match="prompt_embeds have 32 features but the model's joint_attention_dim is 64"):
        from diffusers import ChromaTransformer2DModel

        model = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                         approximator_hidden_dim=32, approximator_layers=1)
        train_lora(model, chroma_dataset(), **FAST)
