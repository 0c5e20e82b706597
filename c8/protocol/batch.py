"""Batch framing: numpy structured arrays on the wire, never per-event objects.

Two forms:
- *packed* (collectors -> broker, internal): a header map plus the array's raw
  little-endian buffer as one frame. The dtype travels as numpy's ``descr``.
- *columnar* (broker -> clients): one msgpack map ``{"type": "batch",
  "category", "n", "columns": {name: bytes}, "dtypes": {name: "<u8"},
  "widths": {name: 256}, ...}`` so a client in any language decodes each
  column from its type string alone; string columns are cut to the batch's
  longest value and ``widths`` gives the declared width to pad them back to.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from c8 import schema
from c8.schema import rows

LINEAGE_DEPTH = 16  # ancestors named per event, parent first


class Tables(dict):
    """What a batch's events refer to, beside its columns: the container table
    (this dict: index -> [container_id, container_name, image_id, image_name,
    runtime, k8s_namespace, k8s_pod_name, k8s_pod_uid, k8s_container_name,
    k8s_labels {key: value}]) and ``processes``, the process table of its lineage: process_id ->
    [pid, exec_filename, command_line, parent process_id ("" at the top)]."""

    def __init__(self, containers=(), processes: dict | None = None):
        super().__init__(containers)
        self.processes: dict = processes or {}

    def lineage(self, process_id: str) -> list[dict]:
        """A process's ancestors, parent first, at most LINEAGE_DEPTH: each
        {pid, process_id, exec_filename, command_line}."""
        out: list[dict] = []
        row = self.processes.get(process_id)
        seen = {process_id}
        while row is not None and row[3] and len(out) < LINEAGE_DEPTH and row[3] not in seen:
            key = row[3]
            seen.add(key)
            row = self.processes.get(key)
            if row is not None:
                out.append({"pid": row[0], "process_id": key, "exec_filename": row[1],
                            "command_line": row[2]})
        return out


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
    """A batch as a msgpack-able map: column name -> typed buffer, plus types.

    Byte-string columns travel cut to the longest value of the batch (most of
    a 256-byte path column is NUL padding): ``dtypes`` names the type on the
    wire, ``widths`` the declared width a decoder pads them back to: the
    schema's (a batch may hold a field narrower, c8.schema.rows), else the
    array's. A cut column is read straight from the rows at its narrow width.
    """
    declared = schema.dtype(category) if category in schema.CATEGORIES else array.dtype
    cols = {}
    types = {}
    widths = {}
    fields = array.dtype.fields
    declared_widths = {n: declared.fields[n][0].itemsize if n in declared.names else fields[n][0].itemsize
                       for n in array.dtype.names if fields[n][0].kind == "S"}
    cut = [n for n, w in declared_widths.items() if w >= NARROW_MIN_WIDTH]
    used_widths = rows.used_widths(array, cut)
    for name in array.dtype.names:
        types[name] = _format(fields[name][0])  # subarrays keep their shape
        if name in used_widths:
            width = declared_widths[name]
            used = max(used_widths[name], 1)
            if used < width:
                widths[name] = width
                types[name] = np.dtype(f"S{used}").str
                cols[name] = rows.field(array, name, f"S{used}").tobytes()
                continue
        cols[name] = array[name].tobytes()
    return {"type": "batch", "category": category, "n": len(array),
            "columns": cols, "dtypes": types, "widths": widths, **extra}


NARROW_MIN_WIDTH = 16  # narrower string columns are sent as they are


def decode_columns(msg: dict) -> np.ndarray:
    """The structured array of a decoded columnar message.

    A string column cut on the wire stays as narrow as the batch's longest
    value (``widths`` in the message names the schema's width): values and
    comparisons are the same, and a file row takes about 200 bytes, not
    1,667 (bench/bench_files.py: 47 ns an event to decode, 138 padded back).
    ``c8.schema.rows.widen`` gives the schema's widths to a caller that
    writes longer values into a batch.

    Every column must hold exactly ``n`` values of its type, checked before
    the rows are made: what a message makes is bounded by the bytes it
    brought (a fleet stream's messages come from other hosts). ValueError
    names what is wrong.
    """
    n = msg["n"]
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"batch message: n {n!r} is not a row count")
    cols = {}
    for name, t in msg["dtypes"].items():
        try:
            dt = np.dtype(t)
        except TypeError as exc:
            raise ValueError(f"batch message: column {name!r} has no type {t!r}") from exc
        buf = msg["columns"][name]
        if dt.hasobject or len(buf) != n * dt.itemsize:
            raise ValueError(f"batch message: column {name!r} holds {len(buf)} bytes, "
                             f"not {n} values of {t}")
        cols[name] = np.frombuffer(buf, dtype=dt, count=n)
    out = np.empty(n, list(msg["dtypes"].items()))
    for name, col in cols.items():
        out[name] = col
    return out
