"""Process lifecycle end to end: kernel -> collectors -> broker -> subscriber."""

import os
import signal
import subprocess
import time

import pytest

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root


def collect(sub, until, timeout=20.0):
    """Events from a subscription until until(events) is true or the timeout."""
    events = []
    deadline = time.monotonic() + timeout
    for ev in sub.events(timeout=3.0):
        events.append(ev)
        if until(events) or time.monotonic() > deadline:
            break
    return events


def perf_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                n += 1
        except OSError:
            pass
    return n


def test_200_execs_fork_exec_exit_linked(shared_sensor):
    me = os.getpid()
    with shared_sensor.client.subscribe({"events": {"process": {}}}) as sub:
        children = []
        for _ in range(200):
            p = subprocess.Popen(["/bin/true"])
            children.append(p.pid)
            p.wait()
        kids = set(children)

        def done(evs):
            return sum(1 for e in evs if e["kind"] == "EXIT" and e["process_pid"] in kids) >= 200
        events = collect(sub, done, timeout=30)

    forks = {e["fork_child_pid"]: e for e in events if e["kind"] == "FORK" and e["process_pid"] == me
             and e["fork_child_pid"] in kids}
    execs = [e for e in events if e["kind"] == "EXEC" and e["process_pid"] in kids]
    exits = {e["process_pid"]: e for e in events if e["kind"] == "EXIT" and e["process_pid"] in kids}
    assert len(execs) == 200
    assert all(e["exec_filename"] == "/bin/true" for e in execs)
    assert len(forks) == 200 and len(exits) == 200
    for ex in execs:
        pid = ex["process_pid"]
        fork, exit_ = forks[pid], exits[pid]
        assert fork["sensor_sequence_number"] < ex["sensor_sequence_number"] < exit_["sensor_sequence_number"]
        # one process identity links the three events, distinct for each process
        assert fork["fork_child_id"] == ex["process_id"] == exit_["process_id"] != ""
        assert exit_["exit_code"] == 0 and exit_["exit_signal"] == 0
        assert ex["exec_command_line"] == "/bin/true"
    assert len({e["process_id"] for e in execs}) == 200
    seqs = [e["sensor_sequence_number"] for e in events]
    assert seqs == sorted(seqs)


def test_exit_code_and_signal(shared_sensor):
    with shared_sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXIT"'}}}) as sub:
        p3 = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        p3.wait()
        victim = subprocess.Popen(["/bin/sleep", "30"])
        time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        pids = {p3.pid, victim.pid}
        events = collect(sub, lambda evs: pids <= {e["process_pid"] for e in evs})
    by_pid = {e["process_pid"]: e for e in events}
    assert by_pid[p3.pid]["exit_status"] == 3
    assert by_pid[p3.pid]["exit_code"] == 3 << 8
    assert by_pid[p3.pid]["exit_signal"] == 0
    assert by_pid[victim.pid]["exit_signal"] == signal.SIGKILL
    assert by_pid[victim.pid]["exit_code"] & 0x7F == signal.SIGKILL


def test_short_lived_process_full_command_line(shared_sensor):
    with shared_sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
        p = subprocess.Popen(["/bin/true", "a", "b", "c"])
        p.wait()
        events = collect(sub, lambda evs: any(e["process_pid"] == p.pid for e in evs))
    ev = next(e for e in events if e["process_pid"] == p.pid)
    assert ev["exec_command_line"] == "/bin/true a b c"


FILELESS = """
import os, sys
fd = os.memfd_create("payload", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
print(fd, flush=True)
sys.stdin.readline()
os.execve(fd, ["payload", "fileless-mark"], {})  # fexecve: execveat(fd, "", AT_EMPTY_PATH)
"""


def test_fileless_exec_of_a_memfd_is_an_exec(shared_sensor):
    """A program run from memory (memfd + fexecve, no file on disk) is an EXEC like
    any other: named as the kernel names it, /dev/fd/<fd>, with its command line."""
    import sys
    with shared_sensor.client.subscribe(
            {"events": {"process": {"filter": 'kind == "EXEC" and exec_command_line == "payload fileless-mark"'}}}) as sub:
        p = subprocess.Popen([sys.executable, "-c", FILELESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        fd = int(p.stdout.readline())
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.wait(10) == 0
        events = collect(sub, lambda evs: any(e["type"] == "process" for e in evs), timeout=20)
    execs = [e for e in events if e["type"] == "process"]
    assert [(e["process_pid"], e["exec_filename"]) for e in execs] == [(p.pid, f"/dev/fd/{fd}")]


def test_no_perf_event_after_last_unsubscribe(shared_sensor):
    collectors = [c["pid"] for c in shared_sensor.children() if c["name"].startswith("c8-collector")]
    assert collectors
    sub = shared_sensor.client.subscribe({"events": {"process": {}, "syscall": {"filter": "id == 39"}}})
    wait_for(lambda: all(perf_fds(pid) > 0 for pid in collectors), 10, what="collectors to open perf events")
    sub.close()
    wait_for(lambda: all(perf_fds(pid) == 0 for pid in collectors), 10,
             what="every perf event closed after the last unsubscribe")
    assert shared_sensor.status()["plan"]["tracepoints"] == {}


def test_collector_killed_comes_back_and_subscription_continues(sensor):
    with sensor.client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as sub:
        victim = next(c for c in sensor.children() if c["name"] == "c8-collector cpu0")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: any(c["name"] == "c8-collector cpu0" and c["pid"] != victim["pid"] and c["state"] == "RUNNING"
                             for c in sensor.children()), 15, what="cpu0's collector restarted")
        new_pid = next(c["pid"] for c in sensor.children() if c["name"] == "c8-collector cpu0")

        def collecting_again():
            st = sensor.status()
            cols = st["collectors"]
            return (cols["0"]["pid"] == new_pid and (cols["0"].get("bpf") or {}).get("exec", {}).get("loaded")
                    and all(c["generation"] >= st["plan"]["generation"] for c in cols.values()))
        wait_for(collecting_again, 30, 0.2, "the new collector to load the plan again")
        # After the restart, execs on every CPU still reach the subscriber.
        pids = set()
        for cpu in sorted(os.sched_getaffinity(0)):
            p = subprocess.Popen(["/bin/true"], preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
            p.wait()
            pids.add(p.pid)
        events = collect(sub, lambda evs: pids <= {e["process_pid"] for e in evs})
    assert pids <= {e["process_pid"] for e in events}
    assert {e["exec_filename"] for e in events if e["process_pid"] in pids} == {"/bin/true"}
    assert "restart" in sensor.output().lower()
