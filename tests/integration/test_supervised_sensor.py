"""The real sensor tree under its supervisor: privileges, limits, restarts, c8ctl."""

import json
import os
import pwd
import signal
import subprocess
import sys
import time

import pytest

from c8.supervisor import privileges
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

CGROUP = "capsule8-sensor"


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def c8ctl(run_dir, *args, timeout=20):
    return subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_children_run_as_sensor_user_with_their_role_caps_and_collect(shared_sensor):
    user = pwd.getpwnam("capsule8")
    children = shared_sensor.children()
    assert {c["name"] for c in children} >= {"c8-broker", "c8-collector cpu0"}
    for child in children:
        pid = child["pid"]
        uids = status_field(pid, "Uid").split()
        assert uids == [str(user.pw_uid)] * 4, child
        role = "broker" if child["name"] == "c8-broker" else \
            "collector0" if child["name"] == "c8-collector cpu0" else "collector"
        cap_eff = int(status_field(pid, "CapEff"), 16)
        assert cap_eff == privileges.role_mask(role) != 0
        assert int(status_field(pid, "CapAmb"), 16) == 0
        assert not cap_eff & (1 << 16), "CAP_SYS_MODULE must not be kept"
    # and they still collect
    with shared_sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
        p = subprocess.Popen(["/bin/true", "as-capsule8"])
        p.wait()
        got = next((e for e in sub.events(timeout=5) if e["process_pid"] == p.pid), None)
        assert got is not None and got["exec_command_line"] == "/bin/true as-capsule8"


def test_c8ctl_status_subscribe_and_exit_codes(shared_sensor, tmp_path):
    st = c8ctl(shared_sensor.run_dir, "status")
    assert st.returncode == 0, st.stderr
    assert "c8-collector cpu0" in st.stdout and "subscriptions:" in st.stdout
    st = json.loads(c8ctl(shared_sensor.run_dir, "status", "--json").stdout)
    assert st["sensor_id"] and set(st["collectors"]) >= {"0"}
    # subscribe streams JSON lines; --limit ends it
    proc = subprocess.Popen([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", shared_sensor.run_dir,
                             "subscribe", "--events", "process", "--filter", 'exec_command_line like "*c8ctl-mark*"',
                             "--limit", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # c8ctl prints the subscription id once the broker replied, and the broker
    # replies once the collectors run the plan: execs after that are seen.
    first = proc.stderr.readline()
    assert "subscription" in first, first
    for _ in range(2):
        subprocess.run(["/bin/true", "c8ctl-mark"])
    out, err = proc.communicate(timeout=20)
    lines = [json.loads(x) for x in out.splitlines()]
    assert [e["exec_command_line"] for e in lines] == ["/bin/true c8ctl-mark"] * 2, (lines, err)
    assert all(e["type"] == "process" and e["kind"] == "EXEC" for e in lines)
    # a bad filter is a clear error, exit 1
    bad = c8ctl(shared_sensor.run_dir, "subscribe", "--events", "file", "--filter", "filenam == 'x'")
    assert bad.returncode == 1 and "filenam" in bad.stderr
    # not running: non-zero with a message
    down = c8ctl(str(tmp_path / "nowhere"), "status")
    assert down.returncode == 1 and "not running" in down.stderr


def resumes(sub, marker: str, within: float = 40) -> bool:
    """True once an exec of ``marker`` made after the client's resubscription
    arrives. The client notices the silence and subscribes again on the same
    connection; from then on the marker runs every two seconds, from inside the
    read too (a busy host never lets a read go idle)."""
    deadline = time.monotonic() + within
    next_run = 0.0

    def poke():
        nonlocal next_run
        if sub.resubscribed and time.monotonic() >= next_run:
            subprocess.run(marker.split())
            next_run = time.monotonic() + 2

    while time.monotonic() < deadline:
        for ev in sub.events(timeout=6, idle=2):  # timeout > the client's BROKER_SILENCE
            if ev.get("exec_command_line") == marker:  # lost notices have no command line
                return True
            poke()
            if time.monotonic() >= deadline:
                break
        poke()
    return False


def test_broker_killed_restarts_and_subscription_recovers(sensor):
    with sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
        broker = next(c for c in sensor.children() if c["name"] == "c8-broker")
        os.kill(broker["pid"], signal.SIGKILL)
        wait_for(lambda: any(c["name"] == "c8-broker" and c["pid"] != broker["pid"] and c["state"] == "RUNNING"
                             for c in sensor.children()), 20, what="the broker restarted")
        assert resumes(sub, "/bin/true after-broker-restart")
        assert sub.resubscribed >= 1
    assert "c8-broker" in sensor.output() and "restart" in sensor.output().lower()


def test_stopped_broker_is_replaced_as_hung_and_subscription_resumes(tmp_path):
    """SIGSTOP: the broker is alive but its loop does not turn (as when it blocks
    on a FIFO): no heartbeat for heartbeat_timeout, so it is killed and replaced."""
    s = Sensor(tmp_path, heartbeat_timeout="5s").start()
    try:
        with s.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
            old = next(c for c in s.children() if c["name"] == "c8-broker")["pid"]
            os.kill(old, signal.SIGSTOP)
            new = wait_for(lambda: next((c["pid"] for c in s.children() if c["name"] == "c8-broker"
                                         and c["pid"] not in (None, old) and c["state"] == "RUNNING"),
                                        None), 30, what="a new broker")
            wait_for(lambda: not os.path.exists(f"/proc/{old}"), 10, what="the stopped broker gone")
            assert new != old
            assert resumes(sub, "/bin/true after-hung-broker")
            assert sub.resubscribed >= 1
        log = s.output()
        assert f"c8-broker (pid {old}) hung: no heartbeat for 5s (silent " in log, log
        assert f"c8-broker (pid {old}) exited: hung: no heartbeat for 5s, killed by SIGKILL" in log, log
        # the collectors beat all along
        assert all(c["restarts"] == 0 for c in s.children() if c["name"] != "c8-broker")
    finally:
        assert s.stop() == 0


def read_cg(controller, name):
    with open(f"/sys/fs/cgroup/{controller}/{CGROUP}/{name}") as f:
        return f.read()


def test_cpu_limit_throttles_the_sensor_under_a_storm(tmp_path):
    s = Sensor(tmp_path, use_supervisor=True, use_resource_limits=True, cpu_limit=5, memory_limit="512M").start()
    try:
        quota = int(read_cg("cpu", "cpu.cfs_quota_us"))
        period = int(read_cg("cpu", "cpu.cfs_period_us"))
        ncpu = os.cpu_count()
        assert period == 1_000_000 and quota == 5 * ncpu * 10_000
        assert int(read_cg("memory", "memory.limit_in_bytes")) == 512 << 20
        with s.client.subscribe({"events": {"syscall": {"kinds": ["ENTER"]}}}, queue=1000) as sub:
            usage0 = int(read_cg("cpuacct", "cpuacct.usage"))
            t0 = time.monotonic()
            storm = subprocess.Popen([sys.executable, "-c",
                                      "import os,time\nt=time.monotonic()+6\nwhile time.monotonic()<t: os.getppid()"])
            for _ in sub.batches(timeout=1):
                if storm.poll() is not None:
                    break
            storm.wait()
            used = (int(read_cg("cpuacct", "cpuacct.usage")) - usage0) / 1e9
            elapsed = time.monotonic() - t0
        stat = dict(line.split() for line in read_cg("cpu", "cpu.stat").splitlines())
        assert int(stat["nr_throttled"]) > 0
        # the quota allows 5% of all CPUs; one period of slack for the edges
        assert used <= 0.05 * ncpu * (elapsed + 1.0), (used, elapsed)
    finally:
        assert s.stop() == 0
    assert not os.path.exists(f"/sys/fs/cgroup/cpu/{CGROUP}")
    assert not os.path.exists(s.run_dir + "/sensor.sock")


def test_sensor_never_reports_its_own_activity(shared_sensor):
    own = {c["pid"] for c in shared_sensor.children()}
    own.add(shared_sensor.proc.pid)
    with shared_sensor.client.subscribe({"events": {"syscall": {"kinds": ["ENTER"]}, "file": {},
                                                    "process": {}}}, queue=1000) as sub:
        n = 0
        deadline = time.monotonic() + 3
        for category, batch, _ in sub.batches(timeout=2):
            if category in ("lost", "limiter"):
                continue
            n += len(batch)
            assert not set(batch["process_pid"].tolist()) & own
            if time.monotonic() > deadline:
                break
    assert n > 0  # the host (this test, at least) was seen meanwhile


def test_a_busy_broker_is_not_subscribed_to_twice(shared_sensor):
    """A broker silent for longer than the client's BROKER_SILENCE (paused here for
    5 s, as a storm on a loaded host can hold it) still holds the subscription:
    the client asks, sees it listed and does not subscribe again (twice would give
    every later event twice). Meanwhile the collectors' queues to it held what
    they read: their ticks (one per ring read) are conflated, not queued, so an
    idle host's 5 s stall loses nothing (queued, they filled it in 4 s, and the
    events after it were lost)."""
    spec = {"events": {"process": {"filter": 'kind == "EXEC" and exec_command_line == "/bin/true busy-broker"'}}}
    with shared_sensor.client.subscribe(spec) as sub:
        broker = next(c for c in shared_sensor.children() if c["name"] == "c8-broker")["pid"]
        os.kill(broker, signal.SIGSTOP)
        try:
            got = list(sub.messages(timeout=5))  # silence: the client asks whether we are still there
        finally:
            os.kill(broker, signal.SIGCONT)
        assert got == []
        for _ in range(3):
            subprocess.run(["/bin/true", "busy-broker"], check=True)
        events = []
        deadline = time.monotonic() + 30  # the broker catches up on what came while it was paused
        for ev in sub.events(timeout=5, idle=5):
            events += [ev] if ev["type"] == "process" else []
            if len(events) > 3 or time.monotonic() > deadline:
                break
        assert len(events) == 3 and sub.resubscribed == 0, (len(events), sub.resubscribed, sub.lost)
        assert "collector" not in sub.lost, sub.lost
        mine = [s for s in shared_sensor.client.request("list")["subscriptions"] if s["spec"] == spec]
        assert len(mine) == 1, mine
