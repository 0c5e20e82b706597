"""The alert limiter: at most limit_per_period alerts per limit_period, per output.

Each output is wrapped by its own limiter, so a noisy rule can silence the
webhook without starving the local file. Beyond the limit alerts are discarded
for that output only and counted; when the period rolls over, one summary line
("N alerts suppressed by <output> in the last 60s") goes out through the same
output and to stderr, so suppression is never silent. Periods are fixed windows
of limit_period starting when the limiter is made.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable

log = logging.getLogger("c8.detections.limiter")

_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")


def parse_duration(value) -> float:
    """Seconds from a number or a duration string ("60s", "2m", "1m30s", "500ms")."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return value
    text = str(value).strip()
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"not a duration: {value!r} (use e.g. 60s, 2m, 500ms)")
    return int(total) if total == int(total) else total


def _fmt_seconds(s: float) -> str:
    return f"{int(s)}s" if s == int(s) else f"{s}s"


class AlertLimiter:
    """Wraps an output; forwards at most limit_per_period alerts per limit_period.

    With no limit every alert goes through. ``tick()`` should be called about
    once a second so the summary is emitted even when no more alerts come.
    """

    def __init__(self, output, limit_per_period: int | None = None,
                 limit_period: float | str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.output = output
        self.clock = clock
        self.limit = None if limit_per_period is None else int(limit_per_period)
        self.period = None if limit_period is None else parse_duration(limit_period)
        if self.limit is not None:
            if self.limit < 0:
                raise ValueError(f"limit_per_period must be >= 0, got {limit_per_period!r}")
            if not self.period:
                raise ValueError(f"output {output.name}: limit_per_period needs a limit_period > 0")
        self._lock = threading.Lock()
        self._period_start = clock()
        self._sent = 0
        self._suppressed = 0
        self.suppressed_total = 0
        self.delivered_total = 0

    @property
    def name(self) -> str:
        return self.output.name

    def send(self, alert) -> bool:
        """Deliver or discard one alert; True when delivered."""
        with self._lock:
            self._roll()
            if self.limit is not None and self._sent >= self.limit:
                self._suppressed += 1
                self.suppressed_total += 1
                return False
            self._sent += 1
            self.delivered_total += 1
        self.output.send(alert)
        return True

    def tick(self) -> None:
        """Roll the period if it is over (emitting the summary if alerts were dropped)."""
        with self._lock:
            self._roll()

    def close(self) -> None:
        with self._lock:
            self._summary()
        self.output.close()

    def _roll(self) -> None:
        if self.period is None:
            return
        now = self.clock()
        if now < self._period_start + self.period:
            return
        self._summary()
        elapsed = math.floor((now - self._period_start) / self.period)
        self._period_start += elapsed * self.period
        self._sent = 0

    def _summary(self) -> None:
        if not self._suppressed:
            return
        text = (f"{self._suppressed} alerts suppressed by {self.output.name} "
                f"in the last {_fmt_seconds(self.period)}")
        self._suppressed = 0
        log.warning("%s", text)
        try:
            self.output.notice(text)
        except Exception:  # an output failing must not take the detector down
            log.exception("output %s: could not send the suppression summary", self.output.name)
