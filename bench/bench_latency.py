"""Latency: kernel timestamp to subscriber receipt at paced syscall rates.

A C program makes getppid calls at a fixed rate (bursts every millisecond on
an absolute clock). The subscriber stamps CLOCK_MONOTONIC when each batch
arrives; an event's latency is that minus its sensor_monotime_nanos (the
kernel's CLOCK_MONOTONIC sample time). Percentiles are over events. The
anchor is the goal (perf record's latency is its wakeup, not comparable to a
subscriber's receipt); the holdback setting is printed with the figures.

Usage: python bench/bench_latency.py [--quick]
"""

from __future__ import annotations

import common as c
import numpy as np

RATES = (1_000, 10_000, 100_000)
GOAL_P99_MS = 50.0


def measure(sensor: c.BenchSensor, rate: int, secs: float) -> dict:
    w = c.Workload("paced", rate, secs, cpu=c.STORM_CPU)
    # as a user writes it: the kind in the filter (the plan then opens sys_enter alone)
    spec = {"events": {"syscall": {
        "filter": f'kind == "ENTER" and id == {c.SYS_GETPPID} and process_tid == {w.pid}'}}}
    late0 = sensor.status()["counts"].get("late", 0)
    with c.Counter(sensor.run_dir, spec, "syscall", pid=w.pid, latency=True) as counter:
        done, _ = w.run()
        counter.settle(quiet=1.0)
    late = sensor.status()["counts"].get("late", 0) - late0
    lat = np.concatenate(counter.latencies) / 1e6 if counter.latencies else np.zeros(1)
    return {"rate": rate, "produced": done, "delivered": counter.count,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()), "batches": counter.batches, "late": late,
            "lost": counter.lost}


def run(quick: bool = False, **overrides) -> dict:
    secs = 3.0 if quick else 5.0
    with c.BenchSensor(**overrides) as sensor:
        results = [measure(sensor, r, secs) for r in RATES]
    rows = []
    for r in results:
        goal = f"p99 < {GOAL_P99_MS:.0f} ms" if r["rate"] == 10_000 else ""
        rows.append((f"{r['rate'] // 1000}k/s p50 / p99 ms (delivered {r['delivered']}/{r['produced']})",
                     round(r["p50"], 1), round(r["p99"], 1),
                     round(r["p99"] / GOAL_P99_MS, 2), goal))
    notes = ["columns: c8 = p50, anchor = p99, ratio = p99 / 50 ms goal; merge_holdback "
             f"{overrides.get('merge_holdback', 'default')}; max ms " +
             ", ".join(f"{r['rate'] // 1000}k: {r['max']:.1f}" for r in results) +
             "; events merged out of order (status late, all sources): " +
             ", ".join(f"{r['rate'] // 1000}k: {r['late']}" for r in results) +
             "; losses told to the subscriber: " +
             ", ".join(f"{r['rate'] // 1000}k: {r['lost'] or 0}" for r in results)]
    return {"title": "Latency: kernel time to subscriber receipt", "rows": rows, "notes": notes,
            "raw": results}


if __name__ == "__main__":
    c.standalone(run)
