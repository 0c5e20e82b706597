"""c8ctl subscribe: JSON lines per second, what a user piping into jq or wc gets.

Two parts, each beside the formatter c8ctl had before (a per-event dict,
json.dumps and a write plus flush per line; kept below as the reference, and
measured in the same run):

- formatting alone: decoded batches of syscall, file and process events
  (the content a busy host makes) through each formatter into /dev/null,
  CPU time per line of the formatting process;
- live: a getppid loop pinned to one CPU at a steady rate, a private sensor,
  ``c8ctl subscribe --spec ... | wc -l`` (and the old formatter, the same
  way). Figures: event lines printed per second of the workload, the share of
  the loop's calls printed (the rest is reported lost at the broker, as lost
  lines), and c8ctl's CPU microseconds per line. The sensor's own delivery to
  a numpy batch subscriber at the same rate is printed with them: c8ctl can
  print no more than that.

Usage: python bench/bench_c8ctl.py [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import common as c
import msgpack
import numpy as np
import yaml

from c8 import schema
from c8.clients import jsonlines
from c8.clients.client import Client
from c8.protocol import batch as wire
from tests.unit.test_c8ctl_format import ref_to_dicts as old_to_dicts  # the formatter as it was

SENSOR_ID = hashlib.sha256(b"bench").hexdigest()


# -- the old formatter: c8ctl subscribe as of d764fd4, the anchor -------------------
def old_write_batch(out, category: str, arr: np.ndarray, table: dict, sensor_id: str) -> int:
    """What the old c8ctl did per batch: sort, json.dumps, write and flush per line."""
    pending = old_to_dicts(category, arr, table, sensor_id)
    pending.sort(key=lambda e: e["sensor_sequence_number"])
    for ev in pending:
        out.write(json.dumps(ev, default=str) + "\n")
        out.flush()
    return len(pending)


def old_c8ctl(run_dir: str, spec_path: str) -> None:
    """The old ``c8ctl subscribe --spec`` loop (run in a child: ``--old-c8ctl RUN_DIR SPEC``)."""
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    with Client(run_dir, timeout=3.0).subscribe(spec) as sub:
        print(json.dumps({"subscription": sub.id}), file=sys.stderr, flush=True)
        try:
            for category, arr, table in sub.batches():
                old_write_batch(sys.stdout, category, arr, table, sub.sensor_id)
        except KeyboardInterrupt:
            pass


# -- formatting alone ------------------------------------------------------------------
def sample_batch(category: str, n: int) -> tuple[str, np.ndarray, dict]:
    """A decoded batch as a busy host sends it: a few processes, varied names and numbers."""
    rng = np.random.default_rng(1)
    a = schema.empty(category, n)
    a["sensor_sequence_number"] = np.arange(1, n + 1)
    a["sensor_monotime_nanos"] = 10**13 + np.cumsum(rng.integers(100, 5000, n))
    a["cpu"] = rng.integers(0, 2, n)
    pids = rng.choice([812, 1490, 23771, 23790], n)
    a["process_pid"] = a["process_tid"] = pids
    a["process_id"] = [b"%016x" % (p * 2654435761 % 2**64) for p in pids.tolist()]
    a["uid"] = a["euid"] = a["fsuid"] = a["suid"] = 1000
    a["gid"] = a["egid"] = a["fsgid"] = a["sgid"] = 1000
    if category == "syscall":
        a["kind"] = 1
        a["id"] = rng.choice([0, 1, 3, 257, 110], n)
        for i in range(6):
            a[f"arg{i}"] = rng.integers(0, 2**47, n)
    elif category == "file":
        a["kind"] = 1
        names = [b"/usr/lib/x86_64-linux-gnu/libc.so.6", b"/etc/ld.so.cache", b"/proc/self/status",
                 b"/home/user/project/src/main.py", b"/tmp/build-1234/obj/x.o"]
        a["filename"] = a["path"] = [names[i] for i in rng.integers(0, len(names), n)]
        a["open_flags"] = 0o2000000
        a["ret"] = rng.integers(-2, 40, n)
        a["syscall"] = 257
        a["process_exec_filename"] = b"/usr/bin/python3.11"
    elif category == "process":
        a["kind"] = rng.integers(1, 4, n)
        a["exec_filename"] = b"/usr/bin/git"
        a["exec_command_line"] = [b"git status --porcelain=v2 --branch %d" % i for i in range(n)]
        a["fork_child_pid"] = rng.integers(30000, 40000, n)
        a["parent_pid"] = 812
        a["parent_exec_filename"] = b"/bin/bash"
        a["process_exec_filename"] = b"/usr/bin/git"
    msg = msgpack.unpackb(msgpack.packb(wire.columns(category, a, containers={}), use_bin_type=True),
                          raw=False, strict_map_key=False)
    return category, wire.decode_columns(msg), {}


def format_rate(quick: bool) -> list[dict]:
    n, reps = 2000, (3 if quick else 10)
    out = []
    with open(os.devnull, "w") as text, open(os.devnull, "wb") as raw:
        for category in ("syscall", "file", "process"):
            b = sample_batch(category, n)

            def old(b=b):
                old_write_batch(text, *b, SENSOR_ID)

            def new(b=b):
                raw.write(jsonlines.window_lines([b], SENSOR_ID))
                raw.flush()
            rates = {}
            for name, fn in (("old", old), ("new", new)):
                best = min(_cpu(fn) for _ in range(reps))
                rates[name] = n / best
            size = len(jsonlines.lines(*b, SENSOR_ID)[0])
            out.append({"category": category, "bytes": size, **rates})
    return out


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


# -- live: c8ctl | wc -l on a sustained workload ----------------------------------------
def live(sensor: c.BenchSensor, rate: int, secs: float, who: str, jq: bool = False) -> dict:
    """One run of the paced loop with ``who`` subscribed: new or old c8ctl piped into
    ``grep -c`` (event lines; lost lines are not counted), through ``jq -c .`` first
    with ``jq``; or a numpy batch counter (the sensor's delivery)."""
    w = c.Workload("paced", rate, secs, cpu=c.STORM_CPU)
    spec = {"events": {"syscall": {  # as a user writes it: the kind in the filter
        "filter": f'kind == "ENTER" and id == {c.SYS_GETPPID} and process_tid == {w.pid}'}}}
    produced = int(rate * secs)
    if who == "numpy":
        with c.Counter(sensor.run_dir, spec, "syscall", pid=w.pid) as counter:
            t0 = time.monotonic()
            w.run()
            counter.settle(quiet=1.0)
            took = time.monotonic() - t0
        return {"who": who, "produced": produced, "printed": counter.count, "seconds": took,
                "lost": sum(counter.lost.values()), "cpu_us": counter.cpu / max(counter.count, 1) * 1e6}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
    if who == "new":
        argv = [sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", sensor.run_dir, "subscribe", "--spec", f.name]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--old-c8ctl", sensor.run_dir, f.name]
    # Ctrl-C as a terminal sends it; a shell starts background jobs with SIGINT ignored,
    # and a benchmark run that way must not pass that on to the c8ctl it stops with one
    ctl = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=c.ROOT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pipe = ctl.stdout
    if jq:
        jqp = subprocess.Popen(["jq", "-c", "."], stdin=pipe, stdout=subprocess.PIPE)
        pipe.close()
        pipe = jqp.stdout
    # event lines only: each has its category as a value, no lost line has "syscall"
    count = subprocess.Popen(["grep", "-c", "-F", '"syscall"'], stdin=pipe, stdout=subprocess.PIPE, text=True)
    pipe.close()
    readers = [ctl.pid, jqp.pid] if jq else [ctl.pid]
    try:
        sub_id = json.loads(ctl.stderr.readline())["subscription"]
        t0 = time.monotonic()
        w.run()
        # done when the broker has sent or dropped it all and the readers are idle
        last, since = None, time.monotonic()
        while time.monotonic() - since < 1.0 and time.monotonic() - t0 < secs + 120:
            st = next((s for s in sensor.status()["subscriptions"] if s["subscription"] == sub_id), {})
            now = (st.get("sent"), json.dumps(st.get("lost")), *(c.cpu_seconds(p) for p in readers))
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.1)
        took = since - t0
        cpu = c.cpu_seconds(ctl.pid)
        lost = sum((st.get("lost") or {}).values())
    finally:
        ctl.send_signal(signal.SIGINT)
        ctl.wait(20)
        os.unlink(f.name)
    printed = int(count.communicate(timeout=20)[0].split()[0])
    return {"who": who, "produced": produced, "printed": printed, "seconds": took, "lost": lost,
            "cpu_us": cpu / max(printed, 1) * 1e6}


def run(quick: bool = False) -> dict:
    rows = []
    fmt = format_rate(quick)
    for r in fmt:
        rows.append((f"format {r['category']} lines/s, one process ({r['bytes']} B/line): c8ctl / old",
                     round(r["new"]), round(r["old"]), round(r["new"] / r["old"], 1), "faster"))
    secs = 4.0 if quick else 10.0
    rates = (100_000, 200_000) if quick else (50_000, 100_000, 150_000, 200_000, 300_000)
    results = []
    with c.BenchSensor() as sensor:
        for rate in rates:
            results.append({who: live(sensor, rate, secs, who) for who in ("new", "old", "numpy")})
        jq = {who: live(sensor, rates[0], secs, who, jq=True) for who in ("new", "old")}
    for res in results:
        new, old, npy = res["new"], res["old"], res["numpy"]
        k = new["produced"] // int(secs) // 1000
        rows.append((f"{k}k/s for {secs:.0f} s | grep -c: event lines/s printed, c8ctl / old",
                     round(new["printed"] / new["seconds"]), round(old["printed"] / old["seconds"]),
                     round(new["printed"] / new["seconds"] / (old["printed"] / old["seconds"]), 2), "keeps up"))
        rows.append((f"{k}k/s: share of the calls printed, c8ctl / old (numpy subscriber {npy['printed'] / npy['produced']:.3f})",
                     round(new["printed"] / new["produced"], 3), round(old["printed"] / old["produced"], 3),
                     None, "the rest: lost lines"))
        rows.append((f"{k}k/s: c8ctl CPU us per line, c8ctl / old", round(new["cpu_us"], 2),
                     round(old["cpu_us"], 2), round(new["cpu_us"] / old["cpu_us"], 2) if old["cpu_us"] else None, ""))
    k = jq["new"]["produced"] // int(secs) // 1000
    rows.append((f"{k}k/s | jq -c . | grep -c: share printed, c8ctl / old",
                 round(jq["new"]["printed"] / jq["new"]["produced"], 3),
                 round(jq["old"]["printed"] / jq["old"]["produced"], 3), None, ""))
    notes = [f"{c.NCPU} cores; the loop pinned to CPU {c.STORM_CPU}; lines/s = event lines over the time from the "
             "loop's start to the reader's last line; losses the broker counted for the subscriber (each told "
             "to it as a lost line): " +
             "; ".join(f"{res['new']['produced'] // int(secs) // 1000}k/s c8ctl {res['new']['lost']}, "
                       f"old {res['old']['lost']}, numpy {res['numpy']['lost']}" for res in results),
             "format rows: CPU time of one process formatting 2,000-event batches into /dev/null, best of runs"]
    return {"title": "c8ctl subscribe: JSON lines per second", "rows": rows, "notes": notes,
            "raw": {"format": fmt, "live": results, "jq": jq}}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--old-c8ctl":
        old_c8ctl(sys.argv[2], sys.argv[3])
    else:
        c.standalone(run)
