"""Z-Image (``ZImageTransformer2DModel``, Qwen3 text encoder, Flux VAE): tiny models built from configs.

The training prediction is checked against one step of diffusers' own ``ZImagePipeline`` (its time
``1 - sigma`` and negated output); training lowers the loss on caption rows of different lengths
(padded + mask); the saved file, loaded by ``ZImagePipeline.load_lora_weights``, gives the denoiser of
``model_with_lora``; ``--existing_lora`` reads it back and continues; LyCORIS algorithms use ComfyUI's
``lycoris_`` names; the family is detected from a pipeline folder, a bare folder and a single file in the
original layout; ``lora-prepare`` and ``--sample_prompts`` encode with a tiny Qwen3 as the pipeline does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST

from trainer import train_lora
from trainer.adapters import adapter_layers, attach_adapter, get_algorithm
from trainer.adapters.formats import read_existing_adapter
from trainer.errors import TrainerError
from trainer.models import get_family, load_model
from trainer.models.zimage import MAX_TOKENS, caption_list
from trainer.objectives import ObjectiveOptions

SIZE, TOKENS, CAP_DIM, CHANNELS = 8, 8, 16, 16  # latent side, text tokens, Qwen3 width, Flux VAE channels


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_zimage():
    from diffusers import ZImageTransformer2DModel

    return _seeded(lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=CHANNELS, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=CAP_DIM, axes_dims=[4, 6, 6], axes_lens=[1024, 32, 32]))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def tiny_vae():
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=CHANNELS, norm_num_groups=8,
        scaling_factor=0.5, shift_factor=0.25))


def lengths(rows):
    return [3 + (i * 3) % (TOKENS - 2) for i in range(rows)]  # 3..8 real tokens: rows differ


def dataset(rows=8, seed=0, mask=True, dim=CAP_DIM, size=SIZE):
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    g = torch.Generator().manual_seed(seed)
    columns = {"latents": torch.randn(rows, CHANNELS, size, size, generator=g),
               "prompt_embeds": torch.randn(rows, TOKENS, dim, generator=g)}
    features = {"latents": Array3D((CHANNELS, size, size), "float32"),
                "prompt_embeds": Array2D((TOKENS, dim), "float32")}
    if mask:
        m = torch.zeros(rows, TOKENS)
        for i, n in enumerate(lengths(rows)):
            m[i, :n] = 1
        columns["prompt_embeds"] = columns["prompt_embeds"] * m[..., None]  # padding is zeros, as prepared
        columns["prompt_attention_mask"] = m
        features["prompt_attention_mask"] = Sequence(Value("float32"), length=TOKENS)
    return Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=Features(features))


def tiny_pipeline(transformer=None, text=False):
    from diffusers import ZImagePipeline

    encoder, tokenizer = tiny_qwen3() if text else (None, None)
    return ZImagePipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer,
                          transformer=transformer or tiny_zimage())


def denoiser_output(model, seed=1):
    """The transformer's raw outputs on fixed inputs: two images, captions of 5 and 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, 1, SIZE, SIZE, generator=g)
    text = torch.randn(2, TOKENS, CAP_DIM, generator=g)
    with torch.no_grad():
        out = model(list(x.unbind(0)), torch.tensor([0.3, 0.9]), [text[0, :5], text[1]], return_dict=False)[0]
    return torch.stack(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("zimage")
    return train_lora(tiny_zimage(), dataset(), rank=4, alpha=3.0, learning_rate=0.02, output_dir=str(out),
                      **{**FAST, "steps": 3})


# ----------------------------------------------------------------------------- the objective


def test_prediction_is_the_velocity_the_pipeline_steps_with():
    """One Euler step of ZImagePipeline from sigma s to 0 moves the latents by -s * v; the trainer's
    prediction at the same noise level (timestep s * 1000) is that v, for captions cut to their mask."""
    model = tiny_zimage()
    pipe = tiny_pipeline(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=g)
    text = torch.randn(1, TOKENS, CAP_DIM, generator=g)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3])
    with torch.no_grad():
        stepped = pipe(prompt_embeds=[text[0, :5]], guidance_scale=0.0, latents=x, sigmas=[0.6],
                       num_inference_steps=1, height=SIZE * 2, width=SIZE * 2, output_type="latent").images
        sigma = pipe.scheduler.sigmas[0].item()
        assert sigma == pytest.approx(3 * 0.6 / (1 + 2 * 0.6))  # the scheduler's shift
        family = get_family("zimage")
        loaded = load_model(pipe)
        objective = family.make_objective(loaded, ObjectiveOptions())
        prediction = family.forward(model, x, torch.tensor([sigma * 1000]),
                                    {"prompt_embeds": text, "prompt_attention_mask": mask},
                                    **objective.model_inputs)
    torch.testing.assert_close(prediction, (x - stepped) / sigma, atol=1e-5, rtol=1e-4)
    # the shift the objective uses is the scheduler's: draws u map to 3u / (1 + 2u)
    u = torch.tensor([0.2, 0.5])
    objective_uniform = family.make_objective(
        loaded, ObjectiveOptions(timestep_sampling="uniform"))
    torch.testing.assert_close(objective_uniform.sigmas(u, x.expand(2, -1, -1, -1)), 3 * u / (1 + 2 * u))


def test_mask_cuts_each_caption_to_its_tokens():
    embeds = torch.arange(2 * 4 * 1.0).view(2, 4, 1)
    cut = caption_list({"prompt_embeds": embeds, "prompt_attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])})
    assert [c.flatten().tolist() for c in cut] == [[0.0, 1.0], [4.0, 5.0, 6.0, 7.0]]
    assert [len(c) for c in caption_list({"prompt_embeds": embeds})] == [4, 4]
    with pytest.raises(TrainerError, match="marks no token as real"):
        caption_list({"prompt_embeds": embeds, "prompt_attention_mask": torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])})


@pytest.mark.parametrize("options", [{}, {"objective": "x0"}])
def test_first_loss_matches_an_independent_computation(options):
    """The trainer's first loss from the batch's own draws, written out here: logit-normal sigma shifted by
    3, x_s = (1 - s) x0 + s eps, the transformer fed 1 - s and each caption's real tokens, its output
    negated; target eps - x0 (or, for x0, the clean latents from x_s - s v)."""
    from trainer.data import LatentBatches, StepBatchSampler, TrainingData

    data = dataset()
    res = train_lora(tiny_zimage(), data, batch_size=2, **{**FAST, "steps": 1}, **options)
    model = tiny_zimage()
    rows = TrainingData(data, None, get_family("zimage"), model)
    batch = LatentBatches(rows, 0).__getitems__(next(iter(StepBatchSampler(rows.num_rows, 2, 1, 1, 0, 0, 1))))
    x0, eps, u = batch["latents"], batch["noise"], batch["u"]
    s = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)).clamp(1e-3, 1.0)
    sigma = 3 * s / (1 + 2 * s)
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    captions = [e[: int(m.sum())] for e, m in zip(batch["prompt_embeds"], batch["prompt_attention_mask"])]
    with torch.no_grad():
        out = torch.stack(model(list(xt.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0])
    v = -out.squeeze(2)
    pred, target = (xt - sigma.view(-1, 1, 1, 1) * v, x0) if options else (v, eps - x0)
    assert res.loss["loss"][0] == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-4)


# ----------------------------------------------------------------------------- training and files


def probe_loss(model, data):
    """The flow-matching loss of fixed (noise, sigma) on the rows, through the family's forward."""
    family = get_family("zimage")
    rows = data.with_format("torch")[:]
    g = torch.Generator().manual_seed(5)
    x0 = rows["latents"]
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.full((len(x0),), 0.5)
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = family.forward(model, noisy, sigma * 1000, rows)
    return torch.nn.functional.mse_loss(v, eps - x0).item()


def test_training_learns():
    data = dataset(rows=2)
    res = train_lora(tiny_zimage(), data, rank=8, alpha=8.0, learning_rate=0.01, batch_size=2,
                     **{**FAST, "steps": 30})
    assert res.steps == 30 and all(math.isfinite(v) for v in res.loss["loss"])
    before, after = probe_loss(tiny_zimage(), data), probe_loss(res.model_with_lora, data)
    assert after < 0.95 * before, (before, after)


def test_training_without_a_mask_uses_every_token():
    res = train_lora(tiny_zimage(), dataset(rows=2, mask=False), batch_size=2, **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])


def test_file_loads_in_diffusers_with_the_same_effect(trained):
    from safetensors.torch import load_file

    lora = load_file(str(trained.lora_path))
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in lora} == {"lora_A", "lora_B",
                                                                                         "alpha"}
    # every Linear layer (--target_modules all): the blocks, both refiners, the embedders and the final layer
    assert {k.split(".")[1] for k in lora} == {"layers", "noise_refiner", "context_refiner", "t_embedder",
                                               "cap_embedder", "all_x_embedder", "all_final_layer"}
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(trained.lora_path))
    expected = denoiser_output(trained.model_with_lora)
    assert (expected - denoiser_output(tiny_zimage())).abs().max() > 1e-3
    got = denoiser_output(pipe.transformer)
    print("max relative difference", ((got - expected).abs().max() / expected.abs().max()).item())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_existing_lora_reads_our_file_back_and_continues(trained, tmp_path):
    model = tiny_zimage()
    existing = read_existing_adapter(trained.lora_path, model, get_family("zimage"))
    assert existing.source_format == "trainer" and existing.steps == 3 and existing.algorithm == "LoRA"
    algorithm = get_algorithm("LoRA")
    attach_adapter(model, algorithm, seed=0, **existing.attach_arguments())
    layers = adapter_layers(model)
    for name, tensors in existing.modules.items():
        algorithm.import_layer(layers[name], tensors)
    torch.testing.assert_close(denoiser_output(model), denoiser_output(trained.model_with_lora), atol=1e-5, rtol=1e-5)
    res = train_lora(tiny_zimage(), dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path), **FAST)
    assert res.steps == 5 and json.loads((tmp_path / "loss.json").read_text())["step"] == [4, 5]


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr"])
def test_lycoris_algorithms_use_comfyui_names(algorithm, tmp_path):
    res = train_lora(tiny_zimage(), dataset(rows=2), algorithm=algorithm, rank=4, batch_size=2,
                     output_dir=str(tmp_path), **FAST)
    modules = {name.replace(".", "_") for name in adapter_layers(res.model_with_lora)}
    assert {k.split(".")[0] for k in res.lora} == {"lycoris_" + m for m in modules}
    back = read_existing_adapter(res.lora_path, tiny_zimage(), get_family("zimage"))
    assert back.algorithm == algorithm and set(back.modules) == set(adapter_layers(res.model_with_lora))


# ----------------------------------------------------------------------------- detection and checks


def test_detected_from_a_pipeline_folder_and_a_bare_folder(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_model(str(tmp_path / "pipe"))
    assert loaded.family.name == "zimage" and loaded.kind == "pipeline"
    assert loaded.scheduler_config["shift"] == 3.0
    assert load_model(str(tmp_path / "pipe" / "transformer")).family.name == "zimage"
    res = train_lora(str(tmp_path / "pipe"), dataset(rows=2), batch_size=2, **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])


def test_conditioning_that_cannot_feed_the_model_is_refused():
    with pytest.raises(TrainerError, match="cap_feat_dim is 16"):
        train_lora(tiny_zimage(), dataset(rows=2, dim=24), **FAST)
    with pytest.raises(TrainerError, match="not a multiple of the patch size 2"):
        train_lora(tiny_zimage(), dataset(rows=2, size=7), **FAST)
    with pytest.raises(TrainerError, match="exceeds the model's rotary positions"):
        train_lora(tiny_zimage(), dataset(rows=2, size=66), **FAST)


# ----------------------------------------------------------------------------- lora-prepare


def tiny_qwen3(folder: Path | None = None):
    """A tiny Qwen3 and a word-level tokenizer with a chat template (written offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "a", "red", "square",
             "wide", "view", "sks", "dog", "tall", "thin", "tower", "\n"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        chat_template=template, model_max_length=MAX_TOKENS)
    config = Qwen3Config(vocab_size=len(words), hidden_size=CAP_DIM, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=MAX_TOKENS)
    return _seeded(lambda: Qwen3Model(config)), tokenizer


def test_prepare_encodes_with_qwen3_and_trains(tmp_path):
    import numpy as np
    from PIL import Image

    from trainer.prepare import PrepareConfig, prepare

    pipe = tiny_pipeline(text=True)
    pipe.save_pretrained(tmp_path / "pipe")
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "a.txt").write_text("a red square")
    result = prepare(PrepareConfig(images=str(root), model=str(tmp_path / "pipe"), output=str(tmp_path / "data"),
                                   resolution=32, bucket_step=8, batch_size=1))
    assert result.shapes == {(CHANNELS, 16, 16): 1}
    import datasets

    row = datasets.load_from_disk(str(tmp_path / "data")).with_format("torch")[0]
    assert row["prompt_embeds"].shape == (MAX_TOKENS, CAP_DIM) and row["prompt_attention_mask"].shape == (MAX_TOKENS,)
    # the pipeline's own encoding: the caption's real tokens, in the chat template
    with torch.no_grad():
        expected, _ = pipe.encode_prompt("a red square", device=torch.device("cpu"), do_classifier_free_guidance=False)
    n = int(row["prompt_attention_mask"].sum())
    assert n == len(expected[0]) == 8  # <|im_start|> user a red square <|im_end|> <|im_start|> assistant
    torch.testing.assert_close(row["prompt_embeds"][:n].float(), expected[0], atol=1e-5, rtol=1e-5)
    assert not row["prompt_embeds"][n:].any()
    # latents: the VAE's mean, (z - shift) * scale from the VAE's config
    pixels = torch.from_numpy(np.asarray(Image.open(root / "a.png"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean[0]
    torch.testing.assert_close(row["latents"].float(), (z - 0.25) * 0.5, atol=1e-4, rtol=1e-4)
    res = train_lora(str(tmp_path / "pipe"), str(tmp_path / "data"), batch_size=1, **FAST)
    assert all(math.isfinite(v) for v in res.loss["loss"])


def test_samples_from_the_pipeline_with_captions_cut_to_their_tokens(tmp_path):
    """--sample_prompts: the prompts are encoded with the pipeline's Qwen3 and handed to ZImagePipeline as
    lists of real-token embeddings (what its own encode_prompt gives), with a negative prompt for CFG."""
    import numpy as np
    from PIL import Image

    from trainer.sampling import SamplePrompt, encode_prompts

    pipe = tiny_pipeline(text=True)
    pipe.save_pretrained(tmp_path / "pipe")
    prompts = [SamplePrompt("a red square", negative="a dog"), SamplePrompt("a tall thin tower")]
    embeds = encode_prompts(tmp_path / "pipe", "zimage", prompts, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected, negative = pipe.encode_prompt("a red square", device=torch.device("cpu"), negative_prompt="a dog")
    assert set(embeds[0]) == {"prompt_embeds", "negative_prompt_embeds"}
    torch.testing.assert_close(embeds[0]["prompt_embeds"][0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[0]["negative_prompt_embeds"][0], negative[0], atol=1e-5, rtol=1e-5)
    (tmp_path / "prompts.txt").write_text("a red square --n a dog\na tall thin tower\n")
    train_lora(str(tmp_path / "pipe"), dataset(rows=2), batch_size=2, output_dir=str(tmp_path / "run"),
               sample_prompts=str(tmp_path / "prompts.txt"), sample_steps=2, sample_guidance=2.0, **FAST)
    image = np.asarray(Image.open(tmp_path / "run" / "samples" / "step-00000002" / "0.png"))
    assert image.shape == (16, 16, 3)  # the dataset's 8x8 latents x the VAE's factor 2


def original_layout(model) -> dict[str, torch.Tensor]:
    """The transformer's tensors in Z-Image's original names (ComfyUI's diffusion_models files): fused
    qkv, attention.out, q_norm/k_norm, x_embedder and final_layer without the patch key."""
    out = {}
    for key, tensor in model.state_dict().items():
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
        key = key.replace(".attention.norm_k.", ".attention.k_norm.")
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [model.state_dict()[key.replace(".attention.to_q.", f".attention.to_{p}.")] for p in "qkv"]
            key, tensor = key.replace(".attention.to_q.", ".attention.qkv."), torch.cat(parts)
        out[key] = tensor.contiguous()
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_in_the_original_layout(tmp_path, prefix):
    from safetensors.torch import save_file

    model = tiny_zimage()
    save_file({prefix + k: v for k, v in original_layout(model).items()}, str(tmp_path / "z.safetensors"))
    loaded = load_model(str(tmp_path / "z.safetensors"))
    assert loaded.family.name == "zimage" and loaded.kind == "single_file"
    assert loaded.scheduler_config["shift"] == 3.0
    config = loaded.denoiser.config
    assert (config.dim, config.n_layers, config.n_refiner_layers, config.n_heads, config.cap_feat_dim,
            list(config.axes_dims)) == (32, 1, 1, 2, CAP_DIM, [4, 6, 6])
    torch.testing.assert_close(denoiser_output(loaded.denoiser), denoiser_output(model))
