"""Storm: a getppid loop on one CPU through the full sensor, against perf record.

The loop (fixed count, so both runs produce the same events) waits at a gate
until the subscription or perf record is up, filtered on its own pid and the
syscall id (the same kernel filter for both). c8: a private sensor with
ring_pages = perf's -m, a subscriber counting with Subscription.batches().
perf: ``perf record -a -m <pages> -e raw_syscalls:sys_enter --filter ...``.

Usage: python bench/bench_storm.py [--quick]
"""

from __future__ import annotations

import common as c


def storm_c8(n: int, pages: int = c.RING_PAGES) -> dict:
    """Produced, delivered, lost and CPU of one storm through a private sensor."""
    with c.BenchSensor(ring_pages=pages) as sensor:
        w = c.Workload("storm", n, cpu=c.STORM_CPU)
        spec = {"events": {"syscall": {  # as a user writes it: the kind in the filter
            "filter": f'kind == "ENTER" and id == {c.SYS_GETPPID} and process_tid == {w.pid}'}}}
        with c.Counter(sensor.run_dir, spec, "syscall", pid=w.pid) as counter:
            cpu0 = sensor.cpu_seconds()
            produced, secs = w.run()
            delivered = counter.settle(quiet=2.0)
            cpu = sensor.cpu_seconds() - cpu0
            status = sensor.status()
            mem = sensor.memory()
        lost = c.lost_counts(status)
        lost.update({f"subscriber_{k}": v for k, v in counter.lost.items()})
    return {"produced": produced, "seconds": secs, "delivered": delivered, "lost": lost,
            "sensor_cpu": cpu, "subscriber_cpu": counter.cpu, "memory": mem}


def storm_perf(n: int, pages: int = c.RING_PAGES) -> dict:
    w = c.Workload("storm", n, cpu=c.STORM_CPU)
    with c.PerfRecord(["raw_syscalls:sys_enter"], pages,
                      flt=f"id == {c.SYS_GETPPID} && common_pid == {w.pid}") as pr:
        produced, secs = w.run()
    st = pr.stats()
    pr.cleanup()
    return {"produced": produced, "seconds": secs, "captured": st["samples"], "lost": st["lost"],
            "perf_cpu": pr.cpu}


def run(quick: bool = False) -> dict:
    n = 2_000_000 if quick else 5_000_000
    c8 = storm_c8(n)
    pf = storm_perf(n)
    # the broker's own counts (kernel, collector) plus what it dropped for this
    # subscriber; the per-CPU and subscriber-side echoes of those are not added again
    lost_total = sum(v for k, v in c8["lost"].items() if k in ("kernel", "collector", "sub_subscriber"))
    rows = [
        ("events produced (loop count)", c8["produced"], pf["produced"], None, ""),
        ("loop rate (M syscalls/s)", round(c8["produced"] / c8["seconds"] / 1e6, 3),
         round(pf["produced"] / pf["seconds"] / 1e6, 3),
         round((c8["produced"] / c8["seconds"]) / (pf["produced"] / pf["seconds"]), 3), ""),
        ("delivered (c8) / captured (perf)", c8["delivered"], pf["captured"],
         round(c8["delivered"] / pf["captured"], 4) if pf["captured"] else None, ">= 0.95"),
        ("lost", lost_total, pf["lost"], None, ""),
        ("tracer CPU s (sensor tree / perf)", round(c8["sensor_cpu"], 2), round(pf["perf_cpu"], 2),
         round(c8["sensor_cpu"] / pf["perf_cpu"], 2) if pf["perf_cpu"] else None, ""),
    ]
    notes = [f"ring {c.RING_PAGES} pages per CPU for both; loop pinned to CPU {c.STORM_CPU}; "
             f"c8 losses by source: {c8['lost'] or 'none'}; subscriber thread CPU {c8['subscriber_cpu']:.2f}s"]
    return {"title": "Storm: getppid loop, raw_syscalls:sys_enter", "rows": rows, "notes": notes,
            "raw": {"c8": c8, "perf": pf}}


if __name__ == "__main__":
    c.standalone(run)
