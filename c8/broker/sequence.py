"""Release stage 3, numbering: one gap-free sequence across every category.

    cut (merge.py) -> identity (identity.py) -> number (this) -> select, encode, send (publish.py)

A window is numbered once, after identity has added the container events its
process events caused, so a client can interleave categories by
``sensor_sequence_number`` and a gap always means a loss.
"""

from __future__ import annotations

import numpy as np


class Sequence:
    """The sensor's sequence numbers, handed out a window at a time in time order."""

    def __init__(self, first: int = 1):
        self.next = first

    def number(self, window: dict[str, np.ndarray]) -> None:
        """Number every event of the window in time order (ties keep category order)."""
        if not window:
            return
        cats = list(window)
        times = np.concatenate([window[c]["sensor_monotime_nanos"] for c in cats])
        order = np.argsort(times, kind="stable")
        seq = np.empty(len(times), np.uint64)
        seq[order] = np.arange(self.next, self.next + len(times), dtype=np.uint64)
        self.next += len(times)
        start = 0
        for c in cats:
            n = len(window[c])
            window[c]["sensor_sequence_number"] = seq[start:start + n]
            start += n
