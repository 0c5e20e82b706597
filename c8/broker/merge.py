"""Merging per-CPU streams into one time-ordered, gap-free numbered stream.

Batches wait ``holdback`` seconds after their kernel time so that slower CPUs'
events of the same moment can join them; then a window is released: every
category sorted by time, sequence numbers assigned across categories in time
order (so a client can interleave categories by sequence number).
"""

from __future__ import annotations

import numpy as np

from c8.schema import rows


class Merger:
    def __init__(self, holdback_ns: int):
        self.holdback_ns = holdback_ns
        self.pending: dict[str, list[np.ndarray]] = {}
        self.next_seq = 1
        self.late = 0  # events released after a later-stamped window (out of order)
        self.released_until = 0
        self.window_first = 1  # first sequence number of the last released window
        # (min, max) time of each pending part: whole parts are released or kept
        # without touching their rows; only a part straddling the cutoff is split.
        self._bounds: dict[str, list[tuple[int, int]]] = {}

    def add(self, category: str, batch: np.ndarray) -> None:
        if len(batch):
            t = batch["sensor_monotime_nanos"]
            self.pending.setdefault(category, []).append(batch)
            self._bounds.setdefault(category, []).append((int(t.min()), int(t.max())))

    def release(self, now_ns: int, flush: bool = False, upto_ns: int | None = None) -> dict[str, np.ndarray]:
        """Events stamped before now - holdback (and before ``upto_ns``, the point every
        CPU's stream has reached), per category, time-sorted and numbered."""
        cutoff = now_ns - self.holdback_ns if not flush else np.iinfo(np.uint64).max
        if upto_ns is not None and not flush:
            cutoff = min(cutoff, upto_ns)
        out: dict[str, np.ndarray] = {}
        for category, parts in list(self.pending.items()):
            ready: list[np.ndarray] = []
            keep: list[np.ndarray] = []
            keep_bounds: list[tuple[int, int]] = []
            for part, (tmin, tmax) in zip(parts, self._bounds[category], strict=True):
                if tmax <= cutoff:
                    ready.append(part)
                elif tmin > cutoff:
                    keep.append(part)
                    keep_bounds.append((tmin, tmax))
                else:
                    r = part["sensor_monotime_nanos"] <= cutoff
                    ready.append(rows.take(part, r))
                    rest = rows.take(part, ~r)
                    keep.append(rest)
                    keep_bounds.append((int(rest["sensor_monotime_nanos"].min()), tmax))
            if keep:
                self.pending[category] = keep
                self._bounds[category] = keep_bounds
            else:
                del self.pending[category], self._bounds[category]
            if not ready:
                continue
            batch = rows.concat(ready)
            t = batch["sensor_monotime_nanos"]
            if len(t) > 1 and not (t[1:] >= t[:-1]).all():  # one CPU's drain is already in order
                batch = rows.take(batch, np.argsort(t, kind="stable"))
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
            out[c] = rows.take(batch, np.argsort(batch["sensor_monotime_nanos"], kind="stable"))
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
