"""Full-state checkpoints: exact resume, total limit, preemption by SIGTERM, NaN/inf stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_dataset

from trainer import TrainerError, train_lora

ROOT = Path(__file__).resolve().parents[1]
RESUME = dict(FAST, optimizer="AdamW", learning_rate=0.01, batch_size=2, steps=6)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    ds = make_dataset(rows=6)  # 3 steps per epoch: the resume crosses an epoch boundary
    whole = train_lora("demo", ds, output_dir=str(tmp_path / "whole"), **RESUME)
    part = dict(RESUME, steps=4, checkpointing_steps=2)
    train_lora("demo", ds, output_dir=str(tmp_path / "split"), **part)
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    resumed = train_lora("demo", ds, output_dir=str(tmp_path / "split"), resume_from_checkpoint="latest", **RESUME)
    assert resumed.steps == 6 and resumed.loss["step"] == [1, 2, 3, 4, 5, 6]
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=0)
    assert resumed.loss["loss"] == whole.loss["loss"]


def test_resume_from_an_explicit_path_and_extend_a_finished_run(tmp_path):
    ds = make_dataset(rows=6)
    whole = train_lora("demo", ds, output_dir=str(tmp_path / "whole"), **RESUME)
    train_lora("demo", ds, output_dir=str(tmp_path / "b"), **dict(RESUME, steps=3, checkpointing_steps=3))
    extended = train_lora("demo", ds, output_dir=str(tmp_path / "b"),
                          resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "step-00000003"), **RESUME)
    for key, value in whole.lora.items():
        torch.testing.assert_close(extended.lora[key], value, rtol=0, atol=0)


def test_checkpoints_total_limit_keeps_the_newest(tmp_path):
    train_lora("demo", make_dataset(), output_dir=str(tmp_path), checkpointing_steps=1, checkpoints_total_limit=2,
               **dict(FAST, steps=4))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    saved = (tmp_path / "checkpoints" / "step-00000004")
    assert json.loads((saved / "progress.json").read_text())["done"] == 4
    # only the adapter is saved, never the frozen model
    # (the demo UNet's weights take 3.2 MB in fp32; the rank-8 adapter on its 83 layers 0.63 MB)
    assert not list(saved.glob("model*.safetensors")) and (saved / "adapter.safetensors").stat().st_size < 800_000


def test_resume_latest_without_checkpoints_starts_fresh_and_bad_path_is_an_error(tmp_path):
    res = train_lora("demo", make_dataset(), output_dir=str(tmp_path), resume_from_checkpoint="latest", **FAST)
    assert res.steps == 2
    with pytest.raises(TrainerError, match="not a complete checkpoint"):
        train_lora("demo", make_dataset(), output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path), **FAST)


def test_nan_loss_stops_and_keeps_the_last_good_adapter(tmp_path):
    from safetensors import safe_open

    ds = make_dataset(rows=8)

    def explode(row, index):
        if index == 5:
            row["latents"] = [[[1e25] * 16] * 16] * 4  # finite data, but its squared error overflows fp32
        return row

    ds = ds.map(explode, with_indices=True)
    with pytest.raises(TrainerError, match=r"loss became (inf|nan) at step (\d+)") as err:
        train_lora("demo", ds, output_dir=str(tmp_path), **dict(FAST, steps=8, batch_size=1))
    bad_step = int(err.value.args[0].split(" at step ")[1].split(";")[0])
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert int(f.metadata()["ss_steps"]) == bad_step - 1
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert len(json.loads((tmp_path / "loss.json").read_text())["loss"]) == bad_step - 1


# SIGTERM in the default run, SIGINT (the same handler) with -m slow: the default run stays near 5 minutes
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_stop_signal_saves_and_exits_cleanly_then_resumes(tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(out), "--steps", "100000",
           "--training_dtype", "fp32", "--log_every", "1", "--checkpointing_steps", "20"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-00000020").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # a few steps past the checkpoint
        proc.send_signal(sig)
        started = time.time()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert time.time() - started < 30
    from safetensors import safe_open

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        steps = int(f.metadata()["ss_steps"])
    assert 20 < steps < 100000
    ckpt = out / "checkpoints" / f"step-{steps:08d}"
    assert json.loads((ckpt / "progress.json").read_text())["done"] == steps
    resumed = subprocess.run(cmd[:4] + ["--steps", str(steps + 2), "--training_dtype", "fp32",
                                        "--resume_from_checkpoint", "latest"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["steps"] == steps + 2
