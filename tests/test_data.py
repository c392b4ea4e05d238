"""The latents dataset: formats, conditioning pairing, schema errors, and the step sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset

from trainer import train_lora
from trainer.data import StepBatchSampler, TrainingData
from trainer.demo import build_demo_model
from trainer.errors import TrainerError
from trainer.models import get_family

SD = get_family("sd")


def training_data(latents, positive=None):
    return TrainingData(latents, positive, SD, build_demo_model())


def test_save_to_disk_parquet_and_nested_lists_read_the_same(tmp_path):
    ds = make_dataset(rows=4)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    nested = make_dataset(rows=4, fixed_shape=False)
    expected = training_data(ds).rows([0, 3])
    for source in (str(tmp_path / "saved"), str(tmp_path / "parquet"), str(tmp_path / "parquet" / "*.parquet"),
                   nested):
        got = training_data(source).rows([0, 3])
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])


def test_positive_with_one_row_is_repeated():
    ds = make_dataset(rows=4, with_embeds=False)
    embeds = torch.randn(1, 8, 32)
    data = training_data(ds, positive=embeds)
    batch = data.rows([0, 2, 3])
    assert torch.equal(batch["prompt_embeds"], embeds.expand(3, -1, -1))


def test_positive_with_one_row_per_latent(tmp_path):
    from safetensors.torch import save_file

    ds = make_dataset(rows=4, with_embeds=False)
    embeds = torch.randn(4, 8, 32)
    save_file({"prompt_embeds": embeds}, str(tmp_path / "cond.safetensors"))
    data = training_data(ds, positive=str(tmp_path / "cond.safetensors"))
    assert torch.equal(data.rows([2, 0])["prompt_embeds"], embeds[[2, 0]])


def test_positive_count_mismatch_names_both_counts():
    with pytest.raises(TrainerError, match="3 rows.*--latents has 4"):
        training_data(make_dataset(rows=4, with_embeds=False), positive=torch.randn(3, 8, 32))


def test_missing_columns():
    with pytest.raises(TrainerError, match="no 'latents' column"):
        training_data(make_dataset().rename_column("latents", "x"))
    with pytest.raises(TrainerError, match="no 'prompt_embeds' column.*--positive"):
        training_data(make_dataset(with_embeds=False))


def test_wrong_channels_and_wrong_embedding_width():
    with pytest.raises(TrainerError, match="8 channels but the model expects 4"):
        training_data(make_dataset(channels=8))
    with pytest.raises(TrainerError, match="cross_attention_dim is 32"):
        training_data(make_dataset(dim=48))


def test_nan_row_is_named():
    ds = make_dataset(rows=6)

    def poison(row, index):
        if index == 4:
            row["latents"][0][1][1] = float("nan")
        return row

    bad = ds.map(poison, with_indices=True)
    with pytest.raises(TrainerError, match="'latents', row 4 holds NaN"):
        training_data(bad)


def test_mixed_shapes_without_buckets_is_an_error():
    from datasets import Dataset

    rows = [np.zeros((4, 16, 16), np.float32), np.zeros((4, 8, 16), np.float32)]
    ds = Dataset.from_dict({"latents": [r.tolist() for r in rows],
                            "prompt_embeds": [np.zeros((8, 32), np.float32).tolist()] * 2})
    with pytest.raises(TrainerError, match="row 1 has shape .* bucketing"):
        training_data(ds)


def test_missing_path():
    with pytest.raises(TrainerError, match="--latents: no such file"):
        training_data("/no/such/dataset")


@pytest.mark.parametrize("batch, procs, accum", [(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)])
def test_sampler_global_batches_do_not_depend_on_the_split(batch, procs, accum):
    """Each step's global batch is the same set of (position, row) pairs, rows never repeat within a step."""
    reference = list(StepBatchSampler(10, 4, 1, 1, seed=3, start_step=0, end_step=6))
    sampler = StepBatchSampler(10, batch, procs, accum, seed=3, start_step=0, end_step=6)
    micro = list(sampler)
    assert len(micro) == 6 * procs * accum
    per_step = procs * accum
    for step in range(6):
        keys = [k for mb in micro[step * per_step:(step + 1) * per_step] for k in mb]
        assert keys == reference[step]
        rows = [r for _, r in keys]
        assert len(set(rows)) == len(rows)


def test_sampler_reshuffles_each_epoch_and_resumes_mid_stream():
    whole = [k for mb in StepBatchSampler(8, 2, 1, 1, seed=0, start_step=0, end_step=8) for k in mb]
    epochs = [[r for _, r in whole[i:i + 8]] for i in (0, 8)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]
    tail = [k for mb in StepBatchSampler(8, 2, 1, 1, seed=0, start_step=5, end_step=8) for k in mb]
    assert tail == whole[10:]


def test_global_batch_larger_than_dataset_is_an_error():
    with pytest.raises(TrainerError, match="larger than the dataset"):
        train_lora("demo", make_dataset(rows=3), batch_size=4, **FAST)
