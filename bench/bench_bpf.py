"""What the eBPF programs cost the monitored process, per call, in each form.

The open family is loaded as the sensor loads it, with a user's filter
(``filename like "/tmp/c8open*"``: every call of the loop passes): records
waiting in task storage and written to BPF ring buffers (this kernel's form),
waiting in a pending HASH (kernels without task storage for tracepoint
programs), and in task storage written through perf output (the form before
ring buffers, and of kernels before 5.8).
An unpaced open+close loop pinned to one CPU runs for ``seconds`` under each,
and bare (no program) as the anchor. The kernel's own accounting
(kernel.bpf_stats_enabled: run_time_ns / run_cnt per program) gives the
programs' time per call; the loop's rate gives what the whole call costs.
A thread reads the ring meanwhile, so outputs succeed as they do in the sensor.

Usage: python bench/bench_bpf.py [--quick]   (root)
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import common as c

from c8.collectors import perf, ring, ringbuf
from c8.collectors.bpf import maps
from c8.collectors.bpf.manager import PERF, RINGBUF, BpfManager

PATH = "/tmp/c8open-bpf-bench"


def _prog_times(pid: int) -> dict[str, tuple[int, int]]:
    """Every loaded eBPF program fd of ``pid``: (run_time_ns, run_cnt), from fdinfo."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out[fd] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out


def _loop(rate: float, seconds: float) -> float:
    """Opens per second of the loop asked for ``rate`` (at least what it can do:
    then it runs unpaced, for ``seconds`` or longer)."""
    done, secs = c.Workload("paced", int(rate), seconds, PATH, cpu=c.STORM_CPU).run()
    return done / secs


def _under(per_task: bool, output: str, rate: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as run_dir, BpfManager(
            run_dir, per_task=per_task, output=output, ring_size=c.RING_PAGES * perf.PAGE_SIZE) as m:
        if output == RINGBUF:
            out = m.output_for(c.STORM_CPU)
            os.close(out.fd)
            fd = out.ring
            rg = ringbuf.RingBuffer(fd, out.ring_size)
        else:
            fd = perf.open_bpf_output(c.STORM_CPU, wakeup_watermark=perf.PAGE_SIZE)
            rg = ring.Ring(perf.mmap_ring(fd, c.RING_PAGES))
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                rg.read()
                time.sleep(0.002)

        reader = threading.Thread(target=drain, daemon=True)
        try:
            if output == RINGBUF:
                maps.output_set(m.map_fd, c.STORM_CPU, fd)
            else:
                perf.enable(fd)
                maps.output_set(m.map_fd, c.STORM_CPU, fd)
            st = m.apply({"open": {"filter": {"prefixes": ["/tmp/c8open"], "ignore_tgids": [os.getpid()]}}})
            if not st["open"]["loaded"]:
                raise RuntimeError(st["open"]["error"])
            reader.start()
            before = _prog_times(os.getpid())
            rate = _loop(rate, seconds)
            after = _prog_times(os.getpid())
        finally:
            stop.set()
            if reader.is_alive():
                reader.join()
            rg.close()
            if output == PERF:
                os.close(fd)  # (a RingBuffer closes its own)
    ns = sum(t - before.get(k, (0, 0))[0] for k, (t, _n) in after.items())
    calls = max(n - before.get(k, (0, 0))[1] for k, (_t, n) in after.items())  # the enter program's runs
    return {"rate": rate, "ns_per_call": ns / calls if calls else 0.0}


def run(quick: bool = False) -> dict:
    seconds = 2.0 if quick else 5.0
    with open(PATH, "w"):
        pass
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_was = f.read().strip()
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        bare = _loop(2.0 * _loop(5_000_000, 0.2), seconds)  # the loop's own pace, then as many calls
        task = _under(True, RINGBUF, bare, seconds)
        hashed = _under(False, RINGBUF, bare, seconds)
        perf_out = _under(True, PERF, bare, seconds)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_was)
        os.unlink(PATH)
    rows = [
        ("eBPF open programs, ns a call (ring buffer / perf output)", round(task["ns_per_call"]),
         round(perf_out["ns_per_call"]), c.fmt_ratio(task["ns_per_call"], perf_out["ns_per_call"]), "< 1"),
        ("open+close loop, calls/s (ring buffer / perf output)", round(task["rate"]), round(perf_out["rate"]),
         c.fmt_ratio(task["rate"], perf_out["rate"]), ">= 1"),
        ("eBPF open programs, ns a call (task storage / HASH)", round(task["ns_per_call"]),
         round(hashed["ns_per_call"]), c.fmt_ratio(task["ns_per_call"], hashed["ns_per_call"]), "< 1"),
        ("open+close loop, calls/s (task storage / HASH)", round(task["rate"]), round(hashed["rate"]),
         c.fmt_ratio(task["rate"], hashed["rate"]), ">= 1"),
        ("open+close loop, calls/s (task storage / no program)", round(task["rate"]), round(bare),
         c.fmt_ratio(task["rate"], bare), ""),
    ]
    notes = [f"enter+exit programs of openat, filter filename like /tmp/c8open* (every call passes); "
             f"loop unpaced on CPU {c.STORM_CPU} for {seconds:.0f} s per form; a thread reads the "
             f"{c.RING_PAGES}-page ring; times from kernel.bpf_stats_enabled; task storage "
             f"and ring buffers unless named"]
    return {"title": "eBPF programs: cost a call, ring buffer vs perf output, task storage vs HASH",
            "rows": rows, "notes": notes}


if __name__ == "__main__":
    c.standalone(run)
