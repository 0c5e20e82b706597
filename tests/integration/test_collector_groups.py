"""Several CPUs in one collector process (max_collectors below the CPU count, as on
a host with more CPUs than the default 8): each CPU's tracepoints and eBPF
programs reach the subscriber, stamped with that CPU, and a restart of the
process brings every one of its CPUs back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from c8.protocol import cpus
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

ONLINE = cpus.online_cpus()
GROUP = cpus.collector_name(ONLINE)

# On one CPU: open the marker (eBPF, the open family), then getsid (a tracepoint).
WORKLOAD = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nos.close(os.open(sys.argv[2], os.O_RDONLY))\nos.getsid(0)\n"


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    if len(ONLINE) < 2:
        pytest.skip("needs two CPUs to put in one collector")  # this VM and CI have two
    s = Sensor(tmp_path_factory.mktemp("grouped"), max_collectors=1).start()
    yield s
    s.stop()


def collector(sensor) -> dict:
    found = [c for c in sensor.children() if c["name"].startswith(cpus.COLLECTOR_PREFIX)]
    assert [c["name"] for c in found] == [GROUP]
    return found[0]


def every_cpu_reports(sensor, pid: int) -> bool:
    st = sensor.status()
    cols = st["collectors"]
    return (sorted(int(k) for k in cols) == ONLINE and all(c["pid"] == pid for c in cols.values())
            and (cols["0"].get("bpf") or {}).get("open", {}).get("loaded")
            and all(c["generation"] >= st["plan"]["generation"] for c in cols.values()))


def run_on_every_cpu(sensor, marker: str) -> None:
    """The workload once on each CPU; asserts each CPU's OPEN and ENTER arrive, stamped."""
    spec = {"events": {"file": {"filter": f'filename == "{marker}"'},
                       "syscall": {"kinds": ["ENTER"], "filter": "id == 124"}}}
    with sensor.client.subscribe(spec) as sub:
        pid = collector(sensor)["pid"]
        wait_for(lambda: every_cpu_reports(sensor, pid), 30, 0.2, "every CPU of the group to run the plan")
        for cpu in ONLINE:
            subprocess.run([sys.executable, "-c", WORKLOAD, str(cpu), marker], check=True)
        # each run's OPEN names its pid; its getsid is the ENTER of that pid on that CPU
        seen: dict[tuple[int, str], int] = {}
        for ev in sub.events(timeout=10, idle=5):
            if ev["type"] == "file" and ev["filename"] == marker:
                seen[(ev["cpu"], "OPEN")] = ev["process_pid"]
            elif ev["type"] == "syscall" and (ev["cpu"], "OPEN") in seen \
                    and ev["process_pid"] == seen[(ev["cpu"], "OPEN")]:
                seen[(ev["cpu"], "ENTER")] = ev["process_pid"]
            if len(seen) == 2 * len(ONLINE):
                break
    assert sorted(seen) == sorted((cpu, kind) for cpu in ONLINE for kind in ("ENTER", "OPEN")), seen


def test_one_process_reads_every_cpu(grouped, tmp_path):
    marker = str(tmp_path / "grouped-marker")
    open(marker, "w").close()
    wait_for(lambda: collector(grouped)["state"] == "RUNNING", 20, 0.2, "the group's collector running")
    run_on_every_cpu(grouped, marker)


def test_a_killed_group_comes_back_with_every_cpu(grouped, tmp_path):
    marker = str(tmp_path / "grouped-marker-2")
    open(marker, "w").close()
    victim = collector(grouped)["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: collector(grouped)["pid"] != victim and collector(grouped)["state"] == "RUNNING",
             20, 0.2, "the group's collector restarted")
    run_on_every_cpu(grouped, marker)
