"""The latents dataset: formats, conditioning pairing, schema errors, and the step sampler."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import FAST, make_dataset

from trainer import train_lora
from trainer.data import LatentBatches, StepBatchSampler, TrainingData
from trainer.demo import build_demo_model
from trainer.errors import TrainerError
from trainer.models import get_family

SD = get_family("sd")


def training_data(latents, positive=None):
    return TrainingData(latents, positive, SD, build_demo_model())


@pytest.mark.unit
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


@pytest.mark.unit
def test_positive_with_one_row_is_repeated():
    ds = make_dataset(rows=4, with_embeds=False)
    embeds = torch.randn(1, 8, 32)
    data = training_data(ds, positive=embeds)
    batch = data.rows([0, 2, 3])
    assert torch.equal(batch["prompt_embeds"], embeds.expand(3, -1, -1))


@pytest.mark.unit
def test_positive_with_one_row_per_latent(tmp_path):
    from safetensors.torch import save_file

    ds = make_dataset(rows=4, with_embeds=False)
    embeds = torch.randn(4, 8, 32)
    save_file({"prompt_embeds": embeds}, str(tmp_path / "cond.safetensors"))
    data = training_data(ds, positive=str(tmp_path / "cond.safetensors"))
    assert torch.equal(data.rows([2, 0])["prompt_embeds"], embeds[[2, 0]])


@pytest.mark.unit
def test_positive_count_mismatch_names_both_counts():
    with pytest.raises(TrainerError, match="3 rows.*--latents has 4"):
        training_data(make_dataset(rows=4, with_embeds=False), positive=torch.randn(3, 8, 32))


@pytest.mark.unit
def test_missing_columns():
    with pytest.raises(TrainerError, match="no 'latents' column"):
        training_data(make_dataset().rename_column("latents", "x"))
    with pytest.raises(TrainerError, match="no 'prompt_embeds' column.*--positive"):
        training_data(make_dataset(with_embeds=False))


@pytest.mark.unit
def test_wrong_channels_and_wrong_embedding_width():
    with pytest.raises(TrainerError, match="8 channels but the model expects 4"):
        training_data(make_dataset(channels=8))
    with pytest.raises(TrainerError, match="cross_attention_dim is 32"):
        training_data(make_dataset(dim=48))


@pytest.mark.unit
def test_nan_row_is_named():
    ds = make_dataset(rows=6)

    def poison(row, index):
        if index == 4:
            row["latents"][0][1][1] = float("nan")
        return row

    bad = ds.map(poison, with_indices=True)
    with pytest.raises(TrainerError, match="'latents', row 4 holds NaN"):
        training_data(bad)


def mixed_shapes(shapes, seed=0):
    """A dataset whose rows have these latent shapes (nested lists: no fixed-shape feature fits)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"latents": [torch.randn(*s, generator=g).numpy() for s in shapes],
                              "prompt_embeds": [torch.randn(8, 32, generator=g).numpy() for _ in shapes]})


@pytest.mark.unit
def test_mixed_shapes_are_grouped_by_shape_and_never_mixed_in_a_batch():
    """Several latent shapes are buckets: each global batch (so each micro-batch) holds one shape."""
    shapes = [(4, 16, 16), (4, 8, 16), (4, 16, 16), (4, 8, 16), (4, 16, 16), (4, 16, 8)]
    data = training_data(mixed_shapes(shapes))
    assert [b.tolist() for b in data.buckets] == [[1, 3], [5], [0, 2, 4]]  # ordered by shape: 8x16, 16x8, 16x16
    sampler = StepBatchSampler(data.buckets, 1, 2, 1, seed=0, start_step=0, end_step=12)
    micro = list(sampler)
    for step in range(12):
        rows = [r for mb in micro[2 * step:2 * step + 2] for _, r in mb]
        assert len({shapes[r] for r in rows}) == 1 and len(set(rows)) == 2
        batch = LatentBatches(data, seed=0).__getitems__(micro[2 * step])
        assert batch["latents"].shape[0] == 1
    assert 5 not in {r for mb in micro for _, r in mb}  # its bucket cannot fill a global batch of 2


@pytest.mark.unit
def test_buckets_smaller_than_the_global_batch():
    data = training_data(mixed_shapes([(4, 16, 16)] * 2 + [(4, 8, 16)] * 3))
    with pytest.raises(TrainerError, match="larger than every group of rows with one latent shape"):
        StepBatchSampler(data.buckets, 4, 1, 1, seed=0, start_step=0, end_step=1)


@pytest.mark.unit
def test_mixed_channel_counts_are_an_error():
    with pytest.raises(TrainerError, match="row 1 has 8 latent channels but row 0 has 4"):
        training_data(mixed_shapes([(4, 16, 16), (8, 16, 16)]))


@pytest.mark.unit
@pytest.mark.parametrize("batch, procs, accum", [(2, 2, 1), (2, 1, 2), (1, 2, 2)])
def test_bucketed_sampler_does_not_depend_on_the_split(batch, procs, accum):
    buckets = [[0, 3, 6, 9, 12], [1, 4, 7, 10, 13, 2, 5], [8, 11, 14, 15]]
    reference = list(StepBatchSampler(buckets, 4, 1, 1, seed=5, start_step=0, end_step=9))
    micro = list(StepBatchSampler(buckets, batch, procs, accum, seed=5, start_step=0, end_step=9))
    per_step = procs * accum
    shape_of = {r: b for b, rows in enumerate(buckets) for r in rows}
    for step in range(9):
        keys = [k for mb in micro[step * per_step:(step + 1) * per_step] for k in mb]
        assert keys == reference[step]
        assert len({shape_of[r] for _, r in keys}) == 1


def test_bucketed_training_runs():
    ds = mixed_shapes([(4, 16, 16), (4, 8, 16)] * 3)
    result = train_lora("demo", ds, batch_size=2, **{**FAST, "steps": 3})
    assert len(result.loss["loss"]) == 3 and all(np.isfinite(result.loss["loss"]))


@pytest.mark.unit
def test_missing_path():
    with pytest.raises(TrainerError, match="--latents: no such file"):
        training_data("/no/such/dataset")


@pytest.mark.unit
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


@pytest.mark.unit
def test_sampler_reshuffles_each_epoch_and_resumes_mid_stream():
    whole = [k for mb in StepBatchSampler(8, 2, 1, 1, seed=0, start_step=0, end_step=8) for k in mb]
    epochs = [[r for _, r in whole[i:i + 8]] for i in (0, 8)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]
    tail = [k for mb in StepBatchSampler(8, 2, 1, 1, seed=0, start_step=5, end_step=8) for k in mb]
    assert tail == whole[10:]


def test_batch_larger_than_the_data_is_clamped_in_one_process(caplog, tmp_path):
    """As ComfyUI's node: batch_size 4 on 3 rows trains with batch 3 (with a warning), the same run as
    batch_size 3."""
    import json

    with caplog.at_level(logging.WARNING):
        clamped = train_lora("demo", make_dataset(rows=3), batch_size=4, output_dir=str(tmp_path), **FAST)
    assert "training with batch_size 3" in caplog.text
    same = train_lora("demo", make_dataset(rows=3), batch_size=3, **FAST)
    assert clamped.loss == same.loss
    from safetensors import safe_open

    with safe_open(str(clamped.lora_path), "pt") as f:
        assert json.loads(f.metadata()["trainer_config"])["batch_size"] == 3


def test_global_batch_larger_than_dataset_is_an_error():
    # accumulation: the optimizer step would need 2 x 2 different rows out of 3
    with pytest.raises(TrainerError, match="larger than the dataset"):
        train_lora("demo", make_dataset(rows=3), batch_size=2, grad_accumulation_steps=2, **FAST)


def test_several_processes_never_clamp():
    from trainer.data import fitted_batch_size

    assert fitted_batch_size(4, [[0, 1, 2]], num_processes=1) == 3
    assert fitted_batch_size(4, [[0, 1, 2]], num_processes=2) == 4  # the sampler then names the problem


@pytest.mark.unit
def test_rows_with_a_leading_batch_dimension_of_one_are_read_as_rows():
    """Latents saved as [1, C, H, W] and embeddings as [1, L, D] (encoder outputs as they come)."""
    from datasets import Dataset

    flat = make_dataset(rows=3)
    batched = Dataset.from_dict({"latents": [np.asarray(r)[None] for r in flat["latents"]],
                                 "prompt_embeds": [np.asarray(r)[None] for r in flat["prompt_embeds"]]})
    got, expected = training_data(batched).rows([2, 0]), training_data(flat).rows([2, 0])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_a_missing_dataset_fails_before_the_model_is_loaded(tmp_path):
    with pytest.raises(TrainerError, match="--latents: no such file"):
        train_lora(str(tmp_path / "no_model_here"), str(tmp_path / "no_data_here"), **FAST)


# ----------------------------------------------------------------------------- start-up cost (issue 16)


class Reads:
    """Counts what the start-up checks read: leaf values per column and nested-list shape scans."""

    def __init__(self, monkeypatch):
        import trainer.data as data_module

        self.values, self.shape_scans = {}, 0
        real_values, real_row_shapes = data_module.values, data_module.row_shapes

        def values(array, depth):
            flat = real_values(array, depth)
            self.values[depth] = self.values.get(depth, 0) + flat.size
            return flat

        def row_shapes(*args):
            self.shape_scans += 1
            return real_row_shapes(*args)

        monkeypatch.setattr(data_module, "values", values)
        monkeypatch.setattr(data_module, "row_shapes", row_shapes)
        monkeypatch.setattr(data_module, "UPFRONT_CHECK_BYTES", 0)  # as for a dataset too large to scan
        from datasets.formatting.np_formatter import NumpyFormatter

        def no_formatter(*_):
            raise AssertionError("the per-row numpy formatter was used at start-up")

        for name in ("format_row", "format_column", "format_batch"):
            monkeypatch.setattr(NumpyFormatter, name, no_formatter)


def bucketed(rows: int, with_shape_column: bool):
    """Nested-list latents of two shapes, optionally with lora-prepare's latent_shape column (the
    features lora-prepare writes)."""
    from datasets import Array2D, Dataset, Features, List, Value

    shapes = [(4, 8, 16) if i % 3 else (4, 16, 8) for i in range(rows)]
    g = torch.Generator().manual_seed(rows)
    columns = {"latents": [torch.randn(s, generator=g).half().numpy() for s in shapes],
               "prompt_embeds": [np.zeros((8, 32), np.float16)] * rows}
    features = {"latents": List(List(List(Value("float16")))), "prompt_embeds": Array2D((8, 32), "float16")}
    if with_shape_column:
        columns["latent_shape"] = [list(s) for s in shapes]
        features["latent_shape"] = List(Value("int32"), length=3)
    return Dataset.from_dict(columns, features=Features(features))


@pytest.mark.parametrize("kind", ["fixed", "shape_column", "nested"])
def test_startup_reads_do_not_grow_with_the_row_count(monkeypatch, kind):
    """Fixed shapes come from the schema and buckets from the shape column: no latent value is read at
    start-up, whatever the row count. Nested lists without it are scanned through their offsets, one
    vectorised pass per piece of rows (never the numpy formatter, never a row at a time)."""
    counts = []
    for rows in (30, 3000):
        reads = Reads(monkeypatch)
        ds = make_dataset(rows=rows, size=8) if kind == "fixed" else bucketed(rows, kind == "shape_column")
        data = training_data(ds)
        assert reads.values.get(3, 0) == 0  # latents (3 list levels) never read
        counts.append((reads.shape_scans, reads.values.get(2, 0)))
        if kind != "fixed":
            assert sorted(len(b) for b in data.buckets) == sorted([rows // 3, rows - rows // 3])
    assert counts[0] == counts[1] == ((0, 0) if kind != "nested" else (1, 0))


@pytest.mark.unit
def test_large_dataset_checks_nan_as_batches_are_read(monkeypatch):
    """Beyond UPFRONT_CHECK_BYTES, values are checked per batch, with the same message naming the row."""
    import trainer.data as data_module

    monkeypatch.setattr(data_module, "UPFRONT_CHECK_BYTES", 0)
    ds = make_dataset(rows=6)

    def poison(row, index):
        if index == 4:
            row["prompt_embeds"][2][3] = float("inf")
        return row

    data = training_data(ds.map(poison, with_indices=True))
    assert not data.checked_upfront
    data.rows([0, 5])
    with pytest.raises(TrainerError, match="'prompt_embeds', row 4 holds NaN or inf"):
        data.rows([1, 4])


@pytest.mark.unit
def test_shape_column_gives_the_same_buckets_and_a_wrong_one_is_caught():
    with_column, without = training_data(bucketed(12, True)), training_data(bucketed(12, False))
    assert [b.tolist() for b in with_column.buckets] == [b.tolist() for b in without.buckets]
    torch.testing.assert_close(with_column.rows([1, 2]), without.rows([1, 2]))
    lying = bucketed(12, True).map(lambda row: {"latent_shape": [4, 8, 16]})  # row 0 is 4x16x8
    data = training_data(lying)
    with pytest.raises(TrainerError, match="row 1 has shape .* but row 0 has"):
        data.rows([0, 1])


@pytest.mark.unit
def test_ragged_nested_rows_are_named():
    from datasets import Dataset

    good = np.zeros((4, 8, 8), np.float32).tolist()
    bad = [row[:] for row in good]
    bad[2] = bad[2][:7]  # channel 2 has 7 lines
    ds = Dataset.from_dict({"latents": [good, good, bad], "prompt_embeds": [np.zeros((8, 32))] * 3})
    with pytest.raises(TrainerError, match="'latents', row 2 is not a rectangular array"):
        training_data(ds)
