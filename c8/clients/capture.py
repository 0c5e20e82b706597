"""Captures: a subscription's windows to Apache Parquet, and back into the rule engine.

    subscription windows -> CaptureWriter -> FILE.parquet -> read_batches -> Engine

One file schema for every capture (``file_schema``): one column per event field
of every category, named as in ``c8ctl fields`` (strings as UTF-8 text, kinds
by name), a ``type`` column for the category, ``sensor_id``, the container
identity (container_id, container_name, image_id, image_name, and the
Kubernetes k8s_namespace, k8s_pod_name, k8s_pod_uid, k8s_container_name,
k8s_labels as a map; files from before them read as outside a pod) and
``process_lineage`` (a list of {pid, process_id, exec_filename, command_line},
parent first). A column a category lacks is null on its rows. The batch-local
``container`` index and the filter-only ``parent.*`` / ``ancestor.*`` fields
are not stored; kernel_call/user_call argument columns (``arg_*``, their names
depend on the probe) are not stored either.

Arrow arrays are made from the numpy columns a whole column at a time: string
columns from their fixed-width buffers (lengths by ``np.char.str_len``, bytes
gathered by one mask), kinds and container fields by lookup. The only Python
objects made are one lineage list per distinct process of a batch. A window's
batches are put in sensor sequence order and buffered into row groups of about
``ROW_GROUP_ROWS`` rows.

Reading back (``read_batches``) turns each row group into one numpy structured
array per category with the broker's dtype, and a batch table (containers and
lineage) that the filter language and the engine read as they read live ones.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from c8 import schema
from c8.clients import jsonlines
from c8.protocol.batch import Tables

ROW_GROUP_ROWS = 65536  # rows buffered before a row group is written
FORMAT_VERSION = 1  # of the file layout; in the file's metadata as c8.capture
NOT_STORED = frozenset({"container"})  # batch-local index: rebuilt from container_id on read
CONTAINER_COLUMNS = ("container_id", "container_name", "image_id", "image_name")
K8S_COLUMNS = jsonlines.K8S_KEYS[:4]  # strings; then k8s_labels, a map
LABELS_TYPE = pa.map_(pa.string(), pa.string())

LINEAGE_TYPE = pa.list_(pa.struct([("pid", pa.int32()), ("process_id", pa.string()),
                                   ("exec_filename", pa.string()), ("command_line", pa.string())]))


class CaptureError(ValueError):
    """A file that is not a c8 capture, or one this version cannot read."""


def _arrow_type(np_type: np.dtype) -> pa.DataType:
    return pa.string() if np_type.kind == "S" else pa.from_numpy_dtype(np_type)


def _field_dtypes() -> dict[str, np.dtype]:
    """Every stored event column -> its numpy dtype, over all categories (one type per name)."""
    out: dict[str, np.dtype] = {}
    for category in schema.CATEGORIES:
        dt = schema.dtype(category)
        for name in dt.names:
            if name in NOT_STORED:
                continue
            t = dt.fields[name][0]
            if out.setdefault(name, t) != t:  # the field table gives each name one type
                raise AssertionError(f"field {name} has two types: {out[name]} and {t}")
    return out


FIELD_DTYPES = _field_dtypes()


def file_schema(metadata: dict | None = None) -> pa.Schema:
    """The schema every capture has: type, the event fields, sensor and container
    identity, lineage."""
    fields = [pa.field("type", pa.string(), nullable=False)]
    for name, t in FIELD_DTYPES.items():
        fields.append(pa.field(name, pa.string() if name == "kind" else _arrow_type(t)))
        if name == "sensor_monotime_nanos":  # the identity columns near the front
            fields.append(pa.field("sensor_id", pa.string()))
    fields += [pa.field(c, pa.string()) for c in CONTAINER_COLUMNS + K8S_COLUMNS]
    fields.append(pa.field("k8s_labels", LABELS_TYPE))
    fields.append(pa.field("process_lineage", LINEAGE_TYPE))
    meta = {"c8.capture": str(FORMAT_VERSION), "c8.wire": str(schema.WIRE_VERSION)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return pa.schema(fields, metadata=meta)


# -- numpy -> Arrow, a column at a time ---------------------------------------------
def strings_to_arrow(col: np.ndarray) -> pa.Array:
    """A fixed-width byte-string column as Arrow UTF-8 strings (trailing NULs cut).
    Valid UTF-8 goes straight from the buffer; a column holding invalid bytes is
    decoded with replacement characters."""
    col = np.ascontiguousarray(col)
    n, width = len(col), col.dtype.itemsize
    lengths = np.char.str_len(col).astype(np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if width:
        data = col.view(np.uint8).reshape(n, width)[np.arange(width) < lengths[:, None]]
    else:
        data = np.zeros(0, np.uint8)
    if offsets[-1] < 2**31:
        arr = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))
    else:
        arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)).cast(pa.string())
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:  # not UTF-8 (a file name is any bytes): this column per value
        arr = pa.array(jsonlines.strings(col), pa.string())
    return arr


def _lookup(index: np.ndarray, values: list, type_: pa.DataType) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array(values, type_)).dictionary_decode()


def _kinds(category: str, codes: np.ndarray) -> pa.Array:
    names = list(schema.KINDS.get(category, ()))
    codes = codes.astype(np.int64)
    ok = (codes > 0) & (codes <= len(names))
    if ok.all():
        return _lookup(codes - 1, names, pa.string())
    extra = np.unique(codes[~ok])  # unnamed codes as their number, as JSON lines show them
    index = np.where(ok, codes - 1, len(names) + np.searchsorted(extra, codes))
    return _lookup(index, names + [str(c) for c in extra.tolist()], pa.string())


def batch_to_arrow(category: str, arr: np.ndarray, table: dict, sensor_id: str,
                   schema_: pa.Schema) -> pa.RecordBatch:
    """One broker batch as a record batch of the capture schema."""
    n = len(arr)
    names = set(arr.dtype.names)
    tables = table if isinstance(table, Tables) else Tables(table or {})
    cols: dict[str, pa.Array] = {}
    cols["type"] = _lookup(np.zeros(n, np.int32), [category], pa.string())
    cols["sensor_id"] = _lookup(np.zeros(n, np.int32), [sensor_id], pa.string())
    for name in FIELD_DTYPES:
        if name not in names:
            continue
        col = arr[name]
        if name == "kind":
            cols[name] = _kinds(category, col)
        elif col.dtype.kind == "S":
            cols[name] = strings_to_arrow(col)
        else:
            cols[name] = pa.array(np.ascontiguousarray(col))
    idx = arr["container"] if "container" in names else np.zeros(n, np.uint32)
    keys, inverse = np.unique(idx, return_inverse=True)
    rows = [tuple(tables.get(k) or jsonlines.NO_CONTAINER) for k in keys.tolist()]
    rows = [r[:4] + (r[5:10] if len(r) >= 10 else jsonlines.NO_POD) for r in rows]
    for j, name in enumerate(CONTAINER_COLUMNS + K8S_COLUMNS):
        cols[name] = _lookup(inverse.reshape(-1), [r[j] or "" for r in rows], pa.string())
    labels = pa.array([list((r[8] or {}).items()) for r in rows], LABELS_TYPE)
    cols["k8s_labels"] = labels.take(pa.array(inverse.reshape(-1)))
    if "process_id" in names and n:
        keys, inverse = np.unique(arr["process_id"], return_inverse=True)
        chains = [tables.lineage(k.decode(errors="replace")) for k in keys.tolist()]
        cols["process_lineage"] = pa.array(chains, LINEAGE_TYPE).take(pa.array(inverse.reshape(-1)))
    out = []
    for f in schema_:
        c = cols.get(f.name)
        out.append(pa.nulls(n, f.type) if c is None else c.cast(f.type) if c.type != f.type else c)
    return pa.RecordBatch.from_arrays(out, schema=schema_)


# -- writing ---------------------------------------------------------------------------
class CaptureWriter:
    """Windows in, a Parquet capture out; ``close()`` finishes the file.

    ``metadata`` (str -> str or JSON-able) goes into the file's key-value metadata,
    beside ``c8.capture`` (format version) and ``c8.wire``.
    """

    def __init__(self, path: str, sensor_id: str = "", metadata: dict | None = None,
                 row_group_rows: int = ROW_GROUP_ROWS):
        self.path = path
        self.sensor_id = sensor_id
        self.schema = file_schema(dict(metadata or {}, **{"c8.sensor_id": sensor_id}))
        self.row_group_rows = row_group_rows
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self.row_groups = 0
        self.not_stored: set[str] = set()  # columns of batches the schema has no place for (arg_*)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write_window(self, window: list[tuple[str, np.ndarray, dict]]) -> int:
        """Append one window's batches, its rows in sensor sequence order; returns rows."""
        batches = [batch_to_arrow(c, a, t, self.sensor_id, self.schema) for c, a, t in window if len(a)]
        for _, a, _ in window:
            self.not_stored.update(n for n in a.dtype.names if n not in FIELD_DTYPES and n not in NOT_STORED)
        if not batches:
            return 0
        order = jsonlines.sequence_order([w for w in window if len(w[1])])
        if order is not None:
            batches = pa.Table.from_batches(batches, self.schema).take(pa.array(order)).to_batches()
        n = sum(b.num_rows for b in batches)
        self._pending += batches
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self.row_group_rows:
            self.flush()
        return n

    def flush(self) -> None:
        """Write what is buffered as one row group."""
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending, self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.row_groups += 1
        self._pending, self._pending_rows = [], 0

    def close(self, metadata: dict | None = None) -> None:
        """Flush and write the footer (with ``metadata`` added to the file's)."""
        if self._writer is None:
            return
        self.flush()
        if metadata:
            self._writer.add_key_value_metadata(
                {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        self._writer.close()
        self._writer = None


def cut_window(window: list, keep: int, categories) -> tuple[list, int]:
    """The window up to its ``keep``-th event of ``categories`` in sequence order (other
    categories' rows up to the same point); returns (window, events of categories kept)."""
    seqs = [a["sensor_sequence_number"] for c, a, _ in window if c in categories]
    counted = int(sum(len(s) for s in seqs))
    if counted <= keep:
        return window, counted
    if keep <= 0:
        return [], 0
    last = np.sort(np.concatenate(seqs))[keep - 1]
    out = [(c, a[a["sensor_sequence_number"] <= last], t) for c, a, t in window]
    return [w for w in out if len(w[1])], keep


def record(sub, path: str, count: int | None = None, duration: float | None = None,
           metadata: dict | None = None, idle_poll: float = 0.5) -> dict:
    """Write a subscription's windows to ``path`` until ``count`` events of its
    categories, ``duration`` seconds, the subscription's end or KeyboardInterrupt.
    Returns {path, events, rows, row_groups, seconds, lost, ended}."""
    categories = set((sub.spec or {}).get("events") or ()) or set(schema.CATEGORIES)
    start = time.monotonic()
    deadline = start + duration if duration is not None else None
    events = 0
    meta = dict(metadata or {}, **{"c8.subscription": sub.spec or {},
                                   "c8.wall_minus_monotime_nanos": str(time.time_ns() - time.monotonic_ns())})
    writer = CaptureWriter(path, sub.sensor_id, meta)
    try:
        done = False
        while not done and sub.ended is None:
            # with a deadline, come back at idle moments to look at the clock; without,
            # one iteration throughout (it resubscribes if the broker restarts)
            for window in sub.windows(idle=idle_poll if deadline is not None else None):
                if count is not None:
                    window, n = cut_window(window, count - events, categories)
                else:
                    n = sum(len(a) for c, a, _ in window if c in categories)
                writer.write_window(window)
                events += n
                if (count is not None and events >= count) or (
                        deadline is not None and time.monotonic() >= deadline):
                    done = True
                    break
            if deadline is None or time.monotonic() >= deadline:
                done = True  # without a deadline the iteration ends only with the subscription
    except KeyboardInterrupt:
        pass
    finally:
        seconds = time.monotonic() - start
        writer.close({"c8.recorded": {"events": events, "seconds": round(seconds, 3),
                                      "lost": dict(sub.lost), "ended": sub.ended}})
    out = {"path": path, "events": events, "rows": writer.rows, "row_groups": writer.row_groups,
           "seconds": round(seconds, 3), "lost": dict(sub.lost), "ended": sub.ended}
    if writer.not_stored:
        out["columns_not_stored"] = sorted(writer.not_stored)
    return out


# -- reading ---------------------------------------------------------------------------
class CaptureTables(Tables):
    """A read-back batch's table: containers by index like a live one, and lineage
    from the stored ``process_lineage`` lists, converted once per distinct process
    the first time any is asked for. ``lineage`` is the batch's lineage column, or a
    function of row positions in the batch giving theirs (read from the file only
    then: most rules never ask)."""

    def __init__(self, containers: dict, process_ids: np.ndarray, lineage):
        super().__init__(containers)
        self._ids = process_ids
        self._source = lineage
        self._chains: dict[str, list[dict]] | None = None

    def lineage(self, process_id: str) -> list[dict]:
        if self._chains is None:
            self._chains = {}
            if self._source is not None and len(self._ids):
                keys, first = np.unique(self._ids, return_index=True)
                source = self._source
                col = source.take(pa.array(first)) if isinstance(source, pa.Array) else source(first)
                names = [k.decode(errors="replace") for k in keys.tolist()]
                self._chains = {k: v or [] for k, v in zip(names, col.to_pylist(), strict=True)}
        return self._chains.get(process_id, [])


def strings_from_arrow(arr: pa.Array, width: int) -> np.ndarray:
    """Arrow strings as a numpy ``S<width>`` column (nulls empty, longer values cut)."""
    arr = pc.fill_null(arr, "") if arr.null_count else arr
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int32, n + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = np.minimum(offsets[1:] - starts, width)
    out = np.zeros((n, max(width, 1)), np.uint8)
    total = int(lengths.sum())
    if total:
        rows = np.repeat(np.arange(n), lengths)
        within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, within] = data[np.repeat(starts, lengths) + within]
    return out[:, :width].copy().view(f"S{width}").reshape(n) if width else np.zeros(n, "S0")


def _codes(category: str, kinds: pa.Array) -> np.ndarray:
    enc = pc.dictionary_encode(pc.fill_null(kinds, ""))
    names = enc.dictionary.to_pylist()  # a handful of names per batch
    table = np.array([_kind_code(category, k) for k in names], np.uint8)
    return table[np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]


def _kind_code(category: str, name: str) -> int:
    if name in schema.KINDS.get(category, ()):
        return schema.kind_code(category, name)
    return int(name) if name.isdigit() else 0


def _containers(rows: pa.Table) -> tuple[np.ndarray, dict]:
    """The container index column and table of a read-back batch (0: the host)."""
    cid = pc.fill_null(rows.column("container_id").combine_chunks(), "")
    enc = pc.dictionary_encode(cid)
    ids = enc.dictionary.to_pylist()
    indices = np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)
    _, first = np.unique(indices, return_index=True)
    slot = np.zeros(len(ids), np.uint32)
    table: dict[int, tuple] = {}
    def column(name: str) -> pa.Array | None:  # None: a file from before the column
        return rows.column(name).combine_chunks() if name in rows.column_names else None

    others = [column(c) for c in CONTAINER_COLUMNS[1:]]
    pods = [column(c) for c in K8S_COLUMNS]
    labels = column("k8s_labels")
    for d, row in zip(np.unique(indices).tolist(), first.tolist(), strict=True):
        if not ids[d]:
            continue  # the host
        slot[d] = len(table) + 1
        pod = tuple((o[row].as_py() or "") if o is not None else "" for o in pods)
        table[int(slot[d])] = (ids[d], *((o[row].as_py() or "") for o in others), "", *pod,
                               dict((labels[row].as_py() or []) if labels is not None else []))
    return slot[indices], table


def rows_to_batch(category: str, rows: pa.Table, narrow: bool = True,
                  lineage=None) -> tuple[np.ndarray, CaptureTables]:
    """Capture rows of one category as the broker's structured array and batch table.

    ``narrow``: each string column only as wide as its longest value (at most the
    declared width), as the wire sends them and a client decodes them: the
    filter masks scan less; the values are the same."""
    declared = schema.dtype(category)
    n = rows.num_rows
    present = set(rows.column_names)
    cols: dict[str, pa.Array] = {}
    formats = []
    for name in declared.names:
        t = declared.fields[name][0]
        if name != "container" and name in present:
            cols[name] = rows.column(name).combine_chunks()
        if t.kind == "S" and narrow and name in cols:
            used = pc.max(pc.binary_length(cols[name])).as_py() or 0
            t = np.dtype(f"S{min(max(used, 1), t.itemsize)}")
        formats.append((name, t))
    dt = np.dtype(formats)
    out = np.zeros(n, dt)
    for name, col in cols.items():
        t = dt.fields[name][0]
        if name == "kind":
            out[name] = _codes(category, col)
        elif t.kind == "S":
            out[name] = strings_from_arrow(col, t.itemsize)
        else:
            out[name] = (pc.fill_null(col, 0) if col.null_count else col).to_numpy(zero_copy_only=False)
    index, containers = _containers(rows)
    if "container" in dt.names:
        out["container"] = index
    if "process_lineage" in present:
        lineage = rows.column("process_lineage").combine_chunks()
    ids = out["process_id"] if "process_id" in dt.names else np.zeros(n, "S16")
    return out, CaptureTables(containers, ids, lineage)


def open_capture(path: str) -> pq.ParquetFile:
    """The Parquet file, checked to be a c8 capture this version reads."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CaptureError(f"{path}: not a Parquet file ({exc})") from None
    meta = pf.schema_arrow.metadata or {}
    version = meta.get(b"c8.capture")
    if version is None:
        raise CaptureError(f"{path}: a Parquet file but not a c8 capture (no c8.capture metadata)")
    if int(version) > FORMAT_VERSION:
        raise CaptureError(f"{path}: capture format {version.decode()} is newer than this c8 reads ({FORMAT_VERSION})")
    if "type" not in pf.schema_arrow.names:
        raise CaptureError(f"{path}: capture without a type column")
    return pf


def read_batches(path: str, categories=None) -> Iterator[tuple[str, np.ndarray, CaptureTables]]:
    """(category, structured array, batch table) per category of each row group, in
    file order; within a row group process events come first (so EXECs are known to
    the engine before the file events of the same programs), then the schema's order."""
    pf = open_capture(path)
    wanted = [c for c in schema.CATEGORIES if categories is None or c in categories]
    columns = [n for n in pf.schema_arrow.names if n != "process_lineage"]
    has_lineage = "process_lineage" in pf.schema_arrow.names
    for i in range(pf.num_row_groups):
        group = pf.read_row_group(i, columns=columns)  # lineage lists only when asked for
        types = group.column("type").combine_chunks()
        present = set(pc.unique(types).to_pylist())
        lineage = _LazyColumn(pf, i, "process_lineage") if has_lineage else None
        for category in wanted:
            if category not in present:
                continue
            mask = pc.equal(types, category)
            rows = group.filter(mask)
            positions = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            source = lineage.rows(positions) if lineage is not None else None
            arr, tables = rows_to_batch(category, rows, lineage=source)
            yield category, arr, tables


class _LazyColumn:
    """One column of one row group, read from the file the first time it is needed."""

    def __init__(self, pf: pq.ParquetFile, group: int, name: str):
        self.pf, self.group, self.name = pf, group, name
        self._col: pa.Array | None = None

    def rows(self, positions: np.ndarray):
        """A function of row positions in a batch (``positions`` in the row group) -> values."""
        def take(idx: np.ndarray) -> pa.Array:
            if self._col is None:
                self._col = self.pf.read_row_group(self.group, columns=[self.name]).column(0).combine_chunks()
            return self._col.take(pa.array(positions[idx]))
        return take


def replay(path: str, engine, categories=None) -> Iterator[tuple[str, np.ndarray, list]]:
    """(category, batch, the engine's alerts) per batch of a capture (a limiter TRIPPED
    flushes its caches, as the detector does). An alert's ``time`` is the wall time
    of the recording host (its clock offset is in the file); a ``{time}`` in a rule's
    output text is rendered by the engine with this host's clock."""
    tripped = schema.kind_code("limiter", "TRIPPED")
    meta = open_capture(path).schema_arrow.metadata or {}
    offset = meta.get(b"c8.wall_minus_monotime_nanos")
    for category, arr, tables in read_batches(path, categories):
        if category == "limiter":
            if (arr["kind"] == tripped).any():
                engine.flush()
            continue
        if category == "lost":
            continue
        alerts = engine.evaluate(category, arr, tables)
        if offset is not None:
            for alert in alerts:
                alert.time = _iso(int(offset) + alert.time_nanos)
        yield category, arr, alerts


def _iso(wall_nanos: int) -> str:
    return datetime.datetime.fromtimestamp(wall_nanos / 1e9, datetime.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def parse_duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``5m``, ``1h`` or ``250ms``; ValueError naming the text."""
    t = str(text).strip().lower()
    for unit, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1.0
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"bad duration {text!r} (use e.g. 30, 30s, 5m, 1h, 250ms)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"bad duration {text!r}: must be a positive number of seconds")
    return value
