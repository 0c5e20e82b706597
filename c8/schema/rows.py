"""Whole-row operations on structured event batches, at memcpy speed.

numpy copies structured rows field by field (a file event has ~40 fields):
concatenating, sorting or masking a batch that way costs 4-6 times a plain
copy of the same bytes. Viewing rows as opaque fixed-size blobs (``np.void``)
lets numpy move them whole; the result is viewed back with the batch's dtype.

String fields may be narrower in a batch than the schema declares (below).
"""

from __future__ import annotations

import functools

import numpy as np


def _opaque(arr: np.ndarray) -> np.ndarray:
    return arr.view(np.dtype((np.void, arr.dtype.itemsize)))


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate`` for batches of one dtype."""
    if len(parts) == 1:
        return parts[0]
    if any(p.dtype != parts[0].dtype for p in parts):
        return np.concatenate(parts)  # numpy promotes the fields
    return np.concatenate([_opaque(p) for p in parts]).view(parts[0].dtype)


def take(arr: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``arr[index]`` for an integer or boolean index: a new batch of those rows."""
    return _opaque(arr)[index].view(arr.dtype)


def copy(arr: np.ndarray) -> np.ndarray:
    """``arr.copy()``."""
    return _opaque(arr).copy().view(arr.dtype)


def fill(arr: np.ndarray, row: np.ndarray) -> None:
    """Set every row of ``arr`` to ``row`` (a one-row batch of the same dtype)."""
    _opaque(arr)[:] = _opaque(row)[0]


# -- narrow string fields ---------------------------------------------------------
# A batch may hold a string field narrower than the schema declares (a file row's
# five 256-byte names are mostly NUL padding): every value fits, the wire declares
# the schema's width, and a client sees the declared dtype. Rows that carry
# fewer bytes are cheaper in every stage after them (the merge, masks, encoding).
MIN_WIDTH = 8


def field(arr: np.ndarray, name: str, fmt) -> np.ndarray:
    """Field ``name`` of a structured array read as ``fmt``: a strided view, no copy."""
    dt = arr.dtype
    one = np.dtype({"names": [name], "formats": [fmt], "offsets": [dt.fields[name][1]],
                    "itemsize": dt.itemsize})
    return arr.view(one)[name]


# Up to this width a column is sized by str_len, which walks back over each value's
# NUL padding (1-5 ns a row when there is little); wider ones by OR-ing their words,
# whose cost is the width's whatever the values (a short name in a 256-byte field).
STR_LEN_WIDTH = 64


def used_width(col: np.ndarray) -> int:
    """Bytes up to the last non-NUL byte of any value of an ``S`` array, read in
    place (a field of a batch is a strided view: nothing is copied)."""
    n, w = len(col), col.dtype.itemsize
    if n == 0 or w == 0:
        return 0
    if w <= STR_LEN_WIDTH:
        return int(np.char.str_len(col).max())
    if w % 8:  # no whole words to read in place
        col = np.ascontiguousarray(col)
    if col.flags.c_contiguous:
        return _last_used(_or_rows(col))
    # numpy's 2-D reduce is slow over strided rows (16 ns a row for a 32-byte field
    # of a file row), a 1-D reduce down each 8-byte word is not (4 ns)
    words = np.lib.stride_tricks.as_strided(col[:1].view(np.uint64), (n, w // 8), (col.strides[0], 8),
                                            writeable=False)
    seen = np.array([np.bitwise_or.reduce(words[:, j]) for j in range(w // 8)], np.uint64)
    return _last_used(seen.view(np.uint8))


def used_widths(arr: np.ndarray, names) -> dict[str, int]:
    """:func:`used_width` of each named ``S`` field of a batch. Rows that lie
    back to back are read in one pass for all of them (a file row's eight
    string fields: 24 ns a row, where one field at a time took 100)."""
    if not len(arr) or not names or not arr.flags.c_contiguous:
        return {n: used_width(arr[n]) for n in names}
    seen = _or_rows(arr)
    fields = arr.dtype.fields
    return {n: _last_used(seen[fields[n][1]: fields[n][1] + fields[n][0].itemsize]) for n in names}


def _or_rows(arr: np.ndarray) -> np.ndarray:
    """The OR of every row's bytes (rows back to back, at least one)."""
    return np.bitwise_or.reduce(arr.view(np.uint8).reshape(len(arr), arr.dtype.itemsize), axis=0)


def _last_used(seen: np.ndarray) -> int:
    nz = np.flatnonzero(seen)
    return int(nz[-1]) + 1 if len(nz) else 0


def width_for(used: int, declared: int) -> int:
    """The width a string field gets in a batch: its longest value, rounded up to a
    power of two (a workload's batches then share a dtype and concatenate as
    whole rows), at most the declared width."""
    return min(declared, max(MIN_WIDTH, 1 << max(used - 1, 0).bit_length()))


def with_widths(dtype: np.dtype, widths: dict[str, int]) -> np.dtype:
    """``dtype`` with the named string fields at the given widths."""
    return _with_widths(dtype, tuple(sorted(widths.items())))


# Batch layouts kept: the widths follow monitored processes' name lengths, so the
# cache is bounded (powers of two from 8 to 256 over five names would be 7,776).
LAYOUTS_KEPT = 256


@functools.lru_cache(maxsize=LAYOUTS_KEPT)
def _with_widths(dtype: np.dtype, widths: tuple) -> np.dtype:
    w = dict(widths)
    return np.dtype([(n, f"S{w[n]}" if n in w else dtype.fields[n][0]) for n in dtype.names])


def widen(arr: np.ndarray, declared: np.ndarray | np.dtype, names: tuple[str, ...]) -> np.ndarray:
    """``arr``, or a copy of it with the named fields at their declared widths
    (``declared``: the schema dtype), before a stage writes values of any length there."""
    declared = np.dtype(declared)
    short = {n: declared.fields[n][0].itemsize for n in names
             if arr.dtype.fields[n][0].itemsize < declared.fields[n][0].itemsize}
    if not short:
        return arr
    out = np.empty(len(arr), with_widths(arr.dtype, short))
    for n in arr.dtype.names:
        out[n] = arr[n]
    return out
