"""c8-telemetry as a user runs it: a subprocess against a private sensor.

A workload (exec, opens of *foo* names, a missing file, an IPv4 connect) runs
while c8-telemetry prints; the test looks for the workload's lines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root

WORKLOAD = textwrap.dedent(r"""
    import os, socket, subprocess, sys
    T, port = sys.argv[1], int(sys.argv[2])
    subprocess.run(["/bin/true", "telemetry-check"])
    open(os.path.join(T, "foo-telemetry"), "w").close()
    try:
        open(os.path.join(T, "missing-file"))
    except FileNotFoundError:
        pass
    socket.create_connection(("127.0.0.1", port)).close()
""")


class Telemetry:
    """c8-telemetry running; a thread reads its stdout so it never blocks on the pipe."""

    def __init__(self, sensor, *flags):
        self.sensor = sensor
        # an earlier client's subscription may linger until the broker sees it gone
        self.before = {s["subscription"] for s in sensor.status()["subscriptions"]}
        self.proc = subprocess.Popen([sys.executable, "-m", "c8.clients.telemetry", "--run-dir", sensor.run_dir,
                                      *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for ln in self.proc.stdout:
            self.lines.append(ln.rstrip("\n"))

    def collecting(self):
        """Wait until its subscription is live and every collector runs the plan that serves it."""
        def ready():
            st = self.sensor.status()
            gen = st["plan"]["generation"]
            mine = {s["subscription"] for s in st["subscriptions"]} - self.before
            return mine and all(c["generation"] >= gen for c in st["collectors"].values())
        wait_for(ready, 15, 0.1, "c8-telemetry's subscription to be collected")
        # its subscribe returns once the collectors run the plan; host opens print soon after
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def until(self, done, timeout=40.0) -> list[str]:
        """Its lines once done(lines) holds or after the timeout; then stops it."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not done(list(self.lines)):
                time.sleep(0.1)
        finally:
            self.proc.terminate()
            self.proc.wait(10)
            self.reader.join(5)
        return list(self.lines)


@pytest.fixture
def telemetry(shared_sensor):
    """Starts c8-telemetry against the shared sensor; always stopped, so its
    subscription never outlives the test."""
    started = []

    def start(*flags):
        tel = Telemetry(shared_sensor, *flags)
        started.append(tel)
        return tel.collecting()
    yield start
    for tel in started:
        tel.stop()


def run_workload(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    child = subprocess.run([sys.executable, "-c", WORKLOAD, str(tmp_path), str(port)], check=True)
    srv.close()
    return child, port


def test_telemetry_prints_the_workload(telemetry, tmp_path):
    tel = telemetry()
    _, port = run_workload(tmp_path)
    foo = os.path.join(str(tmp_path), "foo-telemetry")
    wants = {
        "exec": lambda ln: 'process:<kind:"EXEC"' in ln and 'exec_command_line:"/bin/true telemetry-check"' in ln,
        "open_ret": lambda ln: 'syscall:<kind:"EXIT"' in ln and "ret:-2" in ln,
        "foo": lambda ln: 'file:<kind:"OPEN"' in ln and f'filename:"{foo}"' in ln,
        "connect": lambda ln: 'network:<kind:"CONNECT_ATTEMPT"' in ln and 'address:"127.0.0.1"' in ln
        and f"port:{port} " in ln,
    }
    lines = tel.until(lambda ls: all(any(w(ln) for ln in ls) for w in wants.values()))
    missing = [k for k, w in wants.items() if not any(w(ln) for ln in lines)]
    assert not missing, (missing, lines[-20:])
    assert all(ln.startswith("event:<") for ln in lines)
    # only *foo* names among the file events, only IPv4 connects among the network ones
    assert all("foo" in ln.split("filename:", 1)[1] for ln in lines if "file:<" in ln)
    assert all("family:2 " in ln for ln in lines if "network:<" in ln)


def test_telemetry_json(telemetry, tmp_path):
    tel = telemetry("-json")
    child, port = run_workload(tmp_path)
    lines = tel.until(lambda ls: any('"CONNECT_ATTEMPT"' in ln and str(port) in ln for ln in ls))
    events = [json.loads(ln) for ln in lines]
    conn = [e for e in events if e["type"] == "network" and e["port"] == port]
    assert conn and conn[0]["address"] == "127.0.0.1" and conn[0]["kind"] == "CONNECT_ATTEMPT"
    assert len(conn[0]["id"]) == 64
    sys_exits = [e for e in events if e["type"] == "syscall"]
    assert all(e["kind"] == "EXIT" and e["id"] in (2, 85, 257, 437) for e in sys_exits)


def test_telemetry_image_filter_hides_the_host(shared_sensor, telemetry, tmp_path):
    tel = telemetry("-image", "no-such-image-*")
    run_workload(tmp_path)
    # a plain subscriber proves the workload's events were published meanwhile
    with shared_sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
        p = subprocess.Popen(["/bin/true", "image-check"])
        p.wait()
        seen = False
        for ev in sub.events(timeout=3.0, idle=10.0):
            if ev["process_pid"] == p.pid:
                seen = True
                break
    lines = tel.until(lambda ls: False, timeout=2.0)
    assert seen
    assert lines == []  # host events are not in any container
    assert "Watching for container images matching no-such-image-*" in tel.proc.stderr.read()
