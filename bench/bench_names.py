"""Names the eBPF open program could not read, and the bytes its records take.

A program at syscall entry may not fault a page in: a name whose page the
process has not touched yet (a program's first open after exec: the loader's
and libc's own strings) reads as empty there. The kernel faults it in to copy
the name, so the open program reads it again at exit. This benchmark execs
``/bin/cat /etc/hostname`` N times on one CPU with the open family loaded and
counts, for those processes' opens, how many names are empty and the ring
bytes per record: once with the programs as built (names read again at exit,
records cut after the name) and once as the baseline, the programs before
that change (no second read, whole 304-byte records).

Usage: python bench/bench_names.py [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np

from c8.collectors import perf, ring
from c8.collectors.bpf import maps, programs, records
from c8.collectors.bpf.manager import PERF, BpfManager
from c8.collectors.decode import Decoder

CPU = 1 if (os.cpu_count() or 1) > 1 else 0
PAGES = 1024


def _pin() -> None:
    os.sched_setaffinity(0, {CPU})


def measure(execs: int, baseline: bool) -> dict:
    """Load the open family, exec cat ``execs`` times on CPU, count its opens."""
    patches = []
    if baseline:  # the programs as they were: one read at entry, the whole record out
        patches = [mock.patch.object(programs, "_read_name_again", lambda p, dt, done: None),
                   mock.patch.object(programs, "_output", _whole_record(programs._output))]
    with tempfile.TemporaryDirectory(prefix="c8bench-names-") as run_dir:
        for p in patches:
            p.start()
        try:
            mgr = BpfManager(run_dir, output=PERF)  # the ring bytes counted are a perf ring's
            st = mgr.apply({"open": {"filter": {"ignore_tgids": [os.getpid()]}}})
        finally:
            for p in patches:
                p.stop()
        assert st["open"]["loaded"], st
        fd = perf.open_bpf_output(CPU)
        r = ring.Ring(perf.mmap_ring(fd, PAGES, "bench ring"))
        dec = Decoder(256)
        dec.add_bpf_output(perf.event_id(fd))
        perf.enable(fd)
        maps.output_set(mgr.map_fd, CPU, fd)
        pids: set[int] = set()
        arrays, raw_bytes = [], 0
        try:
            for _ in range(execs):
                p = subprocess.Popen(["/bin/cat", "/etc/hostname"], preexec_fn=_pin, stdout=subprocess.DEVNULL)
                p.wait()
                pids.add(p.pid)
                buf = r.read()
                recs = ring.walk(buf)
                raw_bytes += _raw_bytes(buf, recs.samples, pids)
                arrays += [a for src, a in dec.decode(buf, recs.samples) if src == "bpf:open"]
        finally:
            maps.output_clear(mgr.map_fd, CPU)
            r.close()
            os.close(fd)
            mgr.close()
    arr = np.concatenate(arrays) if arrays else np.empty(0, records.OPEN)
    ours = arr[np.isin(arr["pid"], list(pids))]
    empty = int((ours["filename"] == b"").sum())
    return {"opens": len(ours), "empty": empty, "bytes_per_record": raw_bytes / max(1, len(ours))}


def _whole_record(output):
    def whole(p, maps, size):
        return output(p, maps, size[0].itemsize if isinstance(size, tuple) else size)
    return whole


def _raw_bytes(buf: np.ndarray, samples: np.ndarray, pids: set[int]) -> int:
    """Ring bytes (whole perf records) of the samples of ``pids``."""
    if not len(samples):
        return 0
    head = buf[: len(buf) & ~7].view("<u8")[samples >> 3]
    pid = buf.view(np.uint8)[samples[:, None] + perf.SAMPLE_PID_OFF + np.arange(4)].copy().view("<u4")[:, 0]
    return int((head >> np.uint64(48))[np.isin(pid, list(pids))].sum())


def run(quick: bool = False) -> dict:
    execs = 100 if quick else 300
    base = measure(execs, baseline=True)
    now = measure(execs, baseline=False)
    rows = [
        ("opens of fresh processes with an empty name (c8 / before)", now["empty"], base["empty"],
         round(now["empty"] / base["empty"], 3) if base["empty"] else None, "0"),
        ("ring bytes per open record (c8 / before)", round(now["bytes_per_record"]),
         round(base["bytes_per_record"]), round(now["bytes_per_record"] / base["bytes_per_record"], 3), "< 1"),
    ]
    notes = [f"{execs} execs of /bin/cat /etc/hostname on CPU {CPU}: {now['opens']} opens seen "
             f"({base['opens']} in the baseline run)"]
    return {"title": "eBPF names: read again at exit, records cut after the name", "rows": rows,
            "notes": notes, "raw": {"now": now, "before": base}}


if __name__ == "__main__":
    res = run("--quick" in sys.argv)
    for fig, a, b, ratio, goal in res["rows"]:
        print(f"{fig}: {a} / {b}  ratio {ratio}  goal {goal}")
    print(*res["notes"], sep="\n")
