"""From a ``datasets`` dataset of latents to training batches.

- :func:`open_dataset` reads what ``--latents`` / ``--positive`` point at (a ``save_to_disk``
  folder, Parquet/Arrow files, a folder or glob of them, a ``.safetensors`` conditioning file, or
  an in-memory ``Dataset``); ``--streaming`` reads through :mod:`trainer.streaming` instead.
- :class:`TrainingData` checks the schema once up front (columns, shapes, channel count,
  conditioning count; NaN/inf too for small datasets, else batch by batch) without a Python step
  per row (:mod:`trainer.columns`), and fetches batches of rows through Arrow.
- :class:`StepBatchSampler` fixes which rows make each optimizer step's global batch, from the
  seed alone, so 1 process x batch 4, 2 processes x batch 2 and 1 process x batch 2 x 2
  accumulation steps see the same samples. Each sample also carries its *stream position*, from
  which its noise and timestep draw are derived: those are per sample, never per process.
- Rows whose latents differ in height/width (aspect-ratio buckets), or for video families
  (``latent_ndim`` 4, rows ``[C, T, H, W]``) in frames too, are always batched by shape: every
  global batch comes from one bucket, so shapes are never mixed in a batch.
"""

from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .columns import (
    batch_tensor,
    check_numeric,
    column_pieces,
    first_non_finite,
    list_depth,
    row_shapes,
    schema_shape,
    values,
)
from .errors import TrainerError
from .models.base import latent_layout

logger = logging.getLogger(__name__)

LATENTS = "latents"
#: a small column of per-row latent shapes ``[C, H, W]`` or ``[C, T, H, W]`` (written by ``lora-prepare`` for bucketed
#: data): bucket membership without reading the latents' nested lists
SHAPE_COLUMN = "latent_shape"
#: datasets up to this many bytes of numbers are checked for NaN/inf at start-up; larger ones batch
#: by batch as they are read (a whole-file scan would read every page of a large dataset)
UPFRONT_CHECK_BYTES = 64 << 20


# ----------------------------------------------------------------------------- reading


def open_dataset(source: Any, param: str):
    """Open a ``datasets.Dataset`` from a path, glob, ``"demo"`` or an in-memory dataset.

    ``param`` names the parameter in error messages (``--latents``, ``--positive``).
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _single_split(source, param)
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.IterableDataset):
        raise TrainerError(f"{param}: an IterableDataset is read with streaming=True (--streaming true)")
    if str(source) == "demo":
        from .demo import build_demo_dataset

        return build_demo_dataset()
    spec = str(source)
    path = Path(spec)
    files = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else []
    if not files and not path.exists():
        raise TrainerError(f"{param}: no such file or folder: {spec}")
    empty = TrainerError(f"{param}: the dataset {spec} has no rows")
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            if _saved_without_data(path):
                raise empty  # datasets itself fails on it with an IndexError
            ds = _single_split(datasets.load_from_disk(str(path)), param)
            if len(ds) == 0:
                raise empty
            return ds
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
            if not files:
                raise TrainerError(f"{param}: {spec} is not a save_to_disk folder and holds no .parquet or "
                                   ".arrow files")
        elif not files:
            files = [spec]
        suffixes = {Path(f).suffix for f in files}
        if len(suffixes) != 1 or suffixes.pop() not in (".parquet", ".arrow"):
            raise TrainerError(f"{param}: expected .parquet or .arrow files, got {', '.join(files[:3])}")
        if files[0].endswith(".parquet"):
            if _parquet_rows(files) == 0:
                raise empty  # datasets would say 'Instruction "train" corresponds to no data'
            # Parquet is compressed and encoded by pages, so rows cannot be read at random in place:
            # datasets converts the files once into its Arrow cache (with a progress bar, keyed by the
            # files' paths and times) and memory-maps that in every later run. Its conversion is bound
            # by Parquet decoding; a hand-written pyarrow conversion measured no faster. Data that
            # should not be copied is what --streaming is for.
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = _arrow_dataset(files)
        if len(ds) == 0:
            raise empty
        return ds
    except TrainerError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        raise TrainerError(f"{param}: cannot read {spec}: {type(e).__name__}: {e}") from None


def _saved_without_data(path: Path) -> bool:
    """Whether a ``save_to_disk`` folder of one split was saved from an empty dataset (no data files)."""
    import json

    state = path / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # let datasets report what is wrong with it


def _parquet_rows(files: list[str]) -> int:
    """Rows of Parquet files, from their footers (no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _arrow_dataset(files: list[str]):
    """Arrow files memory-mapped where they lie: no copy, whatever their size. Files in Arrow's IPC
    *file* format (Feather v2; ``datasets`` writes the stream format) go through ``load_dataset``."""
    import datasets

    try:
        parts = [datasets.Dataset.from_file(f) for f in files]
    except Exception:  # pyarrow: not an IPC stream
        return datasets.load_dataset("arrow", data_files=files, split="train")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _single_split(ds, param):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise TrainerError(f"{param}: the dataset has splits {list(ds)} and none is named 'train'")
    return ds


def open_conditioning(source: Any, param: str = "--positive") -> dict[str, torch.Tensor]:
    """Conditioning tables from a ``.safetensors`` file (tensors named like the columns), a dataset,
    a dict of tensors or a single ``prompt_embeds`` tensor.

    Returns column name -> fp32 tensor with the rows along the first dimension; a safetensors
    tensor without a row dimension is one row (the caller adds it, knowing each column's rank).
    """
    if isinstance(source, torch.Tensor):
        return {"prompt_embeds": source.float()}
    if isinstance(source, dict):
        return {k: torch.as_tensor(v).float() for k, v in source.items()}
    if isinstance(source, (str, Path)) and str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(source).is_file():
            raise TrainerError(f"{param}: no such file: {source}")
        try:
            return {k: v.float() for k, v in load_file(str(source)).items()}
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise TrainerError(f"{param}: cannot read {source}: {e}") from None
    ds = open_dataset(source, param).with_format("numpy")
    tables = {}
    for name in ds.column_names:
        try:
            tables[name] = torch.as_tensor(np.asarray(ds[name], dtype=np.float32))
        except (ValueError, TypeError):
            continue  # text or ragged columns (captions, file names) are not conditioning
    return tables


# ----------------------------------------------------------------------------- validation


@dataclass
class Column:
    """Where one conditioning column comes from: the latents dataset or a separate table."""

    name: str
    #: rows of a separate --positive table (None: the column lives in the latents dataset)
    table: torch.Tensor | None = None


class TrainingData:
    """The latents dataset with its conditioning, checked once, read by batches of row indices."""

    def __init__(self, latents, positive, family, model):
        self.family = family
        #: conditioning columns the family reads (required, then optional ones) -> dims per row
        self.column_ndims = {**family.conditioning, **family.optional_conditioning}
        self.dataset = open_dataset(latents, "--latents")
        if LATENTS not in self.dataset.column_names:
            raise TrainerError(f"--latents: the dataset has no '{LATENTS}' column "
                               f"(columns: {', '.join(self.dataset.column_names) or 'none'})")
        self.num_rows = len(self.dataset)
        if self.num_rows == 0:
            where = f" {latents}" if isinstance(latents, (str, Path)) else ""
            raise TrainerError(f"--latents: the dataset{where} has no rows")
        self.columns = self._conditioning_columns(positive)
        needed = [LATENTS] + [c.name for c in self.columns if c.table is None]
        # Arrow-formatted: a batch is an Arrow table of its rows, read without per-row objects
        self.table = self.dataset.select_columns(needed).with_format("arrow")
        schema = self.dataset.features.arrow_schema
        #: list levels of each dataset column, and its row shape when the column type fixes it
        self.depth = {name: check_numeric(name, schema.field(name).type, "--latents") for name in needed}
        self.fixed = {name: schema_shape(schema.field(name).type) for name in needed}
        shapes, groups = self._scan()
        #: row indices (int64 arrays, ascending) per latent shape (bucket), ordered by shape
        self.buckets: list[np.ndarray] = [groups[shape] for shape in sorted(groups)]
        self.latent_shape = shapes[LATENTS]
        channels = self.latent_shape[0]
        expected = family.latent_channels(model)
        if channels != expected:
            raise TrainerError(f"--latents: latents have {channels} channels but the model expects {expected} "
                               "(were they encoded with this model's VAE?)")
        conditioning_shapes = {c.name: shapes[c.name] for c in self.columns}
        for latent_shape in groups:  # every bucket must fit the model (e.g. Flux's 2x2 patches)
            family.check_conditioning(model, {LATENTS: latent_shape, **conditioning_shapes})

    def _conditioning_columns(self, positive) -> list[Column]:
        columns = []
        pos = open_conditioning(positive) if positive is not None else None
        for name, ndim in self.column_ndims.items():
            required = name in self.family.conditioning
            if pos is None or (not required and name not in pos):
                if name in self.dataset.column_names:
                    columns.append(Column(name))
                elif required:
                    raise TrainerError(f"--latents: the dataset has no '{name}' column, which this model needs; "
                                       "add it or pass --positive")
                continue
            if name not in pos:
                raise TrainerError(f"--positive: no '{name}' column (has: {', '.join(pos) or 'nothing numeric'})")
            table = pos[name]
            if table.ndim == ndim:
                table = table.unsqueeze(0)
            if len(table) not in (1, self.num_rows):
                raise TrainerError(f"--positive has {len(table)} rows but --latents has {self.num_rows}: "
                                   "give 1 row (used for every latent) or exactly one row per latent")
            if table.ndim != ndim + 1:
                raise TrainerError(f"--positive: '{name}' rows must have {ndim} dimensions, got shape "
                                   f"{tuple(table.shape[1:])}")
            _check_finite(table, f"--positive: column '{name}'", 0)
            columns.append(Column(name, table))
        return columns

    def _scan(self) -> tuple[dict[str, tuple[int, ...]], dict[tuple[int, ...], np.ndarray]]:
        """One shape per conditioning column, latents of one channel count, NaN/inf-free values.

        Nothing here runs per row in Python: shapes come from the column types where they are fixed,
        else from a ``latent_shape`` column (``lora-prepare`` writes one) or the nested lists' offsets,
        vectorised. Values are checked up front when the dataset is small (``UPFRONT_CHECK_BYTES``);
        beyond that every batch is checked as it is read, with the same message naming the row.
        Returns the shapes (the first latent shape) and the rows of each latent shape."""
        shapes: dict[str, tuple[int, ...]] = {c.name: tuple(c.table.shape[1:]) for c in self.columns
                                              if c.table is not None}
        latent_dims = self._latent_dims()
        groups = _group_rows(latent_dims, self.num_rows)
        for c in self.columns:
            if c.table is None:
                shapes[c.name] = self._uniform_shape(c.name)
        # rows saved with a leading batch dimension of 1 (a VAE's or text encoder's output as it
        # comes, e.g. [1, 4, 64, 64]) are read as the row itself
        self.squeezed: set[str] = set()
        ndim = self.family.latent_ndim
        #: whether image rows [C, H, W] are read as 1-frame clips [C, 1, H, W] (a video family)
        self.single_frame = False
        if all(len(shape) == ndim + 1 and shape[0] == 1 for shape in groups):
            groups = {shape[1:]: rows for shape, rows in groups.items()}
            self.squeezed.add(LATENTS)
        elif ndim == 4 and all(len(shape) == 3 for shape in groups):
            groups = {(shape[0], 1, *shape[1:]): rows for shape, rows in groups.items()}
            self.single_frame = True
        #: shape of each dataset conditioning column as stored (before squeezing)
        self.stored_shapes = {c.name: shapes[c.name] for c in self.columns if c.table is None}
        for c in self.columns:
            shape = shapes[c.name]
            if c.table is None and len(shape) == self.column_ndims[c.name] + 1 and shape[0] == 1:
                shapes[c.name] = shape[1:]
                self.squeezed.add(c.name)
        first = min(groups, key=lambda shape: groups[shape][0])  # the shape of row 0
        shapes[LATENTS] = first
        for shape, rows in groups.items():
            if len(shape) != ndim:
                raise TrainerError(f"--latents: latents must be {latent_layout(ndim)} per row for "
                                   f"{self.family.name}, got shape {shape} in row {rows[0]}")
            if shape[0] != first[0]:
                raise TrainerError(f"--latents: row {rows[0]} has {shape[0]} latent channels but row 0 has "
                                   f"{first[0]}: every row must come from the same VAE")
        if len(groups) > 1:
            sizes = ", ".join(f"{'x'.join(map(str, s))}: {len(r)} rows" for s, r in sorted(groups.items()))
            logger.info("latents come in %d shapes (buckets): %s; each batch holds one shape", len(groups), sizes)
        for c in self.columns:
            want = self.column_ndims[c.name]
            if len(shapes[c.name]) != want:
                raise TrainerError(f"'{c.name}' rows must have {want} dimensions, got shape {shapes[c.name]}")
        self.checked_upfront = self._value_bytes(latent_dims) <= UPFRONT_CHECK_BYTES
        if self.checked_upfront:
            self._check_values(latent_dims)
        return shapes, groups

    def _latent_dims(self) -> np.ndarray | tuple[int, ...]:
        """The latent shape of every row ``[rows, dims]``, or one shape when the column type fixes it."""
        fixed, depth = self.fixed[LATENTS], self.depth[LATENTS]
        if fixed is not None:
            return fixed
        where = f"--latents: column '{LATENTS}'"
        if SHAPE_COLUMN in self.dataset.column_names:
            shape_type = self.dataset.features.arrow_schema.field(SHAPE_COLUMN).type
            if list_depth(shape_type)[0] == 1:
                shape_table = self.dataset.select_columns([SHAPE_COLUMN]).with_format("arrow")
                dims = np.concatenate([values(chunk, 1) for _, chunk in
                                       column_pieces(shape_table, SHAPE_COLUMN, self.num_rows)])
                if dims.size == self.num_rows * depth:
                    return dims.reshape(self.num_rows, depth).astype(np.int64)
                logger.warning("--latents: ignoring the '%s' column: it does not hold %d numbers per row",
                               SHAPE_COLUMN, depth)
        return np.concatenate([row_shapes(chunk, depth, start, where)
                               for start, chunk in column_pieces(self.table, LATENTS, self.num_rows)])

    def _uniform_shape(self, name: str) -> tuple[int, ...]:
        """The one shape of a conditioning column of the dataset (an error names the first row that differs)."""
        if self.fixed[name] is not None:
            return self.fixed[name]
        shape = None
        for start, chunk in column_pieces(self.table, name, self.num_rows):
            dims = row_shapes(chunk, self.depth[name], start, f"--latents: column '{name}'")
            shape = tuple(int(d) for d in dims[0]) if shape is None else shape
            other = np.flatnonzero((dims != shape).any(axis=1))
            if len(other):
                i = int(other[0])
                raise TrainerError(f"--latents: column '{name}', row {start + i} has shape "
                                   f"{tuple(int(d) for d in dims[i])} but earlier rows have {shape}: "
                                   "conditioning must have one shape in every row")
        return shape

    def _value_bytes(self, latent_dims) -> int:
        """Bytes of numbers in the dataset's columns (latents and conditioning)."""
        schema = self.dataset.features.arrow_schema
        total = 0
        for name in self.depth:
            itemsize = list_depth(schema.field(name).type)[1].bit_width // 8
            if name == LATENTS and not isinstance(latent_dims, tuple):
                count = int(latent_dims.prod(axis=1).sum())
            else:
                count = self.num_rows * math.prod(latent_dims if name == LATENTS else self.stored_shapes[name])
            total += count * itemsize
        return total

    def _check_values(self, latent_dims) -> None:
        """NaN/inf over whole columns, a piece at a time (only for datasets within ``UPFRONT_CHECK_BYTES``)."""
        for name, depth in self.depth.items():
            where = f"--latents: column '{name}'"
            for start, chunk in column_pieces(self.table, name, self.num_rows):
                flat = values(chunk, depth)
                if name != LATENTS or isinstance(latent_dims, tuple):
                    per_row = math.prod(latent_dims if name == LATENTS else self.stored_shapes[name])
                    bad = first_non_finite(flat, per_row)
                else:  # rows of several sizes: find the row from the running value counts
                    ends = np.cumsum(latent_dims[start:start + len(chunk)].prod(axis=1))
                    bad = first_non_finite(flat, 1)
                    bad = None if bad is None else int(np.searchsorted(ends, bad, side="right"))
                if bad is not None:
                    raise TrainerError(f"{where}, row {start + bad} holds NaN or inf values")

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Latents and conditioning of these rows (of one latent shape), stacked, in fp32 on the CPU.
        Raises TrainerError naming a row with NaN/inf values or of another shape."""
        batch = self.table[indices]
        out = {LATENTS: batch_tensor(batch[LATENTS], self.depth[LATENTS], self.fixed[LATENTS], indices,
                                     f"--latents: column '{LATENTS}'")}
        for c in self.columns:
            if c.table is None:
                out[c.name] = batch_tensor(batch[c.name], self.depth[c.name], self.stored_shapes[c.name],
                                           indices, f"--latents: column '{c.name}'")
            else:
                rows = torch.as_tensor(indices) if len(c.table) > 1 else torch.zeros(len(indices), dtype=torch.long)
                out[c.name] = c.table[rows]
        for name in self.squeezed:
            out[name] = out[name].squeeze(1)
        if self.single_frame:
            out[LATENTS] = out[LATENTS].unsqueeze(2)  # [B, C, H, W] -> [B, C, 1, H, W]
        return out


def _group_rows(dims: np.ndarray | tuple[int, ...], num_rows: int) -> dict[tuple[int, ...], np.ndarray]:
    """Row indices per shape, from one fixed shape or the shapes of all rows ``[rows, dims]``
    (np.unique over one int64 key per row: vectorised, no Python step per row)."""
    if isinstance(dims, tuple):
        return {dims: np.arange(num_rows, dtype=np.int64)}
    if (dims == dims[0]).all():
        return {tuple(int(d) for d in dims[0]): np.arange(num_rows, dtype=np.int64)}
    sizes = dims.max(axis=0) + 1
    if math.prod(int(s) for s in sizes) >= 2**62:
        raise TrainerError(f"--latents: latent shapes up to {tuple(int(s) - 1 for s in sizes)} are too large")
    keys = np.ravel_multi_index(tuple(dims.T), tuple(int(s) for s in sizes))
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by shape, ascending within each
    cuts = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
    return {tuple(int(d) for d in dims[i]): rows for i, rows in zip(first, np.split(order, cuts))}


def _check_finite(rows, where: str, start: int) -> None:
    for i, row in enumerate(rows):
        if not np.isfinite(np.asarray(row, dtype=np.float32)).all():
            raise TrainerError(f"{where}, row {start + i} holds NaN or inf values")


# ----------------------------------------------------------------------------- batching


def mix_seed(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): independent seeds for epochs and samples."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def fitted_batch_size(batch_size: int, buckets: list[list[int]], num_processes: int) -> int:
    """``batch_size``, lowered to the number of rows (of the largest latent shape) with a warning when
    it is larger, as ComfyUI's node clamps it to the number of latents. Only for one process: with
    several, each must get different rows, and the sampler's error says what to change."""
    rows = max(len(bucket) for bucket in buckets)
    if num_processes > 1 or batch_size <= rows:
        return batch_size
    logger.warning("batch_size %d is larger than the %d rows %s; training with batch_size %d (as ComfyUI's node "
                   "does)", batch_size, rows, "of the dataset" if len(buckets) == 1 else "of its largest latent "
                   "shape", rows)
    return rows


class StepBatchSampler:
    """Micro-batches of ``(stream position, row)`` pairs in global order.

    The stream is the concatenation of per-epoch permutations of the rows (seeded by ``seed`` and
    the epoch), each cut to a whole number of global batches, so no row appears twice in one
    optimizer step; the rows cut off differ from epoch to epoch. Step ``s`` owns stream positions
    ``s*G .. (s+1)*G - 1`` with ``G = batch_size * num_processes * accumulation``, split into
    ``accumulation * num_processes`` consecutive micro-batches. Accelerate's ``BatchSamplerShard``
    hands micro-batch ``k`` to process ``k % num_processes``, which is the layout assumed here.

    ``rows`` is the row count, or the row indices of each bucket (rows of one latent shape). With
    several buckets each epoch permutes every bucket, cuts it into whole global batches and shuffles
    the order of all those batches: every global batch, hence every micro-batch on every process,
    holds one shape, and the stream does not depend on how G is split. A bucket with fewer rows
    than G is left out (with a warning); one bucket behaves exactly as a plain row count.
    """

    drop_last = True

    def __init__(self, rows: int | list, batch_size: int, num_processes: int, accumulation: int,
                 seed: int, start_step: int, end_step: int):
        self.batch_size = batch_size
        self.global_batch = batch_size * num_processes * accumulation
        self.micro_per_step = num_processes * accumulation
        # numpy row arrays: a million rows are one array, not a million Python ints
        buckets = [None] if isinstance(rows, int) else [np.asarray(b, dtype=np.int64) for b in rows]
        sizes = [rows] if isinstance(rows, int) else [len(b) for b in buckets]
        self.num_rows = sum(sizes)
        split = (f"the global batch (batch_size {batch_size} x {num_processes} processes x "
                 f"grad_accumulation_steps {accumulation} = {self.global_batch})")
        if len(buckets) == 1 and self.global_batch > self.num_rows:
            raise TrainerError(f"{split} is larger than the dataset ({self.num_rows} rows); lower batch_size "
                               "or grad_accumulation_steps")
        #: (bucket number, rows or None for 0..n-1, row count) of the buckets that fill a global batch
        self.buckets = [(b, rows, n) for b, (rows, n) in enumerate(zip(buckets, sizes)) if n >= self.global_batch]
        if not self.buckets:
            raise TrainerError(f"{split} is larger than every group of rows with one latent shape (bucket "
                               f"sizes {', '.join(map(str, sizes))}); lower batch_size or "
                               "grad_accumulation_steps, or prepare the images at fewer aspect ratios")
        if len(self.buckets) < len(buckets):
            left_out = [n for n in sizes if n < self.global_batch]
            logger.warning("%d rows in %d latent shape(s) are never trained on: each has fewer rows than %s",
                           sum(left_out), len(left_out), split)
        G = self.global_batch
        self.epoch_length = sum(n // G for _, _, n in self.buckets) * G
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.micro_per_step

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return int(self._order[offset])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The rows of one epoch in stream order (only the first ``epoch_length`` are used); numpy
        throughout, so a million-row epoch costs milliseconds."""
        def permuted(rows, n, *key):
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch, *key))
            order = torch.randperm(n, generator=g).numpy()
            return order if rows is None else rows[order]

        if len(self.buckets) == 1:
            _, rows, n = self.buckets[0]
            return permuted(rows, n)
        G = self.global_batch
        batches = np.concatenate([permuted(rows, n, b)[:n // G * G].reshape(-1, G) for b, rows, n in self.buckets])
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0xB0C7, epoch))
        return batches[torch.randperm(len(batches), generator=g).numpy()].reshape(-1)

    def __iter__(self):
        first = self.start_step * self.global_batch
        for micro in range(len(self)):
            start = first + micro * self.batch_size
            yield [(q, self.row(q)) for q in range(start, start + self.batch_size)]


class LatentBatches(torch.utils.data.Dataset):
    """Map-style view that turns ``(position, row)`` keys into a collated training batch.

    Besides the rows' tensors, each batch carries per-sample Gaussian ``noise`` (latent-shaped) and
    a uniform draw ``u`` in [0, 1) for the timestep, both from a generator seeded by ``seed`` and
    the sample's stream position.
    """

    def __init__(self, data: TrainingData, seed: int):
        self.data = data
        self.seed = seed

    def __len__(self):
        return self.data.num_rows

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        batch = self.data.rows([row for _, row in keys])
        batch.update(sample_draws([position for position, _ in keys], batch[LATENTS].shape[1:], self.seed))
        return batch

    def __getitem__(self, key):
        return self.__getitems__([key])


def sample_draws(positions, shape, seed: int) -> dict[str, torch.Tensor]:
    """Per-sample Gaussian ``noise`` of ``shape`` and a uniform ``u`` in [0, 1), each from a generator
    seeded by ``seed`` and the sample's stream position."""
    noise, u = [], []
    for position in positions:
        g = torch.Generator().manual_seed(mix_seed(seed, position))
        noise.append(torch.randn(shape, generator=g))
        u.append(torch.rand((), generator=g))
    return {"noise": torch.stack(noise), "u": torch.stack(u)}


def _collated(batch):
    return batch  # LatentBatches.__getitems__ already returns the collated batch


def build_dataloader(data: TrainingData, sampler: StepBatchSampler, seed: int, num_workers: int):
    return torch.utils.data.DataLoader(
        LatentBatches(data, seed),
        batch_sampler=sampler,
        collate_fn=_collated,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
