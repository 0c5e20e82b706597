"""Which pid is a running c8-supervisor: decided without reading its command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from c8.supervisor import status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts a process as another user")


def _named(name: str, **kw) -> subprocess.Popen:
    """sh that names itself ``name`` (its comm, as setproctitle does) and waits."""
    p = subprocess.Popen([shutil.which("sh"), "-c", f"printf '{name}' > /proc/self/comm; sleep 30; :"], **kw)
    deadline = time.monotonic() + 5
    while open(f"/proc/{p.pid}/comm").read().rstrip("\n") != name:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p


def test_a_supervisor_is_roots_process_of_that_name_and_nothing_else(tmp_path):
    root = _named("c8-supervisor: ")
    user = _named("c8-supervisor: ", user=65534, group=65534)  # a stale pid a user took over
    other = _named("sleeper")
    try:
        assert status.is_supervisor(root.pid)
        assert not status.is_supervisor(user.pid) and not status.is_supervisor(other.pid)
        assert not status.is_supervisor(2 ** 22 + 1)  # no such pid
        path = tmp_path / "supervisor.json"
        for p, want in ((root, root.pid), (user, None)):
            status.write(str(path), {"pid": p.pid}, [])
            assert status.running_supervisor(str(path)) == want
    finally:
        for p in (root, user, other):
            p.kill()
            p.wait()
