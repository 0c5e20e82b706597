"""Detections end to end: a real action -> kernel -> broker -> c8-detector -> webhook + syslog.

One sensor (detections.enabled, the packaged default rules) sends every alert
to a real local HTTP server (webhook output) and a real UDP syslog receiver.
For every default rule a test performs the action for real, waits for the
alert on both receivers and checks its fields; a benign workload done just
before it (the detector handles events in time order) must yield no alert.
A second sensor checks the alert limiter: 5 per 60s on one output, none on another.
"""

from __future__ import annotations

import ctypes
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest

from c8.detections.rules import default_rules_path, load_rules
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

ALERT_TIMEOUT = 30.0


# ---- receivers ---------------------------------------------------------------------------

class Receivers:
    """A local HTTP server (webhook) and a UDP syslog receiver, both recording what arrives."""

    def __init__(self):
        self.posts: list[dict] = []
        self.syslog: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._recv_syslog, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/alerts"

    @property
    def syslog_address(self) -> str:
        return f"127.0.0.1:{self.udp.getsockname()[1]}"

    def _recv_syslog(self):
        while not self._stop.is_set():
            try:
                data = self.udp.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.syslog.append(data.decode(errors="replace"))

    def alerts(self, rule: str) -> list[dict]:
        with self.lock:
            return [p for p in self.posts if p.get("type") == "alert" and p.get("rule") == rule]

    def syslog_alerts(self, rule: str) -> list[dict]:
        """Parsed RFC 5424 alerts of a rule: pri, sd params and msg."""
        out = []
        with self.lock:
            lines = list(self.syslog)
        for line in lines:
            m = re.match(r"<(\d+)>1 \S+ \S+ \S+ \S+ alert \[c8@32473 ((?:[^\]\\]|\\.)*)\] (.*)", line, re.S)
            if not m:
                continue
            sd = {k: v.replace('\\"', '"') for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2))}
            if sd.get("rule") == rule:
                out.append({"pri": int(m.group(1)), "sd": sd, "msg": m.group(3)})
        return out

    def close(self):
        self._stop.set()
        self.http.shutdown()
        self.http.server_close()
        self.udp.close()


def detector_ready(sensor: Sensor, rx: Receivers, workdir: str) -> None:
    """Wait until the detector is subscribed and alerting: a canary exec from a temp dir."""
    wait_for(lambda: sensor.status()["subscriptions"], 30, 0.2, "the detector's subscription")
    canary = os.path.join(workdir, "canary")
    shutil.copy("/bin/true", canary)

    def alerted():
        subprocess.run([canary], check=True)
        return [a for a in rx.alerts("Execution from temporary directory")
                if a["event"]["exec_filename"] == canary]
    wait_for(alerted, 40, 1.0, "a canary alert from the detector")


def sensor_config(rx_outputs: list[dict]) -> dict:
    return {"detections": {"enabled": True, "rules": [default_rules_path()]},
            "alert_output": {"outputs": rx_outputs}}


@pytest.fixture(scope="module")
def bindir():
    """Compiled helpers in a directory no rule watches (not /tmp, not a bin dir)."""
    d = f"/opt/c8-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(d)
    progs = {
        # a "server" that runs a command through /bin/sh, as system(3) does
        "server.c": '#include <stdlib.h>\nint main(int c, char **v) { return system(v[1]); }\n',
        # connects to 127.0.0.1:<port> and exits
        "connect.c": ("#include <arpa/inet.h>\n#include <stdlib.h>\n#include <sys/socket.h>\n"
                      "#include <unistd.h>\nint main(int c, char **v) {\n"
                      "  int s = socket(AF_INET, SOCK_STREAM, 0);\n"
                      "  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v[1]))};\n"
                      "  a.sin_addr.s_addr = htonl(0x7f000001);\n"
                      "  return connect(s, (struct sockaddr *)&a, sizeof a) != 0; }\n"),
    }
    for src, text in progs.items():
        path = os.path.join(d, src)
        with open(path, "w") as f:
            f.write(text)
        subprocess.run(["gcc", "-O1", "-o", path[:-2], path], check=True)
    # the same programs under telling names
    for name, prog in (("nginx", "server"), ("worker", "server"), ("cat", "connect"),
                       ("curl", "connect")):
        shutil.copy(os.path.join(d, prog), os.path.join(d, name))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def det_sensor(tmp_path_factory, rx, workdir):
    s = Sensor(tmp_path_factory.mktemp("det"), **sensor_config([
        {"type": "webhook", "url": rx.url, "insecure": True},  # plain http to the local receiver
        {"type": "syslog", "address": rx.syslog_address, "protocol": "udp"}])).start()
    try:
        detector_ready(s, rx, workdir)
        yield s
    finally:
        s.stop()


# ---- checking alerts ---------------------------------------------------------------------------

ATTEMPTS = 3        # the sensor is lossy by design: on a busy host an attempt's events may be dropped
ATTEMPT_TIMEOUT = 20.0


def await_alert(rx: Receivers, rule: str, match, what: str, timeout: float = ALERT_TIMEOUT):
    """The webhook alert of ``rule`` with match(alert) and its syslog twin (same message)."""
    def found():
        hits = [a for a in rx.alerts(rule) if match(a)]
        if not hits:
            return None
        twins = [s for s in rx.syslog_alerts(rule)
                 if s["msg"] == hits[0]["output"] and s["sd"].get("pid") == str(hits[0]["process"]["pid"])]
        return (hits[0], twins[0]) if twins else None
    return wait_for(found, timeout, 0.1, f"alert {rule!r} for {what}")


def trigger(rx: Receivers, rule: str, act, what: str):
    """Run act() (a benign workload, then the action; returns (match, context)) until
    the alert it causes arrives; returns (alert, syslog twin, context)."""
    for attempt in range(ATTEMPTS):
        match, ctx = act()
        try:
            alert, syslog = await_alert(rx, rule, match, what, ATTEMPT_TIMEOUT)
            return alert, syslog, ctx
        except AssertionError:
            if attempt == ATTEMPTS - 1:
                raise


def check_common(alert: dict, syslog: dict, rule: str, priority: str, pid: int, exe: str | None):
    assert alert["rule"] == rule and alert["priority"] == priority
    assert alert["process"]["pid"] == pid == alert["event"]["process_pid"]
    if exe is not None:
        assert alert["process"]["exec_filename"] == exe
        assert syslog["sd"]["exe"] == exe
    assert alert["time"].endswith("Z") and alert["time_nanos"] > 0
    assert alert["process"]["process_id"] == alert["event"]["process_id"] != ""
    sev = {"critical": 2, "error": 3, "warning": 4, "notice": 5}[priority]
    assert syslog["pri"] == 3 * 8 + sev  # facility daemon
    assert syslog["sd"]["priority"] == priority
    assert syslog["sd"]["process_id"] == alert["process"]["process_id"]
    assert syslog["msg"] == alert["output"]


def no_alert(rx: Receivers, rule: str, pids: set[int]) -> None:
    bad = [a for a in rx.alerts(rule) if a["process"]["pid"] in pids or a["event"].get("parent_pid") in pids]
    assert not bad, f"benign workload alerted {rule!r}: {bad}"


def host_container(alert: dict) -> None:
    assert alert["container"] == {"container_id": "", "container_name": "", "image_id": "", "image_name": ""}


def run(argv, **kw) -> int:
    """Run a program to its end; its pid."""
    p = subprocess.Popen(argv, **kw)
    assert p.wait() == 0, argv
    return p.pid


# ---- one test per default rule -------------------------------------------------------------------

def test_read_sensitive_file(det_sensor, rx):
    rule, benign = "Read sensitive file", set()

    def act():
        benign.add(run(["/bin/cat", "/etc/hostname"], stdout=subprocess.DEVNULL))
        pid = run(["/bin/cat", "/etc/shadow"], stdout=subprocess.DEVNULL)
        return (lambda a: a["process"]["pid"] == pid), pid
    alert, syslog, pid = trigger(rx, rule, act, "cat /etc/shadow")
    check_common(alert, syslog, rule, "warning", pid, "/bin/cat")
    assert alert["event"]["filename"] == "/etc/shadow" and alert["event"]["kind"] == "OPEN"
    assert alert["event"]["path"] == "/etc/shadow"  # the rules match path (test_detections_attacks.py)
    assert alert["event"]["ret"] >= 0 and alert["event"]["open_flags"] & 3 == 0
    assert "/etc/shadow" in alert["output"]
    host_container(alert)
    no_alert(rx, rule, benign)


def test_write_below_system_directory(det_sensor, rx, workdir):
    rule, benign = "Write below system directory", set()
    for target in ("/etc", "/usr/local/bin"):
        def act(target=target):
            tag = uuid.uuid4().hex[:12]
            benign.add(run(["/usr/bin/touch", os.path.join(workdir, f"c8-test-{tag}")]))
            path = f"{target}/c8-test-{tag}"
            touch = run(["/usr/bin/touch", path])
            rm = run(["/bin/rm", "-f", path])

            def match(a):
                return a["process"]["pid"] == touch and a["event"]["filename"] == path
            return match, (path, touch, rm)
        alert, syslog, (path, touch, rm) = trigger(rx, rule, act, f"touch below {target}")
        check_common(alert, syslog, rule, "error", touch, "/usr/bin/touch")
        assert alert["event"]["kind"] in ("OPEN", "CREATE")
        assert path in alert["output"]
        host_container(alert)
        alert, syslog = await_alert(rx, rule, lambda a, rm=rm, path=path: a["process"]["pid"] == rm
                                    and a["event"]["filename"] == path, f"rm {path}")
        check_common(alert, syslog, rule, "error", rm, "/bin/rm")
        assert alert["event"]["kind"] == "DELETE"
    no_alert(rx, rule, benign)


def test_shell_spawned_by_server(det_sensor, rx, bindir):
    rule, benign = "Shell spawned by server", set()
    nginx = os.path.join(bindir, "nginx")

    def act():
        # system(3) spawns sh with posix_spawn (CLONE_VFORK); a few servers per attempt
        benign.add(run([os.path.join(bindir, "worker"), "true"]))
        servers = {run([nginx, "true"]) for _ in range(4)}
        return (lambda a: a["event"]["parent_pid"] in servers), servers
    alert, syslog, servers = trigger(rx, rule, act, "nginx -> sh")
    assert alert["event"]["parent_pid"] in servers
    check_common(alert, syslog, rule, "critical", alert["event"]["process_pid"], "/bin/sh")
    assert alert["event"]["parent_exec_filename"] == nginx
    # argv lives in user memory eBPF cannot always read after a vfork; the name comes
    # from the kernel (sched_process_exec), and an unknown command line stays empty
    assert alert["event"]["exec_command_line"] in ("sh -c true", "")
    assert nginx in alert["output"]
    no_alert(rx, rule, benign)


def test_execution_from_temporary_directory(det_sensor, rx, workdir):
    rule, benign = "Execution from temporary directory", set()
    shm_dir = tempfile.mkdtemp(prefix="c8-det-", dir="/dev/shm")
    try:
        for prog in (os.path.join(workdir, "from-tmp"), os.path.join(shm_dir, "from-shm")):
            shutil.copy("/bin/true", prog)

            def act(prog=prog):
                benign.add(run(["/bin/true"]))
                pid = run([prog, "arg1"])
                return (lambda a: a["process"]["pid"] == pid), pid
            alert, syslog, pid = trigger(rx, rule, act, prog)
            check_common(alert, syslog, rule, "warning", pid, prog)
            assert alert["event"]["exec_filename"] == prog
            assert alert["event"]["exec_command_line"] == f"{prog} arg1"
            host_container(alert)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    no_alert(rx, rule, benign)


MEMFD_EXEC = """
import os
fd = os.memfd_create("c8-payload", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
os.execve(f"/proc/self/fd/{fd}", ["c8-payload"], {})
"""


def test_fileless_execution(det_sensor, rx):
    rule, benign = "Fileless execution", set()

    def act():
        benign.add(run([sys.executable, "-c", "import os; os.execv('/bin/true', ['true'])"]))
        pid = run([sys.executable, "-c", MEMFD_EXEC])
        return (lambda a: a["process"]["pid"] == pid), pid
    alert, syslog, pid = trigger(rx, rule, act, "memfd exec")
    fn = alert["event"]["exec_filename"]
    assert re.fullmatch(r"/proc/self/fd/\d+", fn), fn
    check_common(alert, syslog, rule, "critical", pid, fn)
    assert alert["event"]["exec_command_line"] == "c8-payload"
    no_alert(rx, rule, benign)


PTRACE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
req, pid = int(sys.argv[1]), int(sys.argv[2])
if libc.ptrace(req, pid, None, None) != 0:
    sys.exit(0 if req != 16 else "ptrace: " + os.strerror(ctypes.get_errno()))
if req == 16:
    os.waitpid(pid, 0x40000000)  # __WALL: the tracee stops
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
"""


def test_ptrace_attach(det_sensor, rx):
    rule, benign = "Ptrace attach", set()
    target = subprocess.Popen(["/bin/sleep", "120"])
    try:
        def act():
            # PTRACE_PEEKUSER of an untraced process fails: a ptrace call that is no attach
            benign.add(run([sys.executable, "-c", PTRACE, "3", str(target.pid)]))
            tracer = run([sys.executable, "-c", PTRACE, "16", str(target.pid)])
            return (lambda a: a["process"]["pid"] == tracer), tracer
        alert, syslog, tracer = trigger(rx, rule, act, "PTRACE_ATTACH")
    finally:
        target.kill()
        target.wait()
    check_common(alert, syslog, rule, "warning", tracer, sys.executable)
    assert alert["event"]["kind"] == "ENTER" and alert["event"]["arg0"] == 16
    assert alert["event"]["id"] == 101  # the syscall number (the event's own id is event_id)
    assert alert["event"]["arg1"] == target.pid
    no_alert(rx, rule, benign)


LISTEN = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
if sys.argv[1] == "listen":
    s.listen(7)
"""


def test_new_listening_socket(det_sensor, rx):
    rule, benign = "New listening socket", set()

    def act():
        benign.add(run([sys.executable, "-c", LISTEN, "bind"]))
        pid = run([sys.executable, "-c", LISTEN, "listen"])
        return (lambda a: a["process"]["pid"] == pid), pid
    alert, syslog, pid = trigger(rx, rule, act, "listen()")
    check_common(alert, syslog, rule, "notice", pid, sys.executable)
    assert alert["event"]["kind"] == "LISTEN_RESULT" and alert["event"]["ret"] == 0
    no_alert(rx, rule, benign)


def test_shell_or_package_manager_in_container(det_sensor, rx, docker):  # noqa: F811
    rule, benign, benign_ids = "Shell or package manager in container", set(), set()
    for argv in (["/bin/sh", "-c", "exit 0"], ["/bin/dpkg", "--help"]):
        def act(argv=argv):
            benign.add(run(["/bin/sh", "-c", "exit 0"]))  # a shell on the host is no container shell
            benign_ids.add(docker.run(["/bin/true"]).container_id)
            c = docker.run(argv)
            return (lambda a: a["container"]["container_id"] == c.container_id), c
        alert, syslog, c = trigger(rx, rule, act, argv[0])
        check_common(alert, syslog, rule, "warning", alert["event"]["process_pid"], argv[0])
        assert alert["event"]["exec_filename"] == argv[0]
        # the id comes from the cgroup at once; name and image from docker's metadata,
        # which the broker's container table may not have read yet for a brand-new container
        meta = alert["container"]
        if meta["container_name"]:
            assert meta["container_name"] == c.name and c.name in alert["output"]
            assert meta["image_name"].split(":")[0] == "busybox"
            assert meta["image_id"] == docker.image_id
        assert syslog["sd"]["container_id"] == c.container_id
    assert not [a for a in rx.alerts(rule) if a["container"]["container_id"] in benign_ids]
    no_alert(rx, rule, benign)


def test_unexpected_outbound_connection(det_sensor, rx, bindir):
    rule, benign = "Unexpected outbound connection", set()
    cat = os.path.join(bindir, "cat")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    try:
        def act():
            benign.add(run([os.path.join(bindir, "curl"), str(port)]))
            pid = run([cat, str(port)])
            return (lambda a: a["process"]["pid"] == pid), pid
        alert, syslog, pid = trigger(rx, rule, act, "cat connecting")
    finally:
        listener.close()
    check_common(alert, syslog, rule, "error", pid, cat)
    assert alert["event"]["kind"] == "CONNECT_ATTEMPT"
    assert alert["event"]["address"] == "127.0.0.1" and alert["event"]["port"] == port
    assert f"127.0.0.1:{port}" in alert["output"]
    no_alert(rx, rule, benign)


# ---- the alert limiter -------------------------------------------------------------------------------

def subscribed_and_collecting(sensor: Sensor) -> bool:
    """The detector's subscription is live and every collector runs its plan."""
    st = sensor.status()
    gen = st["plan"]["generation"]
    return bool(st["subscriptions"]) and st["plan"]["enabled"] and all(
        c.get("generation", -1) >= gen for c in st["collectors"].values())


def test_alert_limiter_5_per_60s(tmp_path):
    limited, full = Receivers(), Receivers()
    rule = "Read sensitive file"
    config = sensor_config([
        {"type": "webhook", "url": limited.url, "insecure": True, "limit_per_period": 5,
         "limit_period": "60s"},
        {"type": "webhook", "url": full.url, "insecure": True},
        {"type": "syslog", "address": limited.syslog_address, "protocol": "udp",
         "limit_per_period": 5, "limit_period": "60s"}])
    # Only the rule under test: any other alert on the host would use the limited slots.
    others = [r.name for r in load_rules([default_rules_path()])[0] if r.name != rule]
    only = tmp_path / "only-one-rule.yaml"
    only.write_text("".join(f"- rule: {json.dumps(n)}\n  enabled: false\n" for n in others))
    config["detections"]["rules"].append(str(only))
    s = Sensor(tmp_path, **config).start()
    try:
        wait_for(lambda: subscribed_and_collecting(s), 30, 0.2, "the detector's subscription")
        pids = set()
        for _ in range(20):
            p = subprocess.Popen(["/bin/cat", "/etc/shadow"], stdout=subprocess.DEVNULL)
            p.wait()
            pids.add(p.pid)

        def mine(r):
            return [a for a in r.alerts(rule) if a["process"]["pid"] in pids]
        wait_for(lambda: len(mine(full)) == 20, ALERT_TIMEOUT, 0.1, "20 alerts on the unlimited output")
        wait_for(lambda: len(mine(limited)) == 5, ALERT_TIMEOUT, 0.1, "5 alerts on the limited webhook")
        wait_for(lambda: len(limited.syslog_alerts(rule)) == 5, ALERT_TIMEOUT, 0.1, "5 on the limited syslog")
    finally:
        s.stop()  # closing the limiters emits the period's summary at once
    try:
        assert len(mine(limited)) == 5 and len(limited.syslog_alerts(rule)) == 5
        assert len([p for p in limited.posts if p.get("type") == "alert"]) == 5
        notices = [p["message"] for p in limited.posts if p.get("type") == "notice"]
        # the summary names the rules it suppressed, with counts
        assert notices == ['15 alerts suppressed by webhook in the last 60s: "Read sensitive file" 15']
        sys_notices = [m for m in limited.syslog if " notice " in m]
        assert len(sys_notices) == 1 and sys_notices[0].endswith(
            '15 alerts suppressed by syslog in the last 60s: "Read sensitive file" 15')
        assert not [p for p in full.posts if p.get("type") == "notice"]
        assert '15 alerts suppressed by webhook in the last 60s: "Read sensitive file" 15' in s.output()
    finally:
        limited.close()
        full.close()


def test_ctypes_available():
    # the ptrace helper relies on libc through ctypes
    assert ctypes.CDLL(None).ptrace
