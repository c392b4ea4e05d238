"""One test per call of trainer/compat.py: each fails when the upstream behaviour the trainer relies on
changes (a renamed private method, a reworded error, a moved helper), so an upgrade names what broke."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from trainer import compat

pytestmark = pytest.mark.unit


def test_reset_single_process_state_lets_a_second_accelerator_choose_again():
    from accelerate import Accelerator

    compat.reset_single_process_state()  # an earlier test's state, if any
    first = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    assert first.mixed_precision == "bf16"
    assert compat.reset_single_process_state() is True
    second = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=1)
    assert second.mixed_precision == "no" and second.gradient_accumulation_steps == 1
    compat.reset_single_process_state()


def test_unwrap_takes_keep_torch_compile_and_returns_the_module():
    from accelerate import Accelerator

    compat.reset_single_process_state()
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    assert compat.unwrap(accelerator, accelerator.prepare(model)) is model
    assert "keep_torch_compile" in inspect.signature(accelerator.unwrap_model).parameters


def test_mark_peft_adapter_added_turns_on_diffusers_adapter_methods():
    from trainer.demo import build_demo_model

    model = build_demo_model()
    with pytest.raises(ValueError):  # diffusers: "No adapter loaded"
        model.disable_adapters()
    compat.mark_peft_adapter_added(model)
    model.disable_adapters()  # no adapter layers, nothing to do, but no refusal either


def _lora(model: nn.Module, targets: list[str], name: str = "a") -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), model, adapter_name=name)


def test_adapter_names_lists_the_layers_adapters():
    model = _lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["0"], name="mine")
    assert isinstance(model[0], compat.BaseTunerLayer)
    assert compat.adapter_names(model[0]) == ["mine"]


def test_is_no_target_error_recognises_peft_error_and_no_other():
    with pytest.raises(ValueError) as caught:
        _lora(nn.Sequential(nn.Linear(4, 4)), ["no_such_module"])
    assert compat.is_no_target_error(caught.value)
    assert not compat.is_no_target_error(ValueError("rank must be positive"))


def test_pattern_key_is_peft_suffix_match():
    assert compat.pattern_key({"attn1.to_q": 4}, "down.0.attn1.to_q") == "attn1.to_q"
    assert compat.pattern_key(["attn1.to_q"], "down.0.attn2.to_q") == "down.0.attn2.to_q"  # none: the name


@pytest.mark.parametrize("conv", [nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1, padding_mode="circular"),
                                  nn.Conv3d(2, 4, 1, groups=2)], ids=["1d-reflect", "2d-circular", "3d-groups"])
def test_conv_forward_applies_the_layers_own_settings(conv):
    x = torch.randn(1, 2, *([5] * (conv.weight.ndim - 2)))
    torch.testing.assert_close(compat.conv_forward(conv, x, conv.weight, conv.bias), conv(x))
    doubled = compat.conv_forward(conv, x, 2 * conv.weight, None)
    torch.testing.assert_close(doubled, 2 * (conv(x) - conv.bias.view(1, -1, *([1] * (x.ndim - 2)))))


def test_quantized_parts_are_the_inner_tensors_of_torchao_weights():
    pytest.importorskip("torchao", reason="the optional quant extra (torchao) is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Sequential(nn.Linear(64, 64, bias=False))
    quantize_(layer, Int8WeightOnlyConfig())
    parts = compat.quantized_parts(layer[0].weight)
    assert parts and all(type(p) is torch.Tensor for p in parts)
    assert torch.int8 in {p.dtype for p in parts}
    assert sum(p.numel() * p.element_size() for p in parts) < 64 * 64 * 4


def test_infer_single_file_type_tells_sd2_from_sd1():
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    assert compat.infer_single_file_type({key: torch.zeros(320, 768)}) == "v1"
    assert compat.infer_single_file_type({key: torch.zeros(320, 1024)}) == "v2"


def test_single_file_converter_renames_an_ldm_unet_back():
    from ldm import diffusers_to_ldm_state_dict

    from trainer.demo import build_demo_model

    unet = build_demo_model()
    convert = compat.single_file_converter(type(unet).__name__)
    converted = convert(config=dict(unet.config), checkpoint=diffusers_to_ldm_state_dict(unet))
    assert set(converted) == set(unet.state_dict())


def test_peft_tuner_extension_points_oft_uses():
    """DiagOFTModel (trainer/adapters/oft.py) overrides and calls these members of peft's BaseTuner."""
    from trainer.adapters.oft import DiagOFTConfig, DiagOFTModel

    params = list(inspect.signature(compat.BaseTuner._create_and_replace).parameters)
    assert params[:7] == ["self", "peft_config", "adapter_name", "target", "target_name", "parent", "current_key"]
    assert callable(compat.BaseTuner._replace_module) and callable(compat.check_adapters_to_merge)
    assert issubclass(DiagOFTConfig, compat.LycorisConfig) and compat.PeftType.OFT.value == "OFT"
    model = DiagOFTModel(nn.Sequential(nn.Linear(8, 8)), DiagOFTConfig(r=2, target_modules=["0"]), "default")
    assert type(model.model[0]).__name__ == "DiagOFTLayer"
