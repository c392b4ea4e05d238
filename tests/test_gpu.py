"""CUDA runs (``python -m pytest -m gpu``): bf16 on the GPU, and the file still means the same thing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_pipeline, unet_inputs

from trainer import train_lora
from trainer.demo import build_demo_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_on_cuda_keeps_fp32_masters_and_a_loadable_file(tmp_path):
    res = train_lora("demo", make_dataset(), steps=4, training_dtype="bf16", lora_dtype="fp32", rank=4,
                     alpha=4.0, learning_rate=0.01, output_dir=str(tmp_path))
    params = dict(res.model_with_lora.named_parameters())
    assert all(p.device.type == "cuda" for p in params.values())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "lora_" in n)
    # frozen weights bf16; norm weights and biases (1-D) stay fp32
    assert all(p.dtype == (torch.bfloat16 if p.ndim >= 2 else torch.float32)
               for n, p in params.items() if "lora_" not in n)

    pipe = make_pipeline(build_demo_model())
    pipe.load_lora_weights(str(res.lora_path))
    x, t, c = unet_inputs()
    reference = res.model_with_lora.float()
    with torch.no_grad():
        expected = reference(x.cuda(), t.cuda(), c.cuda()).sample.cpu()
        loaded = pipe.unet(x, t, c).sample
    torch.testing.assert_close(loaded, expected, atol=1e-3, rtol=1e-3)
