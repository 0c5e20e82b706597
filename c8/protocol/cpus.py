"""Which CPUs exist, and which collector process reads which of them.

One collector process per CPU costs its interpreter's memory once per CPU
(about 14 MB of PSS each, measured: 0.9 GB on a 64-CPU host). At most
``max_collectors`` processes run: on a larger host each reads the rings of a
contiguous run of CPUs, shared out evenly. The process holding cpu0 owns the
eBPF programs and probes. A collector's name lists its CPUs in the kernel's
own form (``c8-collector cpu3``, ``c8-collector cpu0-7``), so the name alone
tells which CPUs it answers for (:func:`of_collector`).
"""

from __future__ import annotations

import os

COLLECTOR_PREFIX = "c8-collector cpu"


def parse_list(text: str) -> list[int]:
    """CPU numbers of a kernel CPU list ('0-3,5')."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def list_text(cpus: list[int]) -> str:
    """A kernel CPU list of ``cpus`` (sorted): runs as 'a-b', others by commas."""
    parts: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus) + [None]:
        if run and (cpu is None or cpu != run[-1] + 1):
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if cpu is not None:
            run.append(cpu)
    return ",".join(parts)


def online_cpus(text: str | None = None) -> list[int]:
    """CPU numbers from /sys/devices/system/cpu/online ('0-3,5')."""
    if text is None:
        try:
            with open("/sys/devices/system/cpu/online") as f:
                text = f.read()
        except OSError:
            return list(range(os.cpu_count() or 1))
    return parse_list(text)


def groups(cpus: list[int], max_collectors: int) -> list[list[int]]:
    """``cpus`` in at most ``max_collectors`` contiguous groups of even size
    (sizes differ by one at most; the larger ones first, cpu0 in the first)."""
    cpus = sorted(cpus)
    n = min(len(cpus), max(1, max_collectors))
    size, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(cpus[start:end])
        start = end
    return out


def collector_name(group: list[int]) -> str:
    """The process name of the collector of ``group``."""
    return COLLECTOR_PREFIX + list_text(group)


def of_collector(name: str) -> list[int] | None:
    """The CPUs a collector's name says it reads; None for another child's name."""
    if not name.startswith(COLLECTOR_PREFIX):
        return None
    try:
        return parse_list(name[len(COLLECTOR_PREFIX):])
    except ValueError:
        return None
