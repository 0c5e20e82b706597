"""Real container runtimes for integration tests, each started in a temp dir.

Session fixtures ``docker``, ``podman``, ``runc`` and ``crun`` start the runtime
themselves (own data root, state dirs and socket; nothing of the host's
configuration is used or changed), provide a busybox image built from the
busybox-static package, and tear everything down. Each exposes the same
helpers:

- ``run(argv, name=None) -> Run``: run a container to its end (runc and crun
  also take ``container_id``: the id is known before the container runs);
- ``start(argv, name=None) -> Run``: run it detached (``exit_code`` None);
- ``pid(container_id) -> int``: host pid of its init;
- ``stop(container_id)``: kill and remove it.

A missing runtime fails the test with the Debian package that
.ci/install-runtimes.sh should have installed: these tests never skip.
The fixtures are defined once for every test module, in conftest.py (one dockerd
per session: a fixture imported into a module is a fixture of that module).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

INSTALL_SCRIPT = ".ci/install-runtimes.sh"
IMAGE = "busybox"
# Debian package providing each executable the harness runs
PACKAGES = {
    "dockerd": "docker.io", "docker": "docker.io", "containerd": "containerd",
    "podman": "podman", "conmon": "conmon", "runc": "runc", "crun": "crun",
    "busybox": "busybox-static",
}


@dataclass(frozen=True)
class Run:
    """A container the harness ran: its id, its name, and its exit code
    (None while it runs, or when the runtime does not keep it)."""

    container_id: str
    name: str
    exit_code: int | None


def require(binary: str, path: str | None = None) -> str:
    """Absolute path of ``binary`` (or ``path`` if it exists); fails naming the package."""
    found = path if path and os.path.exists(path) else shutil.which(binary)
    if not found:
        pytest.fail(f"{binary} not found: {INSTALL_SCRIPT} should have installed the Debian "
                    f"package {PACKAGES.get(binary, binary)}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("container runtime tests need root", pytrace=False)
    return found


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0,
             interval: float = 0.05) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def sh(argv: list[str], *, env: dict | None = None, timeout: float = 60.0,
       check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with no stdin, capturing its output; fail with stderr on error."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}",
                    pytrace=False)
    return proc


def build_rootfs(dest: str) -> str:
    """A busybox root file system at ``dest``: /bin/busybox (static) plus one
    symlink per applet; returns ``dest``."""
    busybox = require("busybox", "/bin/busybox")
    bindir = os.path.join(dest, "bin")
    os.makedirs(bindir, exist_ok=True)
    shutil.copy2(busybox, os.path.join(bindir, "busybox"))
    applets = sh([busybox, "--list"]).stdout.split()
    for applet in applets:
        link = os.path.join(bindir, applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    return dest


def rootfs_tar(rootfs: str, tar_path: str) -> str:
    with tarfile.open(tar_path, "w") as tar:
        tar.add(rootfs, arcname=".")
    return tar_path


def unmount_under(base: str) -> None:
    """Lazily unmount everything mounted below ``base`` (overlays, netns, shm)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(base + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def stop_daemon(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def new_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Docker:
    """A private dockerd: data root, exec root and socket under ``base``."""

    def __init__(self, base: str, tar: str) -> None:
        self.dockerd = require("dockerd")
        # the docker CLI of the same package, not whatever comes first on PATH
        self.cli = require("docker", "/usr/bin/docker")
        require("containerd")
        require("runc")
        self.base = base
        self.data_root = os.path.join(base, "root")
        self.exec_root = os.path.join(base, "exec")
        self.socket = os.path.join(base, "docker.sock")
        self.log = open(os.path.join(base, "dockerd.log"), "wb")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [self.dockerd, "--data-root", self.data_root, "--exec-root", self.exec_root,
             "-H", f"unix://{self.socket}", "--pidfile", os.path.join(base, "docker.pid"),
             "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("dockerd to answer `docker info`", self._ready, timeout=60)
        self.image_id = self.docker("import", tar, IMAGE).stdout.strip()

    def _ready(self) -> bool:
        if self.daemon.poll() is not None:
            pytest.fail(f"dockerd exited {self.daemon.returncode}; see {self.log.name}",
                        pytrace=False)
        return sh([self.cli, "-H", f"unix://{self.socket}", "info"], check=False).returncode == 0

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh([self.cli, "-H", f"unix://{self.socket}", *args], check=check)

    def _run(self, argv: list[str], name: str | None, detach: bool) -> Run:
        name = name or new_name("c8-docker")
        cidfile = os.path.join(self.base, f"{name}.cid")
        proc = self.docker("run", *(["-d"] if detach else []), "--network", "none",
                           "--cidfile", cidfile, "--name", name, IMAGE, *argv, check=False)
        if not os.path.exists(cidfile):
            pytest.fail(f"docker run failed: {proc.stderr.strip()}", pytrace=False)
        with open(cidfile) as f:
            cid = f.read().strip()
        return Run(cid, name, None if detach else proc.returncode)

    def run(self, argv: list[str], name: str | None = None) -> Run:
        return self._run(argv, name, detach=False)

    def start(self, argv: list[str], name: str | None = None) -> Run:
        return self._run(argv, name, detach=True)

    def pid(self, container_id: str) -> int:
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container_id).stdout)

    def stop(self, container_id: str) -> None:
        self.docker("rm", "-f", container_id, check=False)

    def close(self) -> None:
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)
        stop_daemon(self.daemon)
        self.log.close()


PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/tmp"
volume_path = "{base}/volumes"
"""
STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{base}/root"
runroot = "{base}/run"
"""


class Podman:
    """podman with its own containers.conf, storage root and run root."""

    def __init__(self, base: str, tar: str) -> None:
        self.podman = require("podman")
        require("conmon")
        require("runc")
        self.base = base
        self.root = os.path.join(base, "root")
        self.runroot = os.path.join(base, "run")
        for name, text in (("containers.conf", PODMAN_CONF), ("storage.conf", STORAGE_CONF)):
            with open(os.path.join(base, name), "w") as f:
                f.write(text.format(base=base))
        self.env = dict(os.environ, CONTAINERS_CONF=os.path.join(base, "containers.conf"),
                        CONTAINERS_STORAGE_CONF=os.path.join(base, "storage.conf"))
        out = self.cmd("import", tar, IMAGE).stdout.split()
        self.image_id = out[-1].removeprefix("sha256:")

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh([self.podman, "--root", self.root, "--runroot", self.runroot,
                   "--storage-driver", "vfs", *args], env=self.env, check=check)

    def _run(self, argv: list[str], name: str | None, detach: bool) -> Run:
        name = name or new_name("c8-podman")
        cidfile = os.path.join(self.base, f"{name}.cid")
        proc = self.cmd("run", *(["-d"] if detach else []), "--cidfile", cidfile,
                        "--name", name, IMAGE, *argv, check=False)
        if not os.path.exists(cidfile):
            pytest.fail(f"podman run failed: {proc.stderr.strip()}", pytrace=False)
        with open(cidfile) as f:
            cid = f.read().strip()
        return Run(cid, name, None if detach else proc.returncode)

    def run(self, argv: list[str], name: str | None = None) -> Run:
        return self._run(argv, name, detach=False)

    def start(self, argv: list[str], name: str | None = None) -> Run:
        return self._run(argv, name, detach=True)

    def pid(self, container_id: str) -> int:
        return int(self.cmd("inspect", "-f", "{{.State.Pid}}", container_id).stdout)

    def stop(self, container_id: str) -> None:
        self.cmd("rm", "-f", "-t", "0", container_id, check=False)

    def close(self) -> None:
        self.cmd("rm", "-a", "-f", "-t", "0", check=False)


class Runc:
    """runc with its own state root; one bundle per container over a shared
    read-only busybox rootfs. runc has no names: the container id is 64 hex
    (as docker's and containerd's are) and the name travels as the bundle's
    ``nerdctl/name`` annotation, the image as ``org.opencontainers.image.ref.name``."""

    binary = "runc"

    def __init__(self, base: str, rootfs: str) -> None:
        self.exe = require(self.binary)
        self.base = base
        self.root = os.path.join(base, "state")
        self.rootfs = rootfs
        self.spec = json.loads(self._spec())

    def _spec(self) -> str:
        scratch = tempfile.mkdtemp(dir=self.base)
        sh([self.exe, "spec", "--bundle", scratch])
        with open(os.path.join(scratch, "config.json")) as f:
            return f.read()

    def cmd(self, *args: str, check: bool = True, timeout: float = 60.0):
        return sh([self.exe, "--root", self.root, *args], check=check, timeout=timeout)

    def bundle(self, container_id: str, name: str, argv: list[str]) -> str:
        spec = json.loads(json.dumps(self.spec))
        spec["process"].update(terminal=False, args=argv)
        spec["root"] = {"path": self.rootfs, "readonly": True}
        spec["annotations"] = {"nerdctl/name": name, "org.opencontainers.image.ref.name": IMAGE}
        path = os.path.join(self.base, container_id)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(spec, f)
        return path

    def run(self, argv: list[str], name: str | None = None, container_id: str | None = None) -> Run:
        cid, name = container_id or secrets.token_hex(32), name or new_name(f"c8-{self.binary}")
        proc = self.cmd("run", "--bundle", self.bundle(cid, name, argv), cid, check=False)
        return Run(cid, name, proc.returncode)

    def start(self, argv: list[str], name: str | None = None) -> Run:
        cid, name = secrets.token_hex(32), name or new_name(f"c8-{self.binary}")
        # the container inherits runc's stdio: a pipe would stay open for its life
        log = os.path.join(self.base, f"{cid}.log")
        with open(log, "wb") as out:
            rc = subprocess.run([self.exe, "--root", self.root, "run", "-d", "--bundle",
                                 self.bundle(cid, name, argv), cid], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, timeout=60).returncode
        if rc != 0:
            with open(log) as f:
                pytest.fail(f"{self.binary} run -d exited {rc}: {f.read().strip()}",
                            pytrace=False)
        return Run(cid, name, None)

    def state(self, container_id: str) -> dict | None:
        proc = self.cmd("state", container_id, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def pid(self, container_id: str) -> int:
        state = self.state(container_id)
        if not state:
            pytest.fail(f"{self.binary} knows no container {container_id}", pytrace=False)
        return int(state["pid"])

    def stop(self, container_id: str) -> None:
        self.cmd("delete", "-f", container_id, check=False)

    def close(self) -> None:
        listing = self.cmd("list", "-q", check=False).stdout.split()
        for cid in listing:
            self.stop(cid)


class Crun(Runc):
    """crun, driven like runc (same CLI for spec/run/state/delete/list)."""

    binary = "crun"


HUGETLB_V1 = "/sys/fs/cgroup/hugetlb"
UNIFIED = "/sys/fs/cgroup/unified"


def _words(path: str) -> set[str]:
    try:
        with open(path) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _mounted(point: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == point for line in f)


def _remove_empty_cgroups(root: str) -> list[str]:
    """rmdir every cgroup below ``root``, deepest first; returns those still
    holding tasks (they keep the hierarchy alive)."""
    busy = []
    for top, _dirs, _files in sorted(os.walk(root), key=lambda w: -w[0].count("/")):
        if top == root:
            continue
        try:
            os.rmdir(top)
        except OSError:
            busy.append(top)
    return busy


@contextlib.contextmanager
def crun_hybrid_workaround() -> Iterator[bool]:
    """Let crun run on a hybrid cgroup host for the duration of the block, then undo it.

    crun 1.8 refuses a hybrid layout while cgroup2 holds any controller
    ("cgroups in hybrid mode not supported, drop all controllers from
    cgroupv2"); here cgroup2 holds only hugetlb. Mounting hugetlb as its own
    v1 hierarchy at /sys/fs/cgroup/hugetlb (crun looks there) takes it off
    cgroup2. Undoing: every runtime that starts a container meanwhile makes
    cgroups in it (docker's /docker, podman's /libpod_parent stay after their
    containers), and the hierarchy lives until they are gone, so the empty ones
    are removed, then it is unmounted and hugetlb returns to cgroup2. Keep the
    block short. A lock file serialises test sessions running at once. Only
    done when cgroup2 has hugetlb alone and no cgroup enables it
    (subtree_control): then nothing uses it. Yields True when it mounted.
    """
    import fcntl

    with open("/run/c8-crun-hybrid.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        controllers = _words(f"{UNIFIED}/cgroup.controllers")
        if not controllers or _mounted(HUGETLB_V1):
            yield False  # not hybrid, or made permanent (C8_CRUN_HYBRID=1 at install)
            return
        if controllers != {"hugetlb"} or "hugetlb" in _words(f"{UNIFIED}/cgroup.subtree_control"):
            pytest.fail(f"cgroup2 controllers {sorted(controllers)}: crun cannot run on this hybrid "
                        "host without moving controllers in use", pytrace=False)
        made = not os.path.isdir(HUGETLB_V1)
        os.makedirs(HUGETLB_V1, exist_ok=True)
        sh(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_V1])
        try:
            yield True
        finally:
            _undo_hugetlb_v1(made)


def _hugetlb_on_cgroup2() -> bool:
    return "hugetlb" in _words(f"{UNIFIED}/cgroup.controllers")


def _undo_hugetlb_v1(made_dir: bool) -> None:
    """Give hugetlb back to cgroup2. The kernel kills a v1 hierarchy at umount
    only if its root has no child then, and rmdir'ed children leave the list
    asynchronously: so unmount, and while hugetlb is not back, mount the same
    hierarchy again (it still exists) and unmount once more."""
    # containers other sessions started meanwhile made cgroups here: wait for them to end
    deadline = time.monotonic() + 60
    while (busy := _remove_empty_cgroups(HUGETLB_V1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if busy:
        pytest.fail(f"hugetlb stays a v1 hierarchy at {HUGETLB_V1} while these cgroups hold tasks: "
                    f"{busy}; once they are empty, remove them and unmount it", pytrace=False)
    for attempt in range(3):
        if attempt:  # the hierarchy outlived its umount: mount it again to unmount it childless
            sh(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", HUGETLB_V1], check=False)
        sh(["umount", HUGETLB_V1], check=False)
        # killing a hierarchy is asynchronous (RCU, then workqueue): give it time
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _hugetlb_on_cgroup2():
            time.sleep(0.05)
        if _hugetlb_on_cgroup2():
            break
    if made_dir:
        with contextlib.suppress(OSError):
            os.rmdir(HUGETLB_V1)
    if not _hugetlb_on_cgroup2():
        pytest.fail("hugetlb did not return to cgroup2 after unmounting its v1 hierarchy", pytrace=False)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> tuple[str, str]:
    """(rootfs dir, rootfs tar) of busybox-static."""
    base = str(tmp_path_factory.mktemp("busybox"))
    rootfs = build_rootfs(os.path.join(base, "rootfs"))
    return rootfs, rootfs_tar(rootfs, os.path.join(base, "rootfs.tar"))


def _runtime_dir(prefix: str) -> str:
    # short and outside pytest's tmp tree: unix socket paths are limited to 108 bytes
    return tempfile.mkdtemp(prefix=f"c8-{prefix}-", dir="/tmp")


@contextlib.contextmanager
def _started(kind: str, make: Callable[[str], object]) -> Iterator:
    """A runtime made in its own temp dir; closed, unmounted and removed afterwards."""
    base = _runtime_dir(kind)
    runtime = None
    try:
        runtime = make(base)
        yield runtime
    finally:
        try:
            if runtime is not None:
                runtime.close()
        finally:
            unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def docker(busybox_rootfs) -> Iterator[Docker]:
    """A private dockerd with the busybox image imported."""
    with _started("docker", lambda base: Docker(base, busybox_rootfs[1])) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def podman(busybox_rootfs) -> Iterator[Podman]:
    """podman on private storage with the busybox image imported."""
    with _started("podman", lambda base: Podman(base, busybox_rootfs[1])) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def runc(busybox_rootfs) -> Iterator[Runc]:
    """runc with a private state root and busybox bundles."""
    with _started("runc", lambda base: Runc(base, busybox_rootfs[0])) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def crun(busybox_rootfs) -> Iterator[Crun]:
    """crun with a private state root and busybox bundles. On a hybrid cgroup
    host, run its containers inside ``with crun_hybrid_workaround():``."""
    with _started("crun", lambda base: Crun(base, busybox_rootfs[0])) as runtime:
        yield runtime
