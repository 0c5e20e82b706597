"""The event limiter: a circuit breaker on the rate of collected events.

Pure logic with an injectable clock, so the state machine is tested without a
kernel or real time. The broker calls ``count(n)`` as it ingests events and
``poll()`` from its loop; each transition ``poll()`` returns is acted on by the
broker (plan ``enabled: false``/``true``, a ``limiter`` event to subscribers,
exit status 1 through the supervisor).

Semantics (docs/detections.md has the user-facing version):

- Collected events are counted in consecutive windows of ``window_s``
  (``limiter.group_request_duration``), the first starting when the limiter is
  made or collection resumes.
- A window is *over* when its count exceeds ``events_per_second * window_s``.
  When every window is over for ``duration_s`` without a break (that is,
  ``ceil(duration_s / window_s)`` consecutive over windows), the breaker trips
  at the end of the last of them. A window at or under the rate, or a window
  with no events at all, breaks the streak.
- Trip number k (1-based) makes collection dormant for
  ``duration_s * 2**(k-1)``: ``duration_s`` the first time, doubling after.
  Events counted while dormant are ignored. After the dormancy collection
  resumes by itself, with a fresh streak.
- After ``max_retries`` dormancies, the next trip is EXITING: no more
  dormancy; the broker stops the sensor with exit status 1.
- Attribution: ``count_batches`` also tallies events per pid, uid and
  container index in each window (np.unique with counts). A trip names the
  top ``TOP`` of each over the windows of the streak that tripped it, so a
  flood meant to blind the sensor shows who made it. Each window keeps only
  its ``KEEP`` heaviest keys, which bounds memory whatever the pid churn
  (counts of keys below that are approximate; the top ones are exact).

States and edges (every edge goes through ``_enter``):

    ACTIVE  -> DORMANT   trip k <= max_retries         (TRIPPED)
    DORMANT -> ACTIVE    dormancy over                  (RESUMED)
    ACTIVE  -> EXITED    trip k == max_retries + 1     (EXITING)
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ACTIVE = "ACTIVE"
DORMANT = "DORMANT"
EXITED = "EXITED"

TRIPPED = "TRIPPED"
RESUMED = "RESUMED"
EXITING = "EXITING"

TOP = 5                # keys named per field in a TRIPPED/EXITING transition
KEEP = 1024            # keys a window keeps per field (its heaviest)
# columns tallied, each batch has them (schema.COMMON); container is the broker's index
ATTRIBUTED = ("process_pid", "uid", "container")

Top = tuple[tuple[int, int], ...]  # ((key, events), ...), most events first


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum (keys, counts) pairs by key; keep the ``keep`` heaviest keys."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(parts) == 1:
        keys, counts = parts[0]
    else:
        keys, inverse = np.unique(np.concatenate([k for k, _ in parts]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([c for _, c in parts]),
                             minlength=len(keys)).astype(np.int64)
    if len(keys) > keep:
        idx = np.argpartition(counts, len(counts) - keep)[-keep:]
        keys, counts = keys[idx], counts[idx]
    return keys, counts


def _top(keys: np.ndarray, counts: np.ndarray, n: int = TOP) -> Top:
    # most events first; equal counts by key, so the order is deterministic
    order = np.lexsort((keys, -counts))[:n]
    return tuple(zip(keys[order].tolist(), counts[order].tolist(), strict=True))


def format_top(top: Top, label=str) -> str:
    """``"1234:5000,99:20"``: each key (through ``label``) and its events."""
    return ",".join(f"{label(k)}:{c}" for k, c in top)


@dataclass(frozen=True)
class Transition:
    """One state change for the broker to act on.

    kind: TRIPPED, RESUMED or EXITING; dormancy_s: how long collection sleeps
    (TRIPPED only, else 0); trips: trips so far; at: clock time of the change.
    top_pids, top_uids, top_containers (TRIPPED and EXITING): the heaviest
    keys with their events over the windows that tripped the breaker, most
    first (container: the broker's container index, 0 the host).
    """

    kind: str
    dormancy_s: float
    trips: int
    at: float
    top_pids: Top = field(default=())
    top_uids: Top = field(default=())
    top_containers: Top = field(default=())

    @property
    def dormancy(self) -> float:
        """Same as dormancy_s (seconds)."""
        return self.dormancy_s

    @property
    def dormancy_nanos(self) -> int:
        return int(self.dormancy_s * 1e9)


class EventLimiter:
    """Circuit breaker on the collected event rate (see the module docstring)."""

    def __init__(self, events_per_second: float, duration_s: float, max_retries: int,
                 window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if events_per_second <= 0:
            raise ValueError(f"events_per_second must be > 0, got {events_per_second!r}")
        if duration_s <= 0:
            raise ValueError(f"duration must be > 0, got {duration_s!r}")
        if window_s <= 0:
            raise ValueError(f"group_request_duration must be > 0, got {window_s!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self.events_per_second = events_per_second
        self.duration_s = duration_s
        self.max_retries = max_retries
        self.window_s = window_s
        self.clock = clock
        # per-window budget and how many over windows in a row make a trip
        self.window_limit = events_per_second * window_s
        self.windows_to_trip = max(1, math.ceil(duration_s / window_s - 1e-9))
        self.state = ACTIVE
        self.trips = 0
        self.dormant_until = 0.0
        self.ignored = 0  # events counted while dormant or exited
        self._pending: deque[Transition] = deque()
        self._start_windows(clock())

    def _start_windows(self, now: float) -> None:
        self._window_start = now
        self._window_count = 0
        self._streak = 0
        self._tally = self._empty_tally()
        self._streak_tallies: deque[dict] = deque(maxlen=self.windows_to_trip)

    @staticmethod
    def _empty_tally() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for name in ATTRIBUTED}

    def count(self, n: int) -> None:
        """Add n collected events to the current window (no attribution)."""
        now = self.clock()
        self._advance(now)
        if self.state != ACTIVE:
            self.ignored += n
            return
        self._window_count += n

    def count_batches(self, batches) -> None:
        """Add the events of these batches to the current window, tallying who
        made them (each batch a structured array with the ATTRIBUTED columns)."""
        batches = [b for b in batches if len(b)]
        n = sum(len(b) for b in batches)
        self.count(n)
        if self.state != ACTIVE or not n:
            return
        for name in ATTRIBUTED:
            keys, counts = np.unique(np.concatenate([b[name].astype(np.int64) for b in batches]),
                                     return_counts=True)
            # a window may outgrow KEEP keys (pid churn): trim at 4x, keeping the heaviest
            self._tally[name] = _merge([self._tally[name], (keys, counts.astype(np.int64))], 4 * KEEP)

    def poll(self) -> Transition | None:
        """The next transition, if one is due; call it from the broker's loop."""
        self._advance(self.clock())
        return self._pending.popleft() if self._pending else None

    @property
    def dormancy_s(self) -> float:
        """The dormancy the next trip would bring."""
        return self.duration_s * 2 ** self.trips

    def _advance(self, now: float) -> None:
        """Close every window that ended by ``now``; trip or resume as due."""
        if self.state == DORMANT and now >= self.dormant_until:
            # DORMANT -> ACTIVE: dormancy over; count afresh from its end
            self._enter(ACTIVE, Transition(RESUMED, 0.0, self.trips, self.dormant_until))
            self._start_windows(self.dormant_until)
        if self.state != ACTIVE:
            return
        while now >= self._window_start + self.window_s:
            end = self._window_start + self.window_s
            over = self._window_count > self.window_limit
            self._streak = self._streak + 1 if over else 0
            if over:
                self._streak_tallies.append({k: _merge([v], KEEP) for k, v in self._tally.items()})
            else:
                self._streak_tallies.clear()
            self._tally = self._empty_tally()
            self._window_start = end
            self._window_count = 0
            if self._streak >= self.windows_to_trip:
                self._trip(end)
                # a resume may already be due when polls are far apart
                self._advance(now)
                return
            if not over and now >= end + self.window_s:
                # the remaining elapsed windows saw no events: each breaks the
                # streak, so skip them in one step
                skipped = math.floor((now - end) / self.window_s)
                self._window_start = end + skipped * self.window_s
                self._streak = 0
                self._streak_tallies.clear()

    def _culprits(self) -> dict[str, Top]:
        """The top keys of each tallied column over the streak's windows."""
        out = {}
        for name, label in zip(ATTRIBUTED, ("top_pids", "top_uids", "top_containers"), strict=True):
            out[label] = _top(*_merge([t[name] for t in self._streak_tallies], KEEP))
        return out

    def _trip(self, at: float) -> None:
        self.trips += 1
        culprits = self._culprits()
        self._streak_tallies.clear()
        if self.trips > self.max_retries:
            # ACTIVE -> EXITED: retries spent
            self._enter(EXITED, Transition(EXITING, 0.0, self.trips, at, **culprits))
            return
        dormancy = self.duration_s * 2 ** (self.trips - 1)
        self.dormant_until = at + dormancy
        # ACTIVE -> DORMANT: dormancy doubles with every trip
        self._enter(DORMANT, Transition(TRIPPED, dormancy, self.trips, at, **culprits))

    def _enter(self, state: str, transition: Transition) -> None:
        self.state = state
        self._pending.append(transition)
