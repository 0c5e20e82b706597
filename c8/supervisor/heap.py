"""glibc heap settings for the sensor's children: freed batch memory is kept for reuse.

A broker window or a collector drain allocates arrays of megabytes (1,500 file
events are 2.5 MB a copy) and frees them milliseconds later. glibc serves
blocks that large with fresh mmaps, or trims the heap under them when they are
freed, so each new array is faulted in again a page at a time: in the broker
that cost more than filling the rows (bench/bench_files.py's pipeline with
names at the schema's width: 1.8 µs an event with glibc's defaults, 1.25 µs
with these; the same peak RSS).

Raising the mmap and trim thresholds keeps up to ``TRIM`` bytes of freed heap
mapped per process, well inside the sensor's memory limit. One arena: ZeroMQ's
I/O thread allocates every received message (the collectors' batches) and
would otherwise do it in an arena of its own, trimmed apart from the main one
(half of the broker's page faults at 500k opens/s came from there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("c8.heap")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP = 32 << 20  # blocks below this come from the heap (glibc's own dynamic ceiling)
TRIM = 64 << 20  # free memory at the heap's top kept mapped


def keep_freed_memory() -> bool:
    """Set the thresholds in this process; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no mallopt in %s: glibc's heap defaults stay", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([mallopt(M_MMAP_THRESHOLD, MMAP), mallopt(M_TRIM_THRESHOLD, TRIM), mallopt(M_ARENA_MAX, 1)])
