"""Reloading the configuration (SIGHUP, `c8ctl reload`): what changes live, what waits.

    plan = plan_reload(running_cfg)   # raises config.ConfigError: refused whole
    plan.merged                       # the running config with the live keys replaced

Live keys change without a restart: the detector's rules and outputs
(``detections.rules``, ``alert_output.*``; the rule files are re-read even when
the keys are unchanged) and the broker's ``limits.*`` (for subscriptions made
from then on). Every other key needs a restart of the sensor: a changed one is
reported in ``restart_needed`` and keeps its running value. The flow between
the processes is in docs/operations.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from c8.protocol import paths
from c8.supervisor import config
from c8.supervisor.config import Config

LIVE_PREFIXES = ("alert_output.", "detections.rules", "limits.")
MAX_DETECTOR_STATS = 1 << 20


def is_live(key: str) -> bool:
    """True for a key a reload applies without restarting anything."""
    return key.startswith(LIVE_PREFIXES)


@dataclass
class ReloadPlan:
    """A validated new configuration: what it changes, and what it cannot."""

    merged: Config
    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)


def plan_reload(running: Config) -> ReloadPlan:
    """Load the configuration again (same file, same environment) and split its
    changes; raises config.ConfigError naming the key for an invalid one."""
    new = config.load(running.config_path)
    changed = [k for k in config.KEYS if running.get(k) != new.get(k)]
    merged = dataclasses.replace(
        running, alert_output=new.alert_output, limits=new.limits,
        detections=dataclasses.replace(running.detections, rules=new.detections.rules))
    return ReloadPlan(merged, [k for k in changed if is_live(k)],
                      [k for k in changed if not is_live(k)])


def read_detector_stats(run_dir: str) -> dict | None:
    """run_dir/detector.json, which the detector (sensor_user) writes every second
    and after each reload: its pid, alert counts, reload verdict. None when absent
    or not a small JSON map; never followed through a symlink."""
    try:
        fd = os.open(paths.detector_stats(run_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_DETECTOR_STATS + 1)
        data = json.loads(raw) if len(raw) <= MAX_DETECTOR_STATS else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
