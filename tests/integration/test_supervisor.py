"""The real supervisor as a subprocess: users, capabilities, cgroups, restarts, clean-up.

The children run this module's functions instead of the broker and collectors,
through the test-only C8_SUPERVISOR_TEST_ENTRY_POINTS hook (c8.supervisor.arbiter),
imported in the child as `test_supervisor` (PYTHONPATH holds this directory).
"""

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEST_USER = "c8itest"
CG = "capsule8-sensor"
CPU_DIR = f"/sys/fs/cgroup/cpu/{CG}"
CPUACCT_DIR = f"/sys/fs/cgroup/cpuacct/{CG}"
MEM_DIR = f"/sys/fs/cgroup/memory/{CG}"
TRACEFS = "/sys/kernel/tracing"


# -- entry points run in the children (after fork, as TEST_USER) --------------

def sleeper(config, *args):
    """A well-behaved child: heartbeats until SIGTERM."""
    from c8.protocol import heartbeat

    while True:
        heartbeat.beat()
        time.sleep(0.5)


def hangs_after_a_while(config, *args):
    """Heartbeats for a second, then its loop stops turning (as on a FIFO read)."""
    from c8.protocol import heartbeat

    until = time.monotonic() + 1
    while time.monotonic() < until:
        heartbeat.beat()
        time.sleep(0.1)
    while True:
        time.sleep(1)


def hog_memory(config, *args):
    """Touches memory until the cgroup's limit gets it OOM-killed."""
    from c8.protocol import heartbeat

    chunks = []
    while True:
        heartbeat.beat()
        chunks.append(b"\x01" * (8 << 20))
        time.sleep(0.01)


def burn_cpu(config, *args):
    """Spins on one CPU forever."""
    from c8.protocol import heartbeat

    while True:
        heartbeat.beat()


def limiter_exit(config, *args):
    """Exits as the broker does when the event limiter gives up."""
    from c8.supervisor.children import EXIT_LIMITER

    return EXIT_LIMITER


# -- helpers --------------------------------------------------------------------

def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\x00", b" ").decode().strip()


def read_keyed(path):
    with open(path) as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def read_int(path):
    with open(path) as f:
        return int(f.read())


def elf_entry_offset(path):
    """File offset of the ELF entry point (what uprobe_events wants)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        entry = elf.header.e_entry
        for seg in elf.iter_segments():
            h = seg.header
            if h.p_type == "PT_LOAD" and h.p_vaddr <= entry < h.p_vaddr + h.p_memsz:
                return entry - h.p_vaddr + h.p_offset
    raise AssertionError(f"no PT_LOAD holds the entry of {path}")


def add_uprobe(name):
    true = os.path.realpath("/bin/true")
    from c8.supervisor.cleanup import append_line

    append_line(f"{TRACEFS}/uprobe_events", f"p:c8probes/{name} {true}:{elf_entry_offset(true):#x}")
    assert f"c8probes/{name}" in uprobe_lines()


def uprobe_lines():
    with open(f"{TRACEFS}/uprobe_events") as f:
        return f.read()


class Running:
    """One supervisor subprocess with its config, run_dir and stderr log."""

    def __init__(self, tmp_path, settings, entry_points):
        self.run_dir = str(tmp_path / "run")
        self.log_path = tmp_path / "supervisor.log"
        cfg = {"sensor_user": TEST_USER, "run_dir": self.run_dir, **settings}
        # detections run by default: their alert file stays in the test's directory
        cfg["detections"] = {"alerts_file": str(tmp_path / "log" / "alerts.json"), **cfg.get("detections", {})}
        self.config_path = tmp_path / "capsule8-sensor.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE8_")}
        env["PYTHONPATH"] = os.pathsep.join([REPO, HERE])
        env["C8_SUPERVISOR_TEST_ENTRY_POINTS"] = json.dumps(entry_points)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "c8.supervisor.main", "--foreground",
             "--config", str(self.config_path)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def text(self):
        return self.log_path.read_text()

    def status(self):
        try:
            with open(os.path.join(self.run_dir, "supervisor.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def child(self, name):
        st = self.status()
        for c in (st or {}).get("children", []):
            if c["name"] == name:
                return c
        return None

    def wait_running(self, names, timeout=15):
        def ok():
            cs = [self.child(n) for n in names]
            return all(c and c["state"] == "RUNNING" for c in cs) and cs
        try:
            return wait_for(ok, timeout, f"{names} RUNNING")
        except AssertionError:
            raise AssertionError(self.text()) from None

    def wait_log(self, text, timeout=15):
        try:
            return wait_for(lambda: text in self.text(), timeout, repr(text))
        except AssertionError:
            raise AssertionError(f"{text!r} not logged:\n{self.text()}") from None

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def test_user():
    subprocess.run(["userdel", TEST_USER], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    TEST_USER], check=True)
    pw = pwd.getpwnam(TEST_USER)
    yield pw.pw_uid, pw.pw_gid
    subprocess.run(["userdel", TEST_USER], capture_output=True)


@pytest.fixture
def supervisor(tmp_path, test_user):
    started = []

    def start(settings, entry_points):
        r = Running(tmp_path, settings, entry_points)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill()


NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SLEEPERS = {"broker": "test_supervisor:sleeper", "collector": "test_supervisor:sleeper",
            "detector": "test_supervisor:sleeper"}
LIMITS = {"use_supervisor": True, "use_resource_limits": True}


def online_cpus():
    from c8.supervisor.arbiter import online_cpus as oc

    return oc()


def expected_status(name):
    """What privileges.ROLES says a child of this name shows in /proc/<pid>/status."""
    from c8.supervisor.privileges import expected_status as exp

    role = ("broker" if name == "c8-broker" else "detector" if name == "c8-detector"
            else "collector0" if name == "c8-collector cpu0" else "collector")
    return exp(role)


def test_tree_privileges_cgroup_restart_and_cleanup(supervisor, test_user):
    uid, gid = test_user
    add_uprobe("c8itest_stale")  # left by a "dead sensor": removed at start-up
    r = supervisor({**LIMITS, "cpu_limit": 5, "memory_limit": "256M",
                    "detections": {"enabled": True}}, SLEEPERS)
    names = ["c8-broker"] + [f"c8-collector cpu{n}" for n in online_cpus()] + ["c8-detector"]
    children = r.wait_running(names)
    assert "c8probes/c8itest_stale " not in uprobe_lines()

    # Titles, user, capabilities (tests/integration/test_privileges_sensor.py has the
    # same check on the real tree).
    for c in children:
        assert cmdline(c["pid"]) == c["name"]
        st = proc_status(c["pid"])
        assert st["Uid"].split() == [str(uid)] * 4
        assert st["Gid"].split() == [str(gid)] * 4
        assert st["Groups"] == ""
        got = {k: int(st[k], 16) if k.startswith("Cap") else int(st[k])
               for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")}
        assert got == expected_status(c["name"]), c["name"]
        assert not got["CapEff"] & (1 << 21), "CAP_SYS_ADMIN kept"
    assert cmdline(r.proc.pid) == "c8-supervisor"
    st = r.status()
    assert st["pid"] == r.proc.pid and st["cgroup"] == CG and st["started_unix"] <= time.time()

    # run_dir: owned by the user and its group, 0750.
    st = os.stat(r.run_dir)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o750)

    # Cgroup: limits and membership.
    assert read_int(f"{CPU_DIR}/cpu.cfs_period_us") == 1_000_000
    assert read_int(f"{CPU_DIR}/cpu.cfs_quota_us") == 5 * NCPU * 10_000
    assert read_int(f"{MEM_DIR}/memory.limit_in_bytes") == 256 << 20
    for d in (CPU_DIR, MEM_DIR, CPUACCT_DIR):
        procs = {int(p) for p in open(f"{d}/cgroup.procs").read().split()}
        assert {c["pid"] for c in children} <= procs, d
        assert r.proc.pid not in procs  # the supervisor stays outside

    # SIGKILL a child: restarted, with the reason logged.
    broker = children[0]
    os.kill(broker["pid"], signal.SIGKILL)
    r.wait_log(f"c8-broker (pid {broker['pid']}) exited: killed by SIGKILL; restarting in 1s")
    new = wait_for(lambda: (c := r.child("c8-broker")) and c["pid"] not in (None, broker["pid"])
                   and c, what="a new broker pid")
    assert new["restarts"] == 1 and new["last_exit_reason"] == "killed by SIGKILL"
    wait_for(lambda: os.path.exists(f"/proc/{new['pid']}") and cmdline(new["pid"]) == "c8-broker",
             what="the new broker's title")

    # Things the tree made while running, that SIGTERM must remove.
    add_uprobe("c8itest_live")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(r.run_dir, "sensor.sock"))
    sock.close()

    assert r.stop() == 0, r.text()
    for c in children[1:] + [new]:
        assert not os.path.exists(f"/proc/{c['pid']}"), c  # stopped and reaped
    # Only our names: other tests on this machine may use group c8probes meanwhile.
    assert "c8probes/c8itest_live " not in uprobe_lines()
    for d in (CPU_DIR, MEM_DIR, CPUACCT_DIR):
        assert not os.path.exists(d), d
    assert not os.path.exists(os.path.join(r.run_dir, "sensor.sock"))
    assert not os.path.exists(os.path.join(r.run_dir, "supervisor.json"))


def test_oom_killed_child_is_restarted_with_reason(supervisor):
    r = supervisor({**LIMITS, "memory_limit": "64M"},
                   {**SLEEPERS, "broker": "test_supervisor:hog_memory"})
    r.wait_log("c8-broker (pid ", timeout=15)
    r.wait_log("exited: OOM-killed (SIGKILL, memory cgroup limit); restarting in", timeout=30)
    assert read_keyed(f"{MEM_DIR}/memory.oom_control")["oom_kill"] >= 1
    wait_for(lambda: (c := r.child("c8-broker")) and c["restarts"] >= 1, what="a restart")
    assert r.stop() == 0, r.text()
    assert not os.path.exists(MEM_DIR)


def test_cpu_limit_throttles_a_busy_child(supervisor):
    r = supervisor({**LIMITS, "cpu_limit": 5, "log_cgroup_metrics": True,
                    "cgroup_metrics_interval": "500ms"},
                   {**SLEEPERS, "broker": "test_supervisor:burn_cpu"})
    r.wait_running(["c8-broker"])
    quota_ns = 5 * NCPU * 10_000 * 1000  # per 1s period
    p0 = read_keyed(f"{CPU_DIR}/cpu.stat")["nr_periods"]
    u0 = read_int(f"{CPUACCT_DIR}/cpuacct.usage")
    wait_for(lambda: read_keyed(f"{CPU_DIR}/cpu.stat")["nr_periods"] >= p0 + 4, timeout=10,
             what="4 CFS periods")
    u1 = read_int(f"{CPUACCT_DIR}/cpuacct.usage")
    stat = read_keyed(f"{CPU_DIR}/cpu.stat")
    periods = stat["nr_periods"] - p0
    used = u1 - u0
    assert stat["nr_throttled"] > 0
    assert used <= (periods + 1) * quota_ns * 1.1, (used, periods, quota_ns)
    assert used >= (periods - 1) * quota_ns * 0.5, (used, periods, quota_ns)  # it did burn
    r.wait_log("nr_throttled=")
    assert r.stop() == 0, r.text()


def test_limiter_exit_stops_the_sensor_with_status_1(supervisor):
    r = supervisor({}, {**SLEEPERS, "broker": "test_supervisor:limiter_exit"})
    assert r.proc.wait(20) == 1, r.text()
    text = r.text()
    assert "event limiter" in text and "exit status 78" in text
    assert "restarting in" not in text and "not restarting" in text
    assert not os.path.exists(os.path.join(r.run_dir, "supervisor.json"))


def test_bad_config_value_exits_2_naming_the_key(supervisor):
    r = supervisor({"memory_limit": "12X"}, SLEEPERS)
    assert r.proc.wait(20) == 2
    assert (f"ConfigError: memory_limit: '12X' from {r.config_path}: "
            "must be a number followed by M or G, or 0") in r.text()


def test_user_that_cannot_be_created_stops_startup(supervisor):
    r = supervisor({"sensor_user": "c8,bad"}, SLEEPERS)
    assert r.proc.wait(20) == 1
    text = r.text()
    assert "sensor_user 'c8,bad' does not exist and cannot be created" in text
    assert "invalid user name" in text
    assert not os.path.exists(CPU_DIR)


def test_hung_child_is_killed_and_restarted_with_reason_hung(supervisor):
    r = supervisor({"heartbeat_timeout": "2s"},
                   {**SLEEPERS, "broker": "test_supervisor:hangs_after_a_while"})
    first = r.wait_running(["c8-broker"])[0]
    r.wait_log(f"c8-broker (pid {first['pid']}) hung: no heartbeat for 2s (silent ", timeout=20)
    r.wait_log(f"c8-broker (pid {first['pid']}) exited: hung: no heartbeat for 2s, "
               "killed by SIGKILL; restarting in 1s")
    new = wait_for(lambda: (c := r.child("c8-broker")) and c["pid"] not in (None, first["pid"])
                   and c, what="a new broker pid")
    assert new["last_exit_reason"].startswith("hung: no heartbeat")
    assert not os.path.exists(f"/proc/{first['pid']}")
    # the sleepers (collectors) beat all along: never restarted
    assert all(c["restarts"] == 0 for c in r.status()["children"] if c["name"] != "c8-broker")
    assert r.stop() == 0, r.text()


# -- files made safely (c8/protocol/files.py, c8/supervisor/rundir.py) -------------------

def test_symlinked_run_dir_is_refused_at_start(supervisor, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    r = supervisor({}, SLEEPERS)
    assert r.proc.wait(20) == 1
    assert (f"c8-supervisor: cannot start: run_dir {tmp_path}/run is a symlink (to {real}): "
            "refused, set run_dir to the real directory") in r.text()
    assert os.listdir(real) == []


def test_supervisor_json_replaces_a_planted_symlink_and_is_0640_under_umask_0(supervisor, tmp_path,
                                                                             test_user):
    uid, gid = test_user
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    old_umask = os.umask(0)  # inherited by the supervisor
    try:
        r = supervisor({}, SLEEPERS)
    finally:
        os.umask(old_umask)
    first = r.wait_running(["c8-broker"])[0]
    path = os.path.join(r.run_dir, "supervisor.json")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640)
    # sensor_user owns run_dir: it may swap supervisor.json for a symlink to root's file
    os.unlink(path)
    os.symlink(victim, path)
    os.kill(first["pid"], signal.SIGKILL)  # a change: the supervisor writes the file again
    wait_for(lambda: not os.path.islink(path) and (c := r.child("c8-broker"))
             and c["pid"] not in (None, first["pid"]), what="supervisor.json rewritten")
    assert victim.read_text() == "root's file\n"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(r.run_dir)) == ["supervisor.json"]  # no temporary file left
    assert r.stop() == 0, r.text()


def test_log_file_is_0640_never_a_symlink_and_gets_the_logs(tmp_path, test_user):
    log_path = tmp_path / "c8.log"
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    os.symlink(victim, log_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"sensor_user": TEST_USER, "run_dir": str(tmp_path / "run"),
                                   "detections": {"alerts_file": str(tmp_path / "log" / "alerts.json")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE8_")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE])
    env["C8_SUPERVISOR_TEST_ENTRY_POINTS"] = json.dumps(SLEEPERS)
    cmd = [sys.executable, "-m", "c8.supervisor.main", "--config", str(cfg),
           "--log-file", str(log_path)]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20, cwd=REPO)
    assert refused.returncode == 1
    assert f"cannot open --log-file {log_path}" in refused.stderr and "Too many levels" in refused.stderr
    assert victim.read_text() == "keep\n"
    os.unlink(log_path)
    old_umask = os.umask(0)
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    finally:
        os.umask(old_umask)
    try:
        wait_for(lambda: log_path.exists() and "c8-broker started, pid" in log_path.read_text(),
                 what="the log file written")
        assert log_path.stat().st_mode & 0o777 == 0o640
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert "stopped" in log_path.read_text()
