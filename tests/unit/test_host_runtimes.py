"""Runtime metadata readers against hostile state: FIFOs, symlinks, oversize
files, wrong JSON types, a stalling docker API; roots bounded and trusted only
from root's own processes. Real files and sockets under tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from c8.broker.runtimes import MAX_ROOTS, Metadata, Roots
from c8.broker.runtimes.discovery import discover
from c8.broker.runtimes.docker import read_docker, read_docker_api
from c8.broker.runtimes.oci import (
    STATE_LIMIT,
    from_runtime_argv,
    read_containerd,
    read_crun,
    read_runc,
)
from c8.broker.runtimes.storage import read_storage
from c8.host import proc as hostproc
from c8.host import unixhttp

pytestmark = pytest.mark.timeout(30)

C = "ed836b6809d5b0e47b262eee2b0d4aa9b3c1c6d362c49f415fa508cc5ebd49b6"


def write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize("state", [
    {"config": {"labels": [1]}},
    {"config": {"labels": "nerdctl/name=x"}},
    {"config": {"labels": {"a": "b"}}},
    {"config": ["labels"]},
    {"config": None},
    {"config": {"labels": [None, ["a=b"], {"c": "d"}, 3.5]}},
])
def test_runc_wrong_types_give_unknown_not_typeerror(tmp_path, state):
    write(f"{tmp_path}/{C}/state.json", state)
    assert read_runc([str(tmp_path)], C) == Metadata("runc", C, "", "")


def test_runc_labels_of_the_right_type_still_read(tmp_path):
    write(f"{tmp_path}/{C}/state.json", {"config": {"labels": [7, "nerdctl/name=web"]}})
    assert read_runc([str(tmp_path)], C).name == "web"


def test_runc_state_fifo_symlink_oversize(tmp_path):
    os.makedirs(f"{tmp_path}/fifo/{C}")
    os.mkfifo(f"{tmp_path}/fifo/{C}/state.json")
    os.makedirs(f"{tmp_path}/zero/{C}")
    os.symlink("/dev/zero", f"{tmp_path}/zero/{C}/state.json")
    os.makedirs(f"{tmp_path}/dir")
    os.symlink(f"{tmp_path}/fifo/{C}", f"{tmp_path}/dir/{C}")  # the id dir itself a symlink
    write(f"{tmp_path}/big/{C}/state.json", '{"pad": "' + "x" * STATE_LIMIT + '"}')
    start = time.monotonic()
    for root in ("fifo", "zero", "dir", "big"):
        assert read_runc([f"{tmp_path}/{root}"], C) is None, root
    assert time.monotonic() - start < 5


def test_crun_and_containerd_and_docker_wrong_types(tmp_path):
    write(f"{tmp_path}/crun/{C}/status", {"bundle": ["not", "a", "path"]})
    assert read_crun([f"{tmp_path}/crun"], C) == Metadata("crun", C, "", "")
    write(f"{tmp_path}/ctrd/io.containerd.runtime.v2.task/k8s.io/{C}/config.json", {"annotations": [1]})
    assert read_containerd([f"{tmp_path}/ctrd"], C) == Metadata("containerd", C, "", "")
    write(f"{tmp_path}/docker/containers/{C}/config.v2.json", {"Name": ["x"], "Image": 5, "Config": []})
    assert read_docker([f"{tmp_path}/docker"], C) == Metadata("docker", "", "", "")


def test_storage_wrong_types(tmp_path):
    write(f"{tmp_path}/vfs-containers/containers.json",
          [1, "x", {"id": C, "names": "notalist", "image": 3, "metadata": '{"name": 4}'}])
    write(f"{tmp_path}/vfs-containers/{C}/userdata/config.json", {"annotations": "nope"})
    assert read_storage([str(tmp_path)], C) == Metadata("podman", "", "", "")
    write(f"{tmp_path}/vfs-containers/containers.json", {"id": C})  # a map, not a list
    assert read_storage([str(tmp_path)], C) is None


def test_bundle_read_only_when_owned_by_the_named_uid(tmp_path):
    write(f"{tmp_path}/b/config.json", {"annotations": {"nerdctl/name": "mine"}})
    argv = ["runc", "run", "--bundle", f"{tmp_path}/b", C]
    assert from_runtime_argv(argv, C).name == "mine"
    assert from_runtime_argv(argv, C, owner=os.getuid()).name == "mine"
    assert from_runtime_argv(argv, C, owner=os.getuid() + 1).name == C  # not theirs: not read
    assert from_runtime_argv(["runc", "run", "--bundle", "relative", C], C).name == C
    os.mkfifo(f"{tmp_path}/fifo.json")
    os.makedirs(f"{tmp_path}/f")
    os.symlink(f"{tmp_path}/fifo.json", f"{tmp_path}/f/config.json")
    assert from_runtime_argv(["runc", "run", "-b", f"{tmp_path}/f", C], C).name == C


def test_roots_are_bounded():
    roots = Roots(runc=[])
    added = [roots.add("runc", f"/r/{i}") for i in range(MAX_ROOTS + 5)]
    assert added.count(True) == MAX_ROOTS and roots.refused == 5
    assert not roots.add("docker", "relative/path") and roots.refused == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="starts a process as another user")
def test_roots_trusted_only_from_roots_own_runtime(tmp_path):
    """A process named runc advertising --root counts only when it runs as
    root from a root-owned executable: a user's, or root running a
    user-owned copy, is ignored."""
    sh = os.path.realpath(shutil.which("sh"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.chmod(tmp_path, 0o755)
    user_copy = bindir / "runc"
    shutil.copy(sh, user_copy)
    os.chown(user_copy, 65534, 65534)
    wait = ["-c", "sleep 60; :"]  # sh stays (no exec of the last command), its argv as given
    # the user's names itself runc (its comm, as prctl would): counted, its cmdline never read
    named = ["-c", "printf runc > /proc/self/comm; sleep 60; :"]
    procs = {
        "root": subprocess.Popen(["runc", *wait, "--root", "/trusted"], executable=sh),
        "user": subprocess.Popen(["runc", *named, "--root", "/by-nobody"], executable=sh,
                                 user=65534, group=65534),
        "root-runs-users-exe": subprocess.Popen([str(user_copy), *wait, "--root", "/users-exe"]),
    }
    try:
        for p in procs.values():  # exec done: the command line is the new one
            deadline = time.monotonic() + 5
            while hostproc.argv(p.pid)[:1] not in (["runc"], [str(user_copy)]):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert hostproc.advertiser(procs["root"].pid).trusted
        deadline = time.monotonic() + 5
        while (hostproc.stat(procs["user"].pid) or (0, 0, ""))[2] != "runc":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert hostproc.advertiser(procs["user"].pid) == (["runc", *named, "--root", "/by-nobody"], 65534, False)
        assert not hostproc.advertiser(procs["root-runs-users-exe"].pid).trusted
        roots = Roots(runc=[])
        ignored = discover(roots)
        assert "/trusted" in roots.runc
        assert "/by-nobody" not in roots.runc and "/users-exe" not in roots.runc
        assert ignored >= 2
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_advertiser_of_a_gone_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert hostproc.advertiser(p.pid) == ([], None, False)


# -- docker API on a unix socket: total deadline, body cap -------------------------------

class Server:
    """A unix-socket server answering each connection with ``handler(conn)``."""

    def __init__(self, path, handler):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.handler = handler
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.recv(4096)
            try:
                self.handler(conn, self.stop)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def answer(body: bytes, status=b"200 OK"):
    def handler(conn, stop):
        conn.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Type: application/json\r\n\r\n" + body)
    return handler


def never(conn, stop):
    stop.wait(10)


def trickle(conn, stop):
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    while not stop.wait(0.05):
        conn.sendall(b" ")


def flood(conn, stop):
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b" " * 65536)


@pytest.mark.parametrize("handler,expected", [
    (answer(json.dumps({"Name": "/web", "Image": "sha256:1", "Config": {"Image": "busybox"}}).encode()),
     Metadata("docker", "web", "sha256:1", "busybox")),
    (answer(b'{"Name": ["x"], "Config": "y"}'), Metadata("docker", "", "", "")),
    (answer(b"{}", b"404 Not Found"), None),
    (answer(b"{bad"), None),
    (never, None),
    (trickle, None),
    (flood, None),
])
def test_docker_api_bounded(tmp_path, handler, expected):
    path = str(tmp_path / "docker.sock")
    server = Server(path, handler)
    try:
        start = time.monotonic()
        assert read_docker_api([path], C) == expected
        assert time.monotonic() - start < unixhttp.DEADLINE + 1.0
    finally:
        server.close()


def test_docker_api_socket_path_not_a_socket(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert read_docker_api([str(tmp_path / "fifo"), str(tmp_path / "missing")], C) is None
