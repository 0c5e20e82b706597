"""c8ctl top: a live view of a running sensor, over the control socket `c8ctl status` uses.

    status (every interval) -> Sample -> rates against the previous Sample -> rich tables

Shows events/s per category and CPU (what the collectors received from the
kernel, by source, each source counted under the category it feeds), losses by
source, subscriptions with their send rates, the children with CPU and memory
(from /proc/<pid>/stat and status, pids from the supervisor's status) and the
event limiter. q or Ctrl-C ends it with exit code 0.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from c8.clients.client import Client, SensorUnavailable
from c8.host.files import read_bytes

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Collector sources by the category they feed (the broker's catalog names them so).
SOURCE_CATEGORY = {
    "task:": "process", "sched:": "process", "bpf:exec": "process", "bpf:exit": "process",
    "raw_syscalls:": "syscall", "bpf:open": "file", "bpf:file": "file", "bpf:sock": "network",
    "cgroup:": "container",
}


def category_of(source: str) -> str:
    """The event category a collector source feeds (kprobes/uprobes by name; else the source)."""
    for prefix, category in SOURCE_CATEGORY.items():
        if source.startswith(prefix):
            return category
    if "uprobe" in source or source.startswith("user"):
        return "user_call"
    if "kprobe" in source or source.startswith("kernel") or source.startswith("probe"):
        return "kernel_call"
    return source


@dataclass
class Sample:
    """One status reply and the children's CPU ticks, at a monotonic time."""

    at: float
    status: dict
    ticks: dict[int, int] = field(default_factory=dict)  # pid -> utime + stime
    rss: dict[int, int] = field(default_factory=dict)    # pid -> bytes


def proc_ticks(pid: int) -> int | None:
    """utime + stime of a process in clock ticks, or None when gone or unreadable."""
    try:
        data = read_bytes(f"/proc/{pid}/stat", 4096)
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[11]) + int(rest[12])
    except (IndexError, ValueError):
        return None


def proc_rss(pid: int) -> int | None:
    """Resident memory of a process in bytes (VmRSS), or None."""
    try:
        data = read_bytes(f"/proc/{pid}/status", 65536)
    except OSError:
        return None
    for line in data.splitlines():
        if line.startswith(b"VmRSS:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _pids(status: dict) -> list[int]:
    sup = status.get("supervisor") or {}
    pids = [sup.get("pid")] + [c.get("pid") for c in sup.get("children") or []]
    return [p for p in pids if isinstance(p, int) and p > 0]


def sample(client: Client) -> Sample:
    """The sensor's status now, with /proc figures for its processes."""
    st = client.status()
    s = Sample(time.monotonic(), st)
    for pid in _pids(st):
        t, r = proc_ticks(pid), proc_rss(pid)
        if t is not None:
            s.ticks[pid] = t
        if r is not None:
            s.rss[pid] = r
    return s


def _rate(now: float, before: float | None, dt: float) -> float | None:
    return None if before is None or dt <= 0 else max(now - before, 0) / dt


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def category_rates(cur: Sample, prev: Sample | None) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """(cpus, {category: {cpu: events/s}}) from the collectors' received counters."""
    dt = cur.at - prev.at if prev else 0.0
    cpus = sorted((cur.status.get("collectors") or {}), key=lambda c: int(c))
    out: dict[str, dict[str, float | None]] = {}
    for cpu in cpus:
        now = (cur.status["collectors"][cpu].get("received") or {})
        before = ((prev.status.get("collectors") or {}).get(cpu, {}).get("received") or {}) if prev else None
        per: dict[str, list] = {}
        for source, n in now.items():
            b = before.get(source, 0) if before is not None else None
            per.setdefault(category_of(source), []).append(_rate(n, b, dt))
        for category, rates in per.items():
            known = [r for r in rates if r is not None]
            out.setdefault(category, {})[cpu] = sum(known) if known else None
    return cpus, out


def render(cur: Sample, prev: Sample | None, run_dir: str = "") -> Group:
    """The whole view for one refresh."""
    st = cur.status
    dt = cur.at - prev.at if prev else 0.0
    sup = st.get("supervisor") or {}
    plan = st.get("plan") or {}
    lim = st.get("limiter") or {}
    counts = st.get("counts") or {}
    pcounts = (prev.status.get("counts") or {}) if prev else {}
    head = Text.assemble(
        ("c8 top ", "bold"), f"sensor {str(st.get('sensor_id', ''))[:16]}  supervisor {sup.get('pid', '?')}  ",
        f"plan {plan.get('generation')} {'collecting' if plan.get('enabled') else 'idle'}  ",
        f"received {_fmt(_rate(counts.get('received', 0), pcounts.get('received') if prev else None, dt))}/s  ",
        f"published {_fmt(_rate(counts.get('published', 0), pcounts.get('published') if prev else None, dt))}/s",
        ("   q quits", "dim"))

    cpus, rates = category_rates(cur, prev)
    events = Table(title="events/s by category (collected from the kernel)", title_justify="left", expand=False)
    events.add_column("category")
    events.add_column("total", justify="right")
    for cpu in cpus:
        events.add_column(f"cpu{cpu}", justify="right")
    for category in sorted(rates):
        per = rates[category]
        known = [v for v in per.values() if v is not None]
        events.add_row(category, _fmt(sum(known) if known else None),
                       *(_fmt(per.get(cpu)) for cpu in cpus))
    if not rates:
        events.add_row("(nothing collected)", "-", *("-" for _ in cpus))

    losses = Table(title="losses", title_justify="left")
    for col in ("source", "total", "per s"):
        losses.add_column(col, justify="left" if col == "source" else "right")
    for name, now, before in _loss_rows(st, prev.status if prev else None):
        losses.add_row(name, f"{now:,}", _fmt(_rate(now, before, dt)))

    subs = Table(title="subscriptions", title_justify="left")
    for col in ("id", "events", "sent", "sent/s", "lost", "age s"):
        subs.add_column(col, justify="left" if col in ("id", "events") else "right")
    before_subs = {s["subscription"]: s for s in (prev.status.get("subscriptions") or [])} if prev else {}
    for s in st.get("subscriptions") or []:
        b = before_subs.get(s["subscription"])
        lost_n = sum(n for _, n in _flat(s.get("lost") or 0))
        subs.add_row(s["subscription"], ",".join(sorted((s.get("spec") or {}).get("events") or {})),
                     f"{s.get('sent', 0):,}", _fmt(_rate(s.get("sent", 0), b.get("sent") if b else None, dt)),
                     f"{lost_n:,}", _fmt(s.get("age_seconds"), 0))

    kids = Table(title="processes", title_justify="left")
    for col in ("name", "pid", "state", "restarts", "CPU %", "RSS MB"):
        kids.add_column(col, justify="left" if col in ("name", "state") else "right")
    rows = [{"name": "c8-supervisor", "pid": sup.get("pid"), "state": "RUNNING", "restarts": 0}]
    for c in [rows[0], *(sup.get("children") or [])]:
        pid = c.get("pid")
        t, tb = cur.ticks.get(pid), prev.ticks.get(pid) if prev else None
        cpu = _rate(t, tb, dt) * 100 / CLOCK_TICKS if t is not None and tb is not None and dt else None
        rss = cur.rss.get(pid)
        kids.add_row(str(c.get("name", "?")), str(pid), str(c.get("state", "")), str(c.get("restarts", 0)),
                     _fmt(cpu, 1), _fmt(rss / 2**20 if rss is not None else None, 1))

    limiter = Text(f"event limiter: {'enabled' if lim.get('enabled') else 'off'}  trips {lim.get('trips', 0)}"
                   f"  {'DORMANT (collection paused)' if st.get('dormant') else 'collecting'}")
    return Group(head, events, losses, subs, kids, limiter)


def view(cur: Sample, prev: Sample | None):
    """``render``, or what went wrong drawing this status (a newer sensor's shape):
    the live view stays up."""
    try:
        return render(cur, prev)
    except Exception as exc:  # shown, never fatal
        return Text(f"c8ctl top cannot draw this status: {type(exc).__name__}: {exc}", style="bold red")


def _flat(value, prefix: str = "") -> list[tuple[str, int]]:
    """(name, count) of a count or a nested map of counts; names joined by spaces."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _flat(v, f"{prefix} {k}".strip())
        return out
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(prefix, int(value))]
    return []


def _loss_rows(st: dict, prev: dict | None) -> list[tuple[str, int, int | None]]:
    """(source, total, total at the previous sample) for every loss counter."""
    def collect(s: dict) -> dict[str, int]:
        out: dict[str, int] = {}
        for cpu, c in (s.get("collectors") or {}).items():
            out[f"kernel ring cpu{cpu}"] = int(c.get("lost") or 0)
            if c.get("collector_lost"):
                out[f"collector cpu{cpu}"] = int(c["collector_lost"])
            for name, n in _flat(c.get("ebpf_lost") or {}):  # family, then cause
                out[f"ebpf {name} cpu{cpu}"] = n
        sub_lost = 0
        for sub in s.get("subscriptions") or []:
            sub_lost += sum(n for _, n in _flat(sub.get("lost") or 0))
        out["subscribers (broker)"] = sub_lost
        counts = s.get("counts") or {}
        for key in ("late", "bad_messages"):
            if key in counts:
                out[f"broker {key}"] = int(counts[key] or 0)
        return out

    now = collect(st)
    before = collect(prev) if prev else {}
    return [(k, v, before.get(k) if prev else None) for k, v in now.items()]


class _Keys:
    """Single key presses from a terminal (cbreak: Ctrl-C still interrupts)."""

    def __init__(self, stream):
        self.fd = stream.fileno() if stream is not None and stream.isatty() else None
        self.saved = None

    def __enter__(self) -> _Keys:
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait(self, seconds: float) -> str:
        """A key pressed within ``seconds`` ('' if none; the wait is a sleep without a terminal)."""
        if self.fd is None:
            time.sleep(seconds)
            return ""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return os.read(self.fd, 32).decode(errors="replace") if ready else ""


def run(client: Client, interval: float = 1.0, once: bool = False, console: Console | None = None) -> int:
    """The live view until q or Ctrl-C (0); 1 when the sensor does not answer at the start.
    ``once``: print one view (two samples ``interval`` apart) and return."""
    if not interval > 0:
        raise ValueError(f"--interval must be a positive number of seconds, got {interval}")
    console = console or Console()
    try:
        prev = sample(client)
    except SensorUnavailable as exc:
        print(f"c8ctl top: the sensor is not running: {exc}", file=sys.stderr)
        return 1
    if once:
        time.sleep(interval)
        console.print(view(sample(client), prev))
        return 0
    try:
        with _Keys(sys.stdin) as keys, Live(view(prev, None), console=console, screen=True,
                                             auto_refresh=False, transient=True) as live:
            cur = prev
            while True:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in keys.wait(left).lower():
                        return 0
                try:
                    prev, cur = cur, sample(client)
                    live.update(view(cur, prev), refresh=True)
                except SensorUnavailable as exc:  # keep the last view; say so, retry next tick
                    live.update(Group(view(cur, prev), Text(f"sensor not answering: {exc}", style="bold red")),
                                refresh=True)
    except KeyboardInterrupt:
        return 0
