"""Trainer against a bare peft loop, made comparable: both run in fresh processes, interleaved
(bare, trainer, trainer, bare, ...), several times, on several model widths and batch sizes, and
the spread of the ratios is reported next to the median.

The trainer's step time is the difference of two ``train.py`` runs of different lengths, each timed
by its own training loop (``result.json``: from the first batch to the last step), so process
start, imports, model loading and the first (warm-up) steps cancel out; the bare loop times its
steps after the same number of warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE = r"""
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import run
args = argparse.Namespace(**json.loads(sys.argv[2]))
print(json.dumps({"step": run.bare_loop_step_time(Path(sys.argv[3]), Path(sys.argv[4]), args)}))
"""


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def bare_step(unet_dir: Path, data_dir: Path, args) -> float:
    proc = subprocess.run([sys.executable, "-c", BARE, str(ROOT / "bench"), json.dumps(vars(args)), str(unet_dir),
                           str(data_dir)], check=True, capture_output=True, text=True, env=_env(), cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])["step"]


def trainer_step(unet_dir: Path, data_dir: Path, out: Path, args) -> float:
    def loop_seconds(steps: int) -> float:
        folder = out / f"run{steps}"
        cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(unet_dir), "--latents", str(data_dir),
               "--steps", str(steps), "--batch_size", str(args.batch_size), "--rank", str(args.rank),
               "--alpha", str(args.rank), "--training_dtype", args.dtype, "--lora_dtype", args.dtype,
               "--gradient_checkpointing", str(args.gradient_checkpointing).lower(),
               "--target_modules", ",".join(args.targets), "--output_dir", str(folder), "--log_every", "10"]
        subprocess.run(cmd, check=True, capture_output=True, env=_env(), cwd=ROOT)
        result = json.loads((folder / "result.json").read_text())
        return steps * args.batch_size / result["samples_per_second"]

    short, long = args.warmup, args.warmup + args.steps
    return (loop_seconds(long) - loop_seconds(short)) / (long - short)


def section(args, tmp: Path, make_fixture, table) -> tuple[str, float]:
    """The overhead table over ``args.overhead_shapes`` (width x batch); returns it and the trainer's
    median s/step on the first shape (for the data section's headroom)."""
    rows, first = [], None
    for width, batch in args.overhead_shapes:
        sub = argparse.Namespace(**{**vars(args), "width": width, "batch_size": batch,
                                    "rows": max(args.rows, batch)})
        folder = tmp / f"overhead-{width}-{batch}"
        folder.mkdir()
        unet_dir, data_dir = make_fixture(folder, sub)
        bare, ours = [], []
        for repeat in range(args.repeats):
            # alternate which goes first, so a drift in machine load does not favour one side
            order = ("bare", "trainer") if repeat % 2 == 0 else ("trainer", "bare")
            for which in order:
                started = time.perf_counter()
                if which == "bare":
                    bare.append(bare_step(unet_dir, data_dir, sub))
                else:
                    ours.append(trainer_step(unet_dir, data_dir, folder / f"r{repeat}", sub))
                print(f"overhead width {width} batch {batch} repeat {repeat}: {which} "
                      f"{(bare if which == 'bare' else ours)[-1]:.3f} s/step ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        ratios = [b / o for b, o in zip(bare, ours)]
        first = statistics.median(ours) if first is None else first
        rows.append([f"{width}", f"{batch}", f"{statistics.median(bare):.3f}", f"{statistics.median(ours):.3f}",
                     f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}-{max(ratios):.3f}", f"{args.repeats}"])
    title = (f"Overhead: trainer vs bare peft loop (s/step; latents {args.resolution}x{args.resolution}, "
             f"{args.dtype}, rank {args.rank}, attention LoRA; interleaved runs in fresh processes)")
    text = table(title, ["UNet width", "batch", "bare loop", "train.py", "speed ratio (median)",
                         "ratio min-max", "repeats"], rows)
    return text, first
