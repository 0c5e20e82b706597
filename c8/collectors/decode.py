"""Decoding ring records into numpy structured arrays, one per source.

Samples are grouped by their PERF_SAMPLE_IDENTIFIER id (id -> source, from
PERF_EVENT_IOC_ID). Each group is gathered with fancy indexing: the fixed part
of every raw record in one 2D gather, ``__data_loc`` strings in a second
gather masked past their length. No Python object is made per event.

Samples of the BPF-output event carry records written by the sensor's eBPF
programs: a u32 tag first, then the layout registered for that tag with
:func:`register_bpf_record`. They decode to source ``bpf:<name>``. The same
records read from a BPF ring buffer (:mod:`c8.collectors.ringbuf`) come with
their time and pid_tgid before them instead of a sample header
(:meth:`Decoder.decode_ringbuf`).

A payload field whose name is a header field (``pid`` of sched_process_exec)
is renamed ``tp_<name>`` (see :func:`column_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from c8.collectors import perf
from c8.collectors.tracefs import CHARS, DATA_LOC, REL_LOC, EventFormat
from c8.schema import rows

PREFIX_SIZE = 16  # c8.collectors.bpf.records.PREFIX_SIZE: time, pid_tgid

HEADER = [("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4")]
DEFAULT_STRING_WIDTH = 256

_HEADER_NAMES = frozenset(n for n, _ in HEADER)


def column_name(field: str) -> str:
    """The column of a payload field: its name, or ``tp_<name>`` if a header field has it."""
    return f"tp_{field}" if field in _HEADER_NAMES else field


_bpf_records: dict[int, tuple[str, np.dtype]] = {}


def register_bpf_record(tag: int, name: str, dtype: np.dtype) -> None:
    """Declare the layout of eBPF records whose first u32 is ``tag``.

    ``dtype`` starts with the u32 ``tag`` field; decoded arrays (source
    ``bpf:<name>``) carry the header fields then the layout minus the tag.
    """
    dtype = np.dtype(dtype)
    if not dtype.names or dtype.names[0] != "tag" or dtype["tag"] != np.dtype("<u4") \
            or dtype.fields["tag"][1] != 0:
        raise ValueError(f"bpf record {name!r}: dtype must start with a u4 'tag' at offset 0")
    _bpf_records[int(tag)] = (name, dtype)


def bpf_records() -> dict[int, tuple[str, np.dtype]]:
    """The registered eBPF record layouts: tag -> (name, dtype)."""
    return dict(_bpf_records)


def _gather(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """A (n, width) uint8 array of ``buf[start:start+width]`` per row (zero past the end)."""
    if width == 0:
        return np.zeros((len(starts), 0), np.uint8)
    if len(buf) and (starts % 4 == 0).all() and width % 4 == 0 and buf.ctypes.data % 4 == 0:
        # Gather 4 bytes at a time: a quarter of the index work.
        w4 = width // 4
        u32 = buf[: len(buf) & ~3].view("<u4")
        idx = (starts // 4)[:, None] + np.arange(w4)
        np.minimum(idx, len(u32) - 1, out=idx)
        return u32[idx].view(np.uint8).reshape(len(starts), width)
    idx = starts[:, None] + np.arange(width)
    np.minimum(idx, len(buf) - 1, out=idx)
    return buf[idx]


# Header fields of a record view, named "@..." to stay apart from payload names.
_REC_HEADER = [("@pid", "<i4", perf.SAMPLE_PID_OFF), ("@tid", "<i4", perf.SAMPLE_TID_OFF),
               ("@time", "<u8", perf.SAMPLE_TIME_OFF), ("@cpu", "<u4", perf.SAMPLE_CPU_OFF),
               ("@raw_size", "<u4", perf.SAMPLE_RAW_SIZE_OFF)]
_MIN_RUN = 32  # below this mean run length, gathering beats one view per run


def record_dtype(raw: np.dtype, itemsize: int) -> np.dtype:
    """A dtype viewing a whole sample record: header fields, then ``raw``'s fields."""
    names = [n for n, _, _ in _REC_HEADER] + list(raw.names)
    formats = [f for _, f, _ in _REC_HEADER] + [raw.fields[n][0] for n in raw.names]
    offsets = [o for _, _, o in _REC_HEADER] + [perf.SAMPLE_RAW_OFF + raw.fields[n][1] for n in raw.names]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize})


def records(buf: np.ndarray, pos: np.ndarray, raw: np.dtype) -> list[np.ndarray]:
    """Structured views/copies of the sample records at ``pos`` (sorted), in order.

    Same-size records that follow each other in the buffer (the common case: a
    storm of one tracepoint) are *viewed* in place, one strided view per run;
    when runs are short the records are gathered 8 bytes at a time instead.
    """
    n = len(pos)
    u64 = buf[: len(buf) & ~7].view("<u8")
    size = (u64[pos >> 3] >> np.uint64(48)).astype(np.int64)
    need = perf.SAMPLE_RAW_OFF + raw.itemsize
    breaks = np.flatnonzero((np.diff(pos) != size[:-1]) | (size[1:] != size[:-1])) + 1
    if len(breaks) + 1 <= n // _MIN_RUN or n <= _MIN_RUN and len(breaks) == 0:
        out = []
        for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, n].tolist(), strict=True):
            stride = int(size[a])
            p0 = int(pos[a])
            if stride < need or p0 + stride * (b - a) > len(buf):  # short records: gather
                out.append(_gather_records(buf, pos[a:b], raw, need))
                continue
            out.append(np.ndarray((b - a,), record_dtype(raw, stride), buf, p0, (stride,)))
        return out
    return [_gather_records(buf, pos, raw, need)]


def _gather_records(buf: np.ndarray, pos: np.ndarray, raw: np.dtype, need: int) -> np.ndarray:
    width = (need + 7) & ~7
    u64 = buf[: len(buf) & ~7].view("<u8")
    idx = (pos >> 3)[:, None] + np.arange(width >> 3)
    np.minimum(idx, len(u64) - 1, out=idx)
    return u64[idx].reshape(-1).view(record_dtype(raw, width))


@dataclass
class _Tracepoint:
    source: str
    fmt: EventFormat
    raw_dtype: np.dtype
    out_dtype: np.dtype


class Decoder:
    """Turns a linear ring buffer and its sample offsets into arrays per source."""

    def __init__(self, string_width: int = DEFAULT_STRING_WIDTH):
        self.string_width = int(string_width)
        self._tp: dict[int, _Tracepoint] = {}
        self._bpf_ids: set[int] = set()
        self.unknown = 0        # samples of ids we do not know (closed events)
        # sample id -> [since, until) sample times it owns: a source handed over from
        # one perf event to its replacement is read once, from one or the other
        self._windows: dict[int, tuple[int, int]] = {}
        self.unknown_bpf = 0    # eBPF records of unregistered tags

    def add_tracepoint(self, sample_id: int, fmt: EventFormat, source: str | None = None) -> None:
        """Decode samples of ``sample_id`` with the tracepoint format ``fmt``."""
        out = list(HEADER)
        for f in fmt.payload:
            if f.kind in (DATA_LOC, REL_LOC):
                out.append((column_name(f.name), f"S{self.string_width}"))
            elif f.kind == CHARS:
                out.append((column_name(f.name), f"S{f.size}"))
            else:
                out.append((column_name(f.name), f.raw_dtype()))
        self._tp[int(sample_id)] = _Tracepoint(source or fmt.source, fmt, fmt.raw_dtype(), np.dtype(out))

    def add_bpf_output(self, sample_id: int) -> None:
        """Samples of ``sample_id`` are eBPF records (tag first)."""
        self._bpf_ids.add(int(sample_id))

    def limit(self, sample_id: int, since: int = 0, until: int = 2**64 - 1) -> None:
        """Keep only samples of ``sample_id`` stamped in [since, until), until
        :meth:`clear_limits` (after the read that follows a hand-over)."""
        self._windows[int(sample_id)] = (since, until)

    def clear_limits(self) -> None:
        self._windows.clear()

    def remove(self, sample_id: int) -> None:
        self._tp.pop(int(sample_id), None)
        self._bpf_ids.discard(int(sample_id))
        self._windows.pop(int(sample_id), None)

    def sources(self) -> dict[int, str]:
        return {i: t.source for i, t in self._tp.items()}

    def decode(self, buf: np.ndarray, samples: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Arrays ``(source, array)`` for the samples at byte offsets ``samples``.

        Each array keeps ring (time) order within its source.
        """
        if len(samples) == 0:
            return []
        u64 = buf[: len(buf) & ~7].view("<u8")
        slots = samples >> 3
        ids = u64[slots + 1]
        out: list[tuple[str, np.ndarray]] = []
        uniq = np.unique(ids)
        for sid in uniq.tolist():
            pos = samples[ids == sid] if len(uniq) > 1 else samples
            window = self._windows.get(sid)
            if window is not None:
                t = u64[(pos >> 3) + 3]
                pos = pos[(t >= np.uint64(window[0])) & (t < np.uint64(window[1]))]
            tp = self._tp.get(sid)
            if tp is not None:
                out.append((tp.source, self._decode_tp(buf, u64, pos, tp)))
            elif sid in self._bpf_ids:
                slots = pos >> 3
                pidtid = u64[slots + 2]
                head = (u64[slots + 3], u64[slots + 4] & np.uint64(0xFFFFFFFF),
                        (pidtid & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32),
                        (pidtid >> np.uint64(32)).astype(np.uint32).view(np.int32))
                raw_size = (u64[slots + 5] & np.uint64(0xFFFFFFFF)).astype(np.int64)
                out.extend(self._decode_bpf(buf, pos + perf.SAMPLE_RAW_OFF, raw_size, head))
            else:
                self.unknown += len(pos)
        return out

    def _decode_tp(self, buf: np.ndarray, u64: np.ndarray, pos: np.ndarray,
                   tp: _Tracepoint) -> np.ndarray:
        arr = np.empty(len(pos), tp.out_dtype)
        i = 0
        for rec in records(buf, pos, tp.raw_dtype):
            k = len(rec)
            part = arr[i:i + k]
            for name in ("time", "cpu", "pid", "tid"):
                part[name] = rec["@" + name]
            raw_start = pos[i:i + k] + perf.SAMPLE_RAW_OFF
            for f in tp.fmt.payload:
                col = column_name(f.name)
                if f.kind == DATA_LOC or f.kind == REL_LOC:
                    loc = rec[f.name].astype(np.int64)
                    off = loc & 0xFFFF
                    if f.kind == REL_LOC:
                        off = off + f.offset + f.size
                    # never read past this record's raw data
                    length = np.minimum(loc >> 16, rec["@raw_size"].astype(np.int64) - off)
                    length = np.clip(length, 0, self.string_width)
                    part[col] = self._strings(buf, raw_start + off, length)
                else:
                    part[col] = rec[f.name]
            i += k
        return arr

    def _strings(self, buf: np.ndarray, starts: np.ndarray, length: np.ndarray) -> np.ndarray:
        w = int(length.max()) if len(length) else 0
        if w == 0:
            return np.zeros(len(starts), "S1")
        b = _gather(buf, starts, w)
        b[np.arange(w) >= length[:, None]] = 0
        return b.reshape(-1).view(f"S{w}")

    def decode_ringbuf(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                       cpu: int) -> list[tuple[str, np.ndarray]]:
        """Arrays ``(source, array)`` of the eBPF records of one CPU's ring buffer
        (:meth:`c8.collectors.ringbuf.RingBuffer.read`): each is the prefix (time,
        pid_tgid: ``records.PREFIX``) then the record. In ring order per source."""
        whole = lengths >= PREFIX_SIZE
        if not whole.all():  # not written by the sensor's programs
            self.unknown_bpf += int((~whole).sum())
            starts, lengths = starts[whole], lengths[whole]
        if len(starts) == 0:
            return []
        u64 = buf[: len(buf) & ~7].view("<u8")
        slots = starts >> 3  # records start 8-aligned
        pidtid = u64[slots + 1]
        head = (u64[slots], np.full(len(starts), cpu, np.uint32),
                (pidtid >> np.uint64(32)).astype(np.uint32).view(np.int32),
                (pidtid & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32))
        return self._decode_bpf(buf, starts + PREFIX_SIZE, lengths - PREFIX_SIZE, head)

    def _decode_bpf(self, buf: np.ndarray, raw_start: np.ndarray, raw_size: np.ndarray,
                    head: tuple[np.ndarray, ...]) -> list[tuple[str, np.ndarray]]:
        """Records of ``raw_size`` bytes at ``raw_start``; ``head``: their time, cpu,
        pid and tid."""
        tags = _gather(buf, raw_start, 4).view("<u4")[:, 0]
        tags = np.where(raw_size >= 4, tags, np.uint32(0xFFFFFFFF))
        out = []
        for tag in np.unique(tags).tolist():
            sel = tags == tag
            reg = _bpf_records.get(tag)
            if reg is None:
                self.unknown_bpf += int(sel.sum())
                continue
            name, dt = reg
            sizes = raw_size[sel]
            # Records may end early (a one-name record ends with its name): gather
            # only up to the longest of them, the rest of the layout is zeros.
            width = (min(int(sizes.max()), dt.itemsize) + 3) & ~3
            b = _gather(buf, raw_start[sel], width)
            short = sizes < width
            if short.any():  # a record shorter than what was gathered: zero the rest
                b[np.arange(width) >= sizes[:, None]] = 0
            if "name_len" in dt.names:  # one name, last: only as wide as the longest
                dt = _one_name_narrow(dt, width)
            if width >= dt.itemsize:
                rec = b[:, : dt.itemsize].copy().reshape(-1).view(dt)
            else:
                whole = np.zeros((len(sizes), dt.itemsize), np.uint8)
                whole[:, :width] = b
                rec = whole.reshape(-1).view(dt)
            names = [n for n in dt.names if n != "tag"]
            arr = np.empty(len(sizes), HEADER + [(column_name(n), dt.fields[n][0]) for n in names])
            for field, values in zip(("time", "cpu", "pid", "tid"), head, strict=True):
                arr[field] = values[sel]
            for n in names:
                arr[column_name(n)] = rec[n]
            out.append((f"bpf:{name}", arr))
        return out


def _one_name_narrow(dt: np.dtype, width: int) -> np.dtype:
    """A one-name record's layout (``filename`` last, ``name_len`` its bytes) with the
    name only as wide as ``width`` bytes of record hold, rounded up as
    c8.schema.rows does: a 21-byte path costs 32 bytes, not 256, in the batch
    the broker gets and in every copy on the way (the broker widens paths it
    writes)."""
    off = dt.fields["filename"][1]
    full = dt.fields["filename"][0].itemsize
    if off + full != dt.itemsize:
        raise AssertionError(f"{dt}: the name is not the record's last field")
    w = rows.width_for(max(width - off, 0), full)
    if w >= full:
        return dt
    return np.dtype({"names": list(dt.names), "offsets": [dt.fields[n][1] for n in dt.names],
                     "formats": [f"S{w}" if n == "filename" else dt.fields[n][0] for n in dt.names],
                     "itemsize": off + w})
