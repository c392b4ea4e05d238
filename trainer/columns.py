"""Array columns read through Arrow: row shapes, buckets, batches and the NaN/inf check, without a
Python step per row.

A latent or embedding row is stored either with a fixed shape in the column's type (``datasets``'
``Array2D``/``Array3D``, Arrow fixed-size lists: the shape is read from the schema, no row is
touched) or as nested lists (``[[[...]]]``: the shape of each row comes from the lists' offsets,
vectorised with numpy over whole chunks). A batch is the flattened value buffer of its rows,
reshaped: the numpy formatter's per-row arrays are never built.

Why not ``datasets``' numpy formatter: it builds one array object per row (per list level, for
nested lists), which is what made start-up scale with the row count.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from .errors import TrainerError

#: rows per piece when a whole column is scanned (offsets only: ~8 bytes per row and list level)
SCAN_ROWS = 1 << 18


def _storage(array):
    """The plain Arrow array under an extension array (``datasets``' ArrayXD)."""
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def _storage_type(pa_type: pa.DataType) -> pa.DataType:
    return pa_type.storage_type if isinstance(pa_type, pa.ExtensionType) else pa_type


def _is_list(pa_type: pa.DataType) -> bool:
    return pa.types.is_list(pa_type) or pa.types.is_large_list(pa_type) or pa.types.is_fixed_size_list(pa_type)


def list_depth(pa_type: pa.DataType) -> tuple[int, pa.DataType]:
    """(number of list levels, value type) of a column type."""
    depth, t = 0, _storage_type(pa_type)
    while _is_list(t):
        depth, t = depth + 1, t.value_type
    return depth, t


def schema_shape(pa_type: pa.DataType) -> tuple[int, ...] | None:
    """The row shape when the column type fixes it (ArrayXD without a dynamic dimension, or
    fixed-size lists at every level), else None."""
    shape = getattr(pa_type, "shape", None)  # datasets' ArrayXD extension types
    if shape is not None:
        return tuple(shape) if all(d is not None for d in shape) else None
    dims, t = [], _storage_type(pa_type)
    while _is_list(t):
        if not pa.types.is_fixed_size_list(t):
            return None
        dims.append(t.list_size)
        t = t.value_type
    return tuple(dims)


def check_numeric(name: str, pa_type: pa.DataType, where: str) -> int:
    """The column's list depth; a column that is not an array of numbers is an error."""
    depth, value_type = list_depth(pa_type)
    if depth == 0 or not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise TrainerError(f"{where}: column '{name}' is not a numeric array (type {pa_type})")
    return depth


def _level(array) -> tuple[np.ndarray, pa.Array]:
    """(offsets into the child array for each element and one past the end, child array)."""
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        return (array.offset + np.arange(len(array) + 1, dtype=np.int64)) * size, array.values
    return array.offsets.to_numpy().astype(np.int64, copy=False), array.values


def row_shapes(array, depth: int, first_row: int, where: str) -> np.ndarray:
    """Shapes ``[rows, depth]`` of the nested-list rows of one Arrow array (a chunk).

    Each dimension is read along the row's first element (the first channel's first line, ...) and
    the row's total value count must equal the product, so a ragged row is an error naming it.
    ``first_row`` is the row number of ``array[0]``, for the messages."""
    array = _storage(array)
    n = len(array)
    if array.null_count:
        bad = first_row + int(np.flatnonzero(~np.asarray(array.is_valid()))[0])
        raise TrainerError(f"{where}, row {bad} is empty (null)")
    dims = np.empty((n, depth), dtype=np.int64)
    first = np.arange(n, dtype=np.int64)  # element at the current level on each row's first path
    start, end = first.copy(), first + 1  # range of each row's elements at the current level
    for level in range(depth):
        offsets, child = _level(array)
        dims[:, level] = offsets[first + 1] - offsets[first]
        empty = np.flatnonzero(dims[:, level] == 0)
        if len(empty):
            raise TrainerError(f"{where}, row {first_row + int(empty[0])} is empty (a dimension of size 0)")
        first, start, end = offsets[first], offsets[start], offsets[end]
        array = _storage(child)
    ragged = np.flatnonzero(end - start != dims.prod(axis=1))
    if len(ragged):
        raise TrainerError(f"{where}, row {first_row + int(ragged[0])} is not a rectangular array "
                           "(its nested lists differ in length)")
    return dims


def column_pieces(table_source, name: str, num_rows: int):
    """(first row, Arrow chunk) pieces of one column, ``SCAN_ROWS`` rows at a time.

    ``table_source`` is an Arrow-formatted ``datasets.Dataset``: slicing it is zero-copy on the
    memory-mapped table."""
    for start in range(0, num_rows, SCAN_ROWS):
        column = table_source[start:start + SCAN_ROWS][name]
        offset = start
        for chunk in column.chunks:
            yield offset, chunk
            offset += len(chunk)


def values(array, depth: int) -> np.ndarray:
    """The leaf values of an array's rows, in row order (zero-copy where Arrow allows)."""
    array = _storage(array)
    for _ in range(depth):
        array = _storage(array.flatten())  # flatten() honours the slice, .values would not
    return array.to_numpy(zero_copy_only=False)


def first_non_finite(flat: np.ndarray, per_row: int) -> int | None:
    """Index of the first row (of ``per_row`` values each) holding NaN or inf, or None."""
    if not np.issubdtype(flat.dtype, np.floating):
        return None
    finite = np.isfinite(flat)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite)[0]) // per_row


def batch_tensor(column, depth: int, shape: tuple[int, ...] | None, rows: list[int] | np.ndarray,
                 where: str) -> torch.Tensor:
    """Rows of one column (a small Arrow array or chunked array, the batch) as an fp32 tensor
    ``[len(rows), *shape]``; the rows must share one shape. ``rows`` are the dataset's row numbers,
    for the messages. NaN/inf values are an error naming the row."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if shape is None:  # nested lists: every row must have the batch's first row's shape
        dims = row_shapes(array, depth, 0, where)
        shape = tuple(int(d) for d in dims[0])
        other = np.flatnonzero((dims != dims[0]).any(axis=1))
        if len(other):
            i = int(other[0])
            raise TrainerError(f"{where}, row {rows[i]} has shape {tuple(int(d) for d in dims[i])} but row "
                               f"{rows[0]} has {shape}: rows of one batch must have one shape")
    flat = values(array, depth)
    per_row = math.prod(shape)
    if flat.size != len(array) * per_row:
        raise TrainerError(f"{where}: rows {rows[0]}.. hold {flat.size} values, expected {len(array)} x {shape}")
    bad = first_non_finite(flat, per_row)
    if bad is not None:
        raise TrainerError(f"{where}, row {rows[bad]} holds NaN or inf values")
    # astype copies: the Arrow buffer may be read-only (memory-mapped) and fp16
    return torch.from_numpy(flat.astype(np.float32).reshape(len(array), *shape))
