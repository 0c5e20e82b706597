"""Collector decode throughput against the kernel's event rate (root).

1. Fill a real 1024-page ring on one CPU with raw_syscalls:sys_enter and
   sched:sched_switch/sched_process_exec samples from a syscall storm, read it
   once, save the bytes.
2. Time ring.walk + Decoder.decode on that saved content, repeated (and the
   per-record reference walker, for scale).
3. Time how fast this kernel produces raw_syscalls:sys_enter events on a
   getppid loop: ``perf stat -e raw_syscalls:sys_enter -a -- <loop>``.

Usage: python bench/bench_decode.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from c8.collectors import decode, perf, ring, tracefs  # noqa: E402

CPU = 1 if (os.cpu_count() or 1) > 1 else 0
PAGES = 1024
LOOP_C = r"""
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    return 0;
}
"""


def build_loop(tmp: str) -> str:
    src, exe = os.path.join(tmp, "loop.c"), os.path.join(tmp, "loop")
    with open(src, "w") as f:
        f.write(LOOP_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def pinned(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["taskset", "-c", str(CPU), *argv], capture_output=True, text=True, check=True)


def fill_ring(loop: str) -> tuple[np.ndarray, decode.Decoder, float]:
    """Bytes of a ring filled by a storm, the decoder for them, the sampling rate."""
    names = ["raw_syscalls:sys_enter", "sched:sched_switch", "sched:sched_process_exec"]
    dec = decode.Decoder()
    fds = []
    for name in names:
        fmt = tracefs.read_format(name)
        fd = perf.open_tracepoint(fmt.id, CPU, name, wakeup_watermark=1 << 30)
        if fds:
            perf.set_output(fd, fds[0], name)
        else:
            rg = ring.Ring(perf.mmap_ring(fd, PAGES))
        dec.add_tracepoint(perf.event_id(fd, name), fmt)
        fds.append(fd)
    n = int(rg.size * 0.9 // 112)  # sys_enter records are 112 bytes: leave room, lose none
    for fd in fds:
        perf.enable(fd)
    t0 = time.perf_counter()
    pinned([loop, str(n)])
    dt = time.perf_counter() - t0
    for fd in fds:
        perf.disable(fd)
    content = rg.read().copy()
    rg.close()
    for fd in fds:
        os.close(fd)
    return content, dec, n / dt


def time_decode(content: np.ndarray, dec: decode.Decoder, walker, reps: int) -> tuple[float, int]:
    best = float("inf")
    n = 0
    linear = np.empty_like(content)
    for _ in range(reps):
        t0 = time.perf_counter()
        linear[:] = content  # the copy out of the ring that Ring.read does
        recs = walker(linear)
        out = dec.decode(linear, recs.samples)
        best = min(best, time.perf_counter() - t0)
        n = sum(len(a) for _, a in out)
    return best, n


def kernel_rate(loop: str, n: int = 5_000_000) -> float:
    """raw_syscalls:sys_enter events/s that perf stat counts over the pinned loop."""
    t0 = time.perf_counter()
    r = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-a", "--",
                        "taskset", "-c", str(CPU), loop, str(n)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0  # includes perf's start-up: a slight underestimate
    count = int(re.search(r"^(\d+),", r.stderr, re.M).group(1))
    return count / wall


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_decode needs root (perf_event_open on tracepoints)")
    with tempfile.TemporaryDirectory() as tmp:
        loop = build_loop(tmp)
        content, dec, sample_rate = fill_ring(loop)
        recs = ring.walk(content)
        by_src = {s: len(a) for s, a in dec.decode(content, recs.samples)}
        print(f"ring content: {len(content)} bytes, {recs.n} samples, lost {recs.lost}: {by_src}")
        t_fast, n = time_decode(content, dec, ring.walk, 20)
        t_slow, _ = time_decode(content, dec, ring.walk_slow, 2)
        t_walk = min(_timeit(lambda: ring.walk(content)) for _ in range(20))
        decode_rate = n / t_fast
        prod = kernel_rate(loop)
    print(f"walk only (numpy)          : {recs.n / t_walk / 1e6:8.2f} M records/s")
    print(f"read+walk+decode (numpy)   : {decode_rate / 1e6:8.2f} M events/s")
    print(f"read+walk+decode (per-rec) : {n / t_slow / 1e6:8.2f} M events/s  (reference walker)")
    print(f"kernel sampling into ring  : {sample_rate / 1e6:8.2f} M samples/s  (storm while filling)")
    print(f"kernel produces (perf stat): {prod / 1e6:8.2f} M raw_syscalls:sys_enter/s")
    print(f"decode / kernel production : {decode_rate / prod:8.1f} x")
    print(f"decode / kernel sampling   : {decode_rate / sample_rate:8.1f} x   "
          "(target > 5 M/s decode; anchor: perf record keeps up at ~1 M samples/s per CPU)")


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
