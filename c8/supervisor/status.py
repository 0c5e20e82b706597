"""run_dir/supervisor.json: the tree as the supervisor sees it (read by c8ctl status).

    {"pid": 1, "started": "2025-01-01T00:00:00+00:00", "started_unix": 1.7e9,
     "config": "/etc/capsule8/capsule8-sensor.yaml" | null, "cgroup": "capsule8-sensor" | null,
     "children": [{"name": "c8-broker", "pid": 12, "state": "RUNNING", "restarts": 0,
                   "last_exit_reason": null}, ...]}

`pid` is the supervisor's; children's states are those of c8.supervisor.children.State.
"""

from __future__ import annotations

import json
import os

from c8.host import proc as hostproc
from c8.protocol import files


def write(path: str, supervisor: dict, children: list[dict], gid: int | None = None) -> None:
    """Write {**supervisor, "children": children}, replacing the file atomically
    (readers never see half of it) without following a symlink at its name;
    mode 0640, group `gid` (sensor_user's: its members run c8ctl status)."""
    data = json.dumps({**supervisor, "children": children}, indent=1) + "\n"
    files.write_atomic(path, data.encode(), mode=0o640, gid=gid)


def read(path: str) -> dict | None:
    """The file's content, or None when absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def running_supervisor(path: str) -> int | None:
    """The pid of a live supervisor that wrote `path`, or None (stale or absent)."""
    data = read(path)
    try:
        pid = int(data["pid"])
    except (TypeError, KeyError, ValueError):
        return None
    if pid == os.getpid():
        return None
    return pid if is_supervisor(pid) else None


def is_supervisor(pid: int) -> bool:
    """Whether ``pid`` is a c8-supervisor: root's own process whose name its title
    set. Never its command line: a stale pid reused by a user's process could
    hold that read for good (c8.host.proc); its status and stat do not wait."""
    st = hostproc.stat(pid)
    return (st is not None and st.comm.startswith("c8-supervisor")
            and hostproc.root_credentials(hostproc.credentials(pid)))
