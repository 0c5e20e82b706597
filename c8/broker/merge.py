"""Merging per-CPU streams into one time-ordered, gap-free numbered stream.

Batches wait ``holdback`` seconds after their kernel time so that slower CPUs'
events of the same moment can join them; then a window is released: every
category sorted by time, sequence numbers assigned across categories in time
order (so a client can interleave categories by sequence number).
"""

from __future__ import annotations

import numpy as np


class Merger:
    def __init__(self, holdback_ns: int):
        self.holdback_ns = holdback_ns
        self.pending: dict[str, list[np.ndarray]] = {}
        self.next_seq = 1
        self.late = 0  # events released after a later-stamped window (out of order)
        self.released_until = 0
        self.window_first = 1  # first sequence number of the last released window

    def add(self, category: str, batch: np.ndarray) -> None:
        if len(batch):
            self.pending.setdefault(category, []).append(batch)

    def release(self, now_ns: int, flush: bool = False) -> dict[str, np.ndarray]:
        """Events stamped before now - holdback, per category, time-sorted and numbered."""
        cutoff = now_ns - self.holdback_ns if not flush else np.iinfo(np.uint64).max
        out: dict[str, np.ndarray] = {}
        for category, parts in list(self.pending.items()):
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            t = batch["sensor_monotime_nanos"]
            ready = t <= cutoff
            if ready.all():
                del self.pending[category]
            elif ready.any():
                self.pending[category] = [batch[~ready]]
                batch = batch[ready]
            else:
                self.pending[category] = [batch]
                continue
            batch = batch[np.argsort(batch["sensor_monotime_nanos"], kind="stable")]
            self.late += int(np.count_nonzero(batch["sensor_monotime_nanos"] < self.released_until))
            out[category] = batch
        self._number(out)
        if not flush:
            self.released_until = max(self.released_until, cutoff)
        return out

    def renumber(self, out: dict[str, np.ndarray]) -> None:
        """Number the last released window again after events were added to it
        (container RUNNING/EXITED derived from its process events): same first
        number, still gap-free, each category re-sorted by time."""
        for c, batch in out.items():
            out[c] = batch[np.argsort(batch["sensor_monotime_nanos"], kind="stable")]
        self.next_seq = self.window_first
        self._number(out)

    def _number(self, out: dict[str, np.ndarray]) -> None:
        self.window_first = self.next_seq
        if not out:
            return
        cats = list(out)
        times = np.concatenate([out[c]["sensor_monotime_nanos"] for c in cats])
        order = np.argsort(times, kind="stable")
        seq = np.empty(len(times), np.uint64)
        seq[order] = np.arange(self.next_seq, self.next_seq + len(times), dtype=np.uint64)
        self.next_seq += len(times)
        start = 0
        for c in cats:
            n = len(out[c])
            out[c]["sensor_sequence_number"] = seq[start:start + n]
            start += n
