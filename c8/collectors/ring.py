"""Reading a perf mmap ring and walking its records with numpy.

:class:`Ring` copies the unread bytes ``[data_tail, data_head)`` into one linear
buffer (two slices when they wrap) and then releases them to the kernel by
writing ``data_tail``. :func:`walk` finds the record boundaries in that buffer.

Walking variable-size records is sequential in principle (each header gives
the next one's offset). We make it a vector operation: every 8-byte slot is
tested as a *candidate* header (sane size, and for samples a RAW size that
matches the record size: our sample layout is fixed), then the chain
``next = pos + size`` is checked against the following candidate in one numpy
comparison. Runs where the chain holds, of any mix of sizes, are taken whole;
Python only steps where a candidate was a false positive inside a payload.
:func:`walk_slow` is the plain per-record loop, kept as the reference.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

import numpy as np

from c8.collectors import perf

DATA_HEAD_OFF = 1024
DATA_TAIL_OFF = 1032
DATA_OFFSET_OFF = 1040
DATA_SIZE_OFF = 1048

_MAX_TYPE = 64  # record types the kernel defines are far below this
_COARSE_MASK = np.uint64(0x0007_0000_0000_0000 | (0xFFFFFFFF & ~(_MAX_TYPE - 1)))


@dataclass
class Records:
    """Record boundaries in a linear buffer, split by kind."""

    samples: np.ndarray        # int64 byte offsets of PERF_RECORD_SAMPLE records
    lost: int                  # sum of PERF_RECORD_LOST counts
    lost_records: int          # how many LOST records
    other: int                 # records of other types, ignored

    @property
    def n(self) -> int:
        return len(self.samples)


class Ring:
    """A mapped perf ring and the linear buffer its unread bytes are copied to."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm
        self._head = ctypes.c_uint64.from_buffer(mm, DATA_HEAD_OFF)
        self._tail = ctypes.c_uint64.from_buffer(mm, DATA_TAIL_OFF)
        off = ctypes.c_uint64.from_buffer(mm, DATA_OFFSET_OFF).value or perf.PAGE_SIZE
        size = ctypes.c_uint64.from_buffer(mm, DATA_SIZE_OFF).value or (len(mm) - perf.PAGE_SIZE)
        self.data = np.frombuffer(mm, np.uint8, count=size, offset=off)
        self.size = size
        self.linear = np.empty(size, np.uint8)

    def pending(self) -> int:
        """Bytes written by the kernel and not yet read."""
        return self._head.value - self._tail.value

    def read(self) -> np.ndarray:
        """Copy all unread records into the linear buffer and release them.

        Returns a view of the linear buffer, valid until the next read().
        """
        # Load data_head before the data. x86 (TSO) keeps loads in order and
        # keeps the tail store after these loads, which is the barrier pairing
        # the kernel's perf_output_put_handle expects.
        head = self._head.value
        tail = self._tail.value
        n = head - tail
        if n <= 0:
            return self.linear[:0]
        if n > self.size:  # cannot happen unless tail was corrupted
            n = self.size
            tail = head - n
        start = tail % self.size
        first = min(n, self.size - start)
        self.linear[:first] = self.data[start:start + first]
        if first < n:
            self.linear[first:n] = self.data[:n - first]
        self._tail.value = head
        return self.linear[:n]

    def close(self) -> None:
        self.data = None
        del self._head, self._tail
        try:
            self.mm.close()
        except BufferError:  # views still alive: the mapping goes with them
            pass


def walk(buf: np.ndarray) -> Records:
    """Find the records of a linear ring buffer (8-byte aligned, whole records)."""
    end = len(buf) & ~7
    if end == 0:
        return Records(np.empty(0, np.int64), 0, 0, 0)
    u64 = buf[:end].view("<u8")
    nslots = len(u64)
    # One pass over the slots, on whole u64s: size (bits 48..63) a nonzero
    # multiple of 8, type (bits 0..31) below _MAX_TYPE.
    cand = np.flatnonzero(((u64 & _COARSE_MASK) == 0) & (u64 >= np.uint64(8 << 48)))
    head = u64[cand]
    csize = (head >> np.uint64(48)).astype(np.int64)
    ctype = head & np.uint64(0xFFFFFFFF)
    ok = (ctype > 0) & (cand * 8 + csize <= end)
    raw_slot = cand + perf.SAMPLE_RAW_SIZE_OFF // 8
    raw = u64[np.minimum(raw_slot, nslots - 1)] & np.uint64(0xFFFFFFFF)
    is_sample = ctype == perf.RECORD_SAMPLE
    ok &= ~is_sample | ((raw_slot < nslots) & (csize == perf.SAMPLE_RAW_OFF + raw.astype(np.int64)))
    cand = cand[ok]
    nxt = cand + (csize[ok] >> 3)           # in slots
    # succ[i]: index of the candidate where the record at cand[i] ends (len: none)
    succ = np.searchsorted(cand, nxt)
    succ[(succ < len(cand)) & (cand[np.minimum(succ, len(cand) - 1)] != nxt)] = len(cand)
    pieces = []
    pos = 0
    while pos < nslots:
        i = int(np.searchsorted(cand, pos))
        if i < len(cand) and cand[i] == pos:
            path = _chain(succ, i)
            pieces.append(cand[path])
            pos = int(nxt[path[-1]])
        else:  # a header we did not expect: step over it the slow way
            s = int(u64[pos] >> np.uint64(48))
            if s < 8 or s & 7 or pos * 8 + s > end:
                break  # corrupt: stop rather than misparse
            pieces.append(np.array([pos], np.int64))
            pos += s >> 3
    if not pieces:
        return Records(np.empty(0, np.int64), 0, 0, 0)
    slots = np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
    types = u64[slots] & np.uint64(0xFFFFFFFF)
    is_sample = types == perf.RECORD_SAMPLE
    samples = slots[is_sample] * 8
    is_lost = types == perf.RECORD_LOST
    lost_slots = slots[is_lost]
    lost = int(u64[lost_slots + 2].sum()) if len(lost_slots) else 0
    return Records(samples, lost, len(lost_slots), int(len(slots) - is_sample.sum() - len(lost_slots)))


_FEW_BREAKS = 16  # below this many false candidates, step over them one by one


def _chain(succ: np.ndarray, start: int) -> np.ndarray:
    """Indices of the records chained from ``start`` (each one's end is the next one's
    header) until a record ends where no candidate starts.

    Candidates inside a payload (bytes that look like a header: a syscall argument,
    a sys_exit record's trace flags) are never on the chain. When they are few the
    run between them is taken whole; when they are many (any record may carry one,
    and a process can choose its syscall arguments) the chain is found by pointer
    doubling, O(n log n) in numpy, instead of one Python step per record.
    """
    n = len(succ)
    idx = np.arange(start, n)
    breaks = np.flatnonzero(succ[start:] != idx + 1)
    if len(breaks) == 0:
        return idx
    if len(breaks) <= _FEW_BREAKS:
        out = []
        i = start
        while i < n:
            b = int(np.searchsorted(breaks, i - start))  # the first break at or after i
            j = start + int(breaks[b]) if b < len(breaks) else n - 1
            out.append(np.arange(i, j + 1))
            i = int(succ[j])
        return np.concatenate(out)
    # The path from start in the graph i -> succ[i] (n is the end, pointing to itself):
    # after step k, ``on`` holds the first 2^k records of the path and jump = succ^(2^k).
    jump = np.append(succ, n)
    on = np.zeros(n + 1, bool)
    on[start] = True
    members = np.array([start])
    while True:
        on[jump[members]] = True
        grown = np.flatnonzero(on)
        if len(grown) == len(members):
            break
        members = grown
        jump = jump[jump]
    return members[members < n]


def walk_slow(buf: np.ndarray) -> Records:
    """Reference walker: one Python step per record."""
    b = buf.tobytes()
    pos = 0
    samples: list[int] = []
    lost = nlost = other = 0
    end = len(b)
    while pos + 8 <= end:
        typ, _misc, size = struct.unpack_from("<IHH", b, pos)
        if size < 8 or pos + size > end:
            break
        if typ == perf.RECORD_SAMPLE:
            samples.append(pos)
        elif typ == perf.RECORD_LOST:
            lost += struct.unpack_from("<Q", b, pos + 16)[0]
            nlost += 1
        else:
            other += 1
        pos += size
    return Records(np.array(samples, np.int64), lost, nlost, other)
