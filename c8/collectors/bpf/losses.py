"""What the eBPF programs lose, counted in the kernel and read by collector cpu0.

The programs of every family share one PERCPU_ARRAY of u64 counters
(:func:`c8.collectors.bpf.maps.create_counters`); entry ``index(family, counter)``
counts, on each CPU, the records of that family that never reached a ring:

- ``output``: the output failed: the CPU has no ring buffer in the output array
  (-ENOENT), its ring buffer is full (-EAGAIN), or (perf output) its
  PERF_EVENT_ARRAY slot is empty or its BPF-output event is not enabled there.
  A full perf ring (-ENOSPC) is not counted: the kernel writes PERF_RECORD_LOST
  into the ring for that record, reported with source ``kernel``;
- ``update``: a syscall's record had nowhere to wait for its exit: the kernel
  gave no task storage for the thread (out of memory, or another program of
  the sensor held this CPU's storage lock), or, on kernels without it, the
  pending HASH was full;
- ``stale``: a sys_exit found a saved record of another syscall of the family,
  whose own exit was never seen: that record is dropped.

The kernel also counts, per program, the runs it skipped because a BPF program
was already running on that CPU (``bpf_prog_info.recursion_misses``): a skipped
program may have lost a record (an enter skipped for a call that its filter
would have dropped loses nothing, so this is an upper bound).

:class:`LossReader` turns both into deltas since its previous read, which the
collector reports as ``lost`` with source ``ebpf:<family>``.
"""

from __future__ import annotations

from c8.collectors.bpf import maps, records
from c8.collectors.bpf import syscalls as sc

COUNTERS = ("output", "update", "stale")
OUTPUT, UPDATE, STALE = range(len(COUNTERS))
FAMILIES = tuple(records.RECORDS)  # this order fixes each family's entries
ENTRIES = len(FAMILIES) * len(COUNTERS)
MISSES = "skipped"  # the name of recursion misses in the totals


def index(family: str, counter: int) -> int:
    """The counter map entry of ``counter`` (OUTPUT, UPDATE, STALE) of ``family``."""
    return FAMILIES.index(family) * len(COUNTERS) + counter


class LossReader:
    """Deltas of the counters map and of the programs' recursion misses."""

    def __init__(self, map_fd: int, n_cpus: int):
        self.map_fd = map_fd
        self.n_cpus = n_cpus
        self._seen = [[0] * n_cpus for _ in range(ENTRIES)]
        self._misses: dict[int, int] = {}       # prog fd -> recursion misses seen
        self._unreported: dict[str, int] = {}   # family -> misses of programs since closed
        self.totals: dict[str, dict[str, int]] = {}  # family -> {counter: n}, for stats

    def _add_total(self, family: str, counter: str, n: int) -> None:
        fam = self.totals.setdefault(family, {})
        fam[counter] = fam.get(counter, 0) + n

    def _misses_delta(self, prog_fd: int) -> int:
        try:
            _name, misses = sc.prog_info(prog_fd)
        except sc.BpfError:
            return 0
        delta = misses - self._misses.get(prog_fd, 0)
        self._misses[prog_fd] = misses
        return max(delta, 0)

    def forget(self, family: str, prog_fds: list[int]) -> None:
        """Programs about to be closed: keep what they missed since the last read."""
        n = sum(self._misses_delta(fd) for fd in prog_fds)
        for fd in prog_fds:
            self._misses.pop(fd, None)
        if n:
            self._unreported[family] = self._unreported.get(family, 0) + n

    def read(self, programs: dict[str, list[int]]) -> list[tuple[int | None, str, str, int]]:
        """``(cpu, family, cause, lost)`` since the previous read, ``cause`` one of
        COUNTERS or MISSES; ``cpu`` is None for skipped runs (the kernel does not
        say on which CPU). ``programs``: the loaded families' program fds.
        """
        out: list[tuple[int | None, str, str, int]] = []
        now = maps.counters_read(self.map_fd, ENTRIES, self.n_cpus)
        for family in FAMILIES:
            for c, counter in enumerate(COUNTERS):
                i = index(family, c)
                for cpu in range(self.n_cpus):
                    d = now[i][cpu] - self._seen[i][cpu]
                    if d > 0:
                        out.append((cpu, family, counter, d))
                        self._add_total(family, counter, d)
                self._seen[i] = now[i]
            skipped = self._unreported.pop(family, 0)
            skipped += sum(self._misses_delta(fd) for fd in programs.get(family, ()))
            if skipped:
                self._add_total(family, MISSES, skipped)
                out.append((None, family, MISSES, skipped))
        return out
