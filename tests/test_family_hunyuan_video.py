"""HunyuanVideo: detection, training on 5-D latents with a text mask and pooled embeddings, the diffusers
round trip, continuing our own file, the scheduler's shift and the guidance input."""

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
