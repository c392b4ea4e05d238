"""``--streaming``: training batches read from a ``datasets`` IterableDataset, for data that does not
fit one disk (local files or any URL or Hub dataset ``datasets`` can stream).

- Each process reads its own part of the stream: ``datasets.distributed.split_dataset_by_node``
  (whole shards per process when the shard count divides by the process count, else every
  ``world_size``-th example).
- Shuffling is a seeded block buffer: ``shuffle_buffer`` examples are read, permuted with a seed from
  ``(seed, process, epoch, block)``, grouped into batches of one latent shape (leftovers of a shape
  that do not fill a batch are dropped), and served. Why not ``IterableDataset.shuffle``: its buffer
  is not part of ``state_dict()``, so a resumed run would not see the same batches; here the state is
  the stream's ``state_dict()`` at the start of the current block plus the batches already served
  from it, and a resume re-reads only that block.
- The stream repeats (epoch after epoch) until the run's steps are done, so every process always has
  a batch for every step.

Kept and lost against the map-style path: resume is exact for the same process count (same batches,
noise and timesteps). Results do not carry over between process counts or batch splits: which
examples share a batch depends on each process's part of the stream.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .columns import batch_tensor, check_numeric, row_shapes, schema_shape
from .data import LATENTS, mix_seed, open_conditioning, sample_draws
from .errors import TrainerError
from .models.base import latent_layout
from .outputs import write_json

logger = logging.getLogger(__name__)

STATE_FILE = "stream-state-{rank}.json"


def open_stream(source: Any, param: str = "--latents"):
    """A ``datasets.IterableDataset`` for a path, glob, URL or Hub dataset name (or an in-memory dataset)."""
    import glob

    import datasets

    if isinstance(source, datasets.IterableDataset):
        return source
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset(num_shards=min(len(source), 64) or 1)
    spec = str(source)
    if spec == "demo":
        from .demo import build_demo_dataset

        return open_stream(build_demo_dataset(), param)
    path = Path(spec)
    suffix = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            from .data import _single_split

            ds = _single_split(datasets.load_from_disk(spec), param)
            # contiguous row ranges as shards: whole shards go to each process
            return ds.to_iterable_dataset(num_shards=min(len(ds), 64) or 1)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
        elif "://" in spec or path.exists() or any(c in spec for c in "*?["):
            files = sorted(glob.glob(spec)) if "://" not in spec and any(c in spec for c in "*?[") else [spec]
        else:  # a Hub dataset name (user/name)
            return datasets.load_dataset(spec, split="train", streaming=True)
        if not files:
            raise TrainerError(f"{param}: no .parquet or .arrow files in {spec}")
        builder = suffix.get(Path(files[0].split("?")[0]).suffix)
        if builder is None:
            raise TrainerError(f"{param}: cannot stream {files[0]}: expected .parquet, .arrow or .jsonl files")
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    except TrainerError:
        raise
    except Exception as e:  # datasets/fsspec raise many types for unreachable or unreadable sources
        raise TrainerError(f"{param}: cannot stream {spec}: {type(e).__name__}: {e}") from None


class StreamData:
    """The stream's columns and shapes, checked against the model on its first example.

    Every batch is checked as it is read (shapes, NaN/inf): a stream cannot be scanned up front."""

    def __init__(self, latents, positive, family, model):
        self.family = family
        self.column_ndims = {**family.conditioning, **family.optional_conditioning}
        stream = open_stream(latents, "--latents")
        first = next(iter(stream.with_format("arrow")), None)
        if first is None:
            raise TrainerError("--latents: the stream has no rows")
        names = first.column_names
        if LATENTS not in names:
            raise TrainerError(f"--latents: the dataset has no '{LATENTS}' column (columns: {', '.join(names)})")
        pos = open_conditioning(positive) if positive is not None else None
        #: conditioning read from a 1-row --positive table: column -> [1, ...] tensor
        self.tables: dict[str, torch.Tensor] = {}
        for name, ndim in self.column_ndims.items():
            required = name in family.conditioning
            if pos is not None and name in pos:
                table = pos[name] if pos[name].ndim == ndim + 1 else pos[name].unsqueeze(0)
                if len(table) != 1:
                    raise TrainerError(f"--positive has {len(table)} rows: with --streaming it must hold 1 row "
                                       "(used for every latent); put per-row conditioning into the dataset")
                self.tables[name] = table
            elif required and name not in names:
                raise TrainerError(f"--latents: the dataset has no '{name}' column, which this model needs; "
                                   "add it or pass --positive")
        self.names = [LATENTS] + [n for n in self.column_ndims if n in names and n not in self.tables]
        self.stream = stream.select_columns(self.names).with_format("arrow")
        self.depth = {n: check_numeric(n, first.schema.field(n).type, "--latents") for n in self.names}
        self.fixed = {n: schema_shape(first.schema.field(n).type) for n in self.names}
        shapes = {n: tuple(int(d) for d in row_shapes(first[n].combine_chunks(), self.depth[n], 0,
                                                          f"--latents: column '{n}'")[0]) for n in self.names}
        ndim = family.latent_ndim
        self.squeezed = {n for n, s in shapes.items()
                         if len(s) == (ndim if n == LATENTS else self.column_ndims[n]) + 1 and s[0] == 1}
        shapes = {n: s[1:] if n in self.squeezed else s for n, s in shapes.items()}
        #: whether image rows [C, H, W] are read as 1-frame clips [C, 1, H, W] (a video family)
        self.single_frame = ndim == 4 and len(shapes[LATENTS]) == 3
        if self.single_frame:
            shapes[LATENTS] = self.as_latent_shape(shapes[LATENTS])
        #: stored shape of each conditioning column of the stream (every row must have it)
        self.stored = {n: (1, *shapes[n]) if n in self.squeezed else shapes[n] for n in self.names if n != LATENTS}
        if len(shapes[LATENTS]) != ndim:
            raise TrainerError(f"--latents: latents must be {latent_layout(ndim)} per row for {family.name}, got "
                               f"shape {shapes[LATENTS]}")
        expected = family.latent_channels(model)
        if shapes[LATENTS][0] != expected:
            raise TrainerError(f"--latents: latents have {shapes[LATENTS][0]} channels but the model expects "
                               f"{expected} (were they encoded with this model's VAE?)")
        self.channels = expected
        self.conditioning_shapes = {**{n: s for n, s in shapes.items() if n != LATENTS},
                                    **{n: tuple(t.shape[1:]) for n, t in self.tables.items()}}
        for name, shape in self.conditioning_shapes.items():
            if len(shape) != self.column_ndims[name]:
                raise TrainerError(f"'{name}' rows must have {self.column_ndims[name]} dimensions, got shape {shape}")
        self.model = model
        self._checked: set[tuple[int, ...]] = set()
        self.check_latent_shape(shapes[LATENTS])

    def as_latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A row's latent shape as the model reads it (an image row of a video family: 1 frame)."""
        return (shape[0], 1, *shape[1:]) if self.single_frame else shape

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """A latent shape (a bucket) must fit the model, e.g. Flux's 2x2 patches; checked once per shape."""
        if shape not in self._checked:
            self.family.check_conditioning(self.model, {LATENTS: shape, **self.conditioning_shapes})
            self._checked.add(shape)


class StreamingBatches:
    """This process's micro-batches from the stream, with per-sample noise and timestep draws, and a
    state (saved in every checkpoint, one file per process) from which a resume is exact."""

    def __init__(self, data: StreamData, batch_size: int, process_index: int, num_processes: int,
                 accumulation: int, seed: int, buffer: int, start_step: int, end_step: int):
        self.data, self.batch_size, self.seed, self.buffer = data, batch_size, seed, buffer
        self.rank, self.world, self.accumulation = process_index, num_processes, accumulation
        self.start_step, self.end_step = start_step, end_step
        if buffer < batch_size:
            raise TrainerError(f"--shuffle_buffer {buffer} is smaller than batch_size {batch_size}")
        #: where the stream stands: epoch, block in the epoch, the stream's state_dict at the block's
        #: start (None: the epoch's start) and batches already served from the block
        self.state: dict[str, Any] = {"epoch": 0, "block": 0, "source": None, "served": 0}

    def _source(self):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self.data.stream, rank=self.rank, world_size=self.world)

    def _blocks(self):
        """Blocks of ``buffer`` examples (Arrow tables) from the saved state onwards, epoch after epoch.
        While a block is out, ``self.state`` names it: its epoch, number and start in the stream."""
        import pyarrow as pa

        while True:
            source = self._source()
            if self.state["source"] is not None:
                source.load_state_dict(self.state["source"])
            examples = iter(source)
            got_any = False
            while True:
                rows = [t for _, t in zip(range(self.buffer), examples)]
                if not rows:
                    break
                got_any = True
                after = source.state_dict()  # a copy: where the next block starts
                yield pa.concat_tables(rows)
                self.state.update(block=self.state["block"] + 1, source=after, served=0)
            if not got_any:
                raise TrainerError(f"--latents: process {self.rank}'s part of the stream has no rows "
                                   f"({self.world} processes; the stream has {self.data.stream.num_shards} shards)")
            self.state.update(epoch=self.state["epoch"] + 1, block=0, source=None, served=0)

    def _plan(self, block) -> list[np.ndarray]:
        """The block's batches: rows permuted by the seed, cut into batches of one latent shape, in the
        order each batch completes; a shape's leftover rows are dropped."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x57EA, self.rank, self.state["epoch"],
                                                   self.state["block"]))
        order = torch.randperm(block.num_rows, generator=g).numpy()
        latents = block[LATENTS].combine_chunks()
        where = f"--latents: column '{LATENTS}' (streaming, epoch {self.state['epoch']} block {self.state['block']})"
        if self.data.fixed[LATENTS] is not None:
            keys = np.zeros(block.num_rows, dtype=np.int64)
        else:
            dims = row_shapes(latents, self.data.depth[LATENTS], 0, where)
            shapes, keys = np.unique(dims, axis=0, return_inverse=True)
            for shape in shapes:
                shape = tuple(int(d) for d in shape)
                self.data.check_latent_shape(self.data.as_latent_shape(
                    shape[1:] if LATENTS in self.data.squeezed else shape))
        keys = keys.reshape(-1)[order]
        B, batches = self.batch_size, []
        for key in np.unique(keys):
            positions = np.flatnonzero(keys == key)
            positions = positions[:len(positions) // B * B].reshape(-1, B)
            batches += [(int(p[-1]), order[p]) for p in positions]
        return [rows for _, rows in sorted(batches, key=lambda b: b[0])]

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accumulation

    def __iter__(self):
        """Micro-batches for the steps ``start_step .. end_step``, as ``build_dataloader``'s batches."""
        micro = self.start_step * self.accumulation  # this process's micro-batches so far
        end = self.end_step * self.accumulation
        if micro >= end:
            return
        for block in self._blocks():
            for rows in self._plan(block)[self.state["served"]:]:
                batch = self._tensors(block, rows)
                step, a = divmod(micro, self.accumulation)
                k = (step * self.accumulation + a) * self.world + self.rank  # global micro-batch number
                positions = range(k * self.batch_size, (k + 1) * self.batch_size)
                batch.update(sample_draws(positions, batch[LATENTS].shape[1:], self.seed))
                self.state["served"] += 1
                micro += 1
                yield batch
                if micro >= end:
                    return

    def _tensors(self, block, rows: np.ndarray) -> dict[str, torch.Tensor]:
        table = block.take(rows)
        where = f"--latents (streaming, epoch {self.state['epoch']} block {self.state['block']})"
        labels = [f"{int(r)} of the block" for r in rows]
        out = {}
        for name in self.data.names:
            shape = self.data.fixed[name] if name == LATENTS else self.data.stored[name]
            out[name] = batch_tensor(table[name], self.data.depth[name], shape, labels, f"{where}: column '{name}'")
            if name in self.data.squeezed:
                out[name] = out[name].squeeze(1)
        if self.data.single_frame:
            out[LATENTS] = out[LATENTS].unsqueeze(2)  # [B, C, H, W] -> [B, C, 1, H, W]
        if out[LATENTS].shape[1] != self.data.channels:
            raise TrainerError(f"{where}: latents with {out[LATENTS].shape[1]} channels; the model expects "
                               f"{self.data.channels}")
        for name, table_rows in self.data.tables.items():
            out[name] = table_rows.expand(len(rows), *table_rows.shape[1:])
        return out

    # -- checkpoints: one file per process (each reads its own part of the stream)
    def register(self, accelerator) -> None:
        """Save and restore the stream's state with ``accelerator.save_state``/``load_state``."""

        def save_hook(models, weights, output_dir):
            write_json(Path(output_dir, STATE_FILE.format(rank=self.rank)), {**self.state, "world": self.world})

        def load_hook(models, input_dir):
            path = Path(input_dir, STATE_FILE.format(rank=self.rank))
            if not path.is_file():
                raise TrainerError(f"--resume_from_checkpoint: {input_dir} holds no stream state for process "
                                   f"{self.rank} (was it saved without --streaming?)")
            saved = json.loads(path.read_text())
            if saved.pop("world") != self.world:
                raise TrainerError(f"--resume_from_checkpoint: {input_dir} was saved by a streaming run on a "
                                   f"different number of processes; a stream resumes exactly only on the same "
                                   f"number ({self.world} now)")
            self.state = saved

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


def streaming_loader(batches: StreamingBatches, device: torch.device):
    """The batches moved to the training device. Not ``accelerator.prepare``: the stream is already
    split between processes, and accelerate's loader reads one batch ahead, which would put the
    saved stream state one batch past the trained one."""
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

