"""The `capsule8-sensor` cgroup: CPU and memory limits for the sensor's children.

Each controller is looked up where the host has it: a cgroup v1 hierarchy of
its own (/sys/fs/cgroup/cpu, /sys/fs/cgroup/memory, ...) or the v2 unified
hierarchy (enabled in the parent's cgroup.subtree_control). The CPU quota is
cpu_limit percent of all CPUs over a period of one second.

    cg = SensorCgroup(cpu_limit=5, memory_limit=1 << 30)
    cg.create(); cg.add(pid); cg.metrics(); cg.remove()
"""

from __future__ import annotations

import errno
import logging
import os
import time

log = logging.getLogger("c8.supervisor.cgroups")

NAME = "capsule8-sensor"
PERIOD_US = 1_000_000  # one second, as Capsule8 did


class CgroupError(Exception):
    """A cgroup operation failed; the message names the file."""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def _keyed(text: str) -> dict[str, int]:
    """'name value' lines -> {name: int}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def find_controllers(mounts_text: str | None = None) -> dict[str, tuple[int, str]]:
    """{controller: (version, mount point)} for cpu, cpuacct and memory.

    A controller bound to a v1 hierarchy is unavailable in v2, so v1 mounts
    win; a v2 mount serves whatever its cgroup.controllers lists.
    """
    if mounts_text is None:
        mounts_text = _read("/proc/self/mounts")
    found: dict[str, tuple[int, str]] = {}
    v2_mounts = []
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        fstype, mnt, opts = parts[2], parts[1], parts[3].split(",")
        if fstype == "cgroup":
            for c in ("cpu", "cpuacct", "memory"):
                if c in opts and c not in found:
                    found[c] = (1, mnt)
        elif fstype == "cgroup2":
            v2_mounts.append(mnt)
    for mnt in v2_mounts:
        try:
            available = _read(os.path.join(mnt, "cgroup.controllers")).split()
        except OSError:
            continue
        for c in ("cpu", "memory"):
            if c in available and c not in found:
                found[c] = (2, mnt)
        # v2's cpu controller does the accounting (cpu.stat usage_usec).
        if "cpuacct" not in found and found.get("cpu", (0, ""))[0] == 2:
            found["cpuacct"] = found["cpu"]
    return found


class SensorCgroup:
    """The sensor's cgroup in every hierarchy that carries cpu, cpuacct or memory."""

    def __init__(self, cpu_limit: int, memory_limit: int, name: str = NAME,
                 ncpu: int | None = None, controllers: dict[str, tuple[int, str]] | None = None):
        self.cpu_limit = cpu_limit
        self.memory_limit = memory_limit
        self.name = name
        self.ncpu = ncpu or os.cpu_count() or 1
        self.controllers = find_controllers() if controllers is None else controllers
        missing = {"cpu", "memory"} - set(self.controllers)
        if missing:
            raise CgroupError("this host has no cgroup controller for " + ", ".join(sorted(missing)))

    # -- paths
    def dir(self, controller: str) -> str:
        """The cgroup's directory in the hierarchy that has `controller`."""
        version, mnt = self.controllers[controller]
        return os.path.join(mnt, self.name)

    def dirs(self) -> list[str]:
        """Every distinct directory of the cgroup (one per hierarchy)."""
        return sorted({self.dir(c) for c in self.controllers})

    @property
    def cpu_quota_us(self) -> int:
        """cpu_limit percent of every CPU per one-second period; -1 means no limit."""
        if self.cpu_limit == 0:
            return -1
        return self.cpu_limit * self.ncpu * PERIOD_US // 100

    # -- life cycle
    def create(self) -> None:
        """Make the directories and write the limits."""
        for c, (version, mnt) in self.controllers.items():
            if version == 2 and c in ("cpu", "memory"):
                # Controllers must be enabled in the parent for the child to have them.
                ctl = os.path.join(mnt, "cgroup.subtree_control")
                if c not in _read(ctl).split():
                    _write(ctl, f"+{c}")
        for d in self.dirs():
            os.makedirs(d, exist_ok=True)
        self._limit_cpu()
        self._limit_memory()
        log.info("cgroup %s: cpu quota %s us per %s us (%d%% of %d CPUs), memory limit %s",
                 self.name, self.cpu_quota_us, PERIOD_US, self.cpu_limit, self.ncpu,
                 self.memory_limit or "none")

    def _limit_cpu(self) -> None:
        version, _ = self.controllers["cpu"]
        d = self.dir("cpu")
        quota = self.cpu_quota_us
        if version == 1:
            _write(os.path.join(d, "cpu.cfs_period_us"), str(PERIOD_US))
            _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))
        else:
            _write(os.path.join(d, "cpu.max"), f"{quota if quota > 0 else 'max'} {PERIOD_US}")

    def _limit_memory(self) -> None:
        version, _ = self.controllers["memory"]
        d = self.dir("memory")
        limit = self.memory_limit
        if version == 1:
            _write(os.path.join(d, "memory.limit_in_bytes"), str(limit or -1))
            # With swap accounting, also cap memory+swap so the kernel kills rather than swaps.
            memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, str(limit or -1))
        else:
            _write(os.path.join(d, "memory.max"), str(limit or "max"))
            swap = os.path.join(d, "memory.swap.max")
            if os.path.exists(swap):
                _write(swap, "0" if limit else "max")

    def add(self, pid: int) -> None:
        """Move a process into the cgroup in every hierarchy."""
        for d in self.dirs():
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> set[int]:
        """Processes in the cgroup, over all hierarchies."""
        found: set[int] = set()
        for d in self.dirs():
            try:
                found.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except FileNotFoundError:
                pass
        return found

    def remove(self, timeout: float = 5.0) -> None:
        """Move leftover processes to the parent and remove the directories."""
        deadline = time.monotonic() + timeout
        for d in self.dirs():
            while os.path.isdir(d):
                try:
                    procs = _read(os.path.join(d, "cgroup.procs")).split()
                except FileNotFoundError:
                    break
                for pid in procs:
                    try:
                        _write(os.path.join(os.path.dirname(d), "cgroup.procs"), pid)
                    except CgroupError:
                        pass  # it exited meanwhile
                try:
                    os.rmdir(d)
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove {d}: {e.strerror}") from None
                    time.sleep(0.05)  # a dying task still counts; retry until the deadline

    # -- monitoring
    def metrics(self) -> dict[str, int]:
        """CPU and memory counters, the same names on v1 and v2.

        cpu_usage_ns, nr_periods, nr_throttled, throttled_ns, memory_usage_bytes,
        memory_max_usage_bytes, memory_failcnt, oom_kill.
        """
        m: dict[str, int] = {}
        cpu_v, _ = self.controllers["cpu"]
        stat = _keyed(_read(os.path.join(self.dir("cpu"), "cpu.stat")))
        m["nr_periods"] = stat.get("nr_periods", 0)
        m["nr_throttled"] = stat.get("nr_throttled", 0)
        if cpu_v == 1:
            m["throttled_ns"] = stat.get("throttled_time", 0)
        else:
            m["throttled_ns"] = stat.get("throttled_usec", 0) * 1000
        acct_v, _ = self.controllers.get("cpuacct", self.controllers["cpu"])
        if acct_v == 1 and "cpuacct" in self.controllers:
            m["cpu_usage_ns"] = int(_read(os.path.join(self.dir("cpuacct"), "cpuacct.usage")))
        else:
            m["cpu_usage_ns"] = stat.get("usage_usec", 0) * 1000
        d = self.dir("memory")
        if self.controllers["memory"][0] == 1:
            m["memory_usage_bytes"] = int(_read(os.path.join(d, "memory.usage_in_bytes")))
            m["memory_max_usage_bytes"] = int(_read(os.path.join(d, "memory.max_usage_in_bytes")))
            m["memory_failcnt"] = int(_read(os.path.join(d, "memory.failcnt")))
            # Kernels before 4.13 lack oom_kill here: failcnt growth is the best sign then.
            oom = _keyed(_read(os.path.join(d, "memory.oom_control")))
            m["oom_kill"] = oom.get("oom_kill", m["memory_failcnt"])
        else:
            m["memory_usage_bytes"] = int(_read(os.path.join(d, "memory.current")))
            peak = os.path.join(d, "memory.peak")
            m["memory_max_usage_bytes"] = int(_read(peak)) if os.path.exists(peak) else 0
            events = _keyed(_read(os.path.join(d, "memory.events")))
            m["memory_failcnt"] = events.get("max", 0)
            m["oom_kill"] = events.get("oom_kill", 0)
        return m

    def oom_kills(self) -> int:
        """How many processes the kernel has OOM-killed in this cgroup so far."""
        try:
            return self.metrics()["oom_kill"]
        except (OSError, ValueError):
            return 0
