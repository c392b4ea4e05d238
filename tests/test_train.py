"""The training run: every parameter reaches the loop, the objective's math, outputs, diffusers loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, make_dataset, make_pipeline, unet_inputs

from trainer import train_lora
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.demo import build_demo_model
from trainer.models import get_family

ROOT = Path(__file__).resolve().parents[1]


def run(**params):
    return train_lora("demo", make_dataset(), **{**FAST, **params})


def adapter_vector(result) -> torch.Tensor:
    return torch.cat([t.float().flatten() for k, t in sorted(result.lora.items()) if not k.endswith("alpha")])


def test_lora_file_loads_in_diffusers_with_the_same_effect(pipeline_dir, tmp_path):
    """The saved file, loaded by StableDiffusionPipeline.load_lora_weights, reproduces model_with_lora."""
    from diffusers import StableDiffusionPipeline

    res = train_lora(str(pipeline_dir), make_dataset(), rank=4, alpha=3.0, learning_rate=0.02,
                     output_dir=str(tmp_path / "out"), **{**FAST, "steps": 3})
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, text_encoder=None, tokenizer=None,
                                                   safety_checker=None, feature_extractor=None)
    pipe.load_lora_weights(str(res.lora_path))
    x, t, c = unet_inputs()
    with torch.no_grad():
        expected = res.model_with_lora(x, t, c).sample
        loaded = pipe.unet(x, t, c).sample
        base = build_demo_model()(x, t, c).sample
    assert (expected - base).abs().max() > 1e-3  # the adapter does something...
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies exactly it


def test_outputs_and_metadata(tmp_path):
    from safetensors import safe_open

    res = run(output_dir=str(tmp_path), output_name="mine", rank=4, alpha=2.5, steps=3)
    assert res.lora_path == tmp_path / "mine.safetensors"
    with safe_open(str(res.lora_path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_steps"] == "3" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.5"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_seed"] == "0"
    assert json.loads(meta["trainer_config"])["rank"] == 4
    assert keys == set(res.lora)
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert alphas and all(res.lora[k].item() == 2.5 for k in alphas)
    loss = json.loads((tmp_path / "loss.json").read_text())
    assert loss == {"loss": pytest.approx(res.loss["loss"]), "step": [1, 2, 3]}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 3 and result["lora"] == str(res.lora_path) and result["samples_per_second"] > 0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_library_call_writes_nothing_without_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run()
    assert res.lora_path is None and res.steps == 2 and not any(tmp_path.iterdir())


def test_seed_controls_everything():
    a, b, c = run(seed=5), run(seed=5), run(seed=6)
    assert torch.equal(adapter_vector(a), adapter_vector(b)) and a.loss == b.loss
    assert not torch.equal(adapter_vector(a), adapter_vector(c)) and a.loss != c.loss


def test_each_optimizer_reaches_the_loop():
    vectors = {name: adapter_vector(run(optimizer=name, learning_rate=0.01)) for name in
               ("AdamW", "Adam", "SGD", "RMSprop")}
    names = list(vectors)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not torch.allclose(vectors[x], vectors[y]), (x, y)


def test_dtypes():
    res = run(training_dtype="bf16", lora_dtype="bf16", steps=2)
    frozen = [p for n, p in res.model_with_lora.named_parameters() if "lora_" not in n]
    adapter = [p for n, p in res.model_with_lora.named_parameters() if "lora_" in n]
    # frozen weights in bf16; norm weights and biases (1-D) stay fp32, as autocast computes norms in fp32
    assert all(p.dtype == (torch.bfloat16 if p.ndim >= 2 else torch.float32) for p in frozen)
    assert all(p.dtype == torch.float32 for p in adapter)
    assert all(t.dtype == (torch.float32 if k.endswith("alpha") else torch.bfloat16) for k, t in res.lora.items())
    assert all(t.dtype == torch.float32 for t in run(lora_dtype="fp32").lora.values())


def test_tiny_updates_are_not_lost_to_bf16():
    """Adam moves lora_down by ~1e-6 per step, far below bf16's resolution at its magnitude: bf16 weights
    would not move at all; the fp32 masters do."""
    # the attention projections: their lora_down entries are large enough that no 3e-6 move crosses a bf16 step
    res = run(training_dtype="bf16", lora_dtype="bf16", optimizer="Adam", learning_rate=1e-6, steps=3,
              target_modules="attention")
    start = dict(run(steps=1, optimizer="Adam", learning_rate=1e-6,
                     target_modules="attention").model_with_lora.named_parameters())
    downs = {n: p.detach() for n, p in res.model_with_lora.named_parameters() if "lora_A" in n}
    moved = [n for n, p in downs.items() if not torch.equal(p, start[n])]
    assert moved
    assert all(torch.equal(downs[n].bfloat16(), start[n].detach().bfloat16()) for n in moved[:3])


def test_lora_dtype_changes_storage_not_training():
    a, b = run(lora_dtype="fp32", steps=3), run(lora_dtype="bf16", steps=3)
    for (na, pa), (nb, pb) in zip(a.model_with_lora.named_parameters(), b.model_with_lora.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_gradient_checkpointing_reaches_the_model():
    assert run(gradient_checkpointing=True).model_with_lora.is_gradient_checkpointing
    assert not run(gradient_checkpointing=False).model_with_lora.is_gradient_checkpointing


def test_accumulation_equals_a_bigger_batch():
    a = run(batch_size=2, grad_accumulation_steps=1, optimizer="SGD", learning_rate=0.05)
    b = run(batch_size=1, grad_accumulation_steps=2, optimizer="SGD", learning_rate=0.05)
    torch.testing.assert_close(adapter_vector(a), adapter_vector(b), atol=1e-6, rtol=1e-5)
    assert a.loss["loss"] == pytest.approx(b.loss["loss"], rel=1e-5)


def reference_first_loss(loss_function, prediction_type, objective, seed=0):
    """The step-1 loss computed independently: the adapter starts as a no-op (up = 0), so the model is
    the base model; the noise and timestep come from the data pipeline's per-sample draw."""
    model = build_demo_model()
    data = TrainingData(make_dataset(), None, get_family("sd"), model)
    keys = next(iter(StepBatchSampler(data.num_rows, 2, 1, 1, seed, 0, 1)))
    batch = LatentBatches(data, seed).__getitems__(keys)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    t = (batch["u"] * 1000).long()
    a = abar[t].view(-1, 1, 1, 1)
    x0, eps = batch["latents"], batch["noise"]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        out = model(xt, t, batch["prompt_embeds"]).sample
    if objective == "x0":
        pred = (xt - (1 - a).sqrt() * out) / a.sqrt() if prediction_type == "epsilon" else \
            a.sqrt() * xt - (1 - a).sqrt() * out
        target = x0
    else:
        pred, target = out, (eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0)
    fn = {"MSE": F.mse_loss, "L1": F.l1_loss, "Huber": F.huber_loss, "SmoothL1": F.smooth_l1_loss}[loss_function]
    return fn(pred, target).item()


@pytest.mark.parametrize("loss_function, prediction_type, objective", [
    ("MSE", "epsilon", "native"), ("L1", "epsilon", "native"), ("Huber", "v_prediction", "native"),
    ("SmoothL1", "epsilon", "x0"), ("MSE", "v_prediction", "x0"),
])
def test_first_loss_matches_an_independent_computation(loss_function, prediction_type, objective):
    res = run(loss_function=loss_function, prediction_type=prediction_type, objective=objective, steps=1,
              batch_size=2)
    assert res.loss["loss"][0] == pytest.approx(reference_first_loss(loss_function, prediction_type, objective),
                                                rel=1e-4)


def test_prediction_type_comes_from_the_pipeline_scheduler(tmp_path):
    from trainer.models import load_model

    make_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path / "v")
    assert load_model(str(tmp_path / "v")).prediction_type == "v_prediction"
    assert load_model(str(tmp_path / "v" / "unet")).prediction_type == "v_prediction"  # sibling scheduler/
    assert load_model(str(tmp_path / "v"), prediction_type="epsilon").prediction_type == "epsilon"


def test_pickle_checkpoint_is_refused(tmp_path):
    from trainer.errors import TrainerError

    (tmp_path / "model.ckpt").write_bytes(b"not even a pickle")
    with pytest.raises(TrainerError, match="pickle"):
        train_lora(str(tmp_path / "model.ckpt"), make_dataset(), **FAST)


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "output"
    assert {p.name for p in out.iterdir()} >= {"lora.safetensors", "loss.json", "loss.png", "result.json"}
    assert json.loads((out / "result.json").read_text())["steps"] == 16
    assert len(json.loads((out / "loss.json").read_text())["loss"]) == 16


def test_single_file_checkpoint_loads_with_its_config(tmp_path, pipeline_dir):
    """An original-layout (LDM) .safetensors checkpoint loads through diffusers' single-file loader."""
    from ldm import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    from trainer.models import load_model

    unet = build_demo_model()
    path = tmp_path / "model.safetensors"
    save_file(diffusers_to_ldm_state_dict(unet), str(path))
    loaded = load_model(str(path), model_config=str(pipeline_dir))
    assert loaded.kind == "single_file" and loaded.family.name == "sd"
    x, t, c = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, t, c).sample, unet(x, t, c).sample)
    res = train_lora(str(path), make_dataset(), model_config=str(pipeline_dir / "unet"), **FAST)
    assert res.steps == 2


def test_merged_model_is_a_pipeline_folder_with_the_same_effect(pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    res = train_lora(str(pipeline_dir), make_dataset(), rank=4, alpha=4.0, learning_rate=0.02,
                     output_dir=str(tmp_path), save_merged_model=True, **FAST)
    merged = tmp_path / "model_with_lora"
    assert (merged / "model_index.json").is_file() and (merged / "vae").is_dir()
    unet = UNet2DConditionModel.from_pretrained(merged / "unet")
    x, t, c = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, c).sample, res.model_with_lora(x, t, c).sample, atol=1e-5,
                                   rtol=1e-5)


def test_dataloader_workers_give_the_same_run():
    a, b = run(num_workers=0), run(num_workers=2)
    assert torch.equal(adapter_vector(a), adapter_vector(b)) and a.loss == b.loss


def test_single_file_checkpoint_that_does_not_fit_the_builtin_config(tmp_path):
    from ldm import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    from trainer.errors import TrainerError

    path = tmp_path / "tiny.safetensors"
    save_file(diffusers_to_ldm_state_dict(build_demo_model()), str(path))
    with pytest.raises(TrainerError, match="does not fit the built-in sd config.*--model_config"):
        train_lora(str(path), make_dataset(), **FAST)
