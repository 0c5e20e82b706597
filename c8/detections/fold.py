"""Alert folding: one action, one alert.

Alerts of the same rule for the same process (``process_id``, else pid) whose
events fall within ``period`` of the first one fold into that first alert: it
carries ``count`` and the first and last matching events' names
(``first_name``, ``last_name``: a file event's path, else its filename; an
exec's program; a connection's address), and the last event's time. A folded
alert leaves the folder, and so reaches the outputs and their alert limiters
as one alert, once its period is over: when an event later than
``first + period`` has been seen (the detector's stream is in time order), or
when the detector's clock is ``grace`` past it (a quiet host sends no later
event). So a burst such as one useradd's 25-39 file events makes one alert,
and a process that keeps matching makes one alert per period.

Pending folds are bounded (``max_pending``): beyond it the oldest is emitted
early. ``period`` 0 turns folding off: every alert passes at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from c8.detections.alerts import Alert, event_name, wall_time_iso

DEFAULT_GRACE_S = 0.5        # how long past a period the clock waits for the stream's late events
DEFAULT_MAX_PENDING = 4096   # folds open at once (distinct rule x process)


class Folder:
    """Folds alerts by (rule, process) within ``period`` seconds (see the module docstring).

    ``add(alerts)`` takes the alerts of a batch and returns those ready to send;
    ``observe(time_nanos)`` tells it how far the event stream has got; ``due()``
    returns the folds whose period is over; ``drain()`` returns every pending
    fold (stopping, or the detector going dormant).
    """

    def __init__(self, period: float, grace: float = DEFAULT_GRACE_S,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 clock: Callable[[], int] = time.monotonic_ns):
        if period < 0:
            raise ValueError(f"fold period must be >= 0, got {period!r}")
        self.period_ns = int(period * 1e9)
        self.grace_ns = int(grace * 1e9)
        self.max_pending = max_pending
        self.clock = clock
        self.latest = 0                                  # latest event time seen
        self.pending: dict[tuple, Alert] = {}            # opened in time order
        self.folded = 0                                  # alerts absorbed into another

    def observe(self, time_nanos: int) -> None:
        """The stream has reached ``time_nanos`` (events come in time order)."""
        if time_nanos > self.latest:
            self.latest = time_nanos

    def add(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Fold ``alerts``; returns the alerts ready to send (all of them when folding is off)."""
        if not self.period_ns:
            return list(alerts)
        ready: list[Alert] = []
        for alert in alerts:
            self.observe(alert.time_nanos)
            key = (alert.rule, alert.process.get("process_id") or alert.process.get("pid"))
            open_ = self.pending.get(key)
            if open_ is not None and alert.time_nanos - open_.time_nanos < self.period_ns:
                _absorb(open_, alert)
                self.folded += 1
                continue
            if open_ is not None:      # its period is over: this alert starts the next one
                ready.append(_finish(self.pending.pop(key)))
            self.pending[key] = alert
            if len(self.pending) > self.max_pending:
                oldest = next(iter(self.pending))
                ready.append(_finish(self.pending.pop(oldest)))
        return ready + self.due()

    def due(self) -> list[Alert]:
        """Folds whose period is over, by the stream's progress or the clock (less grace)."""
        if not self.pending:
            return []
        horizon = max(self.latest, self.clock() - self.grace_ns)
        out = []
        for key, alert in list(self.pending.items()):
            if alert.time_nanos + self.period_ns <= horizon:
                out.append(_finish(self.pending.pop(key)))
        return out

    def drain(self) -> list[Alert]:
        """Every pending fold, at once."""
        out = [_finish(a) for a in self.pending.values()]
        self.pending.clear()
        return out


def _absorb(first: Alert, alert: Alert) -> None:
    first.count += 1
    first.last_name = event_name(alert.event)
    first.last_time_nanos, first.last_time = alert.time_nanos, alert.time


def _finish(alert: Alert) -> Alert:
    """The folded alert as sent: its message says how many events it stands for."""
    if alert.count > 1:
        span = (alert.last_time_nanos - alert.time_nanos) / 1e9
        alert.output += (f" ({alert.count} events in {span:.3f}s: first {alert.first_name}, "
                         f"last {alert.last_name})")
    if not alert.last_time:
        alert.last_time = wall_time_iso(alert.last_time_nanos)
    return alert
