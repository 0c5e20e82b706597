"""Overhead: a fixed workload timed bare, under c8, and under perf record.

The workload (one C program): N fork+exec of /bin/true, M open/close of a
file, K loopback TCP connect+accept. c8 is subscribed to process, file and
network events (a subscriber counts them); perf record -a -m <pages> traces
the tracepoints that see the same operations. Each configuration runs
``reps`` times, interleaved; medians are compared.

Usage: python bench/bench_overhead.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile

import common as c

PERF_EVENTS = [
    "sched:sched_process_fork", "sched:sched_process_exec", "sched:sched_process_exit",
    "syscalls:sys_enter_openat", "syscalls:sys_exit_openat",
    "syscalls:sys_enter_connect", "syscalls:sys_exit_connect",
    "syscalls:sys_enter_accept4", "syscalls:sys_exit_accept4",
    "syscalls:sys_enter_accept", "syscalls:sys_exit_accept",
]
SPEC = {"events": {"process": {}, "file": {}, "network": {}}}


def workload(args: tuple, path: str) -> float:
    w = c.Workload("mixed", *args, path)
    return w.run()[1]


def run(quick: bool = False) -> dict:
    args = (200, 20_000, 2_000) if quick else (400, 40_000, 4_000)
    reps = 3 if quick else 5
    fd, path = tempfile.mkstemp(prefix="c8bench-open-")
    os.close(fd)
    bare, with_c8, with_perf = [], [], []
    cpu_c8: list[float] = []
    cpu_perf: list[float] = []
    events_c8 = events_perf = 0
    try:
        workload((5, 100, 10), path)  # warm caches
        # One sensor for all runs: with no subscription it holds no perf event
        # (idle), so bare, c8 and perf runs interleave against the same noise.
        with c.BenchSensor() as sensor:
            for _ in range(reps):
                bare.append(workload(args, path))
                w = c.Workload("mixed", *args, path)
                with c.Counter(sensor.run_dir, SPEC, None, pid=w.pid) as counter:
                    cpu0 = sensor.cpu_seconds()
                    with_c8.append(w.run()[1])
                    cpu_c8.append(sensor.cpu_seconds() - cpu0)
                    events_c8 += counter.settle(quiet=1.0)
                # perf record next: c8's programs and events must be gone, or
                # the anchor runs with c8 still collecting
                sensor.wait_idle()
                w = c.Workload("mixed", *args, path)
                with c.PerfRecord(PERF_EVENTS) as pr:
                    with_perf.append(w.run()[1])
                cpu_perf.append(pr.cpu)
                events_perf += pr.stats()["samples"]
                pr.cleanup()
    finally:
        os.unlink(path)
    b, s8, sp = (statistics.median(x) for x in (bare, with_c8, with_perf))
    mb, m8, mp = (min(x) for x in (bare, with_c8, with_perf))
    slow8, slowp = s8 / b, sp / b
    rows = [
        ("workload seconds (median)", round(s8, 3), round(sp, 3), round(s8 / sp, 3), ""),
        ("slowdown vs bare (c8 / perf record)", round(slow8, 3), round(slowp, 3), round(slow8 / slowp, 3),
         "<= 1.2"),
        ("slowdown, best runs (c8 / perf record)", round(m8 / mb, 3), round(mp / mb, 3),
         round((m8 / mb) / (mp / mb), 3), ""),
        ("tracer CPU s during the workload (sensor tree / perf)", round(statistics.median(cpu_c8), 2),
         round(statistics.median(cpu_perf), 2), None, ""),
        ("events per run (c8: workload pid; perf: all)", events_c8 // reps, events_perf // reps, None, ""),
    ]
    notes = [f"bare median {b:.3f}s; workload {args[0]} execs, {args[1]} opens, {args[2]} connects, "
             f"{reps} runs each; c8 spec {SPEC}; perf events {len(PERF_EVENTS)} tracepoints"]
    return {"title": "Overhead: execs + opens + connects", "rows": rows, "notes": notes,
            "raw": {"bare": bare, "c8": with_c8, "perf": with_perf}}


if __name__ == "__main__":
    c.standalone(run)
