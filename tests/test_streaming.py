"""--streaming: a datasets IterableDataset split between processes, a seeded block shuffle buffer,
buckets, and exact resume for a given process count (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset

from trainer import TrainerError, train_lora
from trainer.data import LATENTS
from trainer.demo import build_demo_model
from trainer.models import get_family
from trainer.streaming import StreamData, StreamingBatches

STREAM = dict(FAST, streaming=True, shuffle_buffer=4, batch_size=2, learning_rate=0.01)


def batches(source, world=1, rank=0, steps=6, accumulation=1, buffer=4, start=0, state=None):
    data = StreamData(source, None, get_family("sd"), build_demo_model())
    stream = StreamingBatches(data, 2, rank, world, accumulation, seed=0, buffer=buffer, start_step=start,
                              end_step=steps)
    if state is not None:
        stream.state = state
    return stream, list(stream)


@pytest.mark.unit
def test_every_row_once_per_epoch_per_process_and_processes_disjoint(tmp_path):
    ds = make_dataset(rows=16)
    ds.save_to_disk(str(tmp_path / "saved"))
    seen = []
    for rank in (0, 1):
        _, got = batches(str(tmp_path / "saved"), world=2, rank=rank, steps=4, buffer=8)
        rows = torch.cat([b[LATENTS] for b in got])  # 4 steps x 2 = one epoch of this process's 8 rows
        seen.append({tuple(r.flatten()[:4].tolist()) for r in rows})
        assert len(seen[-1]) == 8
    assert not seen[0] & seen[1]


@pytest.mark.unit
def test_parquet_files_stream_and_the_order_depends_on_the_seed_only(tmp_path):
    ds = make_dataset(rows=12)
    for i in range(2):
        ds.shard(2, i).to_parquet(str(tmp_path / f"part-{i}.parquet"))
    _, one = batches(str(tmp_path / "*.parquet"))
    _, two = batches(str(tmp_path / "*.parquet"))
    for a, b in zip(one, two):
        for key in a:
            assert torch.equal(a[key], b[key])
    in_order = torch.stack([torch.as_tensor(np.asarray(r)) for r in ds.with_format("numpy")["latents"][:4]])
    assert not torch.equal(torch.cat([b[LATENTS] for b in one[:2]]), in_order)  # shuffled


@pytest.mark.unit
def test_state_resumes_exactly_mid_block():
    """Blocks of 6 rows hold 3 batches of 2: stopping after 2, 3 or 4 batches leaves the stream mid-block,
    at a block boundary, and mid-block of the next one; a resume from the saved state continues exactly."""
    ds = make_dataset(rows=10)
    _, whole = batches(ds, steps=7, buffer=6)  # crosses an epoch boundary (10 rows: blocks of 6 and 4)
    for split in (2, 3, 4):
        head, got_head = batches(ds, steps=split, buffer=6)
        _, tail = batches(ds, steps=7, buffer=6, start=split, state=dict(head.state))
        for a, b in zip(got_head + tail, whole):
            for key in a:
                assert torch.equal(a[key], b[key]), (split, key)


@pytest.mark.unit
def test_buckets_never_mix_in_a_batch():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 16, 16), (4, 8, 16)] * 6
    ds = Dataset.from_dict({"latents": [torch.randn(*s, generator=g).numpy() for s in shapes],
                            "prompt_embeds": [torch.randn(8, 32, generator=g).numpy() for _ in shapes]})
    _, got = batches(ds, steps=8, buffer=6)
    assert {tuple(b[LATENTS].shape[2:]) for b in got} == {(16, 16), (8, 16)}


def test_streaming_training_resumes_exactly(tmp_path):
    ds = make_dataset(rows=10)
    whole = train_lora("demo", ds, output_dir=str(tmp_path / "whole"), **dict(STREAM, steps=6))
    train_lora("demo", ds, output_dir=str(tmp_path / "split"), **dict(STREAM, steps=3, checkpointing_steps=3))
    assert (tmp_path / "split" / "checkpoints" / "step-00000003" / "stream-state-0.json").is_file()
    resumed = train_lora("demo", ds, output_dir=str(tmp_path / "split"), resume_from_checkpoint="latest",
                         **dict(STREAM, steps=6))
    assert resumed.loss["loss"] == whole.loss["loss"]
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=0)


def test_streaming_errors():
    with pytest.raises(TrainerError, match="8 channels but the model expects 4"):
        StreamData(make_dataset(channels=8), None, get_family("sd"), build_demo_model())
    with pytest.raises(TrainerError, match="with --streaming it must hold 1 row"):
        StreamData(make_dataset(rows=4, with_embeds=False), torch.randn(4, 8, 32), get_family("sd"),
                   build_demo_model())
    bad = make_dataset(rows=4).map(lambda row, i: {"latents": np.full((4, 16, 16), np.nan) if i == 3
                                                   else row["latents"]}, with_indices=True)
    with pytest.raises(TrainerError, match="holds NaN or inf"):
        batches(bad, steps=2)


@pytest.mark.slow
def test_two_process_streaming_resumes_exactly(tmp_path):
    """Each process saves its own stream position; a 2-process resume equals the uninterrupted run."""
    import subprocess

    from safetensors.torch import load_file
    from test_distributed import ENV, cpu_processes, launch_command

    ds_path = tmp_path / "latents"
    make_dataset(rows=12, seed=3).save_to_disk(str(ds_path))
    params = dict(streaming="true", shuffle_buffer=4, batch_size=1)

    def launch(out, **extra):
        proc = subprocess.run(launch_command(cpu_processes(2), out, ds_path, **{**params, **extra}),
                              capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "whole", steps=6)
    launch(tmp_path / "split", steps=3, checkpointing_steps=3)
    saved = tmp_path / "split" / "checkpoints" / "step-00000003"
    assert (saved / "stream-state-0.json").is_file() and (saved / "stream-state-1.json").is_file()
    launch(tmp_path / "split", steps=6, resume_from_checkpoint="latest")
    whole, resumed = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("whole", "split"))
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_an_iterable_dataset_needs_streaming():
    with pytest.raises(TrainerError, match="streaming=True"):
        train_lora("demo", make_dataset(rows=4).to_iterable_dataset(), **FAST)
