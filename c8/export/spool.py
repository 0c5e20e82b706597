"""The exporter's on-disk spool: messages wait here until JetStream acknowledges them.

A directory of append-only segment files (``<index>.seg``) and a ``cursor``
file. Each record is ``<u32 length><u32 crc32>`` then msgpack
``[suffix, msg_id, events, payload]``. The cursor (segment, offset of the first
record not yet acknowledged, and the loss counters) is rewritten after every
acknowledgement, so a restarted exporter resumes where the last one stopped;
a record sent but not yet marked is sent again with the same Nats-Msg-Id and
JetStream drops the copy. The spool is bounded: when the segments pass
``max_bytes`` the oldest segment goes, and the events of its records not yet
acknowledged are counted as lost (``lost_pending`` until a lost record for
them reaches the stream, ``lost_total`` for ever).

One process (the exporter) owns the directory; its threads share a Spool
through a lock. Writes are not fsynced: the spool survives the exporter and
the sensor, not a power cut.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass

import msgpack

log = logging.getLogger("c8.export.spool")

_HEAD = struct.Struct("<II")
_CURSOR = struct.Struct("<QQQQQ")  # segment, offset, lost_pending, lost_total, events acknowledged
_SEG = re.compile(r"^(\d{16})\.seg$")
MIN_SEGMENT = 64 << 10
MAX_SEGMENT = 8 << 20


@dataclass(frozen=True)
class Record:
    """One message waiting: subject suffix, Nats-Msg-Id, event count, payload; where it is."""

    suffix: str
    msg_id: str
    events: int
    payload: bytes
    segment: int
    offset: int
    end: int


class Spool:
    """A bounded FIFO of records on disk (see the module docstring)."""

    def __init__(self, directory: str, max_bytes: int):
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT, min(MAX_SEGMENT, max_bytes // 8))
        self.lock = threading.Lock()
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self.segments: dict[int, int] = {}  # index -> size
        for name in os.listdir(directory):
            m = _SEG.match(name)
            if m:
                self.segments[int(m.group(1))] = os.path.getsize(os.path.join(directory, name))
        self.cur_seg, self.cur_off, self.lost_pending, self.lost_total, self.acked = \
            self._read_cursor()
        self._wfd = -1
        if self.segments:
            self._repair_tail(max(self.segments))
        if not self.segments or self.cur_seg < min(self.segments):
            self.cur_seg = min(self.segments) if self.segments else 0
            self.cur_off = 0
        self._rfd: tuple[int, int] | None = None  # (segment, fd) being read
        self._inflight: Record | None = None  # the last record peek() gave, until acknowledged
        self.on_append = None  # called (outside the lock) after every append
        self.appended = 0  # events appended by this process

    # -- cursor ------------------------------------------------------------------
    def _cursor_path(self) -> str:
        return os.path.join(self.dir, "cursor")

    def _read_cursor(self) -> tuple[int, int, int, int, int]:
        try:
            with open(self._cursor_path(), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0, 0, 0, 0, 0
        if len(data) != _CURSOR.size + 4 or zlib.crc32(data[:-4]) != \
                struct.unpack("<I", data[-4:])[0]:
            log.warning("spool cursor %s is damaged: sending the spool from its start",
                        self._cursor_path())
            return 0, 0, 0, 0, 0
        return _CURSOR.unpack(data[:-4])

    def _write_cursor(self) -> None:
        body = _CURSOR.pack(self.cur_seg, self.cur_off, self.lost_pending, self.lost_total,
                            self.acked)
        tmp = self._cursor_path() + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, body + struct.pack("<I", zlib.crc32(body)))
        finally:
            os.close(fd)
        os.replace(tmp, self._cursor_path())

    # -- files -------------------------------------------------------------------
    def _path(self, seg: int) -> str:
        return os.path.join(self.dir, f"{seg:016d}.seg")

    def _repair_tail(self, seg: int) -> None:
        """Cut a record half-written when the last exporter died."""
        good = 0
        with open(self._path(seg), "rb") as f:
            data = f.read()
        while good + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, good)
            end = good + _HEAD.size + length
            if end > len(data) or zlib.crc32(data[good + _HEAD.size:end]) != crc:
                break
            good = end
        if good < len(data):
            log.warning("spool segment %d: cut %d bytes of a record left half-written",
                        seg, len(data) - good)
            os.truncate(self._path(seg), good)
            self.segments[seg] = good

    def _writer(self, size: int) -> int:
        last = self.segments.get(max(self.segments)) if self.segments else None
        if self._wfd >= 0 and last and last + size > self.segment_bytes:
            os.close(self._wfd)
            self._wfd = -1
            seg = max(self.segments) + 1
        elif self._wfd >= 0:
            return self._wfd
        elif last is not None and (last == 0 or last + size <= self.segment_bytes):
            seg = max(self.segments)
        else:
            seg = max(self.segments) + 1 if self.segments else max(self.cur_seg, 0)
        self._wfd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                            0o640)
        self.segments.setdefault(seg, 0)
        return self._wfd

    # -- the FIFO ------------------------------------------------------------------
    def append(self, suffix: str, msg_id: str, events: int, payload: bytes) -> None:
        """Add one message at the end; drops the oldest segments past max_bytes."""
        body = msgpack.packb([suffix, msg_id, events, payload], use_bin_type=True)
        rec = _HEAD.pack(len(body), zlib.crc32(body)) + body
        with self.lock:
            fd = self._writer(len(rec))
            os.write(fd, rec)
            self.segments[max(self.segments)] += len(rec)
            self.appended += events
            self._enforce_bound()
        if self.on_append is not None:
            self.on_append()

    def _enforce_bound(self) -> None:
        while len(self.segments) > 1 and sum(self.segments.values()) > self.max_bytes:
            oldest = min(self.segments)
            lost = self._events_from(oldest, self.cur_off if self.cur_seg == oldest else 0) \
                if self.cur_seg <= oldest else 0
            if self._inflight is not None and self._inflight.segment == oldest:
                lost -= self._inflight.events  # being sent: it arrives or is retried
            self._remove(oldest)
            if self.cur_seg <= oldest:
                self.cur_seg, self.cur_off = min(self.segments), 0
            if lost:
                self.lost_pending += lost
                self.lost_total += lost
                log.warning("spool full (%d bytes): dropped %d events not yet in the stream",
                            self.max_bytes, lost)
            self._write_cursor()

    def _events_from(self, seg: int, offset: int) -> int:
        n = 0
        with open(self._path(seg), "rb") as f:
            f.seek(offset)
            data = f.read()
        pos = 0
        while pos + _HEAD.size <= len(data):
            length, _ = _HEAD.unpack_from(data, pos)
            body = data[pos + _HEAD.size:pos + _HEAD.size + length]
            try:
                n += int(msgpack.unpackb(body, raw=False)[2])
            except Exception:  # a damaged record counts for nothing it can prove
                pass
            pos += _HEAD.size + length
        return n

    def _remove(self, seg: int) -> None:
        if self._rfd is not None and self._rfd[0] == seg:
            os.close(self._rfd[1])
            self._rfd = None
        if seg == max(self.segments) and self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        try:
            os.unlink(self._path(seg))
        except FileNotFoundError:
            pass
        del self.segments[seg]

    def peek(self) -> Record | None:
        """The oldest record not yet acknowledged, or None when all are."""
        with self.lock:
            while self.segments:
                seg, off = self.cur_seg, self.cur_off
                size = self.segments.get(seg)
                if size is None:  # the cursor's segment is gone: the next one
                    later = [s for s in self.segments if s > seg]
                    if not later:
                        return None
                    self.cur_seg, self.cur_off = min(later), 0
                    continue
                if off + _HEAD.size <= size:
                    rec = self._read(seg, off, size)
                    if rec is not None:
                        self._inflight = rec
                        return rec
                    log.error("spool segment %d: damaged record at %d: skipping the segment's "
                              "rest", seg, off)
                    self.cur_off = size
                    continue
                if seg == max(self.segments):
                    return None
                self._remove(seg)  # read and acknowledged to its end
                self.cur_seg, self.cur_off = min(self.segments), 0
                self._write_cursor()
            return None

    def _read(self, seg: int, off: int, size: int) -> Record | None:
        if self._rfd is None or self._rfd[0] != seg:
            if self._rfd is not None:
                os.close(self._rfd[1])
            self._rfd = (seg, os.open(self._path(seg), os.O_RDONLY | os.O_CLOEXEC))
        fd = self._rfd[1]
        head = os.pread(fd, _HEAD.size, off)
        length, crc = _HEAD.unpack(head)
        body = os.pread(fd, length, off + _HEAD.size)
        if len(body) != length or zlib.crc32(body) != crc:
            return None
        suffix, msg_id, events, payload = msgpack.unpackb(body, raw=False)
        return Record(suffix, msg_id, events, payload, seg, off, off + _HEAD.size + length)

    def ack(self, rec: Record) -> None:
        """``rec`` reached the stream: the cursor moves past it (unless the bound dropped
        its segment meanwhile: the record in flight is then not counted lost, and the
        publisher retries that Record until it is acknowledged)."""
        with self.lock:
            if self._inflight is rec:
                self._inflight = None
            if (rec.segment, rec.offset) == (self.cur_seg, self.cur_off):
                self.cur_off = rec.end
            self.acked += rec.events
            self._write_cursor()

    def lost_sent(self, count: int) -> None:
        """A lost record for ``count`` events reached the stream."""
        with self.lock:
            self.lost_pending = max(0, self.lost_pending - count)
            self._write_cursor()

    def stats(self) -> dict:
        """Bytes and segments waiting, losses; for the exporter's status file."""
        with self.lock:
            waiting = sum(self.segments.values())
            if self.cur_seg in self.segments:
                waiting -= self.cur_off
            return {"spool_bytes": waiting, "spool_segments": len(self.segments),
                    "lost": self.lost_total, "lost_pending": self.lost_pending,
                    "exported_events": self.acked, "spooled_events": self.appended}

    def close(self) -> None:
        with self.lock:
            if self._wfd >= 0:
                os.close(self._wfd)
                self._wfd = -1
            if self._rfd is not None:
                os.close(self._rfd[1])
                self._rfd = None
