"""The container table's lookup worker: deadlines, stuck threads, failures
counted, and a table that never waits on a stalled lookup for long.

A stalled read is played by a lookup that blocks on an Event (a hung NFS or
FUSE read cannot be made here without root and a mount).
"""

from __future__ import annotations

import threading
import time

import pytest

from c8.broker.containers import ContainerTable
from c8.broker.runtimes import Roots
from c8.broker.runtimes.worker import Worker
from c8.host.proc import Advertiser

pytestmark = pytest.mark.timeout(30)

C = "ed836b6809d5b0e47b262eee2b0d4aa9b3c1c6d362c49f415fa508cc5ebd49b6"


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_job_result_and_exception():
    w = Worker()
    ok = w.submit(lambda: 42)
    assert w.wait(ok, 2.0) and ok.result == 42 and not ok.failed
    bad = w.submit(lambda: [][1])
    assert w.wait(bad, 2.0) and bad.failed and bad.result is None
    assert w.counts["failed"] == 1
    w.close()


def test_stuck_job_given_up_and_queue_goes_on():
    w = Worker(max_abandoned=2)
    release = threading.Event()
    stuck = w.submit(release.wait, deadline=0.2)
    later = w.submit(lambda: "after", deadline=0.2)
    start = time.monotonic()
    assert not w.wait(stuck, 0.05)
    assert not w.wait(later, 1.0)  # a wait timed out, nothing finished since: no second wait
    assert time.monotonic() - start < 0.5
    wait_until(lambda: (w.check(), stuck.done.is_set())[1])
    assert stuck.failed and w.counts["timed_out"] == 1 and w.counts["stuck_threads"] == 1
    assert w.wait(later, 2.0) and later.result == "after"  # a fresh thread took the queue
    release.set()  # the stuck read returns: its late answer is dropped
    time.sleep(0.05)
    assert stuck.result is None and stuck.failed


def test_too_many_stuck_threads_disable_lookups():
    w = Worker(max_abandoned=2)
    release = threading.Event()
    for _ in range(2):
        job = w.submit(release.wait, deadline=0.05)
        wait_until(lambda j=job: (w.check(), j.done.is_set())[1])
    assert w.disabled
    assert w.submit(lambda: 1) is None and w.counts["dropped"] >= 1
    release.set()


def test_wait_budget_bounds_total_waiting():
    w = Worker(wait_budget=0.2)
    release = threading.Event()
    slow = [w.submit(lambda: release.wait(0.15)) for _ in range(5)]
    start = time.monotonic()
    for job in slow:
        w.wait(job, 0.1)
    assert time.monotonic() - start < 0.45
    release.set()


def test_table_never_waits_long_on_a_stalled_lookup(tmp_path):
    """The runtime process making a container's cgroup cannot be read (its
    /proc stalls): mkdir returns at once, the name stays unknown, counted."""
    release = threading.Event()

    def stalled(pid, proc):
        release.wait(10)
        return Advertiser([], None, False)

    t = ContainerTable(str(tmp_path), Roots(docker=[], docker_sockets=[], storage=[], runc=[], crun=[],
                                            containerd=[]),
                       discover_roots=False, advertiser=stalled, wait=0.05, lookup_deadline=0.3)
    start = time.monotonic()
    index, runtime, cid = t.on_cgroup_mkdir(f"/{C}", pid=4242)
    assert cid == C and index > 0
    assert t.row(index)[:5] == (C, "", "", "", "runc")  # identity from the path, name unknown
    assert t.table([index]) == {index: (C, "", "", "", "runc", "", "", "", "", {})}
    assert time.monotonic() - start < 1.0
    wait_until(lambda: (t.refresh(), t.stats()["lookup_timed_out"])[1] == 1)
    assert t.stats()["lookup_stuck_threads"] == 1
    release.set()


def test_table_counts_a_failing_lookup(tmp_path):
    def broken(pid, proc):
        raise TypeError("a reader's bug")

    t = ContainerTable(str(tmp_path), Roots(runc=[]), discover_roots=False, advertiser=broken)
    index, _, _ = t.on_cgroup_mkdir(f"/{C}", pid=4242)
    wait_until(lambda: (t.refresh(), t.stats()["lookup_failed"])[1] == 1)
    assert t.row(index)[1] == ""
