"""Batches to per-event dicts and JSON lines, a column at a time.

A decoded batch (numpy structured array) is first described column by column
(``_fields``: output key -> column, lookup or constant, in the key order
events have always had). Then either:

- ``dicts``: one list of values per key (``tolist()``, strings decoded per
  column), zipped into one dict per event, for Python users; or
- ``lines``: JSON text per column, never a dict: a column whose value is the
  same for the whole batch (uids, container fields, the sensor id, often the
  kind) becomes literal text once; integers are encoded by orjson a whole
  column per call; plain-ASCII string columns and the event ids are quoted a
  column at a time (one join, one split), other strings encoded per value by
  orjson; kinds and container fields by array lookup. No per-event Python
  code runs: each event's line is one ``bytes.join`` of its pieces.

``window_lines`` / ``window_dicts`` put the events of every category of one
broker window in ``sensor_sequence_number`` order (the broker numbers a window
across categories in time order and sends it as one message).

The event shape (keys, their order and values) is the one ``to_dicts`` has
always produced; tests/unit/test_c8ctl_format.py holds both paths to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import methodcaller
from typing import Any

import numpy as np
import orjson

from c8 import schema
from c8.protocol.batch import Tables

Batch = tuple[str, np.ndarray, dict]  # (category, array, container table)

NO_CONTAINER = ("", "", "", "")
# the container-table row's Kubernetes slots (after the runtime, slot 4) and their keys
K8S_KEYS = ("k8s_namespace", "k8s_pod_name", "k8s_pod_uid", "k8s_container_name", "k8s_labels")
NO_POD = ("", "", "", "", {})
_decode = methodcaller("decode", "utf-8", "replace")
_hexdigest = methodcaller("hexdigest")


def _default(v: Any) -> str:
    return str(v)  # what json.dumps(default=str) did for anything JSON has no type for


_dumps = partial(orjson.dumps, default=_default)  # C-level when mapped over a column


# -- what each output key holds ------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Column:
    col: np.ndarray  # a batch column, any dtype


@dataclass(frozen=True, eq=False)
class _Lookup:
    index: np.ndarray  # per event, into values
    values: tuple


@dataclass(frozen=True, eq=False)
class _Const:
    value: Any


@dataclass(frozen=True, eq=False)
class _Ids:
    seq: np.ndarray
    mono: np.ndarray


@dataclass(frozen=True, eq=False)
class _Args:
    keys: tuple[str, ...]
    cols: tuple[np.ndarray, ...]


def _kind(category: str, codes: np.ndarray) -> _Lookup:
    names = schema.KINDS.get(category, ())
    codes = codes.astype(np.int64)
    ok = (codes > 0) & (codes <= len(names))
    if ok.all():
        return _Lookup(codes - 1, tuple(names))
    # unnamed codes show as their number, as text
    extra = np.unique(codes[~ok])
    values = tuple(names) + tuple(str(c) for c in extra.tolist())
    return _Lookup(np.where(ok, codes - 1, len(names) + np.searchsorted(extra, codes)), values)


def _containers(arr: np.ndarray, table: dict) -> list[_Lookup]:
    """container_id, container_name, image_id, image_name, then the K8S_KEYS, from
    the batch's table (one value per distinct container; rows of a sensor that
    sends no Kubernetes slots read as outside a pod)."""
    n = len(arr)
    idx = arr["container"] if "container" in arr.dtype.names else np.zeros(n, np.uint32)
    keys, inverse = np.unique(idx, return_inverse=True)
    rows = [tuple(table.get(k) or NO_CONTAINER) for k in keys.tolist()]
    rows = [r[:4] + (r[5:10] if len(r) >= 10 else NO_POD) for r in rows]
    return [_Lookup(inverse, tuple(r[j] for r in rows)) for j in range(9)]


def _lineage(ids: np.ndarray, table: dict) -> _Lookup:
    """process_lineage per event: its process's ancestors (parent first), looked up
    once per distinct process_id in the batch's lineage table."""
    if len(ids) and (ids == ids[0]).all():  # one process (a storm): no sort
        keys, inverse = ids[:1], np.zeros(len(ids), np.intp)
    else:
        keys, inverse = np.unique(ids, return_inverse=True)
    tables = table if isinstance(table, Tables) else Tables(table)
    return _Lookup(inverse, tuple(tables.lineage(k.decode(errors="replace")) for k in keys.tolist()))


def _fields(category: str, arr: np.ndarray, table: dict, sensor_id: str) -> dict[str, Any]:
    """Output key -> what it holds, keys in the order events have (see module doc)."""
    n = len(arr)
    names = arr.dtype.names
    args = [x for x in names if x.startswith(schema.ARGUMENT_PREFIX)]
    out: dict[str, Any] = {"type": _Const(category)}
    for name in names:
        if name not in args:
            out[name] = _kind(category, arr[name]) if name == "kind" else _Column(arr[name])
    if "kind" not in out:  # every schema batch has one; kept for the shape's sake
        out["kind"] = _Const("None")
    cid, cname, iid, iname, *pod = _containers(arr, table)
    out["container_id"], out["container_name"], out["image_id"], out["image_name"] = cid, cname, iid, iname
    out.update(zip(K8S_KEYS, pod, strict=True))
    if category == "container":
        out["name"], out["image_id"], out["image_name"] = cname, iid, iname
    if "process_id" in names:
        out["process_lineage"] = _lineage(arr["process_id"], table)
    out["sensor_id"] = _Const(sensor_id)
    zero = np.zeros(n, np.uint64)
    ids = _Ids(arr["sensor_sequence_number"] if "sensor_sequence_number" in names else zero,
               arr["sensor_monotime_nanos"] if "sensor_monotime_nanos" in names else zero)
    out["event_id"] = ids
    if "id" not in out:
        out["id"] = ids
    if args:
        out["arguments"] = _Args(tuple(a[len(schema.ARGUMENT_PREFIX):] for a in args),
                                 tuple(arr[a] for a in args))
    return out


# -- event ids -------------------------------------------------------------------
def _id_inputs(sensor_id: str, seq: np.ndarray, monotime: np.ndarray) -> list[bytes]:
    text = sensor_id.encode().replace(b"%", b"%%") + b"%d%d"  # C-level formatting per event
    return list(map(text.__mod__, zip(seq.tolist(), monotime.tolist(), strict=True)))


def event_ids(sensor_id: str, seq: np.ndarray, monotime: np.ndarray) -> list[str]:
    """sha256 hex of sensor id, sequence number and monotime, per event (Capsule8's id)."""
    if not len(seq):
        return []
    return list(map(_hexdigest, map(hashlib.sha256, _id_inputs(sensor_id, seq, monotime))))


def _quoted(values: list[bytes]) -> list[bytes]:
    """Each value in JSON quotes, for values known to need no escaping: one join and one
    split for the whole column (a newline never occurs in such a value)."""
    return (b'"' + b'"\n"'.join(values) + b'"').split(b"\n")


# -- per-event values (dicts) ----------------------------------------------------
def strings(col: np.ndarray) -> list[str]:
    """A byte-string column as str values: trailing NULs cut, UTF-8 with replacement."""
    return list(map(_decode, col.tolist()))


def _values(col: np.ndarray) -> list:
    if col.dtype.kind == "S" and col.ndim == 1:  # sub-arrays stay lists, as they always were
        return strings(col)
    return col.tolist()


def _as_values(spec: Any, n: int, sensor_id: str) -> list:
    if isinstance(spec, _Column):
        return _values(spec.col)
    if isinstance(spec, _Lookup):
        if len(spec.values) == 1:
            return [spec.values[0]] * n
        values = np.empty(len(spec.values), dtype=object)  # values may be lists: no 2-D array
        for i, v in enumerate(spec.values):
            values[i] = v
        return values[spec.index].tolist()
    if isinstance(spec, _Const):
        return [spec.value] * n
    if isinstance(spec, _Ids):
        return event_ids(sensor_id, spec.seq, spec.mono)
    return list(map(dict, map(zip, repeat(spec.keys), zip(*map(_values, spec.cols), strict=True))))


def columns(category: str, arr: np.ndarray, table: dict, sensor_id: str = "") -> dict[str, list]:
    """Output key -> one value per event, keys in event order."""
    n = len(arr)
    done: dict[int, list] = {}  # a spec shared by two keys (event_id and id) is made once
    out = {}
    for key, spec in _fields(category, arr, table, sensor_id).items():
        if id(spec) not in done:
            done[id(spec)] = _as_values(spec, n, sensor_id)
        out[key] = done[id(spec)]
    return out


def dicts(category: str, arr: np.ndarray, table: dict, sensor_id: str = "") -> list[dict]:
    """One dict per event of a batch: strings decoded, kinds named, containers expanded."""
    if not len(arr):
        return []
    cols = columns(category, arr, table, sensor_id)
    return list(map(dict, map(zip, repeat(list(cols)), zip(*cols.values(), strict=True))))


# -- JSON text per column (lines) ---------------------------------------------------
def _column_json(col: np.ndarray) -> bytes | list[bytes]:
    """A column as JSON text: one literal when every value is the same, else per event."""
    if col.ndim == 1 and (col == col[0]).all():
        return _dumps(_values(col[:1])[0])
    if col.dtype.kind in "iu" and col.ndim == 1:
        return orjson.dumps(col.tolist())[1:-1].split(b",")  # integers hold no commas
    if col.dtype.kind == "S" and col.ndim == 1:
        return _string_json(col)
    return list(map(_dumps, _values(col)))


# bytes a JSON string can hold as they are: printable ASCII but the quote and the backslash
_PLAIN = np.zeros(256, bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[[ord('"'), ord("\\")]] = False


def _string_json(col: np.ndarray) -> list[bytes]:
    """A byte-string column as JSON strings. When every value is plain ASCII (no
    quote, backslash, control byte or NUL inside) they are quoted as they are,
    the whole column at once; else each value is decoded and encoded on its own."""
    values = col.tolist()  # trailing NULs cut
    if _PLAIN[np.frombuffer(b"".join(values), np.uint8)].all():
        return _quoted(values)
    return list(map(orjson.dumps, map(_decode, values)))


def _as_json(spec: Any, n: int, sensor_id: str) -> bytes | list[bytes]:
    if isinstance(spec, _Column):
        return _column_json(spec.col)
    if isinstance(spec, _Lookup):
        if len(spec.values) == 1 or (spec.index == spec.index[0]).all():
            return _dumps(spec.values[int(spec.index[0])])
        return np.array([_dumps(v) for v in spec.values], dtype=object)[spec.index].tolist()
    if isinstance(spec, _Const):
        return _dumps(spec.value)
    if isinstance(spec, _Ids):
        hexes = event_ids(sensor_id, spec.seq, spec.mono)  # hex digits: nothing to escape
        return ('"' + '"\n"'.join(hexes) + '"').encode().split(b"\n")
    return _assemble(zip(spec.keys, map(_column_json, spec.cols), strict=True), n, b"{", b"}")


def _assemble(items: Iterable[tuple[str, bytes | list[bytes]]], n: int, head: bytes, tail: bytes):
    """Objects of n events from (key, literal JSON or per-event JSON) pairs; a literal
    when no value varies."""
    streams: list = []
    text = head
    for i, (key, value) in enumerate(items):
        text += (b"," if i else b"") + orjson.dumps(key) + b":"
        if isinstance(value, bytes):
            text += value
        else:
            streams += [repeat(text), value]
            text = b""
    text += tail
    if not streams:
        return text
    streams.append(repeat(text))
    return list(map(b"".join, zip(*streams, strict=False)))  # the repeats never end


def lines(category: str, arr: np.ndarray, table: dict, sensor_id: str = "") -> list[bytes]:
    """One JSON line (newline included) per event of a batch, no dict on the way."""
    n = len(arr)
    if not n:
        return []
    done: dict[int, bytes | list[bytes]] = {}
    items = []
    for key, spec in _fields(category, arr, table, sensor_id).items():
        if id(spec) not in done:
            done[id(spec)] = _as_json(spec, n, sensor_id)
        items.append((key, done[id(spec)]))
    out = _assemble(items, n, b"{", b"}\n")
    return [out] * n if isinstance(out, bytes) else out


# -- a window in sequence order -------------------------------------------------------
def sequence_order(batches: Iterable[Batch]) -> np.ndarray | None:
    """Indices that put the events of these batches (concatenated in order) in
    sensor sequence order; None when they already are. Stable: events without a
    number (a subscriber's lost notice, 0) keep their place ahead of the window."""
    seqs = [arr["sensor_sequence_number"] for _, arr, _ in batches]
    if len(seqs) < 2:
        return None
    seq = np.concatenate(seqs)
    if len(seq) < 2 or (seq[1:] >= seq[:-1]).all():
        return None
    return np.argsort(seq, kind="stable")


def reorder(items: list, order: np.ndarray | None) -> list:
    """``items`` taken in ``order`` (from sequence_order)."""
    if order is None:
        return items
    return list(map(items.__getitem__, order.tolist()))


def window_dicts(batches: list[Batch], sensor_id: str = "") -> list[dict]:
    """Every event of one window (all its batches), in sensor sequence order."""
    out: list[dict] = []
    for category, arr, table in batches:
        out += dicts(category, arr, table, sensor_id)
    return reorder(out, sequence_order(batches))


def window_lines(batches: list[Batch], sensor_id: str = "") -> bytes:
    """Every event of one window as JSON lines in sensor sequence order, one buffer."""
    out: list[bytes] = []
    for category, arr, table in batches:
        out += lines(category, arr, table, sensor_id)
    return b"".join(reorder(out, sequence_order(batches)))
