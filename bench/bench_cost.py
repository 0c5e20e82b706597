"""Cost: the sensor tree's CPU and memory, idle and per million events.

Idle: a private sensor with no subscription, CPU (utime+stime summed over the
supervisor and every descendant, /proc/<pid>/stat) over a window, and RSS
(VmRSS) per process and summed. Memory per CPU: PSS while collecting, with a
collector process per CPU and with every CPU in one (max_collectors 1), and
from the two the tree on a 64-CPU host. Loaded: the storm of bench_storm (full
sensor, raw syscall subscription): tree CPU seconds and peak RSS (VmHWM,
per process and summed) per million events delivered; perf record's CPU per
million captured on the same storm is the anchor.

Usage: python bench/bench_cost.py [--quick]
"""

from __future__ import annotations

import time

import common as c

MB = 1 << 20


def idle(window: float, **overrides) -> dict:
    """CPU and memory with no subscription, then memory while collecting process
    and file events (every collector holds its ring and has drained real events)."""
    with c.BenchSensor(**overrides) as sensor:
        time.sleep(3.0)  # start-up work (imports, scans) is not idling
        cpu0, t0 = sensor.cpu_seconds(), time.monotonic()
        time.sleep(window)
        cpu, wall = sensor.cpu_seconds() - cpu0, time.monotonic() - t0
        mem = sensor.memory()
        with c.Counter(sensor.run_dir, {"events": {"process": {}, "file": {}}}, None):
            time.sleep(5.0)
            working = sensor.memory()
    return {"cpu_pct": 100 * cpu / wall, "window": wall, "memory": mem, "working": working}


def per_collector(apart: dict, together: dict, cpus: int = 64, processes: int = 8) -> dict:
    """PSS, bytes, from the same workload read two ways on this host: a process per
    CPU (``apart``) and every CPU in one process (``together``, max_collectors 1).
    ``process``: one more collector process; ``cpu``: one more CPU in a process;
    ``host``: the tree on a ``cpus``-CPU host with ``processes`` collector processes
    (the default max_collectors), and ``host_apart`` with one process per CPU."""
    def name(key: str) -> str:  # keys are "name[pid]"
        return key.rsplit("[", 1)[0]

    def col(memory: dict, wanted: str) -> float:
        return sum(m["pss"] for k, m in memory.items() if name(k) == wanted)
    names = [name(k) for k in apart if k.startswith("c8-collector cpu")]
    first = "c8-collector cpu0"
    others = [col(apart, k) for k in names if k != first]
    process = sum(others) / len(others) if others else 0.0
    grouped = next((m["pss"] for k, m in together.items() if k.startswith("c8-collector cpu")), 0.0)
    cpu = (grouped - col(apart, first)) / max(1, len(names) - 1)
    base = sum(m["pss"] for k, m in apart.items() if name(k) not in names) + col(apart, first)
    return {"process": process, "cpu": cpu,
            "host": base + (cpus - 1) * cpu + (processes - 1) * max(0.0, process - cpu),
            "host_apart": base + (cpus - 1) * process}


def run(quick: bool = False, storm: dict | None = None) -> dict:
    if storm is None:
        import bench_storm
        storm = {"c8": bench_storm.storm_c8(2_000_000 if quick else 5_000_000),
                 "perf": bench_storm.storm_perf(2_000_000 if quick else 5_000_000)}
    idl = idle(10.0 if quick else 30.0)
    s8, sp = storm["c8"], storm["perf"]
    per_m8 = s8["sensor_cpu"] / (s8["delivered"] / 1e6)
    per_mp = sp["perf_cpu"] / (sp["captured"] / 1e6)
    mem = per_collector(idl["working"], idle(1.0, max_collectors=1)["working"])
    rss_idle = sum(m["rss"] for m in idl["memory"].values())
    rss_max = max(m["rss"] for m in idl["memory"].values())
    hwm = sum(m["hwm"] for m in s8["memory"].values())
    hwm_max = max(m["hwm"] for m in s8["memory"].values())
    rows = [
        ("idle CPU, % of one core (no subscription)", round(idl["cpu_pct"], 2), 1.0,
         round(idl["cpu_pct"] / 1.0, 2), "< 1%"),
        ("idle RSS MB, tree sum / largest process", round(rss_idle / MB, 1), round(rss_max / MB, 1),
         round(rss_idle / (150 * MB), 2), "< 150 MB (sum)"),
        ("CPU s per M events (c8 tree / perf record)", round(per_m8, 2), round(per_mp, 2),
         round(per_m8 / per_mp, 2), ""),
        ("PSS MB per additional collector process / per CPU it reads (collecting)",
         round(mem["process"] / MB, 1), round(mem["cpu"] / MB, 1), None, ""),
        ("PSS MB of the tree on a 64-CPU host: 8 collectors (default) / one per CPU",
         round(mem["host"] / MB), round(mem["host_apart"] / MB), round(mem["host"] / mem["host_apart"], 2), ""),
        ("peak RSS MB in storm, tree sum / largest", round(hwm / MB, 1), round(hwm_max / MB, 1), None, ""),
        ("peak RSS MB per M events delivered (sum)", round(hwm / MB / (s8["delivered"] / 1e6), 1), None,
         None, ""),
    ]
    notes = ["idle RSS per process: " + ", ".join(f"{k} {v['rss'] / MB:.0f}" for k, v in idl["memory"].items()),
             "PSS per process while collecting: " + ", ".join(f"{k} {v['pss'] / MB:.0f}"
                                                            for k, v in idl["working"].items()),
             f"idle window {idl['window']:.0f}s; idle anchor is the 1% goal, RSS ratio is sum / 150 MB"]
    return {"title": "Cost: CPU and memory of the sensor tree", "rows": rows, "notes": notes,
            "raw": {"idle": idl}}


if __name__ == "__main__":
    c.standalone(run)
