"""c8ctl subscribe against the real sensor: windows in sequence order, losses as lines.

Each workload runs in its own processes and the subscriptions name them, so
the host's activity cannot change the counts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time

import orjson
import pytest
import yaml

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root

CATS = 40


class C8ctl:
    """``c8ctl subscribe`` as a user runs it, its stdout a pipe read (or not) by a thread."""

    def __init__(self, run_dir: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir,
                                      "subscribe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the subscription id comes once the broker replied, and it replies once the
        # collectors run the plan: a workload started after this line is seen whole
        first = self.proc.stderr.readline().decode()
        assert "subscription" in first, first + self.proc.stderr.read().decode()
        self.lines: list[dict] = []
        self._reader: threading.Thread | None = None

    def read(self, keep=None) -> None:
        """Start reading stdout (JSON lines) in a thread; ``keep`` (a line's dict ->
        what to store) keeps hundreds of thousands of lines small and cheap to hold."""
        def run():
            for raw in self.proc.stdout:
                line = orjson.loads(raw)
                self.lines.append(line if keep is None else keep(line))
        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()

    def wait_lines(self, done, timeout: float = 40.0, what: str = "lines") -> None:
        wait_for(lambda: done(list(self.lines)), timeout, 0.1, what)

    def stop(self) -> str:
        """SIGINT (what Ctrl-C sends), wait for the exit, return stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        if self._reader is not None:
            self._reader.join(10)
        return self.proc.stderr.read().decode()


def test_c8ctl_prints_every_window_in_sequence_order(shared_sensor, tmp_path):
    """Each cat execs then opens the marker: EXEC, OPEN, EXEC, OPEN ... as they happened.
    Printing a window category by category puts several EXECs before their OPENs."""
    mark = tmp_path / "c8ctl-order-mark"
    mark.write_text("x\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"events": {
        "process": {"filter": f'kind == "EXEC" and exec_command_line == "cat {mark}"'},
        "file": {"filter": f'kind == "OPEN" and filename == "{mark}"'}}}))
    ctl = C8ctl(shared_sensor.run_dir, "--spec", str(spec), "--limit", str(2 * CATS))
    ctl.read()
    # one shell runs the cats back to back: a window holds several of them
    subprocess.run(["sh", "-c", f'for i in $(seq {CATS}); do cat "{mark}"; done'], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        ctl.proc.wait(30)  # --limit ends it once every event was sent
    except subprocess.TimeoutExpired:
        pass
    err = ctl.stop()
    # numbered lines (all but a notice of this reader's own loss) strictly increase
    seqs = [e["sensor_sequence_number"] for e in ctl.lines if e["sensor_sequence_number"]]
    assert all(b > a for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    lines = [e for e in ctl.lines if e["type"] != "lost"]  # the host's kernel losses reach every subscriber
    assert len(lines) == 2 * CATS, (len(lines), err)
    assert [(e["type"], e["kind"]) for e in lines] == [("process", "EXEC"), ("file", "OPEN")] * CATS
    # and each OPEN is the process of the EXEC before it
    assert all(x["process_pid"] == o["process_pid"] for x, o in zip(lines[::2], lines[1::2], strict=True))


def test_events_in_sequence_order_across_categories(shared_sensor, tmp_path):
    """The client library's events() gives Python users the same order."""
    mark = tmp_path / "events-order-mark"
    mark.write_text("x\n")
    spec = {"events": {"process": {"filter": f'kind == "EXEC" and exec_command_line == "cat {mark}"'},
                       "file": {"filter": f'kind == "OPEN" and filename == "{mark}"'}}}
    with shared_sensor.client.subscribe(spec) as sub:
        subprocess.run(["sh", "-c", f'for i in $(seq {CATS}); do cat "{mark}"; done'], check=True,
                       stdout=subprocess.DEVNULL)
        got = []
        deadline = time.monotonic() + 30
        for ev in sub.events(timeout=5):
            got.append(ev)
            if sum(e["type"] != "lost" for e in got) == 2 * CATS or time.monotonic() > deadline:
                break
    got = [e for e in got if e["type"] != "lost"]  # the host's kernel losses reach every subscriber
    assert [(e["type"], e["kind"]) for e in got] == [("process", "EXEC"), ("file", "OPEN")] * CATS
    seqs = [e["sensor_sequence_number"] for e in got]
    assert seqs == sorted(set(seqs))


@pytest.mark.containers
@pytest.mark.timeout(300)
def test_c8ctl_prints_a_container_in_sequence_order(shared_sensor, runc):  # noqa: F811  (fixture)
    """CREATED, RUNNING, the EXEC of /bin/ls and the OPEN of /foo inside, EXITED,
    DESTROYED, as c8ctl prints them: the RUNNING line before the EXECs it precedes."""
    cid, name = secrets.token_hex(32), "c8ctl-order-" + secrets.token_hex(3)
    spec_path = os.path.join(shared_sensor.dir, f"container-{cid[:12]}.yaml")
    with open(spec_path, "w") as f:
        yaml.safe_dump({"events": {"container": {}, "process": {"filter": 'kind == "EXEC"'},
                                   "file": {"filter": 'kind == "OPEN" and filename == "/foo"'}},
                        "containers": {"ids": [cid[:12]]}}, f)
    ctl = C8ctl(shared_sensor.run_dir, "--spec", spec_path)
    ctl.read()
    try:
        assert runc.run(["sh", "-c", "/bin/ls; cat /foo"], name=name, container_id=cid).exit_code == 1
        ctl.wait_lines(lambda ls: any(e["type"] == "container" and e["kind"] == "DESTROYED" for e in ls),
                       what="the container's DESTROYED line")
    finally:
        err = ctl.stop()
    seqs = [e["sensor_sequence_number"] for e in ctl.lines if e["sensor_sequence_number"]]
    assert all(b > a for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    mine = [e for e in ctl.lines if e["container_id"] == cid]
    shown = [(e["type"], e["kind"], e.get("exec_filename") or e.get("filename") or "") for e in mine]
    life = [kind for typ, kind, _ in shown if typ == "container"]
    assert life == ["CREATED", "RUNNING", "EXITED", "DESTROYED"], (shown, err)
    at = {k: shown.index(k) for k in [("container", "RUNNING", ""), ("process", "EXEC", "/bin/ls"),
                                       ("file", "OPEN", "/foo"), ("container", "EXITED", "")]}
    assert sorted(at.values()) == list(at.values()), shown


def test_c8ctl_ends_quietly_when_its_reader_goes(shared_sensor, tmp_path):
    """``c8ctl subscribe | head -1``: once head exits, c8ctl ends with status 0, no traceback."""
    argv = [sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", shared_sensor.run_dir, "subscribe",
            "--events", "process", "--filter", 'kind == "EXEC" and exec_filename == "/bin/true"']
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "subscription" in proc.stderr.readline().decode()
        subprocess.run(["/bin/true", "first"], check=True)
        assert json.loads(proc.stdout.readline())["type"] in ("process", "lost")  # the host's losses come too
        proc.stdout.close()  # what head does after its line

        def ended():
            subprocess.run(["/bin/true", "more"], check=True)
            return proc.poll() is not None
        wait_for(ended, 30, 0.2, "c8ctl to end after its reader went")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert proc.returncode == 0 and "Traceback" not in err, err


# A getppid loop that waits for a line on stdin, then makes CALLS calls in bursts
# of 1000 a millisecond apart (about 100k a second on top of the calls' own time).
LOOP = textwrap.dedent("""
    import os, sys, time
    print(os.getpid(), flush=True)
    sys.stdin.readline()
    for _ in range(int(sys.argv[1]) // 1000):
        for _ in range(1000):
            os.getppid()
        time.sleep(0.001)
    print("done", flush=True)
""")
CALLS = 1_000_000  # far more windows than the client and broker queues hold together


def test_c8ctl_reader_too_slow_sees_lost_lines(shared_sensor):
    """A reader that stops reading (c8ctl blocked on its stdout) loses events at the
    broker, and c8ctl prints how many as a ``lost`` line (source subscriber): what
    it printed and what it was told it lost add up to what happened."""
    loop = subprocess.Popen([sys.executable, "-c", LOOP, str(CALLS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    pid = int(loop.stdout.readline())
    spec = {"events": {"syscall": {"filter": f"id == 110 and process_pid == {pid}", "kinds": ["ENTER"]}}}
    with open(os.path.join(shared_sensor.dir, "slow-spec.yaml"), "w") as f:
        yaml.safe_dump(spec, f)
    ctl = C8ctl(shared_sensor.run_dir, "--spec", f.name)
    # Hundreds of thousands of lines come out: each is tallied as it is read and kept
    # as (type, pid, kind, sequence number) or (type, source, count), never as a dict
    # (holding them all would make the reader, not c8ctl, the slow part).
    printed = {"syscall": 0, "other": 0}
    lost_by: dict[str, int] = {}

    def keep(e: dict) -> tuple:
        if e["type"] == "lost":
            lost_by[e["source"]] = lost_by.get(e["source"], 0) + e["count"]
            return ("lost", e["source"], e["count"])
        printed["syscall" if e["type"] == "syscall" else "other"] += 1
        return (e["type"], e["process_pid"], e["kind"], e["sensor_sequence_number"])

    def told() -> int:
        return printed["syscall"] + sum(lost_by.values())
    try:
        loop.stdin.write("go\n")
        loop.stdin.flush()
        assert loop.stdout.readline().strip() == "done"
        loop.wait(10)
        ctl.read(keep)  # only now: meanwhile the pipe, then the queues, were full
        # The loss notice comes with the next message for us, or the next tick. On a
        # loaded machine the kernel's ring may overflow too (counted for the whole ring,
        # not per process): those count towards the total here, checked again below.
        try:
            wait_for(lambda: told() >= CALLS, 60, 0.2, "every call printed or counted lost")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {printed} printed, lost by source {lost_by}") from None
    finally:
        err = ctl.stop()
        if loop.poll() is None:
            loop.kill()
    assert lost_by.get("subscriber", 0) > 0, err
    events = [e for e in ctl.lines if e[0] == "syscall"]
    assert printed["other"] == 0 and len(events) == printed["syscall"]
    assert {e[1] for e in events} == {pid} and {e[2] for e in events} == {"ENTER"}
    others = sum(n for source, n in lost_by.items() if source != "subscriber")
    if not others:  # nothing lost elsewhere (the kernel's ring): exactly what happened
        assert len(events) + lost_by["subscriber"] == CALLS
    else:  # kernel losses are counted for whole rings, not per process
        assert len(events) + lost_by["subscriber"] <= CALLS <= len(events) + lost_by["subscriber"] + others
    # the printed events are in order
    seqs = [e[3] for e in events]
    assert seqs == sorted(seqs)
