"""Container identity from cgroup paths and runtime metadata, on fake trees.

/proc and the runtimes' state dirs are written under tmp_path in the
layouts measured on a real host (see docs/containers.md), so no runtime or
root is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from c8.broker.containers import ContainerTable, container_of_pid, parse_cgroup_path
from c8.broker.runtimes import Roots
from c8.broker.runtimes.discovery import discover, roots_from_cmdline
from c8.broker.runtimes.worker import Worker
from c8.host.proc import Advertiser, argv


def root_everywhere(pid, proc):
    """Every fake process is root's own (a fake /proc has no exe to fstat)."""
    return Advertiser(argv(pid, proc), 0, True)


def inline(**kw):
    """Lookups run in the caller (deterministic on fake trees); the threaded
    worker is tested in test_host_worker.py."""
    return {"worker": Worker(threaded=False), "advertiser": root_everywhere, **kw}

A = "38ea07063801541315a094adff22fe5edb0d313ece92adb1fba6a29da9c6fb67"
B = "76f0fd57d8af5b70d6dc4fe86f1a4b0ac419b6ad5da9be45ce1c717f7750da8a"
C = "ed836b6809d5b0e47b262eee2b0d4aa9b3c1c6d362c49f415fa508cc5ebd49b6"
D = "f4bb97078648f006f904aa6c260e5d1d9e464d273cacef19c08ad20201e31e85"
POD = "pod0d2c6f6a-1b2c-4d5e-8f90-123456789abc"


@pytest.mark.parametrize("path,expected", [
    (f"/docker/{A}", ("docker", A)),
    (f"4:memory:/docker/{A}", ("docker", A)),
    (f"0::/system.slice/docker-{A}.scope", ("docker", A)),
    (f"/libpod_parent/libpod-{B}", ("podman", B)),
    (f"/machine.slice/libpod-{B}.scope", ("podman", B)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{B}.scope", ("podman", B)),
    (f"/k8s.io/{C}", ("containerd", C)),
    (f"/default/{C}", ("containerd", C)),
    (f"/{C}", ("runc", C)),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/cri-containerd-{C}.scope",
     ("containerd", C)),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-{C}.scope",
     ("cri-o", C)),
    (f"/kubepods.slice/kubepods-{POD}.slice/docker-{A}.scope", ("docker", A)),
    (f"/kubepods/burstable/{POD}/{C}", ("kubernetes", C)),
    (f"/kubepods/{POD}/{C}", ("kubernetes", C)),
    (f"/kubepods/burstable/{POD}/crio-{C}", ("cri-o", C)),
    (f"/docker/{A}/docker/{D}", ("docker", D)),  # docker in docker: the inner one
    (f"/docker/{A}/init", ("docker", A)),  # a sub-cgroup of the container
    (f"/a/b/{C}", ("unknown", C)),
    (f"/system.slice/garden-{C}.scope", ("unknown", C)),
])
def test_parse_cgroup_path_finds_containers(path, expected):
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize("path", [
    "/", "", "0::/", "9:name=systemd:/", "/user.slice", "/user.slice/user-0.slice/session-1.scope",
    "/system.slice/docker.service", "/docker", "/libpod_parent/conmon",
    "/process_api/a39dac194058201e79481e704cff535a",  # 32 hex: not a container id
    f"/libpod_parent/libpod-conmon-{B}",  # podman's monitor, beside the container
    f"/kubepods.slice/kubepods-{POD}.slice/crio-conmon-{C}.scope",
    f"/kubepods/burstable/{POD}",
    f"/docker/{A.upper()}",  # ids are lower-case hex
    f"/docker/{A}0",  # 65 hex digits
    f"/docker/x{A}",
])
def test_parse_cgroup_path_rejects_the_rest(path):
    assert parse_cgroup_path(path) is None


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(text))


def fake_pid(proc, pid, cgroup_path, ppid=1, comm="sh", hybrid=True):
    """/proc/<pid>/{cgroup,stat,cmdline} in this machine's hybrid layout."""
    lines = [f"9:name=systemd:{cgroup_path}", f"4:memory:{cgroup_path}"] if hybrid else []
    lines.append(f"0::{cgroup_path}")
    write(f"{proc}/{pid}/cgroup", "\n".join(lines) + "\n")
    write(f"{proc}/{pid}/stat", f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n")
    write(f"{proc}/{pid}/cmdline", f"{comm}\0")


def test_container_of_pid(tmp_path):
    proc = str(tmp_path)
    fake_pid(proc, 10, f"/docker/{A}")
    fake_pid(proc, 11, "/user.slice")
    write(f"{proc}/12/cgroup", f"4:memory:/process_api/abc\n0::/libpod_parent/libpod-{B}\n")
    assert container_of_pid(10, proc) == ("docker", A)
    assert container_of_pid(11, proc) is None
    assert container_of_pid(12, proc) == ("podman", B)  # any hierarchy line
    assert container_of_pid(99, proc) is None  # gone


@pytest.fixture
def host(tmp_path):
    """A fake host: /proc plus docker, podman, runc and containerd state."""
    proc, root = str(tmp_path / "proc"), str(tmp_path)
    docker_root, storage, runc_root, crun_root, ctrd = (
        f"{root}/docker", f"{root}/storage", f"{root}/runc", f"{root}/crun", f"{root}/containerd")
    write(f"{docker_root}/containers/{A}/config.v2.json",
          {"Name": "/web", "Image": "sha256:" + "1" * 64, "Config": {"Image": "busybox"},
           "State": {"Running": True, "Pid": 100}})
    write(f"{storage}/vfs-containers/containers.json", [{
        "id": B, "names": ["pod1"], "image": "2" * 64,
        "metadata": json.dumps({"image-name": "localhost/busybox:latest", "name": "pod1"})}])
    write(f"{storage}/vfs-containers/{B}/userdata/config.json",
          {"annotations": {"io.container.manager": "libpod"}})
    write(f"{runc_root}/{C}/state.json",
          {"id": C, "config": {"labels": ["nerdctl/name=plain", "org.opencontainers.image.ref.name=busybox",
                                          "bundle=/nowhere"]}})
    write(f"{ctrd}/io.containerd.runtime.v2.task/k8s.io/{D}/config.json",
          {"annotations": {"io.kubernetes.cri.container-name": "app",
                           "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.25"}})
    roots = Roots(docker=[docker_root], docker_sockets=[], storage=[storage], runc=[runc_root],
                  crun=[crun_root], containerd=[ctrd])
    fake_pid(proc, 1, "/", ppid=0, comm="init")
    fake_pid(proc, 50, "/system.slice/containerd.service", comm="containerd-shim")
    fake_pid(proc, 100, f"/docker/{A}", ppid=50)
    fake_pid(proc, 101, f"/docker/{A}", ppid=100)
    fake_pid(proc, 200, f"/libpod_parent/libpod-{B}", ppid=50)
    fake_pid(proc, 300, f"/{C}", ppid=1)
    fake_pid(proc, 400, f"/kubepods/besteffort/{POD}/{D}", ppid=50)
    return proc, roots


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def table_for(host, **kw):
    proc, roots = host
    return ContainerTable(proc, roots, discover_roots=False, **inline(**kw))


def test_enrichment_per_runtime(host):
    t = table_for(host)
    docker, podman, runc, k8s = (t.lookup_pid(p) for p in (100, 200, 300, 400))
    assert len({docker, podman, runc, k8s}) == 4 and 0 not in (docker, podman, runc, k8s)
    assert t.row(docker)[:5] == (A, "web", "sha256:" + "1" * 64, "busybox", "docker")
    assert t.row(podman)[:5] == (B, "pod1", "2" * 64, "localhost/busybox:latest", "podman")
    assert t.row(runc)[:5] == (C, "plain", "", "busybox", "runc")
    # the kubepods path names no runtime: the metadata found says containerd
    assert t.row(k8s)[:5] == (D, "app", "", "docker.io/library/nginx:1.25", "containerd")
    # Kubernetes: the container name from its CRI annotation, the pod uid from the kubepods path
    assert t.row(k8s)[5:] == ("", "", POD[3:], "app", {})
    assert all(t.row(i)[5:] == ("", "", "", "", {}) for i in (docker, podman, runc))
    assert t.lookup_pid(101) == docker and t.lookup_pid(1) == 0
    assert t.row(0) == ("", "", "", "", "", "", "", "", "", {})


def test_lookup_pids_vectorised(host):
    t = table_for(host)
    pids = np.array([100, 1, 200, 100, 999, 101], dtype=np.int32)
    out = t.lookup_pids(pids)
    assert out.dtype == np.uint32
    assert out.tolist() == [t.lookup_pid(100), 0, t.lookup_pid(200), t.lookup_pid(100), 0,
                            t.lookup_pid(100)]
    assert t.table(out) == {0: t.row(0), int(out[0]): t.row(int(out[0])),
                            int(out[2]): t.row(int(out[2]))}


def test_pid_cache_and_forget(host):
    proc, _ = host
    t = table_for(host)
    index = t.lookup_pid(100)
    fake_pid(proc, 100, "/user.slice")  # pid reused on the host
    assert t.lookup_pid(100) == index  # still cached
    t.forget_pid(100)
    assert t.lookup_pid(100) == 0


def test_unknown_runtime_keeps_what_is_known(host):
    t = table_for(host)
    e = "e" * 64
    index = t.index_of("kubernetes", e)
    assert t.row(index)[:5] == (e, "", "", "", "kubernetes")


def test_refresh_retries_missing_metadata(host, tmp_path):
    proc, roots = host
    clock = Clock()
    t = table_for(host, clock=clock, enrich_for=60)
    e = "e" * 64
    fake_pid(proc, 500, f"/docker/{e}")
    index = t.lookup_pid(500)
    assert t.row(index)[1] == ""  # docker has not written its config yet
    assert t.refresh() == []
    write(f"{roots.docker[0]}/containers/{e}/config.v2.json",
          {"Name": "/late", "Image": "sha256:" + "3" * 64, "Config": {"Image": "alpine"}})
    assert t.refresh() == [index]
    assert t.row(index)[1:4] == ("late", "sha256:" + "3" * 64, "alpine")
    assert t.refresh() == []  # done, not retried


def test_refresh_gives_up_after_enrich_for(host):
    clock = Clock()
    t = table_for(host, clock=clock, enrich_for=60)
    index = t.index_of("docker", "e" * 64)
    clock.now += 61
    _, roots = host
    write(f"{roots.docker[0]}/containers/{'e' * 64}/config.v2.json", {"Name": "/x"})
    assert t.refresh() == []
    assert t.row(index)[1] == ""


def test_lifecycle_hints_once_per_container(host):
    clock = Clock()
    t = table_for(host, clock=clock, expire_after=30)
    path = f"/docker/{A}"
    assert t.on_cgroup_mkdir("/docker") is None  # the parent, no container
    created = t.on_cgroup_mkdir(path)
    assert created is not None
    index, runtime, cid = created
    assert (runtime, cid) == ("docker", A) and t.row(index)[1] == "web"
    assert all(t.on_cgroup_mkdir(path) is None for _ in range(9))  # other hierarchies
    assert t.on_cgroup_mkdir(f"/docker/{A}/init") is None  # a sub-cgroup is not a container

    assert t.on_cgroup_attach(path, 77) == (index, "docker", A)  # runc's parent process
    assert t.on_cgroup_attach(path, 77) is None
    assert t.lookup_pid(77) == index  # cache follows the move
    assert t.mark_running(index, 78) and not t.mark_running(index, 79)
    assert t.init_pid(index) == 78
    t.on_cgroup_attach(path, 78)
    assert t.init_of(78) == index and t.init_of(77) == 0

    assert t.on_cgroup_rmdir(f"/docker/{A}/init") is None
    assert t.on_cgroup_rmdir(path) == (index, "docker", A)
    assert t.on_cgroup_rmdir(path) is None
    assert t.on_cgroup_rmdir("/user.slice") is None
    # destroyed rows stay readable until they expire
    clock.now += 29
    t.refresh()
    assert t.row(index)[0] == A
    clock.now += 2
    t.refresh()
    assert t.row(index) == ("", "", "", "", "", "", "", "", "", {})
    assert t.lookup_pid(77) == 0  # purged from the cache with its container (no /proc/77 here)


def test_rmdir_of_unseen_container_still_reported(host):
    t = table_for(host)
    index, runtime, cid = t.on_cgroup_rmdir(f"/libpod_parent/libpod-{B}")
    assert (runtime, cid) == ("podman", B) and t.row(index)[1] == "pod1"


def test_mkdir_after_destroy_is_a_new_life(host):
    t = table_for(host)
    path = f"/{C}"
    first = t.on_cgroup_mkdir(path)
    t.on_cgroup_rmdir(path)
    again = t.on_cgroup_mkdir(path)
    assert again is not None and again[2] == C and first[0] == again[0]


def test_table_is_bounded(host):
    clock = Clock()
    t = table_for(host, clock=clock, max_entries=4)
    ids = [f"{i:064x}" for i in range(1, 9)]
    live = [t.index_of("runc", ids[i]) for i in range(4)]
    assert 0 not in live and len(set(live)) == 4
    assert t.index_of("runc", ids[4]) == 0 and t.overflow == 1  # full of live ones
    t.on_cgroup_rmdir(f"/{ids[0]}")
    fresh = t.index_of("runc", ids[5])
    assert fresh == live[0]  # the destroyed one made room; its index is reused
    assert t.row(fresh)[0] == ids[5] and len(t) == 4


def test_scan_finds_running_containers_and_init(host):
    t = table_for(host)
    found = t.scan()
    rows = {t.row(i)[0]: i for i in found}
    assert set(rows) == {A, B, C, D}
    assert t.init_pid(rows[A]) == 100  # 101 is its child, inside
    assert t.init_of(100) == rows[A] and t.init_of(101) == 0
    assert t.init_pid(rows[C]) == 300
    # no duplicate CREATED for what scan already knew
    assert t.on_cgroup_mkdir(f"/docker/{A}") is None


def test_roots_from_command_lines():
    roots = Roots(docker=[], docker_sockets=[], storage=[], runc=[], crun=[], containerd=[])
    roots_from_cmdline(["/usr/sbin/dockerd", "--data-root", "/d/root", "--exec-root=/d/exec",
                        "-H", "unix:///d/docker.sock", "-H", "tcp://0.0.0.0:2375"], roots)
    roots_from_cmdline(["dockerd", "-g", "/old"], roots)
    roots_from_cmdline(["containerd", "--state", "/s"], roots)
    roots_from_cmdline(["/usr/bin/conmon", "-c", B, "-b", f"/p/root/vfs-containers/{B}/userdata",
                        "--exit-command-arg", "--root", "--exit-command-arg", "/p/root",
                        "--exit-command-arg", "--runroot", "--exit-command-arg", "/p/run"], roots)
    roots_from_cmdline(["crun", "--root", "/c"], roots)
    roots_from_cmdline(["bash", "--root", "/nope"], roots)
    roots_from_cmdline([], roots)
    assert roots.docker == ["/d/root", "/old"]
    assert roots.docker_sockets == ["/d/docker.sock"]
    assert roots.runc == ["/d/exec/runtime-runc/moby"]
    assert roots.containerd == ["/s"]
    assert roots.storage == ["/p/root", "/p/run"]
    assert roots.crun == ["/c"]


def test_discover_reads_proc(tmp_path):
    proc = str(tmp_path)
    write(f"{proc}/5/cmdline", "dockerd\0--data-root\0/x/root\0")
    write(f"{proc}/5/status", "Uid:\t0\t0\t0\t0\n")  # root's: its command line is read
    os.makedirs(f"{proc}/6")  # no cmdline: gone or unreadable
    roots = Roots()
    assert discover(roots, proc, root_everywhere) == 0
    assert "/x/root" in roots.docker and "/var/lib/docker" in roots.docker
    roots = Roots()
    assert discover(roots, proc) == 1  # the real check: a fake process has no exe, untrusted
    assert "/x/root" not in roots.docker


def test_malformed_metadata_is_ignored(tmp_path):
    proc = str(tmp_path / "proc")
    docker_root = str(tmp_path / "docker")
    write(f"{docker_root}/containers/{A}/config.v2.json", "{not json")
    fake_pid(proc, 5, f"/docker/{A}")
    t = ContainerTable(proc, Roots(docker=[docker_root], docker_sockets=[]), discover_roots=False, **inline())
    assert t.row(t.lookup_pid(5))[:5] == (A, "", "", "", "docker")


def test_hostile_runc_state_gives_unknown_never_an_exception(tmp_path, monkeypatch):
    """Wrong-type JSON, a FIFO, a /dev/zero symlink as state.json: the table
    answers (name from the id, or unknown), and a reader that raises anyway
    is counted, never propagated to the broker's loop."""
    proc = str(tmp_path / "proc")
    ids = {kind: f"{i:064x}" for i, kind in enumerate(("types", "fifo", "zero", "raises"), 1)}
    runc = tmp_path / "runc"
    write(f"{runc}/{ids['types']}/state.json", {"config": {"labels": [1, None]}})
    os.makedirs(f"{runc}/{ids['fifo']}")
    os.mkfifo(f"{runc}/{ids['fifo']}/state.json")
    os.makedirs(f"{runc}/{ids['zero']}")
    os.symlink("/dev/zero", f"{runc}/{ids['zero']}/state.json")
    for pid, cid in enumerate(ids.values(), 10):
        fake_pid(proc, pid, f"/{cid}")
    t = ContainerTable(proc, Roots(docker=[], docker_sockets=[], storage=[], runc=[str(runc)], crun=[],
                                   containerd=[]), discover_roots=False, **inline())
    assert t.row(t.lookup_pid(10))[:5] == (ids["types"], ids["types"], "", "", "runc")
    assert t.row(t.lookup_pid(11))[1] == "" and t.row(t.lookup_pid(12))[1] == ""

    import c8.broker.containers as containers

    def boom(roots, cid):
        raise TypeError("a reader's bug")
    monkeypatch.setitem(containers._READERS, "runc", boom)
    index = t.lookup_pid(13)
    assert t.row(index)[:5] == (ids["raises"], "", "", "", "runc")
    assert t.table([index]) == {index: t.row(index)}
    t.refresh()
    assert t.stats()["lookup_failed"] >= 1 and t.stats()["unnamed"] == 3


def test_a_new_container_reads_the_runtimes_roots_while_they_run(host):
    """A podman with a storage root nobody knew (``--root``) runs a container: its
    first mkdir makes the table read the runtimes' command lines at once, not at
    refresh's next period (a short run on a loaded host was gone by then, and the
    container was never named), then look the container up. At most every
    DISCOVER_AT_BIRTH_EVERY seconds."""
    from c8.broker import containers

    proc, roots = host
    clock = Clock()
    t = ContainerTable(proc, Roots(docker=[], docker_sockets=[]), discover_roots=True, clock=clock, **inline())
    assert t.row(t.on_cgroup_mkdir(f"/docker/{A}")[0])[1] == ""  # docker's root is still unknown
    storage = roots.storage[0]
    write(f"{proc}/77/cmdline", f"podman\0--root\0{storage}\0run\0busybox\0")
    write(f"{proc}/77/status", "Uid:\t0\t0\t0\t0\n")
    clock.now += containers.DISCOVER_AT_BIRTH_EVERY
    index, runtime, cid = t.on_cgroup_mkdir(f"/libpod_parent/libpod-{B}")
    assert (cid, runtime) == (B, "podman") and t.row(index)[:2] == (B, "pod1")
