"""Container identity against real runtimes: docker, podman, runc.

For each: a running container's init pid maps to the right runtime and id,
ContainerTable names it and its image, and a container started before the
table exists is found by scan().
"""

from __future__ import annotations

import os

import pytest

from c8.broker.containers import ContainerTable, container_of_pid
from c8.broker.runtimes import Roots

pytestmark = [pytest.mark.root, pytest.mark.containers, pytest.mark.timeout(240)]

SLEEP = ["sleep", "120"]


def _table(runtime_name: str, runtime) -> ContainerTable:
    # runc leaves no process behind to reveal a private --root: configure it,
    # as a deployment with a non-default runc root would
    roots = Roots()
    if runtime_name == "runc":
        roots.add("runc", runtime.root)
    return ContainerTable(roots=roots)


@pytest.fixture(params=["docker", "podman", "runc"])
def runtime(request):
    return request.param, request.getfixturevalue(request.param)


def expected_runtime(name: str) -> str:
    return name  # docker -> docker, podman -> podman (libpod-<id>), runc -> runc (/<id>)


def test_run_reports_exit_code(runtime):
    name, rt = runtime
    assert rt.run(["sh", "-c", "exit 7"]).exit_code == 7
    assert rt.run(["true"]).exit_code == 0


def test_running_container_identity(runtime):
    name, rt = runtime
    run = rt.start(SLEEP)
    try:
        pid = rt.pid(run.container_id)
        assert pid > 0
        assert container_of_pid(pid) == (expected_runtime(name), run.container_id)
        assert container_of_pid(os.getpid()) is None  # the test itself is on the host

        table = _table(name, rt)
        index = table.lookup_pid(pid)
        assert index > 0
        assert table.lookup_pid(pid) == index  # cached
        cid, cname, image_id, image_name, rname = table.row(index)[:5]
        assert (cid, cname, rname) == (run.container_id, run.name, expected_runtime(name))
        assert image_name.rsplit("/", 1)[-1].split(":")[0] == "busybox"
        if name == "runc":
            assert image_id == ""  # runc has no image, only a bundle
        else:
            assert image_id == rt.image_id
        assert table.table([0, index]) == {0: ("", "", "", "", "", "", "", "", "", {}), index: table.row(index)}
    finally:
        rt.stop(run.container_id)


def test_scan_finds_container_started_before(runtime):
    name, rt = runtime
    run = rt.start(SLEEP)
    try:
        pid = rt.pid(run.container_id)
        table = _table(name, rt)
        found = table.scan()
        rows = {table.row(i)[0]: i for i in found}
        assert run.container_id in rows
        index = rows[run.container_id]
        assert table.row(index)[1] == run.name
        assert table.init_pid(index) == pid
        assert table.init_of(pid) == index
    finally:
        rt.stop(run.container_id)
