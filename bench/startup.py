"""Start-up against dataset size: time to the first batch and its parts, RSS, and per-step cost, for
``save_to_disk``, Parquet and bucketed (nested-list) datasets of 1k to 1M rows.

    python bench/run.py --startup                       # 1k, 100k, 1M rows (builds ~7 GB in a temp folder)
    python bench/run.py --startup --startup_rows 1000 100000 --no_record
    python bench/run.py --startup --before /work/main   # the same measurements with another checkout

Each measurement runs in a fresh process (imports included), in ``setup()``'s order: imports, dataset
open, model load, data checks (``TrainingData``), sampler and first batch. The per-step cost is the
training loop's own (``result.json``) of a short ``train.py`` run on the demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("save_to_disk", "parquet", "bucketed", "bucketed+shape")
#: the demo model's inputs: 4x16x16 fp16 latents (bucketed: also 4x16x8), 8x32 prompt embeddings
LATENT, OTHER_SHAPE, EMBEDS = (4, 16, 16), (4, 16, 8), (8, 32)
PIECE = 1 << 16  # rows generated and written at a time (bounded memory while building)

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import trainer.loop  # everything a training run imports
from trainer.data import StepBatchSampler, TrainingData, build_dataloader, open_dataset
from trainer.models import load_model
t1 = time.perf_counter()
ds = open_dataset(sys.argv[1], "--latents")
t2 = time.perf_counter()
loaded = load_model("demo")
t3 = time.perf_counter()
data = TrainingData(ds, None, loaded.family, loaded.denoiser)
t4 = time.perf_counter()
buckets = getattr(data, "buckets", None)
sampler = StepBatchSampler(buckets, 2, 1, 1, 0, 0, 100000)
batches = iter(build_dataloader(data, sampler, 0, 0))
next(batches)
t5 = time.perf_counter()
for _ in range(200):  # random access at this dataset size: what a training step waits for
    next(batches)
t6 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
mib = lambda key: int(status[key].split()[0]) / 1024
print(json.dumps({"imports": t1 - t0, "open": t2 - t1, "model": t3 - t2, "checks": t4 - t3,
                  "sampler": t5 - t4, "batch_ms": (t6 - t5) / 200 * 1000, "rss": mib("VmRSS"),
                  "hwm": mib("VmHWM")}))
"""


def _features(kind: str):
    from datasets import Array2D, Array3D, Features, List, Value

    columns = {"latents": Array3D(LATENT, "float16") if kind in ("save_to_disk", "parquet")
               else List(List(List(Value("float16")))),
               "prompt_embeds": Array2D(EMBEDS, "float16")}
    if kind == "bucketed+shape":
        columns["latent_shape"] = List(Value("int32"), length=3)
    return Features(columns)


def _nested(values: np.ndarray):
    """A [rows, a, b, c] array as Arrow lists of lists of lists (zero-copy offsets arithmetic)."""
    import pyarrow as pa

    rows, a, b, c = values.shape
    array = pa.array(values.reshape(-1))
    for count, size in ((rows * a * b, c), (rows * a, b), (rows, a)):
        array = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * size), array)
    return array


def _piece(kind: str, start: int, n: int, rng, schema):
    import pyarrow as pa

    embeds = rng.standard_normal((n, *EMBEDS), dtype=np.float32).astype(np.float16)
    if kind in ("save_to_disk", "parquet"):
        latents = rng.standard_normal((n, *LATENT), dtype=np.float32).astype(np.float16)
        latent_array = pa.ExtensionArray.from_storage(schema.field("latents").type, _nested(latents))
        shapes = None
    else:  # every third row is 4x16x8: two buckets, stored as nested lists
        wide = (np.arange(start, start + n) % 3) != 0
        parts = []
        for mask, shape in ((wide, LATENT), (~wide, OTHER_SHAPE)):
            values = rng.standard_normal((int(mask.sum()), *shape), dtype=np.float32).astype(np.float16)
            parts.append((np.flatnonzero(mask), _nested(values)))
        order = np.argsort(np.concatenate([idx for idx, _ in parts]), kind="stable")
        latent_array = pa.concat_arrays([arr for _, arr in parts]).take(pa.array(order))
        shapes = np.where(wide[:, None], LATENT, OTHER_SHAPE).astype(np.int32)
    columns = [latent_array,
               pa.ExtensionArray.from_storage(schema.field("prompt_embeds").type, _nested(embeds[:, None])
                                              .flatten())]
    if shapes is not None and "latent_shape" in schema.names:
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(shapes.reshape(-1)), 3))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def build(kind: str, rows: int, folder: Path) -> tuple[Path, float]:
    """Write a ``rows``-row dataset of ``kind`` under ``folder``; returns (path, seconds to build)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    features = _features(kind)
    schema = features.arrow_schema
    rng = np.random.default_rng(rows)
    stream = folder / f"{kind}-{rows}.stream.arrow"
    parquet = folder / f"{kind}-{rows}" / "part-0.parquet"
    if kind == "parquet":
        parquet.parent.mkdir(parents=True)
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        pq_writer = pq.ParquetWriter(str(parquet), schema) if kind == "parquet" else None
        for start in range(0, rows, PIECE):
            batch = _piece(kind, start, min(PIECE, rows - start), rng, schema)
            if pq_writer is not None:
                pq_writer.write_batch(batch, row_group_size=1000)  # datasets' to_parquet row groups
            else:
                writer.write_batch(batch)
        if pq_writer is not None:
            pq_writer.close()
    if kind == "parquet":
        stream.unlink()
        return parquet.parent, time.perf_counter() - started
    path = folder / f"{kind}-{rows}"
    datasets.Dataset.from_file(str(stream)).save_to_disk(str(path))
    stream.unlink()
    return path, time.perf_counter() - started


def _env(pythonpath: Path, tmp: Path) -> dict:
    # datasets' cache (where Parquet is converted) inside the temp folder: removed with it
    return {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf_cache")}


def phases(path: Path, pythonpath: Path, tmp: Path) -> dict:
    env = _env(pythonpath, tmp)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PHASES, str(path)], capture_output=True, text=True, env=env,
                          cwd=pythonpath)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["total"] = wall
    return result


def step_seconds(path: Path, out: Path, pythonpath: Path, steps: int, tmp: Path) -> float:
    """Seconds per step of the training loop (``result.json``) on the demo model, batch 2."""
    env = _env(pythonpath, tmp)
    cmd = [sys.executable, str(pythonpath / "train.py"), "--latents", str(path), "--steps", str(steps),
           "--batch_size", "2", "--training_dtype", "fp32", "--gradient_checkpointing", "false",
           "--output_dir", str(out), "--log_every", str(steps)]
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=pythonpath)
    return 2 / json.loads((out / "result.json").read_text())["samples_per_second"]


def run(args) -> str:
    """Build each kind at each size, measure, and return the markdown section."""
    from run import table  # bench/run.py's table format

    checkouts = [("after", ROOT)] + ([("before", Path(args.before).resolve())] if args.before else [])
    rows_out, builds = [], []
    with tempfile.TemporaryDirectory(dir=args.startup_dir) as tmp:
        tmp = Path(tmp)
        for kind in args.startup_kinds:
            for n in args.startup_rows:
                path, seconds = build(kind, n, tmp)
                builds.append(f"{kind} {n:,} rows: {seconds:.0f} s")
                for label, checkout in checkouts:
                    if label == "before" and n > args.before_max_rows:
                        continue
                    try:
                        p = phases(path, checkout, tmp)
                    except RuntimeError as e:
                        rows_out.append([kind, f"{n:,}", label, f"failed: {str(e).splitlines()[-1][:80]}"]
                                        + [""] * 9)
                        continue
                    step = step_seconds(path, tmp / f"run-{kind}-{n}-{label}", checkout, args.startup_steps, tmp) \
                        if args.startup_steps else float("nan")
                    rows_out.append([kind, f"{n:,}", label, f"{p['total']:.1f}", f"{p['imports']:.1f}",
                                     f"{p['open']:.2f}", f"{p['model']:.2f}", f"{p['checks']:.2f}",
                                     f"{p['sampler']:.2f}", f"{p['batch_ms']:.2f}", f"{p['rss']:.0f}",
                                     f"{p['hwm']:.0f}",
                                     f"{step * 1000:.0f}"])
                    print(" | ".join(rows_out[-1]), flush=True)
                for leftover in tmp.glob(f"{kind}-{n}*"):
                    subprocess.run(["rm", "-rf", str(leftover)], check=True)
                subprocess.run(["rm", "-rf", str(tmp / "hf_cache")], check=True)  # Parquet conversions
    header = ["dataset", "rows", "code", "start-up s (process)", "imports s", "open s", "model s", "checks s",
              "sampler + 1st batch s", "data ms/batch", "RSS MiB", "peak RSS MiB", "ms/step (train.py)"]
    note = ("Start-up = a fresh process until the first batch is in hand (interpreter, imports, dataset open, "
            "model load, data checks, sampler and first batch). data ms/batch: the next 200 batches of 2 random rows "
            "alone (the data pipeline's share of a step). RSS after that point. ms/step from result.json "
            f"of a {args.startup_steps}-step train.py run (demo model, batch 2, fp32). Building the datasets "
            "(random fp16 values, pyarrow writer, then save_to_disk): " + "; ".join(builds) + ".\n")
    return table("Start-up against dataset size", header, rows_out) + "\n" + note
