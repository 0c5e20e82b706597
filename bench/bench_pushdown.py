"""Filter pushdown: sensor CPU under an open storm with a selective glob.

The subscription wants file events of one directory (``filename like
"<dir>/*"``) while a C program opens another file as fast as it can. With
pushdown the eBPF open program drops non-matching paths in the kernel; with
``pushdown: false`` every open is collected, shipped and filtered by the
broker. Figures: CPU seconds of the whole sensor tree per run, and the
workload's time; the anchor is the run without pushdown.

Usage: python bench/bench_pushdown.py [--quick]
"""

from __future__ import annotations

import os
import tempfile

import common as c


def storm(pushdown: bool, opens: int, path: str, watched: str) -> dict:
    with c.BenchSensor(pushdown=pushdown) as sensor:
        spec = {"events": {"file": {"filter": f'filename like "{watched}/*"'}}}
        w = c.Workload("mixed", 0, opens, 0, path)
        with c.Counter(sensor.run_dir, spec, "file") as counter:
            cpu0 = sensor.cpu_seconds()
            received0 = sensor.status()["counts"]["received"]
            _, secs = w.run()
            with open(os.path.join(watched, "hit"), "w"):
                pass  # one matching open: shows the subscription works
            counter.settle(quiet=1.0)
            cpu = sensor.cpu_seconds() - cpu0
            received = sensor.status()["counts"]["received"] - received0
    return {"cpu": cpu, "seconds": secs, "delivered": counter.count, "received": received}


def run(quick: bool = False) -> dict:
    opens = 100_000 if quick else 300_000
    with tempfile.TemporaryDirectory(prefix="c8bench-watched-") as watched:
        fd, path = tempfile.mkstemp(prefix="c8bench-open-")
        os.close(fd)
        try:
            on = storm(True, opens, path, watched)
            off = storm(False, opens, path, watched)
        finally:
            os.unlink(path)
    rows = [
        ("sensor CPU s (pushdown / none)", round(on["cpu"], 2), round(off["cpu"], 2),
         round(on["cpu"] / off["cpu"], 3) if off["cpu"] else None, "< 1"),
        ("events reaching the broker (all processes)", on["received"], off["received"], None, ""),
        ("workload seconds", round(on["seconds"], 3), round(off["seconds"], 3),
         round(on["seconds"] / off["seconds"], 3), ""),
        ("delivered (matching)", on["delivered"], off["delivered"], None, ""),
    ]
    notes = [f"{opens} opens of one file; subscription file filter 'filename like \"<dir>/*\"'"]
    return {"title": "Filter pushdown: selective glob under an open storm", "rows": rows, "notes": notes,
            "raw": {"pushdown": on, "none": off}}


if __name__ == "__main__":
    c.standalone(run)
