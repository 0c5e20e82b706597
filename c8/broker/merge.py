"""Release stage 1, the cut: per-CPU streams merged into time-ordered windows.

    cut (this) -> identity (identity.py) -> number (sequence.py) -> select, encode, send (publish.py)

Batches wait until every CPU's collector has read past their time (its
watermark, ``upto_ns``) and, with a holdback, that much longer; then a window
is released: every category sorted by time. Numbering comes after identity.
"""

from __future__ import annotations

import numpy as np

from c8.schema import rows


class Merger:
    def __init__(self, holdback_ns: int):
        self.holdback_ns = holdback_ns
        self.pending: dict[str, list[np.ndarray]] = {}
        self.late = 0  # events released after a later-stamped window (out of order)
        self.released_until = 0
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
        CPU's stream has reached), per category, time-sorted."""
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
        if not flush:
            self.released_until = max(self.released_until, cutoff)
        return out
