"""The process table's /proc lookups beside the broker's loop (c8.broker.lookups).

A read that stalls is played here by a function blocking on an Event: a mock,
because a real stall needs root and FUSE (tests/integration/test_hostile_proc.py
makes one against the running sensor); the vanished, zombie and renamed
processes below are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from c8 import schema
from c8.broker import lookups
from c8.broker.lookups import DONE, DROPPED, TIMED_OUT, LookupPool
from c8.broker.processes import ProcessTable, make_process_id, read_stat, ticks_at
from c8.host import proc as hostproc


def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_a_stuck_read_is_given_up_and_later_lookups_still_answer():
    gate = threading.Event()
    pool = LookupPool("t", workers=1, max_stuck=4, deadline=0.2)
    try:
        stuck = pool.submit("stuck", gate.wait)
        wait_until(lambda: stuck.state == lookups.RUNNING)
        after = [pool.submit(i, lambda i=i: i * 2) for i in range(5)]  # queued behind it
        assert not pool.wait(after, 0.05)
        wait_until(lambda: (pool.check(), all(j.ended for j in after))[1])
        assert stuck.state == TIMED_OUT and stuck.result is None
        assert [j.state for j in after] == [DONE] * 5 and [j.result for j in after] == [0, 2, 4, 6, 8]
        assert pool.counts["timed_out"] == 1 and pool.counts["stuck_threads"] == 1
        gate.set()  # the read comes back late: its answer is dropped, its thread ends
        wait_until(lambda: pool.counts["stuck_threads"] == 0)
        assert stuck.state == TIMED_OUT and [j.key for j in pool.returned()] == ["stuck"]
        ended = {j.key: j.state for j in pool.finished()}
        assert ended == {"stuck": TIMED_OUT, **{i: DONE for i in range(5)}}
    finally:
        gate.set()
        pool.close()


def test_stuck_threads_are_bounded_and_capacity_returns_when_reads_do():
    gate = threading.Event()
    before = threading.active_count()  # other tests' threads may still run
    pool = LookupPool("t", workers=1, max_stuck=2, deadline=0.1)
    try:
        for n in range(2):
            job = pool.submit(f"stuck{n}", gate.wait)
            wait_until(lambda job=job: (pool.check(), job.state == TIMED_OUT)[1])
        assert pool.counts["stuck_threads"] == 2
        pool.check()
        assert pool.submit("refused", lambda: 1) is None  # no thread left: refused, counted
        assert pool.counts["dropped"] == 1
        assert threading.active_count() <= before + 3  # the worker and the 2 stuck: no more
        gate.set()
        wait_until(lambda: pool.counts["stuck_threads"] == 0)
        job = pool.submit("again", lambda: 7)  # a thread again: answered
        assert job is not None and pool.wait([job], 2.0) and job.result == 7
    finally:
        gate.set()
        pool.close()


def test_a_lookup_that_raises_is_unknown_and_counted():
    pool = LookupPool("t", threaded=False)
    job = pool.submit("x", lambda: 1 / 0)
    assert job.state == lookups.FAILED and pool.counts["failed"] == 1


def test_queued_lookups_are_dropped_when_no_thread_is_left():
    gate = threading.Event()
    pool = LookupPool("t", workers=1, max_stuck=1, deadline=0.1)
    try:
        job = pool.submit("stuck", gate.wait)
        wait_until(lambda: job.state == lookups.RUNNING)
        queued = pool.submit("queued", lambda: 1)
        wait_until(lambda: (pool.check(), queued.ended)[1])
        assert job.state == TIMED_OUT and queued.state == DROPPED
        assert pool.counts["dropped"] == 1
    finally:
        gate.set()
        pool.close()


# -- the process table -------------------------------------------------------------

def fake_proc(root, pid: int, uid: int, cmdline: bytes = b"prog\0arg\0", ppid: int = 1) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    rest = ["S", str(ppid)] + ["0"] * 17 + ["4242"] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (prog) {' '.join(rest)}\n")
    (d / "status").write_text(f"Name:\tprog\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(cmdline)
    os.symlink("/usr/bin/prog", d / "exe")


@pytest.fixture
def stalling_cmdline(monkeypatch):
    """Command lines of pids in ``stall`` block until ``gate`` is set (the injected stall)."""
    gate, stall = threading.Event(), set()
    real = hostproc.command_line

    def command_line(pid, proc=hostproc.PROC, limit=hostproc.CMDLINE_LIMIT):
        if pid in stall:
            gate.wait()
        return real(pid, proc, limit)
    monkeypatch.setattr(hostproc, "command_line", command_line)
    yield gate, stall
    gate.set()


def syscall_batch(pids):
    b = schema.empty("syscall", len(pids))
    b["process_pid"] = pids
    return b


def test_a_miss_is_unknown_until_its_lookup_arrives_then_known(tmp_path):
    fake_proc(tmp_path, 500, uid=1000)
    t = ProcessTable(str(tmp_path), deadline=1.0)
    try:
        b = syscall_batch([500, 500])
        t.fill(b)  # the release path: nothing read, the miss asked
        assert b["process_id"].tolist() == [b"", b""] and b["uid"].tolist() == [-1, -1]
        assert t.stats()["misses"] == 1
        t.fill(syscall_batch([500]))  # asked once, not once per batch
        assert t.stats()["misses"] == 1
        wait_until(lambda: (t.collect(), 500 in t.by_pid and t.by_pid[500].command_line)[1])
        b = syscall_batch([500])
        t.fill(b)
        assert b["process_id"][0] == make_process_id(t.boot, 500, 4242) and b["uid"][0] == 1000
        assert t.by_pid[500].command_line == "prog arg" and t.by_pid[500].exec_filename == "/usr/bin/prog"
    finally:
        t.identities.close()
        t.cmdlines.close()


def test_a_stalled_command_line_leaves_identity_known_and_other_users_read(tmp_path, stalling_cmdline):
    gate, stall = stalling_cmdline
    fake_proc(tmp_path, 600, uid=1001)
    fake_proc(tmp_path, 601, uid=1001)
    fake_proc(tmp_path, 700, uid=1002, cmdline=b"other\0")
    stall.add(600)
    t = ProcessTable(str(tmp_path), deadline=0.2)
    try:
        t.get(600)
        wait_until(lambda: (t.collect(), 600 in t.by_pid)[1])  # identity in; its command line stalls
        assert t.by_pid[600].creds["uid"] == 1001 and t.by_pid[600].command_line == ""
        wait_until(lambda: (t.collect(), t.stats()["cmdline_timed_out"] == 1)[1])
        st = t.stats()
        assert st["stuck_threads"] == 1 and st["stalling_uids"] == 1
        t.get(601)  # same user: its command line is not read again
        t.get(700)  # another user: read, on a fresh thread
        wait_until(lambda: (t.collect(), t.by_pid.get(700) and t.by_pid[700].command_line == "other")[1])
        wait_until(lambda: (t.collect(), 601 in t.by_pid)[1])
        assert t.by_pid[601].command_line == "" and t.stats()["cmdline_skipped"] == 1
        gate.set()  # the stuck read returns late: dropped, its thread ends, its uid is read again
        wait_until(lambda: t.stats()["stuck_threads"] == 0)
        t.collect()
        assert t.by_pid[600].command_line == "" and t.stats()["stalling_uids"] == 0
        fake_proc(tmp_path, 602, uid=1001, cmdline=b"again\0")
        t.get(602)
        wait_until(lambda: (t.collect(), t.by_pid.get(602) and t.by_pid[602].command_line == "again")[1])
    finally:
        gate.set()
        t.identities.close()
        t.cmdlines.close()


def test_seed_with_a_stalling_process_costs_one_deadline(tmp_path, stalling_cmdline):
    gate, stall = stalling_cmdline
    for pid in range(800, 820):
        fake_proc(tmp_path, pid, uid=pid)
    stall.add(805)
    t = ProcessTable(str(tmp_path), deadline=0.3)
    try:
        start = time.monotonic()
        assert t.seed(timeout=5.0) == 20
        assert time.monotonic() - start < 3.0
        assert [p.command_line for pid, p in sorted(t.by_pid.items()) if pid != 805] == ["prog arg"] * 19
        assert t.by_pid[805].command_line == "" and t.stats()["cmdline_timed_out"] == 1
    finally:
        gate.set()
        t.identities.close()
        t.cmdlines.close()


def test_exec_of_an_unknown_pid_takes_the_windows_read_not_a_guess(tmp_path):
    fake_proc(tmp_path, 900, uid=0)
    t = ProcessTable(str(tmp_path), threaded=False)
    t.prefetch([], [900], [])
    t.on_exec(900, "/bin/true", "true", 10)
    assert t.by_pid[900].process_id == make_process_id(t.boot, 900, 4242)
    assert t.by_pid[900].creds["uid"] == 0 and t.stats()["prefetch_late"] == 0
    t.prefetch([], [], [])  # a window whose read was late: unknown, then looked up
    t.on_exec(901, "/bin/true", "true", 20)
    assert t.by_pid[901].process_id == b"" and t.stats()["prefetch_late"] == 1


# -- real processes: gone, zombie, renamed ---------------------------------------------

def known(t: ProcessTable, pid: int):
    """Ask, then apply the identity and (a collect later) the command line it asked for."""
    t.get(pid)
    t.collect()
    t.collect()
    return t.by_pid.get(pid)


def test_vanished_zombie_and_renamed_processes_give_unknown_parts_without_errors(tmp_path):
    t = ProcessTable(threaded=False)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert known(t, gone.pid) is None  # reaped: unknown, no error
    b = syscall_batch([gone.pid])
    t.fill(b)
    assert b["process_id"][0] == b"" and b["uid"][0] == -1

    zombie = subprocess.Popen(["true"])
    wait_until(lambda: (read_stat(zombie.pid) or (0, 0, ""))[2] and
               open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] == "Z")
    p = known(t, zombie.pid)  # stat and status still there; exe and cmdline gone
    assert p is not None and p.process_id == make_process_id(t.boot, zombie.pid, read_stat(zombie.pid)[0])
    assert p.exec_filename == "" and p.command_line == ""
    zombie.wait()

    prog = tmp_path / "sleeper"
    shutil.copy(shutil.which("sleep"), prog)
    renamed = subprocess.Popen([str(prog), "30"])
    try:
        # exe changes before the new argv is in place: wait for both
        wait_until(lambda: hostproc.argv(renamed.pid) == [str(prog), "30"])
        os.rename(prog, tmp_path / "renamed")
        os.unlink(tmp_path / "renamed")
        p = known(t, renamed.pid)
        assert p.exec_filename == f"{tmp_path}/renamed (deleted)"  # as the kernel names it now
        assert p.command_line == f"{prog} 30"
    finally:
        renamed.kill()
        renamed.wait()


def test_a_late_forks_start_time_comes_from_the_event_time():
    child = subprocess.Popen(["sleep", "5"])
    try:
        start = read_stat(child.pid)[0]
        now = time.monotonic_ns()
        assert abs(ticks_at(now) - read_stat(os.getpid())[0]) > 0  # sanity: a different process
        t = ProcessTable(threaded=False)
        t.prefetch([], [], [])  # the window's read did not arrive
        pid_id = t.on_fork(os.getpid(), child.pid, False, now)
        assert t.stats()["prefetch_late"] == 1
        assert abs(ticks_at(now) - start) <= os.sysconf("SC_CLK_TCK")  # within a second of /proc's
        assert pid_id == make_process_id(t.boot, child.pid, ticks_at(now))
        t.prefetch([child.pid], [], [])  # in time: /proc's start time exactly
        assert t.on_fork(os.getpid(), child.pid, False, now) == make_process_id(t.boot, child.pid, start)
    finally:
        child.kill()
        child.wait()


def test_fill_reads_nothing_of_proc(tmp_path, monkeypatch):
    """The release path's stamping never opens /proc: a miss is only asked."""
    t = ProcessTable(str(tmp_path))
    opened = []
    monkeypatch.setattr(hostproc, "stat", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(t.identities, "submit", lambda key, fn, deadline=None: None)
    t.fill(syscall_batch(np.array([11, 12, 11])))
    assert opened == []
    assert t.stats()["misses"] == 2
