"""Longer runs (``python -m pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, make_dataset

from trainer import train_lora

pytestmark = pytest.mark.slow


def test_compiled_training_matches_eager():
    """--compile (torch.compile through accelerate) trains the same adapter as eager mode (SGD: Adam's
    sign-like first steps would turn float-rounding differences of near-zero gradients into full steps)."""
    run = dict(FAST, steps=3, learning_rate=0.05, optimizer="SGD")
    eager = train_lora("demo", make_dataset(), **run)
    compiled = train_lora("demo", make_dataset(), compile=True, **run)
    assert compiled.loss["loss"] == pytest.approx(eager.loss["loss"], rel=1e-3)
    for key, value in eager.lora.items():
        torch.testing.assert_close(compiled.lora[key], value, atol=1e-4, rtol=1e-3)
