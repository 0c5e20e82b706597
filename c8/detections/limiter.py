"""The alert limiter: at most limit_per_period alerts per limit_period, per output.

Each output is wrapped by its own limiter, so a noisy rule can silence the
webhook without starving the local file. Beyond the limit alerts are discarded
for that output only and counted, per rule; when the period rolls over, one
summary line ("N alerts suppressed by <output> in the last 60s: "Rule A" 12,
"Rule B" 3") goes out through the same output and to stderr, so suppression is
never silent and a flood of one rule meant to hide another shows which rules
were silenced. Periods are fixed windows of limit_period starting when the
limiter is made.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable

log = logging.getLogger("c8.detections.limiter")

NAMED_RULES = 10        # rules named in a summary line, most suppressed first
MAX_RULES = 1000        # distinct rule names counted per period; beyond, under "other"

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


def _rule_of(alert) -> str:
    rule = alert.get("rule") if isinstance(alert, dict) else getattr(alert, "rule", None)
    return str(rule) if rule else "?"


def _json_quote(text: str) -> str:
    import json

    return json.dumps(text)  # a rule name with quotes or control characters stays one token


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
        self._by_rule: dict[str, int] = {}
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
                rule = _rule_of(alert)
                if rule not in self._by_rule and len(self._by_rule) >= MAX_RULES:
                    rule = "other"
                self._by_rule[rule] = self._by_rule.get(rule, 0) + 1
                return False
            self._sent += 1
            self.delivered_total += 1
        self.output.send(alert)
        return True

    def tick(self) -> None:
        """Roll the period if it is over (emitting the summary if alerts were dropped),
        and let the output report its own drops (a stalled receiver)."""
        with self._lock:
            self._roll()
        self.output.tick()

    def close(self) -> None:
        with self._lock:
            self._summary()
        self.output.close()
        log.info("output %s: %s", self.output.name,
                 ", ".join(f"{k} {v}" for k, v in self.stats().items()))

    def stats(self) -> dict:
        """Alerts passed to the output (``alerts``) and suppressed before it, with the
        output's own counts (delivered, dropped when its queue was full, failed, ...)."""
        return {"alerts": self.delivered_total, "suppressed": self.suppressed_total,
                **self.output.stats()}

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
        ranked = sorted(self._by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
        rules = ", ".join(f"{_json_quote(r)} {n}" for r, n in ranked[:NAMED_RULES])
        if len(ranked) > NAMED_RULES:
            rules += f" and {len(ranked) - NAMED_RULES} more rules"
        text = (f"{self._suppressed} alerts suppressed by {self.output.name} "
                f"in the last {_fmt_seconds(self.period)}: {rules}")
        details = {"suppressed": self._suppressed, "rules": dict(ranked)}
        self._suppressed = 0
        self._by_rule = {}
        log.warning("%s", text)
        try:
            self.output.notice(text, details)
        except Exception:  # an output failing must not take the detector down
            log.exception("output %s: could not send the suppression summary", self.output.name)
