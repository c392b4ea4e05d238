"""Regenerate docs/sample-grid.png and docs/loss.png (README, "Watching a run").

The built-in demo has no VAE or text encoder, so this wraps the demo UNet in the tiny offline
pipeline of the tests (random tiny VAE and CLIP: the pictures show the layout, not a subject) and
trains it on the demo latents with sample prompts and a held-out quarter of the rows:

    PYTHONPATH=.:tests python docs/make_watch_figures.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from test_prepare import write_tiny_pipeline

from trainer import train_lora

DOCS = Path(__file__).parent
PROMPTS = ["demo concept one", "a red square --n blurry --d 7", "sks dog on a beach --g 3", "a blue circle"]

with tempfile.TemporaryDirectory() as tmp:
    pipeline = write_tiny_pipeline(Path(tmp) / "tiny-sd")
    out = Path(tmp) / "out"
    train_lora(str(pipeline), "demo", output_dir=str(out), steps=60, alpha=None, learning_rate=0.002,
               sample_prompts=PROMPTS, sample_every=30, eval_fraction=0.25, eval_every=5, log_every=5)
    shutil.copy(out / "samples" / "step-00000060" / "grid.png", DOCS / "sample-grid.png")
    shutil.copy(out / "loss.png", DOCS / "loss.png")
