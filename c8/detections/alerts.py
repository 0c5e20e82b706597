"""Alerts: what a rule match produces and every output sends."""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Syslog severities, most severe first (RFC 5424 numbering: emergency 0 .. debug 7).
PRIORITIES = ("emergency", "alert", "critical", "error", "warning", "notice", "informational", "debug")
PRIORITY_ALIASES = {"emerg": "emergency", "crit": "critical", "err": "error", "warn": "warning",
                    "info": "informational"}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")  # dotted: caught as unknown
MISSING = "<NA>"


def priority_name(value: Any) -> str:
    """The canonical priority name; raises ValueError naming the choices."""
    text = str(value).strip().lower()
    text = PRIORITY_ALIASES.get(text, text)
    if text not in PRIORITIES:
        raise ValueError(f"unknown priority {value!r} (use one of {', '.join(PRIORITIES)})")
    return text


def placeholders(template: str) -> list[str]:
    """Field names used as {field} in an output template."""
    return _PLACEHOLDER.findall(template)


def render(template: str, values: dict) -> str:
    """Substitute {field} placeholders; a missing or empty value shows as <NA>."""

    def one(m: re.Match) -> str:
        v = values.get(m.group(1))
        return MISSING if v is None or v == "" else str(v)

    return _PLACEHOLDER.sub(one, template)


def wall_time_iso(monotime_nanos: int) -> str:
    """Wall-clock ISO 8601 time of a CLOCK_MONOTONIC timestamp of this host."""
    wall_ns = time.time_ns() - time.monotonic_ns() + int(monotime_nanos)
    dt = datetime.datetime.fromtimestamp(wall_ns / 1e9, datetime.UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_name(event: dict) -> str:
    """What an alert's event acted on, in one string: a file event's path (else the
    name as passed), an exec's program, a network event's address:port; else the
    process's program."""
    category = event.get("type")
    if category == "file":
        return str(event.get("path") or event.get("filename") or event.get("oldpath") or "")
    if category == "process":
        return str(event.get("exec_filename") or event.get("process_exec_filename") or "")
    if category == "network" and event.get("address"):
        return f"{event['address']}:{event.get('port', '')}"
    return str(event.get("process_exec_filename") or "")


@dataclass
class Alert:
    """One rule match.

    time_nanos is the event's sensor_monotime_nanos; time the wall-clock ISO
    time derived from it. process: pid, tid, process_id, exec_filename and
    command_line (when known); container: container_id, container_name,
    image_id, image_name (empty on the host). count is how many matching events
    of this rule and process the alert stands for (fold.py), first_name and
    last_name the first and last of them by name (``event_name``), last_time_nanos
    and last_time the last one's time.
    """

    rule: str
    priority: str
    output: str
    time_nanos: int
    time: str
    event: dict
    process: dict
    container: dict
    tags: list[str] = field(default_factory=list)
    count: int = 1
    first_name: str = ""
    last_name: str = ""
    last_time_nanos: int = 0
    last_time: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["type"] = "alert"
        return d
