"""A hostile host against a running sensor: runtime state that would block,
grow or crash the broker (issue 18, MEASUREMENTS.md "Hostile input").

Each case plays the measured attack: a process named ``runc`` advertising
``--root DIR``, where ``DIR/<64-hex id>/state.json`` is a FIFO, a symlink to
/dev/zero, or JSON of the wrong types; then a cgroup named with that id (the
v1 cpu and memory hierarchies and cgroup2, as runc makes them) is given
processes that exec, so the broker looks the container up while a subscriber
receives its events. Afterwards ``c8ctl status`` answers at once, an exec
made later reaches the subscriber that was there before, and the broker is
the same process (never restarted, the subscription never re-made).

The fake runc runs as root from a root-owned /bin/sh, so the broker trusts
the root it advertises and really opens the hostile file (the FIFO case
proves the open: a writer blocked on the FIFO is released by it). The same
process as another user is ignored (counted), never trusted.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.sensor import Sensor, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

CGROUP = "/sys/fs/cgroup"
HIERARCHIES = ("cpu", "memory", "unified")
SH = os.path.realpath("/bin/sh")


@pytest.fixture(scope="module")
def sensor(tmp_path_factory):
    s = Sensor(tmp_path_factory.mktemp("hostile")).start()
    yield s
    s.stop()


class FakeRuntime:
    """A root named ``runc`` advertising ``--root``, and a cgroup named for a container id."""

    def __init__(self, base, make_state, user: int | None = None):
        self.id = secrets.token_hex(32)
        self.root = os.path.join(base, f"runc-{self.id[:8]}")
        os.makedirs(os.path.join(self.root, self.id))
        make_state(os.path.join(self.root, self.id, "state.json"))
        # sh with argv[0] "runc" that names itself runc (its comm, as the real binary's
        # is): it stays (no exec of a last command), its argv as given
        self.runc = subprocess.Popen(["runc", "-c", "printf runc > /proc/self/comm; sleep 600; :",
                                      "--root", self.root], executable=SH, user=user, group=user)
        wait_for(lambda: _argv(self.runc.pid)[:1] == ["runc"], 5, what="the fake runc's exec")
        wait_for(lambda: open(f"/proc/{self.runc.pid}/comm").read() == "runc\n", 5, what="the fake runc's name")
        self.cgroups = []
        for h in HIERARCHIES:
            path = os.path.join(CGROUP, h, self.id)
            if os.path.isdir(os.path.join(CGROUP, h)):
                os.mkdir(path)
                self.cgroups.append(path)
        # the container's init: a shell in the cgroup from its first instruction, running
        # what exec_inside sends; its children are in the container from their fork on
        self.init = subprocess.Popen([SH], stdin=subprocess.PIPE, text=True, preexec_fn=self._join)

    def _join(self) -> None:
        for path in self.cgroups:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def exec_inside(self, marker: str) -> str:
        """The init forks a child that execs a shell living 3 s (so the broker
        reads its /proc) with ``marker`` in its command line; returns ``marker``."""
        self.init.stdin.write(f"{SH} -c 'sleep 3; :' {marker} &\n")
        self.init.stdin.flush()
        return marker

    def close(self):
        self.init.stdin.close()
        for p in (self.runc, self.init):
            p.kill()
            p.wait()
        for path in self.cgroups:
            wait_for(lambda path=path: _kill_all(path) and _rmdir(path), 10, what=f"rmdir {path}")


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def _kill_all(path: str) -> bool:
    """SIGKILL what is left in a cgroup (the init's children); True."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return True
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return True


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def status_quickly(sensor) -> dict:
    """c8ctl status's request; fails unless the broker answers within 1 s."""
    start = time.monotonic()
    st = sensor.status()  # Client(timeout=1.0): SensorUnavailable when no answer
    assert time.monotonic() - start < 1.5
    return st


def with_marker(marker: str):
    return lambda evs: any(marker in e.get("exec_command_line", "") for e in evs)


def events_until(sub, done, timeout=30.0) -> list[dict]:
    events: list[dict] = []
    end = time.monotonic() + timeout
    for ev in sub.events(timeout=3.0):
        events.append(ev)
        if done(events) or time.monotonic() > end:
            break
    return events


def attack(sensor, tmp_path, make_state, proof=None):
    """Run the attack; ``proof(rt, sub)`` waits for evidence the broker read the
    hostile file. Then check the broker is unharmed."""
    before = status_quickly(sensor)
    pid = before["broker_pid"]
    mark = "c8hostile" + secrets.token_hex(4)
    # container events too: the cgroup tracepoints (mkdir, attach) place each process
    spec = {"events": {"process": {"filter": f'kind == "EXEC" and exec_command_line like "*{mark}*"'},
                       "container": {}}}
    with sensor.client.subscribe(spec) as sub:
        rt = FakeRuntime(str(tmp_path), make_state)
        try:
            roots0 = before["containers"]["roots"]
            first = rt.exec_inside(mark + "-first")
            seen = events_until(sub, with_marker(first))
            inside = [e for e in seen if first in e.get("exec_command_line", "")]
            assert inside and inside[0]["container_id"] == rt.id, seen
            # the broker rediscovers roots while a container is unnamed (every 5 s)
            wait_for(lambda: status_quickly(sensor)["containers"]["roots"] > roots0, 20, 0.2,
                     "the fake runc's root to be trusted")
            if proof is not None:
                proof(rt, sub, mark)
            for i in range(3):  # more lookups of the container with the hostile root known
                more = rt.exec_inside(f"{mark}-more{i}")
                assert with_marker(more)(events_until(sub, with_marker(more)))
            after = status_quickly(sensor)
            assert after["broker_pid"] == pid
            # an exec made afterwards, on the host, reaches the subscriber that was there before
            later = subprocess.Popen([SH, "-c", ":", mark + "-later"])
            later.wait()
            got = events_until(sub, lambda evs: any(e["process_pid"] == later.pid for e in evs))
            assert any(e["process_pid"] == later.pid and e["container_id"] == "" for e in got), got
            assert sub.resubscribed == 0 and sub.ended is None
            ctl = subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", sensor.run_dir, "status"],
                                 capture_output=True, text=True, timeout=30)
            assert ctl.returncode == 0 and f"broker pid {pid}" in ctl.stdout, ctl.stdout + ctl.stderr
            assert "containers: {" in ctl.stdout
            final = status_quickly(sensor)
            assert final["broker_pid"] == pid
            broker = [c for c in sensor.children() if c["name"] == "c8-broker"]
            assert broker and broker[0]["pid"] == pid and broker[0].get("restarts", 0) == before_restarts(before)
            return final
        finally:
            rt.close()


def before_restarts(status: dict) -> int:
    children = status.get("supervisor", {}).get("children", [])
    return next((c.get("restarts", 0) for c in children if c.get("name") == "c8-broker"), 0)


def test_state_json_fifo(sensor, tmp_path):
    opened = threading.Event()

    def writer(path):
        fd = os.open(path, os.O_WRONLY)  # blocks until a reader opens the FIFO
        opened.set()
        os.close(fd)

    def proof(rt, sub, mark):
        path = os.path.join(rt.root, rt.id, "state.json")
        threading.Thread(target=writer, args=(path,), daemon=True).start()
        deadline = time.monotonic() + 30
        while not opened.wait(0.5):  # each exec makes the broker look the container up again
            assert time.monotonic() < deadline, "the broker never opened the FIFO"
            rt.exec_inside(f"{mark}-poke")

    st = attack(sensor, tmp_path, os.mkfifo, proof)
    assert st["containers"]["lookup_timed_out"] == 0  # refused at once, nothing stalled


def test_state_json_symlink_to_dev_zero(sensor, tmp_path):
    def proof(rt, sub, mark):
        # lookups with the root known: each retries the runc root (the table
        # retries an unnamed container at most every 0.1 s while its events flow)
        n = status_quickly(sensor)["containers"]["lookups"]
        for i in range(3):
            poke = rt.exec_inside(f"{mark}-poke{i}")
            events_until(sub, with_marker(poke))
        wait_for(lambda: status_quickly(sensor)["containers"]["lookups"] >= n + 2, 20, 0.2,
                 "lookups with the /dev/zero root known")

    attack(sensor, tmp_path, lambda p: os.symlink("/dev/zero", p), proof)
    with open(f"/proc/{status_quickly(sensor)['broker_pid']}/status") as f:
        rss_kb = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    assert rss_kb < 1 << 20  # under 1 GiB: /dev/zero was not read into memory


def test_state_json_wrong_types(sensor, tmp_path):
    def make(path):
        with open(path, "w") as f:
            json.dump({"id": "x", "config": {"labels": [1, None, {"a": "b"}]}}, f)

    def proof(rt, sub, mark):
        # read and parsed: a runc container without annotations is named by its id
        def named():
            m = rt.exec_inside(f"{mark}-named{secrets.token_hex(2)}")
            evs = events_until(sub, with_marker(m), 10)
            return any(m in e.get("exec_command_line", "") and e["container_name"] == rt.id for e in evs)
        wait_for(named, 40, 0.5, "the container named from its (wrong-typed) state.json")

    attack(sensor, tmp_path, make, proof)


def test_runtime_of_another_user_is_not_trusted(sensor, tmp_path):
    """The same fake runc as nobody: its root is ignored (counted), never read."""
    os.chmod(tmp_path, 0o755)
    before = status_quickly(sensor)["containers"]
    rt = FakeRuntime(str(tmp_path), os.mkfifo, user=65534)
    try:
        rt.exec_inside("c8hostile-untrusted")
        wait_for(lambda: status_quickly(sensor)["containers"]["runtimes_ignored"] >= 1, 20, 0.2,
                 "the untrusted runc to be ignored")
        assert status_quickly(sensor)["containers"]["roots"] == before["roots"]
    finally:
        rt.close()
