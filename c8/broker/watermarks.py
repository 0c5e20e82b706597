"""How far each collector's stream has been read: the point a window can be cut at.

A collector ticks after every ring read: "every event of this CPU stamped before
``watermark`` has been sent". Ticks travel on a socket of their own, conflated
(a stalled broker finds the newest one, not a queue of them), so a tick can
overtake the batches it covers. Each tick therefore names the last ingest
message it covers (``seq``; collectors number what their ingest queue took) and
counts only once that message, or a later one, is in: until then it is held.
"""

from __future__ import annotations

import time

SILENT_SECONDS = 2.0  # a collector that ticked no longer ago than this counts
SLACK_NS = 1_000_000  # records being written while a ring was read
MAX_WAIT_NS = 1_000_000_000  # a stalled collector holds the merge back at most this


class Watermarks:
    """Per CPU: the newest tick whose messages are all in, and the one held."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[int, float]] = {}  # cpu -> (read up to ns, when it counted)
        self.moved = False  # a mark moved since the broker last released
        self._last: dict[int, tuple[int, int]] = {}  # cpu -> (collector pid, seq of its last message in)
        self._held: dict[int, dict] = {}  # cpu -> newest tick waiting for its messages

    def on_message(self, header: dict) -> None:
        """An ingest message (samples, lost, stats) arrived: a held tick may count now."""
        cpu, seq = header.get("cpu"), header.get("seq")
        if not isinstance(cpu, int) or not isinstance(seq, int):
            return
        self._last[cpu] = (header.get("pid"), seq)
        held = self._held.get(cpu)
        if held is not None and self._covered(held):
            del self._held[cpu]
            self._count(held)

    def on_tick(self, header: dict) -> None:
        """A tick: it counts at once if what it covers is in, else it waits (the
        newest waits: an older one would count no sooner)."""
        if not isinstance(header.get("cpu"), int) or not isinstance(header.get("watermark"), int):
            raise ValueError(f"a tick without cpu and watermark: {header!r}")
        if self._covered(header):
            self._held.pop(header["cpu"], None)
            self._count(header)
        else:
            self._held[header["cpu"]] = header

    def reached(self, now_ns: int) -> int:
        """The time every live collector's stream has been read up to: events
        stamped before it are all here. A collector silent for SILENT_SECONDS
        stops counting; one that stalls holds the merge back at most MAX_WAIT_NS
        (its later events count as late)."""
        seen_after = time.monotonic() - SILENT_SECONDS
        marks = [wm for wm, seen in self.marks.values() if seen > seen_after]
        if not marks:
            return now_ns
        return max(min(marks) - SLACK_NS, now_ns - MAX_WAIT_NS)

    def _covered(self, tick: dict) -> bool:
        seq = tick.get("seq", 0)
        if not seq:  # the collector had sent nothing before it
            return True
        last = self._last.get(tick["cpu"])
        return last is not None and last[0] == tick.get("pid") and last[1] >= seq

    def _count(self, tick: dict) -> None:
        self.marks[tick["cpu"]] = (tick["watermark"], time.monotonic())
        self.moved = True
