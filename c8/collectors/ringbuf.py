"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) and walking its records with numpy.

The kernel maps a ring buffer as a consumer page (``consumer_pos``, ours to
write), a producer page (``producer_pos``) and the data pages twice in a row, so
a record that wraps reads as one piece. Each record is an 8-byte header, ``len``
(bit 31 BUSY: reserved, not yet committed; bit 30 DISCARD) and ``pg_off`` (the
header's page in the kernel's ring object), then ``len`` bytes, padded to 8.

:meth:`RingBuffer.read` copies the unread bytes into one linear buffer, finds the
committed records before the first busy one, and releases exactly those to the
kernel. Finding them is vectorised as :func:`c8.collectors.ring.walk` does for
perf rings: every 8-byte slot whose ``pg_off`` is the one a header at that
position has is a candidate, and the chain ``next = pos + 8 + len`` from the
first record picks the real ones (a record's bytes that look like a header are
never on the chain). :func:`walk_slow` is the plain loop, kept as the reference.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from c8.collectors.ring import _chain

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_LEN_MASK = np.uint64(0x3FFF_FFFF)
PAGE_SHIFT = mmap.PAGESIZE.bit_length() - 1


class RingBuffer:
    """One mapped BPF ring buffer of ``size`` bytes (``fd``: its map, owned here)."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        page = mmap.PAGESIZE
        try:
            self._cons_mm = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            try:
                self._prod_mm = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
            except BaseException:
                self._cons_mm.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        self._cons = ctypes.c_uint64.from_buffer(self._cons_mm, 0)
        self._prod = np.frombuffer(self._prod_mm, np.uint64, count=1, offset=0)
        self.data = np.frombuffer(self._prod_mm, np.uint8, count=2 * size, offset=page)
        self.linear = np.empty(size, np.uint8)

    def pending(self) -> int:
        """Bytes reserved by the programs and not yet released by us."""
        return int(self._prod[0]) - self._cons.value

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(buf, starts, lengths)``: the committed records' bytes in ``buf`` (a view
        of the linear buffer, valid until the next read) at ``starts``, each
        ``lengths`` long; they are released to the kernel."""
        prod = int(self._prod[0])  # before the data: x86 keeps loads in order
        cons = self._cons.value
        n = prod - cons
        if n <= 0:
            return self.linear[:0], _EMPTY, _EMPTY
        n = min(n, self.size)  # the kernel never lets it exceed the ring
        start = cons & (self.size - 1)
        buf = self.linear[:n]
        buf[:] = self.data[start:start + n]  # the second mapping holds the wrap
        starts, lengths, used = walk(buf, cons, self.size)
        if used:
            self._cons.value = cons + used
        return buf, starts, lengths

    def close(self) -> None:
        self.data = self._prod = None
        del self._cons
        for mm in (self._cons_mm, self._prod_mm):
            try:
                mm.close()
            except BufferError:  # views still alive: the mapping goes with them
                pass
        try:
            os.close(self.fd)
        except OSError:
            pass


_EMPTY = np.empty(0, np.int64)


def walk(buf: np.ndarray, pos: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The committed records in ``buf`` (a ring buffer's bytes from position ``pos``,
    ``size`` the ring's): ``(starts, lengths, used)``, the offsets of their bytes,
    their lengths, and the bytes up to the first record not yet committed.
    Discarded records are used but not returned."""
    end = len(buf) & ~7
    if end < HEADER:
        return _EMPTY, _EMPTY, 0
    u64 = buf[:end].view("<u8")
    offset = pos % size
    # pg_off of the first header (a real one: consumer_pos) gives the data's first page
    base = int(u64[0] >> np.uint64(32)) - (offset >> PAGE_SHIFT)
    if base < 0:
        return _EMPTY, _EMPTY, 0
    # One pass on whole slots: pg_off a page of the ring, 8 <= len < 64 KiB + 8, not
    # busy (a len below 8 borrows and fails the len bits); then, on the few left,
    # pg_off exactly the page of the slot's position.
    pages = size >> PAGE_SHIFT
    mask = np.uint64(((0xFFFF_FFFF & ~(pages - 1)) << 32) | (0xFFFF_0000 & ~DISCARD))
    cand = np.flatnonzero(((u64 - np.uint64((base << 32) | HEADER)) & mask) == 0)
    page = ((cand * 8 + offset) & (size - 1)) >> PAGE_SHIFT
    head = u64[cand]
    cand = cand[(head >> np.uint64(32)).astype(np.int64) == page + base]
    length = (u64[cand] & _LEN_MASK).astype(np.int64)
    nxt = cand + ((length + HEADER + 7) >> 3)
    fits = nxt * 8 <= end
    cand, nxt, length = cand[fits], nxt[fits], length[fits]
    succ = np.searchsorted(cand, nxt)
    succ[(succ < len(cand)) & (cand[np.minimum(succ, len(cand) - 1)] != nxt)] = len(cand)
    found: list[np.ndarray] = []
    slot, nslots = 0, end >> 3
    while slot < nslots:
        i = int(np.searchsorted(cand, slot))
        if i < len(cand) and cand[i] == slot:
            path = _records(succ, i)
            found.append(cand[path])
            slot = int(nxt[path[-1]])
            continue
        word = int(u64[slot])  # a record the fast test left out (under 8 bytes, over 64 KiB)
        total = ((word & 0x3FFF_FFFF) + HEADER + 7) & ~7
        if word & BUSY or slot * 8 + total > end:
            break  # not committed yet
        found.append(np.array([slot], np.int64))
        slot += total >> 3
    if not found:
        return _EMPTY, _EMPTY, 0
    hdr = np.concatenate(found) if len(found) > 1 else found[0]
    words = u64[hdr]
    keep = (words & np.uint64(DISCARD)) == 0
    return hdr[keep] * 8 + HEADER, (words[keep] & _LEN_MASK).astype(np.int64), slot * 8


def _records(succ: np.ndarray, start: int) -> np.ndarray:
    """The chain from candidate ``start`` in ``i -> succ[i]``.

    A record's bytes that look like a header (its name's length where a page number
    would be) are candidates no record ends at: they are dropped a round at a time
    (those that only other such candidates point to go in the next round), and
    what stays is the chain unless a payload was built to mimic one, which the
    general walk (:func:`c8.collectors.ring._chain`) then settles.
    """
    n = len(succ)
    alive = np.arange(start, n)
    for _ in range(4):
        pointed = np.zeros(n + 1, bool)
        pointed[succ[alive]] = True
        pointed[start] = True
        kept = alive[pointed[alive]]
        if len(kept) == len(alive):
            break
        alive = kept
    ends = succ[alive]
    if (ends[:-1] == alive[1:]).all() and ends[-1] == n:
        return alive
    return _chain(succ, start)


def walk_slow(buf: np.ndarray, pos: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference walker: one Python step per record."""
    b = buf.tobytes()
    off = 0
    starts, lengths = [], []
    while off + HEADER <= len(b):
        word = int.from_bytes(b[off:off + 4], "little")
        if word & BUSY:
            break
        n = word & 0x3FFF_FFFF
        total = (n + HEADER + 7) & ~7
        if off + total > len(b):
            break
        if not word & DISCARD:
            starts.append(off + HEADER)
            lengths.append(n)
        off += total
    return np.array(starts, np.int64), np.array(lengths, np.int64), off
