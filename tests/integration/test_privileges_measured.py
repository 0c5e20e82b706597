"""Every capability in privileges.ROLES is measured: the call its "why" names
succeeds with the role's set and fails with the same set less that capability.

Each probe runs in a forked child dropped exactly as the supervisor drops a
child (drop_privileges: bounding set, uid, no_new_privs). A grant added to
ROLES without a probe here fails test_every_grant_has_a_probe.
"""

import os
import resource
import shutil
import subprocess
import tempfile

import pytest

from c8.collectors import perf
from c8.collectors.bpf import syscalls as bpf
from c8.supervisor import privileges as P

pytestmark = pytest.mark.root

UID = GID = 65533      # no such user: owns nothing here
NOBODY = 65534         # "another user": the owner of the process the broker looks at
TRACEFS = "/sys/kernel/tracing"
PERF_EVENT_ARRAY = 4
RING_PAGES = 1024      # 4 MiB: beyond perf_event_mlock_kb with RLIMIT_MEMLOCK 0


@pytest.fixture(scope="module")
def world():
    """What the probes touch, made as root before any drop."""
    d = tempfile.mkdtemp(prefix="c8-measure-")
    private = os.path.join(d, "state")      # like /run/runc: 0700 root
    os.mkdir(private, 0o700)
    with open(os.path.join(private, "state.json"), "w") as f:
        f.write("{}")
    nobody = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", "sleep", "300"], cwd="/")
    with open(f"{TRACEFS}/events/sched/sched_process_exec/id") as f:
        tp_id = int(f.read())
    yield {"private": private, "nobody": nobody.pid, "tp_id": tp_id}
    nobody.kill()
    nobody.wait()
    shutil.rmtree(d, ignore_errors=True)


def read_private(w):
    with open(os.path.join(w["private"], "state.json")) as f:
        f.read()


def readlink_other_users_cwd(w):
    os.readlink(f"/proc/{w['nobody']}/cwd")


def read_tracefs(w):
    with open(f"{TRACEFS}/events/sched/sched_process_exec/id") as f:
        f.read()


def open_tracepoint(w):
    os.close(perf.open_tracepoint(w["tp_id"], 0, "measure"))


def create_bpf_map(w):
    os.close(bpf.map_create(PERF_EVENT_ARRAY, 4, 4, 2, "measure"))


def mmap_big_ring(w):
    fd = perf.open_tracepoint(w["tp_id"], 0, "measure")
    try:
        perf.mmap_ring(fd, RING_PAGES).close()
    finally:
        os.close(fd)


def open_probe_control(w):
    os.close(os.open(f"{TRACEFS}/uprobe_events", os.O_WRONLY | os.O_APPEND))


PROBES = {
    ("broker", "CAP_SYS_PTRACE"): readlink_other_users_cwd,
    ("broker", "CAP_DAC_READ_SEARCH"): read_private,
    ("collector0", "CAP_PERFMON"): open_tracepoint,
    ("collector0", "CAP_BPF"): create_bpf_map,
    ("collector0", "CAP_IPC_LOCK"): mmap_big_ring,
    ("collector0", "CAP_DAC_OVERRIDE"): open_probe_control,  # and read_tracefs, below
    ("collector", "CAP_PERFMON"): open_tracepoint,
    ("collector", "CAP_IPC_LOCK"): mmap_big_ring,
    ("collector", "CAP_DAC_READ_SEARCH"): read_tracefs,
    ("detector", "CAP_DAC_READ_SEARCH"): read_private,
    ("exporter", "CAP_DAC_READ_SEARCH"): read_private,  # NATS creds/TLS files root wrote
}


def succeeds_as(mask: int, probe, w) -> bool:
    """Run probe(w) in a child dropped to uid UID with capability set `mask`."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))  # CAP_IPC_LOCK or nothing
            P.drop_privileges(UID, GID, mask)
            try:
                probe(w)
                code = 0
            except OSError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1), f"probe crashed: {status:#x}"
    return os.WEXITSTATUS(status) == 0


def test_every_grant_has_a_probe():
    grants = {(role, g.cap) for role, gs in P.ROLES.items() for g in gs}
    assert grants == set(PROBES)


@pytest.mark.parametrize("role,cap", sorted(PROBES))
def test_grant_is_needed_and_enough(world, role, cap):
    full = P.role_mask(role)
    bit = 1 << P.CAPS[cap]
    assert full & bit, f"{cap} is not in root's bounding set here"
    probe = PROBES[role, cap]
    assert succeeds_as(full, probe, world), f"{role}: {probe.__name__} fails with its own set"
    assert not succeeds_as(full & ~bit, probe, world), \
        f"{role}: {probe.__name__} works without {cap}: drop it from ROLES"


def test_collector0_reads_tracefs_through_dac_override(world):
    """cpu0 keeps no CAP_DAC_READ_SEARCH: CAP_DAC_OVERRIDE serves its reads too."""
    full = P.role_mask("collector0")
    assert succeeds_as(full, read_tracefs, world)
    assert not succeeds_as(full & ~(1 << P.CAPS["CAP_DAC_OVERRIDE"]), read_tracefs, world)
