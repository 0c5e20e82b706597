"""Shared pieces of the benchmark suite: machine facts, C workloads, a private
sensor, the sensor tree's CPU and memory, a counting subscriber, perf record.

Every benchmark module exposes ``run(quick: bool) -> dict`` returning
``{"title": str, "rows": [(figure, c8 value, anchor value, ratio, goal)], "notes": [...]}``
so bench/run.py can print and tabulate them side by side.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from c8.clients.client import Client  # noqa: E402
from tests.integration.sensor import Sensor  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
STORM_CPU = 1 if NCPU > 1 else 0
SYS_GETPPID = 110  # x86_64
RING_PAGES = 256   # the sensor's default ring_pages: the same for perf record -m


def machine() -> dict:
    """Date, host, cores, kernel and CPU model: printed with every table."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    perf_v = subprocess.run(["perf", "--version"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cores": NCPU, "kernel": platform.release(), "cpu": model,
            "python": platform.python_version(), "perf": perf_v}


# -- C workloads --------------------------------------------------------------
# Each program prints its pid, waits for a line on stdin (so filters can name
# the pid before it starts), runs, then prints "<count> <elapsed ns>".
PROGRAMS = {
    "storm": r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
int main(int argc, char **argv) {
    long n = atol(argv[1]); char line[8];
    printf("%d\n", getpid()); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    long t0 = ns();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    printf("%ld %ld\n", n, ns() - t0); fflush(stdout);
    return 0;
}
""",
    # rate per second for seconds: bursts every millisecond on an absolute clock; each
    # call a getppid, or with a path argument an open()+close() of it (eBPF file events)
    "paced": r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/syscall.h>
static long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
int main(int argc, char **argv) {
    long rate = atol(argv[1]); double secs = atof(argv[2]); const char *path = argc > 3 ? argv[3] : 0; char line[8];
    printf("%d\n", getpid()); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    long t0 = ns(), total = (long)(rate * secs), done = 0;
    struct timespec next; clock_gettime(CLOCK_MONOTONIC, &next);
    while (done < total) {
        long due = (long)((double)(ns() - t0) * rate / 1e9) + 1;
        if (due > total) due = total;
        for (; done < due; done++) {
            if (path) { int fd = open(path, O_RDONLY); if (fd >= 0) close(fd); }
            else syscall(SYS_getppid);
        }
        next.tv_nsec += 1000000; if (next.tv_nsec >= 1000000000) { next.tv_nsec -= 1000000000; next.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    printf("%ld %ld\n", done, ns() - t0); fflush(stdout);
    return 0;
}
""",
    # n execs of /bin/true, m opens of a file, k loopback TCP connects
    "mixed": r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
static long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
int main(int argc, char **argv) {
    long n = atol(argv[1]), m = atol(argv[2]), k = atol(argv[3]); const char *path = argv[4]; char line[8];
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128) || getsockname(ls, (struct sockaddr *)&a, &al)) return 2;
    printf("%d\n", getpid()); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    long t0 = ns();
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) { execl("/bin/true", "true", (char *)0); _exit(127); }
        waitpid(p, 0, 0);
    }
    for (long i = 0; i < m; i++) { int fd = open(path, O_RDONLY); if (fd >= 0) close(fd); }
    for (long i = 0; i < k; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a)) return 3;
        int s = accept(ls, 0, 0); close(c); close(s);
    }
    printf("%ld %ld\n", n + m + k, ns() - t0); fflush(stdout);
    return 0;
}
""",
}

_built: dict[str, str] = {}
_build_dir = tempfile.mkdtemp(prefix="c8bench-")


def program(name: str) -> str:
    """Path of the compiled workload ``name`` (gcc -O2, once per run)."""
    if name not in _built:
        src = os.path.join(_build_dir, name + ".c")
        exe = os.path.join(_build_dir, name)
        Path(src).write_text(PROGRAMS[name])
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        _built[name] = exe
    return _built[name]


class Workload:
    """A started workload program waiting at its gate; go() lets it run."""

    def __init__(self, name: str, *args, cpu: int | None = None):
        argv = [program(name), *map(str, args)]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline())

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self) -> tuple[int, float]:
        """(operations done, seconds the program measured)."""
        out = self.proc.stdout.readline().split()
        self.proc.wait()
        if self.proc.returncode:
            raise RuntimeError(f"workload exited {self.proc.returncode}")
        return int(out[0]), int(out[1]) / 1e9

    def run(self) -> tuple[int, float]:
        self.go()
        return self.wait()


# -- the private sensor -----------------------------------------------------------
class BenchSensor(Sensor):
    """The real supervisor tree in a temp dir, with CPU/RSS accounting of the tree."""

    def __init__(self, **overrides):
        self._tmp = tempfile.TemporaryDirectory(prefix="c8bench-sensor-")
        overrides.setdefault("ring_pages", RING_PAGES)
        overrides.setdefault("log_level", "warning")
        super().__init__(Path(self._tmp.name), **overrides)

    def __enter__(self) -> BenchSensor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._tmp.cleanup()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no source is planned and every collector runs that plan: nothing of
        c8's is attached to the kernel (a run of another tool comes next)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            plan = st.get("plan") or {}
            if not (plan.get("tracepoints") or plan.get("bpf") or plan.get("probes")) and all(
                    c.get("generation") == plan.get("generation") for c in st.get("collectors", {}).values()):
                return
            time.sleep(0.05)
        raise RuntimeError("the sensor still collects after its subscriptions ended")

    def tree(self) -> dict[int, str]:
        """pid -> name of the supervisor and every descendant."""
        pids = {self.proc.pid: "supervisor"}
        try:
            for c in self.children():
                if c.get("pid"):
                    pids[int(c["pid"])] = c.get("name") or c.get("role") or "child"
        except (OSError, ValueError):
            pass
        # anything else the tree forked (descendants of those)
        frontier = list(pids)
        while frontier:
            pid = frontier.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in pids:
                    pids[k] = _comm(k)
                    frontier.append(k)
        return pids

    def status(self) -> dict:
        return Client(self.run_dir, timeout=10.0).status()  # a storm keeps the broker busy

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.tree())

    def memory(self) -> dict[str, dict[str, int]]:
        """name -> {"rss", "hwm"} bytes, per process of the tree."""
        out = {}
        for pid, name in self.tree().items():
            m = proc_memory(pid)
            if m:
                out[f"{name}[{pid}]"] = m
        return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    vals = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    if not vals:
        return None
    try:  # proportional set size: shared pages split among their sharers
        pss = int(re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        pss = 0
    return {"rss": int(vals.get("VmRSS", 0)) * 1024, "hwm": int(vals.get("VmHWM", 0)) * 1024,
            "pss": pss * 1024}


# -- a counting subscriber ------------------------------------------------------
@dataclass
class Counter:
    """A subscription consumed in a thread with Subscription.batches().

    Counts events of ``category`` (optionally only of ``pid``), keeps the
    subscriber-side losses, and with ``latency`` the receipt-minus-kernel-time
    of every event (ns, CLOCK_MONOTONIC both).
    """

    run_dir: str
    spec: dict
    category: str | None  # None: every event category
    pid: int | None = None
    latency: bool = False
    queue: int = 64
    count: int = 0
    batches: int = 0
    lost: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list)
    cpu: float = 0.0  # this thread's CPU seconds

    def __enter__(self) -> Counter:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("subscription not ready")
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import numpy as np
        try:
            sub = Client(self.run_dir, timeout=20).subscribe(self.spec, queue=self.queue)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        t0 = time.thread_time()
        with sub:
            while not self._stop.is_set():
                for category, arr, _ in sub.batches(timeout=0.5):
                    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                    if category == self.category or (self.category is None and category != "lost"):
                        # counted, not copied: a boolean take of 1.7 kB file rows cost this
                        # thread more than the decode (the subscriber fell behind at 500k/s)
                        mine = None if self.pid is None else arr["process_pid"] == self.pid
                        self.count += len(arr) if mine is None else int(np.count_nonzero(mine))
                        self.batches += 1
                        if self.latency and len(arr):
                            t = arr["sensor_monotime_nanos"]
                            self.latencies.append(now - (t if mine is None else t[mine]).astype(np.int64))
                    if self._stop.is_set():
                        break
            self.lost = dict(sub.lost)
        self.cpu = time.thread_time() - t0

    def settle(self, quiet: float = 1.5, timeout: float = 120.0, broker: bool = False,
               expected: int | None = None) -> int:
        """Wait until our count and (with ``broker``) the broker's published count
        have not moved for ``quiet`` seconds, or our count reached ``expected``;
        our count. Pass broker=False when the subscription sees the whole busy
        machine (never quiet)."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        client = Client(self.run_dir, timeout=10)
        while time.monotonic() < deadline and (expected is None or self.count < expected):
            try:
                published = client.status()["counts"]["published"] if broker else None
            except Exception:  # a busy broker: ask again
                published = None
            now = (self.count, published)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.1)
        return self.count


def lost_counts(status: dict) -> dict[str, int]:
    """Losses the broker counted, by source, and the collectors' own counters."""
    out = {k[5:]: v for k, v in status.get("counts", {}).items() if k.startswith("lost_") and v}
    for cpu, st in status.get("collectors", {}).items():
        if st.get("lost"):
            out[f"kernel_cpu{cpu}"] = st["lost"]
        if st.get("collector_lost"):
            out[f"collector_cpu{cpu}"] = st["collector_lost"]
    for sub in status.get("subscriptions", []):
        for src, n in (sub.get("lost") or {}).items():
            out[f"sub_{src}"] = out.get(f"sub_{src}", 0) + n
    return out


# -- perf -------------------------------------------------------------------------
def perf_stat_count(event: str, argv: list[str], flt: str | None = None) -> int:
    """How many ``event`` the kernel fired while argv ran (system wide)."""
    cmd = ["perf", "stat", "-x,", "-e", event, "-a"]
    if flt:
        cmd += ["--filter", flt]
    r = subprocess.run([*cmd, "--", *argv], capture_output=True, text=True, check=True)
    return int(re.search(r"^(\d+),", r.stderr, re.M).group(1))


class PerfRecord:
    """``perf record -a -m pages`` on tracepoints, into a temp file, while a block runs."""

    def __init__(self, events: list[str], pages: int = RING_PAGES, flt: str | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="c8bench-perf-")
        self.out = os.path.join(self.tmp.name, "perf.data")
        cmd = ["perf", "record", "-q", "-a", "-m", str(pages), "-o", self.out]
        for e in events:
            cmd += ["-e", e]
            if flt:
                cmd += ["--filter", flt]
        self.cmd = cmd
        self.stderr = ""

    def __enter__(self) -> PerfRecord:
        # Start disabled and enable through the control fifo: its ack means
        # every event is open and recording (a file on disk does not).
        ctl, ack = os.path.join(self.tmp.name, "ctl"), os.path.join(self.tmp.name, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        self.log = open(os.path.join(self.tmp.name, "stderr"), "w+")
        self.proc = subprocess.Popen([*self.cmd, "-D", "-1", "--control", f"fifo:{ctl},{ack}",
                                      "--", "sleep", "3600"], stderr=self.log, stdout=self.log)
        self.ctl = open(ctl, "w")
        self.ack = open(ack)
        self.ctl.write("enable\n")
        self.ctl.flush()
        if self.ack.readline().strip() != "ack":
            raise RuntimeError("perf record did not acknowledge enable")
        self.cpu0 = cpu_seconds(self.proc.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = cpu_seconds(self.proc.pid) - self.cpu0
        self.proc.send_signal(2)
        self.proc.wait(60)
        self.ctl.close()
        self.ack.close()
        self.log.seek(0)
        self.stderr = self.log.read()
        self.log.close()

    def stats(self) -> dict[str, int]:
        """Samples written and samples lost of our events, from ``perf report --stats``
        (its per-event sections: SAMPLE and LOST_SAMPLES counts)."""
        r = subprocess.run(["perf", "report", "--stats", "-i", self.out], capture_output=True, text=True)
        samples = lost = 0
        for name, body in re.findall(r"^(\S+) stats:\n((?:[ \t]+\S.*\n?)*)", r.stdout, re.M):
            if name.startswith("dummy") or name == "Aggregated":
                continue
            m = re.search(r"^\s+SAMPLE events:\s+(\d+)", body, re.M)
            samples += int(m.group(1)) if m else 0
            m = re.search(r"LOST_SAMPLES events:\s+(\d+)", body)
            lost += int(m.group(1)) if m else 0
        return {"samples": samples, "lost": lost}

    def cleanup(self) -> None:
        self.tmp.cleanup()


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


def standalone(run) -> None:
    """Run one benchmark module on its own (``--quick`` for a short run) and print it."""
    t = time.time()
    res = run("--quick" in sys.argv)
    for r in res["rows"]:
        print(r)
    print(res["notes"], f"{time.time() - t:.0f}s")
