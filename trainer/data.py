"""From a ``datasets`` dataset of latents to training batches.

- :func:`open_dataset` reads what ``--latents`` / ``--positive`` point at (a ``save_to_disk``
  folder, Parquet/Arrow files, a folder or glob of them, a ``.safetensors`` conditioning file, or
  an in-memory ``Dataset``).
- :class:`TrainingData` checks the schema once up front (columns, shapes, channel count, NaN/inf,
  conditioning count) and fetches batches of rows.
- :class:`StepBatchSampler` fixes which rows make each optimizer step's global batch, from the
  seed alone, so 1 process x batch 4, 2 processes x batch 2 and 1 process x batch 2 x 2
  accumulation steps see the same samples. Each sample also carries its *stream position*, from
  which its noise and timestep draw are derived: those are per sample, never per process.
- Rows whose latents differ in height/width (aspect-ratio buckets) are always batched by shape:
  every global batch comes from one bucket, so shapes are never mixed in a batch.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainerError

logger = logging.getLogger(__name__)

LATENTS = "latents"
_SCAN_CHUNK = 256  # rows per read while validating


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
    if str(source) == "demo":
        from .demo import build_demo_dataset

        return build_demo_dataset()
    spec = str(source)
    path = Path(spec)
    files = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else []
    if not files and not path.exists():
        raise TrainerError(f"{param}: no such file or folder: {spec}")
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            return _single_split(datasets.load_from_disk(str(path)), param)
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
        builder = "parquet" if files[0].endswith(".parquet") else "arrow"
        return datasets.load_dataset(builder, data_files=files, split="train")
    except TrainerError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        raise TrainerError(f"{param}: cannot read {spec}: {type(e).__name__}: {e}") from None


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
            raise TrainerError("--latents: the dataset has no rows")
        self.columns = self._conditioning_columns(positive)
        needed = [LATENTS] + [c.name for c in self.columns if c.table is None]
        self.table = self.dataset.select_columns(needed).with_format("numpy")
        shapes, groups = self._scan()
        #: row indices per latent shape (bucket), ordered by shape
        self.buckets: list[list[int]] = [groups[shape] for shape in sorted(groups)]
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

    def _scan(self) -> tuple[dict[str, tuple[int, ...]], dict[tuple[int, ...], list[int]]]:
        """Read every row once: all values finite, one shape per conditioning column, latents of one
        channel count. Returns the shapes (the first latent shape) and the rows of each latent shape."""
        shapes: dict[str, tuple[int, ...]] = {c.name: tuple(c.table.shape[1:]) for c in self.columns
                                              if c.table is not None}
        groups: dict[tuple[int, ...], list[int]] = {}
        names = self.table.column_names
        for start in range(0, self.num_rows, _SCAN_CHUNK):
            chunk = self.table[start:start + _SCAN_CHUNK]
            for name in names:
                rows = _as_rows(chunk[name], name, start)
                if name == LATENTS:
                    _group_by_shape(rows, start, groups)
                    _check_finite(rows, f"--latents: column '{name}'", start)
                    continue
                for i, row in enumerate(rows):
                    where = f"--latents: column '{name}', row {start + i}"
                    shape = tuple(row.shape)
                    if name not in shapes:
                        shapes[name] = shape
                    elif shapes[name] != shape:
                        raise TrainerError(f"{where} has shape {shape} but earlier rows have {shapes[name]}: "
                                           "conditioning must have one shape in every row")
                _check_finite(rows, f"--latents: column '{name}'", start)
        # rows saved with a leading batch dimension of 1 (a VAE's or text encoder's output as it
        # comes, e.g. [1, 4, 64, 64]) are read as the row itself
        self.squeezed: set[str] = set()
        if all(len(shape) == 4 and shape[0] == 1 for shape in groups):
            groups = {shape[1:]: rows for shape, rows in groups.items()}
            self.squeezed.add(LATENTS)
        for c in self.columns:
            shape = shapes[c.name]
            if c.table is None and len(shape) == self.column_ndims[c.name] + 1 and shape[0] == 1:
                shapes[c.name] = shape[1:]
                self.squeezed.add(c.name)
        shapes[LATENTS] = next(iter(groups))
        for shape, rows in groups.items():
            if len(shape) != 3:
                raise TrainerError(f"--latents: latents must be [C, H, W] per row, got shape {shape} in row "
                                   f"{rows[0]}")
            if shape[0] != shapes[LATENTS][0]:
                raise TrainerError(f"--latents: row {rows[0]} has {shape[0]} latent channels but row 0 has "
                                   f"{shapes[LATENTS][0]}: every row must come from the same VAE")
        if len(groups) > 1:
            sizes = ", ".join(f"{'x'.join(map(str, s))}: {len(r)} rows" for s, r in sorted(groups.items()))
            logger.info("latents come in %d shapes (buckets): %s; each batch holds one shape", len(groups), sizes)
        for c in self.columns:
            want = self.column_ndims[c.name]
            if len(shapes[c.name]) != want:
                raise TrainerError(f"'{c.name}' rows must have {want} dimensions, got shape {shapes[c.name]}")
        return shapes, groups

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Latents and conditioning of these rows, stacked, in fp32 on the CPU."""
        batch = self.table[indices]
        out = {LATENTS: _stack(batch[LATENTS])}
        for c in self.columns:
            if c.table is None:
                out[c.name] = _stack(batch[c.name])
            else:
                rows = torch.as_tensor(indices) if len(c.table) > 1 else torch.zeros(len(indices), dtype=torch.long)
                out[c.name] = c.table[rows]
        for name in self.squeezed:
            out[name] = out[name].squeeze(1)
        return out


def _as_rows(values, name: str, start: int) -> list[np.ndarray] | np.ndarray:
    """A chunk of one column as an array [rows, ...] or, for ragged data, a list of arrays."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        if not np.issubdtype(values.dtype, np.number):
            raise TrainerError(f"--latents: column '{name}' is not numeric (dtype {values.dtype})")
        return values
    rows = []
    for i, v in enumerate(values):
        try:
            rows.append(np.asarray(v if not isinstance(v, np.ndarray) or v.dtype != object else np.stack(v),
                                   dtype=np.float32))
        except (ValueError, TypeError):
            raise TrainerError(f"--latents: column '{name}', row {start + i} is not a numeric array") from None
    return rows


def _group_by_shape(rows, start: int, groups: dict[tuple[int, ...], list[int]]) -> None:
    if isinstance(rows, np.ndarray):  # a fixed-shape chunk: one shape for all of it
        groups.setdefault(tuple(rows.shape[1:]), []).extend(range(start, start + len(rows)))
        return
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row.shape), []).append(start + i)


def _check_finite(rows, where: str, start: int) -> None:
    for i, row in enumerate(rows):
        if not np.isfinite(np.asarray(row, dtype=np.float32)).all():
            raise TrainerError(f"{where}, row {start + i} holds NaN or inf values")


def _stack(values) -> torch.Tensor:
    if isinstance(values, np.ndarray) and values.dtype != object:
        return torch.from_numpy(values).float()
    return torch.stack([torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in values])


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

    def __init__(self, rows: int | list[list[int]], batch_size: int, num_processes: int, accumulation: int,
                 seed: int, start_step: int, end_step: int):
        self.batch_size = batch_size
        self.global_batch = batch_size * num_processes * accumulation
        self.micro_per_step = num_processes * accumulation
        buckets = [list(range(rows))] if isinstance(rows, int) else [list(b) for b in rows]
        self.num_rows = sum(len(b) for b in buckets)
        split = (f"the global batch (batch_size {batch_size} x {num_processes} processes x "
                 f"grad_accumulation_steps {accumulation} = {self.global_batch})")
        if len(buckets) == 1 and self.global_batch > self.num_rows:
            raise TrainerError(f"{split} is larger than the dataset ({self.num_rows} rows); lower batch_size "
                               "or grad_accumulation_steps")
        #: (bucket number, rows) of the buckets that fill at least one global batch
        self.buckets = [(b, rows) for b, rows in enumerate(buckets) if len(rows) >= self.global_batch]
        if not self.buckets:
            raise TrainerError(f"{split} is larger than every group of rows with one latent shape (bucket "
                               f"sizes {', '.join(str(len(b)) for b in buckets)}); lower batch_size or "
                               "grad_accumulation_steps, or prepare the images at fewer aspect ratios")
        if len(self.buckets) < len(buckets):
            left_out = [len(b) for b in buckets if len(b) < self.global_batch]
            logger.warning("%d rows in %d latent shape(s) are never trained on: each has fewer rows than %s",
                           sum(left_out), len(left_out), split)
        G = self.global_batch
        self.epoch_length = sum(len(rows) // G for _, rows in self.buckets) * G
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
        return self._order[offset]

    def _epoch_order(self, epoch: int) -> list[int]:
        """The rows of one epoch in stream order (only the first ``epoch_length`` are used)."""
        if len(self.buckets) == 1:
            rows = self.buckets[0][1]
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
            return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        G, batches = self.global_batch, []
        for b, rows in self.buckets:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch, b))
            permuted = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
            batches += [permuted[k:k + G] for k in range(0, len(permuted) - G + 1, G)]
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0xB0C7, epoch))
        return [row for k in torch.randperm(len(batches), generator=g).tolist() for row in batches[k]]

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
        shape = batch[LATENTS].shape[1:]
        noise, u = [], []
        for position, _ in keys:
            g = torch.Generator().manual_seed(mix_seed(self.seed, position))
            noise.append(torch.randn(shape, generator=g))
            u.append(torch.rand((), generator=g))
        batch["noise"] = torch.stack(noise)
        batch["u"] = torch.stack(u)
        return batch

    def __getitem__(self, key):
        return self.__getitems__([key])


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
