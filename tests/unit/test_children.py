"""Child states with a fake ProcessOS (no fork: the real one is tested in integration)."""

import logging
import os
import signal

import pytest

from c8.supervisor import children as ch
from c8.supervisor.arbiter import child_specs, entry_points, online_cpus
from c8.supervisor.children import EXIT_LIMITER, Children, ChildSpec, State, describe_status
from c8.supervisor.config import load


def exit_status(code):
    return code << 8


def signal_status(sig):
    return sig


class FakeOS:
    """Records forks and kills; the test decides when processes end and how."""

    def __init__(self):
        self.t = 1000.0
        self.next_pid = 100
        self.spawned = []
        self.killed = []
        self.exits = []        # (pid, status) the next reap returns
        self.oom = 0
        self.die_on = {}       # signal -> True: a kill makes the process exit at once
        self.beating = set()   # pids whose heartbeat the next check sees

    def spawn(self, spec):
        self.next_pid += 1
        self.spawned.append((spec.name, self.next_pid))
        return self.next_pid

    def kill(self, pid, sig):
        self.killed.append((pid, sig))
        if self.die_on.get(sig):
            self.exits.append((pid, signal_status(sig)))

    def reap(self):
        out, self.exits = self.exits, []
        return out

    def oom_kills(self):
        return self.oom

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds

    def heartbeat(self, pid):
        return pid in self.beating


@pytest.fixture
def fos():
    return FakeOS()


def one(fos):
    group = Children([ChildSpec("c8-broker", "x:y")], fos)
    return group, group.children[0]


def test_start_running_after_startsecs(fos):
    group, c = one(fos)
    assert c.state is State.STOPPED
    group.start_all()
    assert c.state is State.STARTING and c.pid == 101
    fos.t += ch.START_SECS - 0.1
    assert not group.tick()
    assert c.state is State.STARTING
    fos.t += 0.2
    assert group.tick()
    assert c.state is State.RUNNING


def test_restart_with_exponential_backoff_capped(fos, caplog):
    caplog.set_level(logging.WARNING, "c8.supervisor")
    group, c = one(fos)
    group.start_all()
    delays = []
    for _ in range(8):
        fos.t += 2  # RUNNING each time (not a quick failure)
        group.tick()
        assert c.state is State.RUNNING
        fos.exits.append((c.pid, exit_status(3)))
        group.reap()
        assert c.state is State.BACKOFF
        delays.append(c.retry_at - fos.t)
        fos.t = c.retry_at - 0.01
        group.tick()
        assert c.state is State.BACKOFF  # not yet
        fos.t = c.retry_at
        group.tick()
        assert c.state is State.STARTING
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert c.restarts == 8
    assert c.last_exit_reason == "exit status 3"
    assert "c8-broker (pid 101) exited: exit status 3; restarting in 1s" in caplog.text


def test_backoff_resets_after_staying_up(fos):
    group, c = one(fos)
    group.start_all()
    for _ in range(3):
        fos.t += 2
        group.tick()
        fos.exits.append((c.pid, exit_status(1)))
        group.reap()
        fos.t = c.retry_at
        group.tick()
    assert c.failures == 3
    fos.t += ch.START_SECS
    group.tick()
    fos.t += ch.RESET_AFTER
    group.tick()
    assert c.failures == 0
    fos.exits.append((c.pid, exit_status(1)))
    group.reap()
    assert c.retry_at - fos.t == 1


def test_quick_failures_go_fatal(fos, caplog):
    group, c = one(fos)
    group.start_all()
    for i in range(ch.START_RETRIES):
        assert c.state is State.STARTING
        fos.exits.append((c.pid, exit_status(2)))
        group.reap()
        if i < ch.START_RETRIES - 1:
            assert c.state is State.BACKOFF
            fos.t = c.retry_at
            group.tick()
    assert c.state is State.FATAL
    assert group.failed() is c
    assert "giving up (FATAL)" in caplog.text


def test_limiter_exit_is_final(fos, caplog):
    group, c = one(fos)
    group.start_all()
    fos.t += 2
    group.tick()
    fos.exits.append((c.pid, exit_status(EXIT_LIMITER)))
    group.reap()
    assert c.state is State.EXITED
    assert group.failed() is c
    fos.t += 100
    group.tick()
    assert len(fos.spawned) == 1  # never restarted
    assert "event limiter" in caplog.text


def test_sigkill_with_oom_growth_is_oom(fos, caplog):
    caplog.set_level(logging.WARNING, "c8.supervisor")
    group, c = one(fos)
    group.start_all()
    fos.oom = 1
    fos.exits.append((c.pid, signal_status(signal.SIGKILL)))
    group.reap()
    assert "OOM-killed" in c.last_exit_reason
    assert "OOM-killed (SIGKILL" in caplog.text
    # A later SIGKILL without a new OOM kill is a plain kill.
    fos.t = c.retry_at
    group.tick()
    fos.exits.append((c.pid, signal_status(signal.SIGKILL)))
    group.reap()
    assert c.last_exit_reason == "killed by SIGKILL"


def test_two_oom_kills_are_both_claimed(fos):
    group = Children([ChildSpec("a", "x:y"), ChildSpec("b", "x:y")], fos)
    group.start_all()
    a, b = group.children
    fos.oom = 2
    fos.exits += [(a.pid, signal.SIGKILL), (b.pid, signal.SIGKILL)]
    group.reap()
    assert "OOM" in a.last_exit_reason and "OOM" in b.last_exit_reason


def test_stop_all_sigterm_then_stopped(fos):
    fos.die_on[signal.SIGTERM] = True
    group = Children([ChildSpec("a", "x:y"), ChildSpec("b", "x:y")], fos)
    group.start_all()
    group.stop_all(timeout=5)
    assert [c.state for c in group.children] == [State.STOPPED, State.STOPPED]
    assert {s for _, s in fos.killed} == {signal.SIGTERM}


def test_stop_all_sigkills_stragglers(fos, caplog):
    fos.die_on[signal.SIGKILL] = True  # ignores SIGTERM
    group, c = one(fos)
    group.start_all()
    group.stop_all(timeout=5)
    assert fos.killed == [(101, signal.SIGTERM), (101, signal.SIGKILL)]
    assert c.state is State.STOPPED
    assert fos.t >= 1005  # waited the whole grace period (fake time)
    assert "did not stop within 5s" in caplog.text


def test_stop_cancels_backoff(fos):
    group, c = one(fos)
    group.start_all()
    fos.exits.append((c.pid, exit_status(1)))
    group.reap()
    assert c.state is State.BACKOFF
    group.stop_all()
    assert c.state is State.STOPPED
    assert fos.killed == []


def test_invalid_edge_is_refused(fos):
    _, c = one(fos)
    with pytest.raises(RuntimeError, match="STOPPED -> RUNNING"):
        c.change(State.RUNNING, "bug")


def test_unknown_pid_ignored(fos):
    group, c = one(fos)
    group.start_all()
    fos.exits.append((4242, 0))
    assert not group.reap()
    assert c.state is State.STARTING


def test_status_lists_children(fos):
    group, c = one(fos)
    group.start_all()
    assert group.status() == [{"name": "c8-broker", "pid": 101, "state": "STARTING",
                               "restarts": 0, "last_exit_reason": None}]


@pytest.mark.parametrize("status,oom,text", [
    (exit_status(0), False, "exit status 0"),
    (exit_status(78), False, "exit status 78"),
    (signal.SIGSEGV, False, "killed by SIGSEGV"),
    (signal.SIGSEGV | 0x80, False, "killed by SIGSEGV (core dumped)"),
    (signal.SIGKILL, True, "OOM-killed (SIGKILL, memory cgroup limit)"),
])
def test_describe_status(status, oom, text):
    assert describe_status(status, oom) == text


def test_real_wait_status_matches():
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    _, status = os.waitpid(pid, 0)
    assert describe_status(status) == "exit status 5"


def test_tree_specs(monkeypatch):
    monkeypatch.setattr("c8.supervisor.config.DEFAULT_PATH", "/nonexistent/c8.yaml")
    cfg = load(environ={"CAPSULE8_DETECTIONS_ENABLED": "true"})
    specs = child_specs(cfg, [0, 1, 3], entry_points({}))
    assert [s.name for s in specs] == ["c8-broker", "c8-collector cpu0", "c8-collector cpu1",
                                       "c8-collector cpu3", "c8-detector"]
    assert specs[0].entry == "c8.broker.main:run"
    assert specs[3] == ChildSpec("c8-collector cpu3", "c8.collectors.main:run", (3,),
                                 role="collector", heartbeat=True)
    assert [(s.role, s.heartbeat) for s in specs] == [
        ("broker", True), ("collector0", True), ("collector", True), ("collector", True),
        ("detector", False)]
    assert specs[4].entry == "c8.detections.main:run"
    cfg = load(environ={})  # detections run by default
    assert [s.name for s in child_specs(cfg, [0], entry_points({}))] == \
        ["c8-broker", "c8-collector cpu0", "c8-detector"]
    cfg = load(environ={"CAPSULE8_DETECTIONS_ENABLED": "false"})
    assert [s.name for s in child_specs(cfg, [0], entry_points({}))] == \
        ["c8-broker", "c8-collector cpu0"]


def test_entry_point_overrides():
    eps = entry_points({"C8_SUPERVISOR_TEST_ENTRY_POINTS": '{"broker": "m:f"}'})
    assert eps["broker"] == "m:f" and eps["collector"] == "c8.collectors.main:run"


def test_online_cpus():
    assert online_cpus("0-3,5\n") == [0, 1, 2, 3, 5]
    assert online_cpus("0\n") == [0]


def test_collector_groups_and_names():
    from c8.protocol import cpus
    assert cpus.groups(list(range(64)), 8) == [list(range(i, i + 8)) for i in range(0, 64, 8)]
    assert cpus.groups([0, 1], 8) == [[0], [1]]  # up to max_collectors: a process per CPU
    assert cpus.groups(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert cpus.groups([0, 1, 2], 1) == [[0, 1, 2]]
    assert cpus.list_text([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    for group in ([3], [0, 1], [0, 2, 4], list(range(8)), [5, 6, 9]):
        name = cpus.collector_name(group)
        assert cpus.of_collector(name) == group, name
    assert cpus.collector_name([0, 1, 2, 3]) == "c8-collector cpu0-3"
    assert cpus.of_collector("c8-broker") is None and cpus.of_collector("c8-collector cpux") is None


def test_tree_groups_cpus_past_max_collectors(monkeypatch):
    monkeypatch.setattr("c8.supervisor.config.DEFAULT_PATH", "/nonexistent/c8.yaml")
    cfg = load(environ={"CAPSULE8_MAX_COLLECTORS": "2", "CAPSULE8_DETECTIONS_ENABLED": "false"})
    specs = child_specs(cfg, [0, 1, 2, 3, 5], entry_points({}))
    assert specs[1:] == [
        ChildSpec("c8-collector cpu0-2", "c8.collectors.main:run", ((0, 1, 2),), role="collector0", heartbeat=True),
        ChildSpec("c8-collector cpu3,5", "c8.collectors.main:run", ((3, 5),), role="collector", heartbeat=True)]
    assert [s.name for s in child_specs(load(environ={}), list(range(64)), entry_points({}))][1:9] == [
        f"c8-collector cpu{i}-{i + 7}" for i in range(0, 64, 8)]


def test_health_reads_every_cpu_of_a_grouped_collector():
    from c8.supervisor.metrics import health
    children = [{"name": "c8-broker", "state": "RUNNING"}, {"name": "c8-collector cpu0-2", "state": "RUNNING"}]
    fresh = {"seen_ago": 0.5}
    assert health(children, {"collectors": {"0": fresh, "1": fresh, "2": fresh}}, None) == []
    assert health(children, {"collectors": {"0": fresh, "2": {"seen_ago": 9.0}}}, None) == [
        "c8-collector cpu0-2 (cpu1) has not reported to the broker",
        "c8-collector cpu0-2 (cpu2) has not reported for 9.0s (it reports every 1s)"]


# -- host parsers the tree relies on (fake /proc and tracefs content)

def test_find_controllers_v1_wins_over_v2(tmp_path):
    from c8.supervisor.cgroups import find_controllers

    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts = ("cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
              "cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n"
              f"cgroup2 {v2} cgroup2 rw 0 0\n")
    found = find_controllers(mounts)
    assert found == {"cpu": (1, "/sys/fs/cgroup/cpu"), "cpuacct": (1, "/sys/fs/cgroup/cpuacct"),
                     "memory": (2, str(v2))}


def test_find_controllers_pure_v2(tmp_path):
    from c8.supervisor.cgroups import SensorCgroup, find_controllers

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    found = find_controllers(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert found == {"cpu": (2, str(tmp_path)), "memory": (2, str(tmp_path)),
                     "cpuacct": (2, str(tmp_path))}
    cg = SensorCgroup(cpu_limit=5, memory_limit=1 << 30, ncpu=4, controllers=found)
    assert cg.cpu_quota_us == 200_000
    assert cg.dirs() == [str(tmp_path / "capsule8-sensor")]
    assert SensorCgroup(0, 0, ncpu=4, controllers=found).cpu_quota_us == -1


def test_probe_names():
    from c8.supervisor.cleanup import probe_names

    text = ("p:c8probes/open_1 /usr/lib/libc.so.6:0x0000000000001040 fd=%di:s32\n"
            "r:c8probes/ret_2 /bin/true:0x10\n"
            "p:other/x /bin/true:0x10\n"
            "p:c8probesx/y /bin/true:0x10\n")
    assert probe_names(text) == ["open_1", "ret_2"]


# -- heartbeats ---------------------------------------------------------------------

def beating(fos, timeout=10.0, heartbeat=True):
    group = Children([ChildSpec("c8-broker", "x:y", heartbeat=heartbeat)], fos, timeout)
    group.start_all()
    return group, group.children[0]


def test_silent_child_is_killed_as_hung_and_restarted(fos, caplog):
    caplog.set_level(logging.WARNING, "c8.supervisor")
    fos.die_on[signal.SIGKILL] = True
    group, c = beating(fos)
    fos.beating.add(c.pid)
    for _ in range(30):  # beats for 30 s: never hung
        fos.t += 1
        group.tick()
    assert c.state is State.RUNNING and fos.killed == []
    fos.beating.clear()  # stops: SIGSTOP, a FIFO, an endless loop
    fos.t += 9.9
    group.tick()
    assert fos.killed == []
    fos.t += 0.2
    group.tick()
    assert fos.killed == [(101, signal.SIGKILL)]
    group.tick()  # killed once, not at every tick
    assert fos.killed == [(101, signal.SIGKILL)]
    group.reap()
    assert c.state is State.BACKOFF
    assert c.last_exit_reason == "hung: no heartbeat for 10s, killed by SIGKILL"
    assert ("c8-broker (pid 101) hung: no heartbeat for 10s (silent 10.1s); killing it with "
            "SIGKILL") in caplog.text
    assert ("c8-broker (pid 101) exited: hung: no heartbeat for 10s, killed by SIGKILL; "
            "restarting in 1s") in caplog.text
    fos.t = c.retry_at
    group.tick()
    assert c.state is State.STARTING and c.pid == 102 and c.hung is None
    # the new process gets a full timeout from its start before it must beat
    fos.t += 9
    group.tick()
    assert fos.killed == [(101, signal.SIGKILL)]


def test_child_that_never_beats_is_hung_after_the_timeout(fos):
    group, c = beating(fos, timeout=5)
    fos.t += 5
    group.tick()
    assert fos.killed == [(101, signal.SIGKILL)]


def test_no_watch_without_heartbeat_spec_or_with_timeout_0(fos):
    for timeout, heartbeat in ((10.0, False), (0.0, True)):
        group, c = beating(fos, timeout, heartbeat)
        fos.t += 100
        group.tick()
        assert fos.killed == [] and c.state is State.RUNNING


def test_hung_child_stopped_during_shutdown_is_stopped(fos):
    group, c = beating(fos)
    fos.t += 11
    group.tick()
    group.stop_all(1.0)  # SIGTERM is not taken (stopped process): SIGKILL again
    fos.exits.append((c.pid, signal_status(signal.SIGKILL)))
    group.reap()
    assert c.state is State.STOPPED and c.last_exit_reason.startswith("hung: ")
