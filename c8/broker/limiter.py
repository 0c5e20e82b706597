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
from dataclasses import dataclass

ACTIVE = "ACTIVE"
DORMANT = "DORMANT"
EXITED = "EXITED"

TRIPPED = "TRIPPED"
RESUMED = "RESUMED"
EXITING = "EXITING"


@dataclass(frozen=True)
class Transition:
    """One state change for the broker to act on.

    kind: TRIPPED, RESUMED or EXITING; dormancy_s: how long collection sleeps
    (TRIPPED only, else 0); trips: trips so far; at: clock time of the change.
    """

    kind: str
    dormancy_s: float
    trips: int
    at: float

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

    def count(self, n: int) -> None:
        """Add n collected events to the current window."""
        now = self.clock()
        self._advance(now)
        if self.state != ACTIVE:
            self.ignored += n
            return
        self._window_count += n

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

    def _trip(self, at: float) -> None:
        self.trips += 1
        if self.trips > self.max_retries:
            # ACTIVE -> EXITED: retries spent
            self._enter(EXITED, Transition(EXITING, 0.0, self.trips, at))
            return
        dormancy = self.duration_s * 2 ** (self.trips - 1)
        self.dormant_until = at + dormancy
        # ACTIVE -> DORMANT: dormancy doubles with every trip
        self._enter(DORMANT, Transition(TRIPPED, dormancy, self.trips, at))

    def _enter(self, state: str, transition: Transition) -> None:
        self.state = state
        self._pending.append(transition)
