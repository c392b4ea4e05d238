"""--existing_lora end to end: the file's weights are the starting adapter, the step count continues."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, make_dataset, unet_inputs
from safetensors import safe_open
from safetensors.torch import save_file
from test_existing_lora import TO_LDM, comfy_node_output

from trainer import TrainerError, train_lora
from trainer.demo import build_demo_model

# one SGD step at the smallest learning rate: the continued model stays at its starting point
STILL = dict(FAST, steps=1, optimizer="SGD", learning_rate=1e-7)


def output(model):
    with torch.no_grad():
        return model(*unet_inputs()).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    return train_lora("demo", make_dataset(), output_dir=str(out), rank=4, alpha=2.0, learning_rate=0.02,
                      **dict(FAST, steps=3))


def test_continuing_our_file_starts_from_its_weights_and_adds_steps(trained, tmp_path):
    res = train_lora("demo", make_dataset(), existing_lora=str(trained.lora_path), output_dir=str(tmp_path),
                     rank=16, **STILL)
    torch.testing.assert_close(output(res.model_with_lora), output(trained.model_with_lora), atol=1e-5, rtol=1e-4)
    assert res.steps == 4 and res.loss["step"] == [4]
    with safe_open(str(res.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 4
    assert set(res.lora) == set(trained.lora)


def test_continuing_a_kohya_file_in_ldm_names_with_ss_steps(trained, tmp_path):
    """kohya/A1111-style file: real alpha tensors, ss_steps in the metadata, LDM module names."""
    prefix = "lora_unet_"
    state = {}
    for key, tensor in trained.lora.items():
        module, suffix = key[len(prefix):].split(".", 1)
        name = next(n for n in TO_LDM if n.replace(".", "_") == module)
        state[f"{prefix}{TO_LDM[name].replace('.', '_')}.{suffix}"] = tensor
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path), metadata={"ss_steps": "120", "ss_network_module": "networks.lora"})
    res = train_lora("demo", make_dataset(), existing_lora=str(path), **STILL)
    torch.testing.assert_close(output(res.model_with_lora), output(trained.model_with_lora), atol=1e-5, rtol=1e-4)
    assert res.steps == 121


def test_continuing_a_comfyui_node_file_keeps_its_full_offsets(tmp_path):
    """ComfyUI's node trains LoRA on every layer plus full offsets of norms and biases; continuing it starts
    from exactly the model ComfyUI would build, and the offsets are carried into the new file."""
    base = build_demo_model()
    path = tmp_path / "lora_300_steps_00001_.safetensors"
    save_file(comfy_node_output(base), str(path))
    res = train_lora("demo", make_dataset(), existing_lora=str(path), output_dir=str(tmp_path / "out"), **STILL)
    again = train_lora("demo", make_dataset(), existing_lora=str(res.lora_path), **STILL)
    assert res.steps == 301 and again.steps == 302
    assert any(k.endswith(".diff") for k in res.lora) and any(k.endswith(".diff_b") for k in res.lora)
    torch.testing.assert_close(output(again.model_with_lora), output(res.model_with_lora), atol=1e-4, rtol=1e-4)
    assert (output(res.model_with_lora) - output(base)).abs().max() > 1e-3


def test_unmatched_keys_are_an_error_not_a_fresh_start(trained, tmp_path):
    state = dict(trained.lora)
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(TrainerError, match="no_such_block"):
        train_lora("demo", make_dataset(), existing_lora=str(path), output_dir=str(tmp_path / "out"), **STILL)
    assert not (tmp_path / "out").exists()


def test_file_without_steps_counts_zero_with_a_warning(trained, tmp_path, caplog):
    path = tmp_path / "plain.safetensors"
    save_file(dict(trained.lora), str(path))
    res = train_lora("demo", make_dataset(), existing_lora=str(path), **STILL)
    assert res.steps == 1 and "no step count" in caplog.text


def test_continued_bf16_file_trains_in_bf16(trained, tmp_path):
    res = train_lora("demo", make_dataset(), existing_lora=str(trained.lora_path),
                     **dict(STILL, training_dtype="bf16", lora_dtype="bf16"))
    assert all(t.dtype == torch.bfloat16 for k, t in res.lora.items() if not k.endswith("alpha"))
    assert res.steps == 4
