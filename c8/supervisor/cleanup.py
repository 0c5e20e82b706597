"""What the sensor leaves behind: tracefs mount, probes of group c8probes, sockets.

The supervisor imports no data-plane package, so the probe clean-up here is
its own: it reads kprobe_events/uprobe_events and removes each `c8probes/NAME`
line with `-:c8probes/NAME` (appending, never truncating, so other tools'
probes stay).
"""

from __future__ import annotations

import logging
import os
import subprocess

from c8.host.tracefs import CANDIDATES as TRACEFS_CANDIDATES
from c8.host.tracefs import find_tracefs

log = logging.getLogger("c8.supervisor.cleanup")

PROBE_GROUP = "c8probes"
SOCKETS = ("sensor.sock", "ingest.sock", "ticks.sock", "plan.sock", "bpf.sock")
PROBE_FILES = ("kprobe_events", "uprobe_events")


def ensure_tracefs() -> str | None:
    """Mount tracefs at /sys/kernel/tracing when it is not there; its path or None."""
    found = find_tracefs()
    if found:
        return found
    target = TRACEFS_CANDIDATES[0]
    res = subprocess.run(["mount", "-t", "tracefs", "nodev", target],
                         capture_output=True, text=True)
    if res.returncode != 0:
        log.warning("cannot mount tracefs at %s: %s", target, res.stderr.strip())
        return None
    log.info("mounted tracefs at %s", target)
    return find_tracefs()


def probe_names(events_text: str, group: str = PROBE_GROUP) -> list[str]:
    """Names of the probes of `group` in kprobe_events/uprobe_events text.

    Lines look like 'p:c8probes/name /bin/true:0x0000000000001040 arg=%di'.
    """
    names = []
    for line in events_text.splitlines():
        head = line.split(" ", 1)[0]
        _, _, ident = head.partition(":")
        g, _, name = ident.partition("/")
        if g == group and name:
            names.append(name)
    return names


def append_line(path: str, line: str) -> None:
    """Append one command to a tracefs control file (O_APPEND without a seek:
    tracefs refuses lseek, and opening without O_APPEND would drop every probe)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def remove_probes(tracefs: str | None = None, group: str = PROBE_GROUP) -> list[str]:
    """Remove every probe of `group`; returns the removed 'file:group/name' list."""
    tracefs = tracefs or find_tracefs()
    removed: list[str] = []
    if tracefs is None:
        return removed
    for fname in PROBE_FILES:
        path = os.path.join(tracefs, fname)
        try:
            with open(path) as f:
                names = probe_names(f.read(), group)
        except FileNotFoundError:
            continue  # no kprobes on this kernel
        for name in names:
            enable = os.path.join(tracefs, "events", group, name, "enable")
            try:
                with open(enable, "w") as f:
                    f.write("0")
            except OSError:
                pass  # not enabled through ftrace, or already gone
            try:
                append_line(path, f"-:{group}/{name}")
                removed.append(f"{fname}:{group}/{name}")
            except OSError as e:
                log.warning("cannot remove probe %s/%s from %s: %s", group, name, fname,
                            e.strerror)
    if removed:
        log.info("removed probes: %s", ", ".join(removed))
    return removed


def remove_files(run_dir: str, names: tuple[str, ...] = SOCKETS) -> list[str]:
    """Remove the named files under run_dir if present; returns the removed paths."""
    removed = []
    for n in names:
        p = os.path.join(run_dir, n)
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
