"""Batch framing: numpy structured arrays on the wire, never per-event objects.

Two forms:
- *packed* (collectors -> broker, internal): a header map plus the array's raw
  little-endian buffer as one frame. The dtype travels as numpy's ``descr``.
- *columnar* (broker -> clients): one msgpack map ``{"type": "batch",
  "category", "n", "columns": {name: bytes}, "dtypes": {name: "<u8"}, ...}`` so a
  client in any language decodes each column from its type string alone.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np


def dtype_to_wire(dt: np.dtype) -> dict:
    """A dtype as a msgpack-able map (names, formats, offsets, itemsize)."""
    return {
        "names": list(dt.names),
        "formats": [_format(dt.fields[n][0]) for n in dt.names],
        "offsets": [dt.fields[n][1] for n in dt.names],
        "itemsize": dt.itemsize,
    }


def _format(dt: np.dtype) -> str:
    """A field's format string; subarrays (e.g. syscall args) keep their shape."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return f"{shape}{base.str}"
    return dt.str


def dtype_from_wire(d: dict) -> np.dtype:
    return np.dtype({"names": d["names"], "formats": d["formats"],
                     "offsets": d["offsets"], "itemsize": d["itemsize"]})


def pack(header: dict, array: np.ndarray) -> list:
    """Frames for a packed batch: [msgpack header, raw buffer]."""
    header = dict(header, n=len(array), dtype=dtype_to_wire(array.dtype))
    return [msgpack.packb(header), np.ascontiguousarray(array).data]


def unpack(frames: list) -> tuple[dict, np.ndarray | None]:
    """Inverse of pack; a header without a dtype carries no array."""
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    if "dtype" not in header:
        return header, None
    dt = dtype_from_wire(header["dtype"])
    buf = frames[1] if len(frames) > 1 else b""
    array = np.frombuffer(buf, dtype=dt, count=header["n"])
    return header, array


def columns(category: str, array: np.ndarray, **extra: Any) -> dict:
    """A batch as a msgpack-able map: column name -> typed buffer, plus types."""
    cols = {}
    types = {}
    for name in array.dtype.names:
        col = np.ascontiguousarray(array[name])
        cols[name] = col.tobytes()
        types[name] = col.dtype.str
    return {"type": "batch", "category": category, "n": len(array),
            "columns": cols, "dtypes": types, **extra}


def encode_columns(category: str, array: np.ndarray, **extra: Any) -> bytes:
    """One columnar message for a client."""
    return msgpack.packb(columns(category, array, **extra), use_bin_type=True)


def decode_columns(msg: dict) -> np.ndarray:
    """The structured array of a decoded columnar message."""
    names = list(msg["dtypes"])
    dt = np.dtype([(n, msg["dtypes"][n]) for n in names])
    out = np.empty(msg["n"], dt)
    for n in names:
        out[n] = np.frombuffer(msg["columns"][n], dtype=dt[n], count=msg["n"])
    return out
