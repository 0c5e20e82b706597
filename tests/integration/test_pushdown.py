"""Pushdown, shown on the real kernel: under a storm of non-matching activity
the collectors receive (about) only what a subscription wants, and the
subscriber gets exactly the matching events.

The workload is a small C program (no interpreter start-up noise): N
non-matching opens or syscalls, then M matching ones.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root

STORM = 100_000
MATCHES = 50

WORKLOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long storm = atol(argv[2]), matches = atol(argv[3]);
    char path[4096];
    if (argv[1][0] == 'o') {            /* opens: argv[4] noise file, argv[5] match prefix */
        for (long i = 0; i < storm; i++) { int fd = open(argv[4], O_RDONLY); if (fd >= 0) close(fd); }
        for (long i = 0; i < matches; i++) {
            snprintf(path, sizeof path, "%s%ld", argv[5], i);
            int fd = open(path, O_RDONLY | O_CREAT, 0600); if (fd >= 0) close(fd);
        }
    } else if (argv[1][0] == 'p') {      /* paced: getsid matches 1 ms apart */
        for (long i = 0; i < matches; i++) { syscall(SYS_getsid, 0); usleep(1000); }
    } else {                             /* syscalls: getppid noise, getsid matches */
        for (long i = 0; i < storm; i++) syscall(SYS_getppid);
        for (long i = 0; i < matches; i++) syscall(SYS_getsid, 0);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("pushdown-bin")
    (d / "w.c").write_text(WORKLOAD_C)
    subprocess.run(["gcc", "-O2", "-o", str(d / "w"), str(d / "w.c")], check=True)
    return str(d / "w")


def received(sensor, source: str) -> int:
    return sum(int(st.get("received", {}).get(source, 0)) for st in sensor.status()["collectors"].values())


def received_since(sensor, source: str, since_ns: int) -> int:
    """The collectors' count in stats sent after ``since_ns`` (CLOCK_MONOTONIC; stats come every second)."""
    def fresh():
        cs = sensor.status()["collectors"].values()
        if cs and all(int(st.get("watermark") or 0) > since_ns for st in cs):
            return [sum(int(st.get("received", {}).get(source, 0)) for st in cs)]  # [0] is truthy
        return None
    return wait_for(fresh, 20, 0.2, f"collector stats newer than the workload ({source})")[0]


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def test_filename_prefix_is_pushed_into_ebpf(shared_sensor, workload, tmp_path):
    match_dir, noise_dir = tmp_path / "m", tmp_path / "noise"
    match_dir.mkdir()
    noise_dir.mkdir()
    noise = noise_dir / "match-not"
    noise.write_text("x")
    prefix = f"{match_dir}/match-"
    spec = {"events": {"file": {"filter": f'filename like "{prefix}*"'}}}
    with shared_sensor.client.subscribe(spec, queue=10000) as sub:
        plan = shared_sensor.status()["plan"]
        assert plan["bpf"]["open"]["filter"]["prefixes"] == [prefix]
        before = received_since(shared_sensor, "bpf:open", now_ns())
        child = subprocess.run([workload, "open", str(STORM), str(MATCHES), str(noise), prefix], check=True)
        assert child.returncode == 0
        events = []
        for ev in sub.events(timeout=10):
            if ev["type"] == "lost":  # the kernel's losses reach every subscriber
                continue
            events.append(ev)
            if len(events) >= MATCHES:
                break
        after = received_since(shared_sensor, "bpf:open", now_ns())
    names = sorted(e["filename"] for e in events)
    assert names == sorted(f"{prefix}{i}" for i in range(MATCHES)), sub.lost
    assert all(e["kind"] == "OPEN" and e["ret"] >= 0 for e in events)
    assert len({e["process_pid"] for e in events}) == 1
    # the kernel dropped the storm: the collectors saw the matches and under 2% of the 100k
    # others (a few hundred slip through now and then: see the report on filter map updates)
    assert MATCHES <= after - before <= MATCHES + STORM // 50, (before, after)


def test_syscall_id_filter_is_set_on_the_tracepoint(shared_sensor, workload):
    spec = {"events": {"syscall": {"kinds": ["ENTER"], "filter": "id == 124"}}}
    with shared_sensor.client.subscribe(spec, queue=100000) as sub:
        status = shared_sensor.status()
        # the subscription's part, then the sensor's own threads kept out
        pushed = status["plan"]["tracepoints"]["raw_syscalls:sys_enter"]["filter"]
        assert pushed.startswith("(id == 124) && common_pid != "), pushed
        wait_for(lambda: all(st.get("filters", {}).get("raw_syscalls:sys_enter", {}).get("filter") == pushed
                             for st in shared_sensor.status()["collectors"].values()), 10,
                 what="every collector to run the filter")
        assert all(st["filters"]["raw_syscalls:sys_enter"]["error"] is None
                   for st in shared_sensor.status()["collectors"].values())
        before = received_since(shared_sensor, "raw_syscalls:sys_enter", now_ns())
        child = subprocess.Popen([workload, "syscalls", str(STORM), str(MATCHES)])
        child.wait()
        mine = []
        for ev in sub.events(timeout=10):
            if ev["type"] == "lost":  # the kernel's losses reach every subscriber
                continue
            assert ev["kind"] == "ENTER"
            if ev["process_pid"] == child.pid:
                mine.append(ev)
                if len(mine) >= MATCHES:
                    break
        after = received_since(shared_sensor, "raw_syscalls:sys_enter", now_ns())
    assert len(mine) == MATCHES
    # the storm's 100k getppid calls never reached a ring: only getsid calls did (getsid,
    # not getpid: libzmq calls getpid on every send, so the sensors here make thousands)
    assert MATCHES <= after - before < STORM // 10, (before, after)


def test_another_subscriber_changing_the_filter_loses_nothing(shared_sensor, workload):
    """Subscriptions coming and going change a tracepoint's kernel filter, which
    the kernel sets once per perf event: the collectors replace the event. A
    subscriber already running sees every event exactly once meanwhile."""
    n = 1500
    spec = {"events": {"syscall": {"kinds": ["ENTER"], "filter": "id == 124"}}}
    other = {"events": {"syscall": {"kinds": ["ENTER"], "filter": "id == 124 and process_pid == 1"}}}
    with shared_sensor.client.subscribe(spec, queue=100000) as sub:
        child = subprocess.Popen([workload, "paced", "0", str(n)])
        changes = 0
        while child.poll() is None and changes < 8:
            with shared_sensor.client.subscribe(other) as joined:  # the filter changes
                time.sleep(0.1)
                shared_sensor.client.unsubscribe(joined.id)  # and changes back
            changes += 2
            time.sleep(0.1)
        child.wait()
        mine = []
        for ev in sub.events(timeout=10, idle=3):
            if ev["type"] == "syscall" and ev["process_pid"] == child.pid:
                mine.append(ev)
                if len(mine) >= n + 10:
                    break
    assert changes >= 4  # the filter changed while the child ran
    assert len(mine) == n, f"{len(mine)} of {n} getsid calls, lost {sub.lost}"
    assert len({e["sensor_monotime_nanos"] for e in mine}) == n  # none read twice
