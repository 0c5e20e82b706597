"""Identity as of the event: a process that changes (exec, setuid, a move into a
container's cgroup) a moment after an event still gets that event credited to
what it was when the event happened, even when both land in one window."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root


def collect(sub, until, timeout=20.0):
    """Events until ``until(events)``, or ``timeout`` seconds, or 2 s without one."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in sub.events(timeout=2.0, idle=min(2.0, max(deadline - time.monotonic(), 0.1))):
            events.append(ev)
            if until(events) or time.monotonic() > deadline:
                return events
        else:
            if time.monotonic() + 0.1 < deadline and not events:
                continue  # nothing yet: wait on until the deadline
            return events
    return events


def test_open_then_exec_is_credited_to_the_program_before_the_exec(shared_sensor, tmp_path):
    target = tmp_path / "x"
    spec = {"events": {"process": {"filter": 'kind == "EXEC"'},
                       "file": {"filter": f'filename == "{target}"'}}}
    with shared_sensor.client.subscribe(spec) as sub:
        p = subprocess.Popen(["/bin/bash", "-c", f"exec 3>{target}; exec /bin/true"])
        p.wait()
        events = collect(sub, lambda evs: sum(e["process_pid"] == p.pid for e in evs) >= 3)
    mine = [e for e in events if e["process_pid"] == p.pid]
    assert [(e["type"], e["kind"]) for e in mine] == [("process", "EXEC"), ("file", "OPEN"),
                                                      ("process", "EXEC")], mine
    bash_exec, opened, true_exec = mine
    assert bash_exec["exec_filename"] == "/bin/bash"
    assert bash_exec["process_exec_filename"] == "/bin/bash"
    assert opened["process_exec_filename"] == "/bin/bash"  # not /bin/true, which came after
    assert true_exec["exec_filename"] == true_exec["process_exec_filename"] == "/bin/true"
    assert opened["process_id"] == true_exec["process_id"]  # one process, two programs


def test_setuid_then_open_carries_the_credentials_of_each_moment(shared_sensor):
    where = tempfile.mkdtemp(prefix="c8-setuid-")  # pytest's tmp_path is root's alone
    os.chmod(where, 0o755)
    before, after = os.path.join(where, "before"), os.path.join(where, "after")
    for f in (before, after):
        with open(f, "w") as out:
            out.write("x")
        os.chmod(f, 0o644)
    code = (f"import os; open({str(before)!r}).close(); os.setresgid(65534, 65534, 65534); "
            f"os.setresuid(65534, 65534, 65534); open({str(after)!r}).close()")
    spec = {"events": {"file": {"filter": f'filename in ("{before}", "{after}")'}}}
    with shared_sensor.client.subscribe(spec) as sub:
        p = subprocess.Popen([sys.executable, "-c", code])
        assert p.wait() == 0
        events = collect(sub, lambda evs: len([e for e in evs if e["process_pid"] == p.pid]) >= 2)
    shutil.rmtree(where)
    got = {e["filename"]: e for e in events if e["process_pid"] == p.pid}
    assert got[before]["uid"] == 0 and got[before]["gid"] == 0
    assert got[after]["uid"] == 65534 and got[after]["gid"] == 65534


def _cgroup_root() -> str:
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            return root
    pytest.fail("no cgroup hierarchy with cgroup.procs here")


def test_move_into_a_container_cgroup_then_exec(shared_sensor, tmp_path):
    """Events before the move are the host's, the exec after it is the container's."""
    cid = secrets.token_hex(32)
    cg = os.path.join(_cgroup_root(), cid)
    os.mkdir(cg)
    marker_before, marker_after = tmp_path / "before", tmp_path / "after"
    marker_before.write_text("b")
    marker_after.write_text("a")
    spec = {"events": {"process": {"filter": 'kind == "EXEC"'},
                       "file": {"filter": f'filename in ("{marker_before}", "{marker_after}")'}}}
    try:
        with shared_sensor.client.subscribe(spec) as sub:
            script = (f"exec 3<{marker_before}; echo $$ > {cg}/cgroup.procs; "
                      f"exec /bin/cat {marker_after}")
            p = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.DEVNULL)
            assert p.wait() == 0
            events = collect(sub, lambda evs: any(e.get("filename") == str(marker_after) for e in evs))
    finally:
        os.rmdir(cg)
    mine = [e for e in events if e["process_pid"] == p.pid]
    opened_before = next(e for e in mine if e.get("filename") == str(marker_before))
    cat_exec = next(e for e in mine if e["kind"] == "EXEC" and e["exec_filename"] == "/bin/cat")
    opened_after = next(e for e in mine if e.get("filename") == str(marker_after))
    assert opened_before["container_id"] == ""
    assert cat_exec["container_id"] == cid
    assert opened_after["container_id"] == cid


def test_lineage_on_every_event_and_in_filters(shared_sensor, tmp_path):
    """A file event carries its process's ancestors (parent first, up to init), and
    ``parent.`` / ``ancestor.`` predicates select on them in the broker."""
    marker = tmp_path / "lineage-marker"
    marker.write_text("x")
    script = f"/bin/sh -c '/bin/cat {marker} > /dev/null'"
    spec = {"events": {"file": {"filter": f'filename == "{marker}" and ancestor.exec_filename == "/bin/bash" '
                                          'and parent.exec_filename == "/bin/sh"'}}}
    decoy = {"events": {"file": {"filter": f'filename == "{marker}" and parent.exec_filename == "/bin/bash"'}}}
    with shared_sensor.client.subscribe(spec) as sub, shared_sensor.client.subscribe(decoy) as other:
        p = subprocess.Popen(["/bin/bash", "-c", script + "; true"])
        assert p.wait() == 0
        events = collect(sub, lambda evs: any(e.get("filename") == str(marker) for e in evs))
        missed = collect(other, lambda evs: False, timeout=2.0)
    opened = next(e for e in events if e.get("filename") == str(marker))
    lineage = opened["process_lineage"]
    assert [a["exec_filename"] for a in lineage[:2]] == ["/bin/sh", "/bin/bash"]
    assert lineage[1]["pid"] == p.pid
    assert lineage[0]["command_line"].startswith("/bin/sh -c")
    assert all(set(a) == {"pid", "process_id", "exec_filename", "command_line"} for a in lineage)
    assert lineage[-1]["pid"] == 1 or len(lineage) == 16  # up to the host's init
    assert [a["pid"] for a in lineage][2] == os.getpid()  # bash's parent: this test
    assert not [e for e in missed if e.get("filename") == str(marker)]  # cat's parent is sh


# Drops to uid 1234 at once, waits for a line, makes 20 getsid calls, and lives on
# until its stdin closes (a process that has exited can no longer be asked about).
UNSEEN = """
import os, sys
os.setresgid(4321, 4321, 4321)
os.setresuid(1234, 1234, 1234)
print(os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(20):
    os.getsid(0)
sys.stdin.read()
"""


def test_a_process_started_before_anyone_subscribed_is_known_from_its_first_event(shared_sensor):
    """Nothing was collected when it started (its fork and exec went unseen): the
    broker asks /proc for it when its first events arrive, and those first events
    already carry who it is, not an unknown identity that later windows fill in."""
    # the earlier tests' subscriptions end as their clients close: wait until none is left
    wait_for(lambda: not shared_sensor.client.subscriptions(), 10, 0.1, "no subscription")
    child = subprocess.Popen([sys.executable, "-c", UNSEEN], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    pid = int(child.stdout.readline())
    spec = {"events": {"syscall": {"kinds": ["ENTER"], "filter": f"id == 124 and process_pid == {pid}"}}}
    try:
        with shared_sensor.client.subscribe(spec) as sub:
            child.stdin.write("go\n")
            child.stdin.flush()
            events = collect(sub, lambda evs: len([e for e in evs if e["type"] == "syscall"]) >= 20)
    finally:
        child.stdin.close()
        child.wait(10)
    mine = [e for e in events if e["type"] == "syscall"]
    assert len(mine) == 20
    assert {e["process_id"] for e in mine} != {""} and len({e["process_id"] for e in mine}) == 1
    assert all(e["uid"] == e["euid"] == 1234 and e["gid"] == 4321 for e in mine), mine[0]
    assert all(e["process_lineage"] and e["process_lineage"][0]["pid"] == os.getpid() for e in mine), mine[0]
