"""Where tracefs is mounted: the one answer for supervisor, broker and collectors."""

from __future__ import annotations

import os
import subprocess

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def find_tracefs() -> str | None:
    """The tracefs directory (one holding ``events``), or None."""
    for path in CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def mount_tracefs() -> str | None:
    """Mount tracefs at /sys/kernel/tracing unless one is found; its path,
    or None when it could not be mounted (the caller says so)."""
    found = find_tracefs()
    if found:
        return found
    subprocess.run(["mount", "-t", "tracefs", "nodev", CANDIDATES[0]],
                   check=False, capture_output=True)
    return find_tracefs()
