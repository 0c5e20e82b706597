"""Least privilege on the real tree: every child's capability sets are those of
c8.supervisor.privileges.ROLES (the table docs/security.md shows), with
no_new_privs, and what the kept capabilities are for still works."""

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from c8.supervisor import privileges
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

NOBODY = 65534
FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def role_of(name: str) -> str:
    if name == "c8-broker":
        return "broker"
    if name == "c8-detector":
        return "detector"
    return "collector0" if name == "c8-collector cpu0" else "collector"


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.strip(), 16) if key.startswith("Cap") else int(value)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    s = Sensor(tmp_path_factory.mktemp("priv"), detections={"enabled": True}).start()
    yield s
    s.stop()


def test_every_child_keeps_exactly_its_roles_capabilities(tree):
    ncpu = len(os.sched_getaffinity(0))
    children = wait_for(lambda: (cs := tree.children()) and all(c["state"] == "RUNNING" for c in cs)
                        and cs, 20, what="every child RUNNING")
    assert sorted(c["name"] for c in children) == sorted(
        ["c8-broker", "c8-detector"] + [f"c8-collector cpu{n}" for n in range(ncpu)])
    root_bounding = privileges.status_caps()["CapBnd"]
    sys_admin = 1 << privileges.CAPS["CAP_SYS_ADMIN"]
    for c in children:
        got = proc_status(c["pid"])
        want = privileges.expected_status(role_of(c["name"]), root_bounding)
        assert got == want, (c["name"], {k: hex(v) for k, v in got.items()})
        assert not got["CapBnd"] & sys_admin, c["name"]
    # the roles differ where the table says so
    by_name = {c["name"]: proc_status(c["pid"])["CapEff"] for c in children}
    dac_override = 1 << privileges.CAPS["CAP_DAC_OVERRIDE"]
    assert by_name["c8-collector cpu0"] & dac_override
    assert not by_name["c8-broker"] & dac_override and not by_name["c8-detector"] & dac_override
    assert by_name["c8-detector"] == 1 << privileges.CAPS["CAP_DAC_READ_SEARCH"]


def test_kept_capabilities_serve_their_calls(tree):
    """eBPF file names (collector cpu0: CAP_BPF) made absolute through another
    user's /proc/<pid>/cwd (broker: CAP_SYS_PTRACE, EACCES without it)."""
    workdir = tempfile.mkdtemp(prefix="c8-priv-", dir="/tmp")
    try:
        os.chmod(workdir, 0o755)
        os.chown(workdir, NOBODY, NOBODY)
        name = f"c8-priv-{uuid.uuid4().hex[:8]}"
        open(os.path.join(workdir, name), "w").close()  # a failed redirection ends sh at once
        spec = {"events": {"file": {"filter": f'filename == "{name}"'}}}
        with tree.client.subscribe(spec) as sub:
            # nobody opens a relative name and stays alive a while (its cwd is readable)
            p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups", "sh", "-c", f": < {name}; sleep 3"],
                                 cwd=workdir, stderr=subprocess.DEVNULL)
            try:
                got = next((e for e in sub.events(timeout=10)
                            if e.get("filename") == name), None)
            finally:
                p.wait(10)
        assert got is not None, "no file event for the open"
        assert got["uid"] == NOBODY and got["kind"] == "OPEN"
        assert got["path"] == os.path.join(workdir, name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
