"""The sensor's eBPF maps: creation helpers and typed accessors.

- The programs' output, one per sensor, sized to the possible CPUs: an
  ARRAY_OF_MAPS (cpu -> BPF ring buffer, Linux 5.8) where each collector stores
  its CPU's ring (:func:`output_set`), or on older kernels a
  PERF_EVENT_ARRAY (cpu -> BPF-output perf fd) where it stores its perf ring's
  event (:func:`output_set`).
- TASK_STORAGE: each thread's record of the syscall it is in, between its
  enter and its exit (kernels with task storage for tracepoint programs: 6.x).
  Elsewhere a HASH keyed by pid_tgid holds them, built in a PERCPU_ARRAY of one
  entry (scratch: larger than the 512-byte stack).
- ARRAY of one entry: a family's filter configuration, written by the manager.
- HASH u32 -> u8: a set of tgids whose activity is ignored.
- PERCPU_ARRAY u32 -> u64, one per sensor: the programs' failure counters
  (:mod:`c8.collectors.bpf.losses`).
"""

from __future__ import annotations

import ctypes
import os
import struct

from c8.collectors.bpf import syscalls as sc
from c8.protocol import cpus

PENDING_ENTRIES = 16384  # syscalls in flight at once, all threads
IGNORE_ENTRIES = 1024


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Number of possible CPUs (highest id + 1), from a list such as ``0-3,5``."""
    try:
        with open(path) as f:
            return max(cpus.parse_list(f.read()), default=0) + 1
    except OSError:
        return os.cpu_count() or 1


def create_perf_array(n_cpus: int | None = None, name: str = "c8_events") -> int:
    """A PERF_EVENT_ARRAY with one slot per possible CPU."""
    n = n_cpus or possible_cpus()
    return sc.map_create(sc.MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, n, name)


def output_set(map_fd: int, cpu: int, fd: int) -> None:
    """Make ``fd`` the output of ``cpu`` in an output map: a ring buffer in the ring
    array, or a PERF_COUNT_SW_BPF_OUTPUT event on ``cpu`` in a PERF_EVENT_ARRAY."""
    sc.map_update(map_fd, struct.pack("<I", cpu), struct.pack("<I", fd))


def output_clear(map_fd: int, cpu: int) -> bool:
    """Remove ``cpu``'s output; the programs' records on that CPU then fail their
    output, counted (False: there was none)."""
    return sc.map_delete(map_fd, struct.pack("<I", cpu))


def create_ringbuf(size: int, name: str = "c8_ring") -> int:
    """A BPF ring buffer of ``size`` bytes (a power of two, at least a page)."""
    return sc.map_create(sc.MAP_TYPE_RINGBUF, 0, 0, size, name)


def create_ring_array(ring_size: int, n_cpus: int | None = None, name: str = "c8_rings") -> int:
    """An ARRAY_OF_MAPS cpu -> BPF ring buffer of ``ring_size`` bytes (every ring
    stored in it must have that size). Raises BpfError where the kernel has no
    BPF ring buffers (before 5.8)."""
    template = create_ringbuf(ring_size, "c8_ring_tmpl")
    try:
        return sc.map_create(sc.MAP_TYPE_ARRAY_OF_MAPS, 4, 4, n_cpus or possible_cpus(), name,
                             inner_map_fd=template)
    finally:
        os.close(template)  # the outer map keeps what it needs of it


def create_pending(value_size: int, name: str) -> int:
    """HASH pid_tgid (u64) -> record: a syscall between enter and exit."""
    return sc.map_create(sc.MAP_TYPE_HASH, 8, value_size, PENDING_ENTRIES, name)


def create_task_records(value_size: int, name: str) -> int:
    """TASK_STORAGE of one ``value_size`` record per thread (created by its first
    enter, freed with the thread). The kernel wants the key and value types in BTF."""
    btf = sc.btf_load(_storage_btf(value_size))
    try:
        return sc.map_create(sc.MAP_TYPE_TASK_STORAGE, 4, value_size, 0, name, flags=sc.F_NO_PREALLOC,
                             btf=(btf, 1, 3))
    finally:
        os.close(btf)  # the map keeps its own reference


def _storage_btf(value_size: int) -> bytes:
    """BTF of three types: 1 ``int`` (the key: a pidfd from user space), 2 ``char``,
    3 ``char[value_size]`` (the record). include/uapi/linux/btf.h."""
    strings = b"\0int\0char\0"
    kind_int, kind_array, signed = 1, 3, 1
    types = (struct.pack("<IIII", 1, kind_int << 24, 4, (signed << 24) | 32)
             + struct.pack("<IIII", 5, kind_int << 24, 1, 8)
             + struct.pack("<IIIIII", 0, kind_array << 24, 0, 2, 1, value_size))
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def create_scratch(value_size: int, name: str) -> int:
    """PERCPU_ARRAY of one ``value_size`` buffer."""
    return sc.map_create(sc.MAP_TYPE_PERCPU_ARRAY, 4, value_size, 1, name)


def create_config(value_size: int, name: str) -> int:
    """ARRAY of one filter configuration (zero: pass everything)."""
    return sc.map_create(sc.MAP_TYPE_ARRAY, 4, value_size, 1, name)


def create_tgid_set(name: str) -> int:
    """HASH u32 tgid -> u8: membership only."""
    return sc.map_create(sc.MAP_TYPE_HASH, 4, 1, IGNORE_ENTRIES, name)


def create_counters(entries: int, name: str = "c8_stats") -> int:
    """PERCPU_ARRAY of ``entries`` u64 counters (each CPU counts its own)."""
    return sc.map_create(sc.MAP_TYPE_PERCPU_ARRAY, 4, 8, entries, name)


def counters_read(map_fd: int, entries: int, n_cpus: int) -> list[list[int]]:
    """Every counter of a :func:`create_counters` map: ``[entry][cpu]``."""
    out = []
    for i in range(entries):
        raw = sc.map_lookup(map_fd, struct.pack("<I", i), 8 * n_cpus)
        out.append(list(struct.unpack(f"<{n_cpus}Q", raw)) if raw else [0] * n_cpus)
    return out


def config_write(map_fd: int, value: bytes) -> None:
    sc.map_update(map_fd, struct.pack("<I", 0), value)


def tgid_set_replace(map_fd: int, old: set[int], new: set[int]) -> None:
    """Make the set hold exactly ``new`` given that it holds ``old``."""
    for tgid in old - new:
        sc.map_delete(map_fd, struct.pack("<I", tgid))
    for tgid in new - old:
        sc.map_update(map_fd, struct.pack("<I", tgid), b"\x01")


def pending_count(map_fd: int) -> int:
    """Entries in a pending map (walks the keys; for tests and stats)."""
    n = 0
    key = None
    while True:
        k = ctypes.create_string_buffer(key or b"\0" * 8, 8)
        nk = ctypes.create_string_buffer(8)
        attr = ctypes.create_string_buffer(sc.ATTR_SIZE)
        struct.pack_into("<IIQQ", attr, 0, map_fd, 0,
                         ctypes.addressof(k) if key is not None else 0, ctypes.addressof(nk))
        try:
            sc.bpf(sc.MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
        except sc.BpfError:
            return n
        n += 1
        key = nk.raw
