"""The process table: who each pid is, so every event carries its identity.

Seeded from /proc at start, kept by FORK/EXEC/EXIT events in time order.
Lookups are per *unique* pid of a batch (np.unique), never per event.
A process is (boot id, tgid, start time): ``process_id`` is a 16-hex-digit
hash of the three, so pid reuse gives a new id (psutil's lesson).

The table sits on the broker's release path, which reads nothing of /proc:
a monitored process may stall any reader of its ``cmdline`` (c8.broker.lookups
says how). A pid the table does not know (a *miss*) is looked up on a
:class:`~c8.broker.lookups.LookupPool` thread: its events keep an unknown
identity until the answer arrives, and the events after it take it
(:meth:`ProcessTable.collect`, at every window). Identity (stat, status, exe)
and command line are read by separate pools, so a stalled command line never
delays an identity; a command line read that times out leaves it empty and
its uid is remembered: that uid's command lines are not read while one of
its reads is stuck (a user can only stall reads of its own processes'
memory, and hides nothing it could not hide by rewriting its argv). The
forks and execs of a window get their /proc facts (the child's start time,
the credentials after exec, a command line eBPF could not read) from one
lookup on a pool of its own, which the release waits for at most
``prefetch_wait`` (budgeted); when it is late, the child's start time comes
from the fork event's time and the credentials stay as they were, counted
``prefetch_late``. Counters: :meth:`ProcessTable.stats` (``c8ctl
status`` counts, ``proc_*``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from c8.broker.lookups import DONE, TIMED_OUT, Lookup, LookupPool
from c8.host import proc as hostproc
from c8.protocol.batch import LINEAGE_DEPTH

log = logging.getLogger("c8.broker.processes")

CLK_TCK = os.sysconf("SC_CLK_TCK")
CREDENTIALS = ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid")
RETRY_UNKNOWN = 1.0  # s before a pid /proc did not know is looked up again


def boot_id() -> str:
    return hostproc.boot_id()


def make_process_id(boot: str, pid: int, start_ticks: int) -> bytes:
    """16 hex digits naming one process for the life of the boot."""
    return hashlib.blake2b(f"{boot}-{pid}-{start_ticks}".encode(), digest_size=8).hexdigest().encode()


def read_stat(pid: int, proc: str = "/proc") -> tuple[int, int, str] | None:
    """(start time in clock ticks since boot, parent pid, comm) or None if gone."""
    return hostproc.stat(pid, proc)


def read_credentials(pid: int, proc: str = "/proc") -> dict[str, int]:
    return hostproc.credentials(pid, proc)


def read_cmdline(pid: int, proc: str = "/proc") -> tuple[str, str]:
    """(exe path, command line) from /proc; empty strings when unreadable.
    May block as long as the process likes: call it only off the loop."""
    return hostproc.exe(pid, proc), hostproc.command_line(pid, proc).decode(errors="replace")


def read_identity(pid: int, proc: str = "/proc") -> tuple[hostproc.Stat, dict[str, int], str] | None:
    """(stat, credentials, exe path) of a process, None when gone. These files
    take no lock the process can hold (unlike ``cmdline``; measured with a
    process holding its mmap lock: stat, status, exe and cgroup answer at once)."""
    st = hostproc.stat(pid, proc)
    if st is None:
        return None
    return st, hostproc.credentials(pid, proc), hostproc.exe(pid, proc)


def read_window(children: list[int], execs: list[int], proc: str = "/proc") -> tuple[dict, dict]:
    """What a window's forks and execs need: {child: stat}, {exec pid: (stat, credentials)}."""
    births = {pid: hostproc.stat(pid, proc) for pid in children}
    return births, {pid: (hostproc.stat(pid, proc), hostproc.credentials(pid, proc)) for pid in execs}


@dataclass
class Process:
    pid: int
    process_id: bytes
    ppid: int = 0
    exec_filename: str = ""
    command_line: str = ""
    creds: dict[str, int] = field(default_factory=dict)
    exited: bool = False


class ProcessTable:
    """tgid -> Process, bounded, with vectorised identity fill for batches."""

    def __init__(self, proc: str = "/proc", max_entries: int = 65536, *, threaded: bool = True,
                 deadline: float = 1.0, max_stuck: int = 8, prefetch_wait: float = 0.01) -> None:
        self.proc = proc
        self.boot = boot_id()
        self.max_entries = max_entries
        self.by_pid: dict[int, Process] = {}
        self._dead: list[int] = []
        self._history: dict[int, list[tuple[int, tuple]]] = {}  # pid -> [(time, snapshot)] this window
        # beside the loop: identities (stat, status, exe) and command lines, each with a deadline
        self.identities = LookupPool("proc-identity", workers=1, max_stuck=2, deadline=deadline,
                                     threaded=threaded)
        self.cmdlines = LookupPool("proc-cmdline", workers=2, max_stuck=max_stuck, deadline=deadline,
                                   threaded=threaded)
        # the window's forks and execs: its own thread, never queued behind misses; its
        # reads were the loop's own work before, so the loop may wait for them longer
        self.windows = LookupPool("proc-window", workers=1, max_stuck=2, deadline=deadline,
                                  wait_budget=0.25, threaded=threaded)
        self.prefetch_wait = prefetch_wait
        self._pending: set[int] = set()  # pids whose identity lookup is under way
        self._unknown: dict[int, float] = {}  # pid -> when /proc last did not know it
        self._stalling_uids: dict[int, int] = {}  # uid -> its command line reads stuck now
        self._births: dict[int, hostproc.Stat | None] = {}  # this window's fork children, read beside
        self._execs: dict[int, tuple] = {}  # this window's exec pids: (stat, credentials)
        self._exec_cmdlines: dict[int, str] = {}  # this window's execs eBPF gave no argv
        self.counts = {"misses": 0, "prefetch_late": 0, "cmdline_skipped": 0}

    # -- building -------------------------------------------------------------
    def seed(self, timeout: float = 10.0) -> int:
        """Learn every live process from /proc (start-up, before the loop runs),
        through the lookup pools: a process stalling its reads costs one deadline."""
        end = time.monotonic() + timeout
        for pid in hostproc.pids(self.proc):
            self._ask(pid, count=False)
        self.identities.drain(end - time.monotonic())
        self.collect()  # identities in, their command lines asked
        self.cmdlines.drain(end - time.monotonic())
        self.collect()
        return len(self.by_pid)

    def _ask(self, pid: int, count: bool = True) -> Lookup | None:
        """Look ``pid`` up beside the loop (once at a time; a pid /proc did not
        know is asked again only after RETRY_UNKNOWN); the lookup, if one was made."""
        if pid in self._pending or pid <= 0:
            return None
        told = self._unknown.get(pid)
        if told is not None and time.monotonic() - told < RETRY_UNKNOWN:
            return None
        if count:
            self.counts["misses"] += 1
        proc = self.proc
        job = self.identities.submit(pid, lambda: read_identity(pid, proc))
        if job is not None:
            self._pending.add(pid)
        return job

    def look_up_misses(self, pids: list[int]) -> bool:
        """Ask /proc now for ``pids``, which the table does not know, and wait at
        most ``prefetch_wait`` s (budgeted, as every wait of the pool) for the
        answers: a process first seen in this window (started before anyone
        subscribed, so its fork and exec went unseen) carries its identity from
        its first event, not from the next window's. A read that is late (a
        process stalling its /proc) leaves these events unknown, as before.
        True when some answer was applied."""
        jobs = [job for pid in pids if (job := self._ask(pid)) is not None]
        if not jobs:
            return False
        self.identities.wait(jobs, self.prefetch_wait)
        self.collect()
        return any(job.ended for job in jobs)

    def _ask_cmdline(self, pid: int, process_id: bytes, uid: int | None) -> None:
        if uid in self._stalling_uids:
            self.counts["cmdline_skipped"] += 1
            return
        proc = self.proc
        self.cmdlines.submit((pid, process_id, uid),
                             lambda: hostproc.command_line(pid, proc).decode(errors="replace"))

    def collect(self) -> None:
        """Apply the lookups finished since the last call: identities of pids
        the table still lacks (events are newer: a pid they taught meanwhile
        keeps theirs), command lines of processes still without one."""
        now = time.monotonic()
        for pool in (self.identities, self.cmdlines, self.windows):
            pool.check()
        self.windows.finished()  # prefetch took its answers itself
        for job in self.identities.finished():
            pid = job.key
            if pid not in self._pending:
                continue  # the process exited meanwhile
            self._pending.discard(pid)
            found = job.result if job.state == DONE else None
            if found is None:
                if len(self._unknown) >= self.max_entries:
                    self._unknown.clear()
                self._unknown[pid] = now
                continue
            st, creds, exe = found
            process_id = make_process_id(self.boot, pid, st.start_ticks)
            p = self.by_pid.get(pid)
            if p is None:
                p = Process(pid, process_id, st.ppid, exe, "", creds)
                self._put(p)
            elif not p.process_id:  # an exec made it before its identity was known
                p.process_id, p.ppid = process_id, st.ppid
                p.creds = p.creds or creds
            else:
                continue
            if not p.command_line:
                self._ask_cmdline(pid, process_id, creds.get("uid"))
        for job in self.cmdlines.finished():
            pid, process_id, uid = job.key
            if job.state == TIMED_OUT and uid is not None:  # bounded: one per stuck thread
                self._stalling_uids[uid] = self._stalling_uids.get(uid, 0) + 1
                log.warning("the command line of pid %d (uid %s) could not be read in %.1fs: command "
                            "lines of uid %s are not read while it is stuck", pid, uid, job.deadline, uid)
            p = self.by_pid.get(pid)
            if job.state == DONE and p is not None and not p.command_line and (
                    process_id is None or p.process_id == process_id):
                p.command_line = job.result
        for job in self.cmdlines.returned():  # a stuck read came back: the stall is over
            uid = job.key[2]
            if self._stalling_uids.get(uid, 0) > 1:
                self._stalling_uids[uid] -= 1
            elif self._stalling_uids.pop(uid, None) is not None:
                log.info("a stuck command line read of uid %s came back: its command lines are read again", uid)

    def stats(self) -> dict[str, int]:
        """Counters for ``c8ctl status`` (``counts``, prefixed ``proc_``): misses
        looked up, and every way a lookup left an identity or a command line unknown."""
        self.collect()  # the loop's thread, between windows: as at a window's start
        pools = (self.identities, self.cmdlines, self.windows)
        i, c, w = (pool.counts for pool in pools)
        return {"known": len(self.by_pid), **self.counts,
                "lookups": i["lookups"], "lookup_failed": i["failed"] + w["failed"],
                "lookup_timed_out": i["timed_out"] + w["timed_out"],
                "lookup_dropped": i["dropped"] + w["dropped"], "cmdline_lookups": c["lookups"],
                "cmdline_failed": c["failed"], "cmdline_timed_out": c["timed_out"],
                "cmdline_dropped": c["dropped"],
                "stuck_threads": sum(pool.counts["stuck_threads"] for pool in pools),
                "stalling_uids": len(self._stalling_uids)}

    def prefetch(self, children: list[int], execs: list[int], no_argv: list[tuple[int, int]]) -> None:
        """Read what this window's forks (``children``) and execs need from /proc
        beside the loop, waiting at most ``prefetch_wait`` s; ``no_argv``:
        (pid, uid) of execs whose argv eBPF could not read."""
        self._births, self._execs, self._exec_cmdlines = {}, {}, {}
        jobs = []
        if children or execs:
            proc = self.proc
            jobs.append(self.windows.submit("window", lambda: read_window(children, execs, proc)))
        cmd_jobs = []
        for pid, uid in no_argv:
            if uid in self._stalling_uids:
                self.counts["cmdline_skipped"] += 1
                continue
            cmd_jobs.append(self.cmdlines.submit(
                (pid, None, uid if uid >= 0 else None),
                lambda pid=pid, proc=self.proc: hostproc.command_line(pid, proc).decode(errors="replace")))
        jobs = [j for j in jobs if j is not None]
        cmd_jobs = [j for j in cmd_jobs if j is not None]
        if jobs and self.windows.wait(jobs, self.prefetch_wait) and jobs[0].state == DONE:
            self._births, self._execs = jobs[0].result
        if cmd_jobs:
            self.cmdlines.wait(cmd_jobs, self.prefetch_wait)
            self._exec_cmdlines = {j.key[0]: j.result for j in cmd_jobs if j.state == DONE}

    def exec_command_line(self, pid: int) -> str:
        """The command line /proc gave an exec of this window that eBPF gave no argv ("" if none)."""
        return self._exec_cmdlines.get(pid, "")

    def _put(self, p: Process) -> None:
        if len(self.by_pid) >= self.max_entries and p.pid not in self.by_pid:
            self._evict()
        self.by_pid[p.pid] = p

    def _evict(self) -> None:
        # Drop exited processes first, then the oldest quarter of entries.
        for pid in [k for k, v in self.by_pid.items() if v.exited]:
            del self.by_pid[pid]
        if len(self.by_pid) >= self.max_entries:
            for pid in list(self.by_pid)[: self.max_entries // 4]:
                del self.by_pid[pid]

    def get(self, pid: int) -> Process | None:
        """The process of a tgid; None on a miss, which is looked up beside the
        loop (its answer arrives at a later :meth:`collect`)."""
        p = self.by_pid.get(pid)
        if p is None:
            self._ask(pid)
        return p

    def on_fork(self, parent: int, child: int, is_thread: bool, time_ns: int = 0) -> bytes:
        """Record a new process at ``time_ns``; returns the child's process_id (the
        parent's for threads)."""
        if is_thread:
            p = self.get(parent)
            return p.process_id if p else b""
        stat = self._births.get(child)
        if stat is not None and stat.ppid == parent:
            start = stat.start_ticks
        else:
            # gone already, or the window's read is late: the fork event's time, in ticks since boot
            if child not in self._births:
                self.counts["prefetch_late"] += 1
            start = ticks_at(time_ns)
        par = self.get(parent)
        before = _snapshot(self.by_pid.get(child))
        p = Process(child, make_process_id(self.boot, child, start), parent,
                    par.exec_filename if par else "", par.command_line if par else "",
                    dict(par.creds) if par else {})
        self._put(p)
        self._changed(child, time_ns, before)
        return p.process_id

    def on_exec(self, pid: int, filename: str, command_line: str, time_ns: int = 0) -> None:
        """The program of ``pid`` changed at ``time_ns``."""
        p = self.by_pid.get(pid)
        before = _snapshot(p)
        stat, creds = self._execs.get(pid) or (None, {})
        if pid not in self._execs:
            self.counts["prefetch_late"] += 1
        if p is None:  # a miss: /proc's identity when the window's read had it, else unknown till a lookup
            p = Process(pid, make_process_id(self.boot, pid, stat.start_ticks) if stat else b"",
                        stat.ppid if stat else 0)
            self._put(p)
            if not stat:
                self._ask(pid)
        p.exec_filename, p.command_line = filename, command_line
        if creds:  # setuid binaries change them at exec
            p.creds = creds
        self._changed(pid, time_ns, before)

    def on_exit(self, pid: int) -> None:
        """Mark exited; the entry lives until the end of the current window."""
        p = self.by_pid.get(pid)
        self._pending.discard(pid)  # a lookup's late answer must not revive it
        if p is not None:
            p.exited = True
            self._dead.append(pid)

    def begin_window(self) -> None:
        """A new window: lookups finished meanwhile are applied, and identity
        changes are remembered from here on."""
        self.collect()
        self._history.clear()

    def end_window(self) -> None:
        """Forget processes that exited in the window just published."""
        for pid in self._dead:
            p = self.by_pid.get(pid)
            if p is not None and p.exited:
                del self.by_pid[pid]
        self._dead.clear()
        self._history.clear()

    def _changed(self, pid: int, time_ns: int, before: tuple) -> None:
        """Remember ``pid``'s identity before and after a change at ``time_ns``: the
        window's other events of that pid take the one that held at their time."""
        history = self._history.setdefault(pid, [(-1, before)])
        history.append((time_ns, _snapshot(self.by_pid.get(pid))))

    # -- lineage ------------------------------------------------------------------
    def lineage_rows(self, pids, same_tree=None) -> dict[str, list]:
        """The lineage table of these pids (c8.protocol.batch.Tables.processes):
        process_id -> [pid, exec_filename, command_line, parent process_id], for each
        pid and its ancestors up to init, at most LINEAGE_DEPTH above each.
        ``same_tree(pid, ancestor_pid)`` False stops the walk (a container's init
        is the top of its processes' lineage)."""
        rows: dict[str, list] = {}
        for pid in pids:
            p = self.get(pid) if pid > 0 else None
            depth = 0
            while p is not None and depth <= LINEAGE_DEPTH:
                key = p.process_id.decode()
                if key in rows:
                    break  # the rest of this chain is in already
                parent = self.get(p.ppid) if p.ppid > 0 and p.ppid != p.pid else None
                if parent is not None and same_tree is not None and not same_tree(pid, parent.pid):
                    parent = None
                rows[key] = [p.pid, p.exec_filename, p.command_line,
                             parent.process_id.decode() if parent is not None else ""]
                p, depth = parent, depth + 1
        return rows

    # -- enrichment -------------------------------------------------------------
    def fill(self, batch: np.ndarray, wait: bool = False) -> None:
        """Set process_id, process_exec_filename and unknown credentials of a batch,
        each as of the event's time: per unique pid from the table, and for pids
        whose identity changed in this window, per event from that pid's history.
        Pids the table does not know are asked of /proc; with ``wait`` (the
        release) their answers are waited for, within :meth:`look_up_misses`'s
        bound, else they apply to later batches."""
        if len(batch) == 0:
            return
        col = batch["process_pid"]
        if (col == col[0]).all():  # one process (a storm): no sort
            pids, inverse = col[:1], np.zeros(len(col), np.intp)
        else:
            pids, inverse = np.unique(col, return_inverse=True)
        known = [self.by_pid.get(pid) for pid in pids.tolist()]
        misses = [pid for pid, p in zip(pids.tolist(), known, strict=True) if p is None and pid > 0]
        if wait and misses:
            if self.look_up_misses(misses):
                known = [self.by_pid.get(pid) for pid in pids.tolist()]
        else:
            for pid in misses:
                self._ask(pid)
        snaps = [_snapshot(p) for p in known]
        ids, exes, creds = _columns(snaps)
        changed = self._history.keys() & set(pids.tolist()) if self._history else ()
        if changed:  # per event: the table now, then each changed pid as of its events' times
            ids, exes, creds = ids[inverse], exes[inverse], creds[:, inverse]
            times = batch["sensor_monotime_nanos"].astype(np.int64)
            for pid in changed:
                at = np.flatnonzero(col == pid)
                history = self._history[pid]
                when = np.array([t for t, _ in history], np.int64)
                which = np.maximum(np.searchsorted(when, times[at], side="right") - 1, 0)
                h_ids, h_exes, h_creds = _columns([snap for _, snap in history])
                ids[at], exes[at], creds[:, at] = h_ids[which], h_exes[which], h_creds[:, which]
        elif len(pids) == 1:  # one process (a storm): scalars, filled without per-event copies
            ids, exes, creds = ids[0], exes[0], [int(c) for c in creds[:, 0]]
        else:
            ids, exes, creds = ids[inverse], exes[inverse], creds[:, inverse]
        batch["process_id"] = ids
        if "process_exec_filename" in batch.dtype.names:
            batch["process_exec_filename"] = exes
        for j, name in enumerate(CREDENTIALS):
            cred = batch[name]
            unknown = cred == -1
            if unknown.all():
                cred[:] = creds[j]
            elif unknown.any():
                cred[unknown] = creds[j] if np.ndim(creds[j]) == 0 else creds[j][unknown]


_UNKNOWN = (b"", b"", (-1,) * len(CREDENTIALS))


def _snapshot(p: Process | None) -> tuple[bytes, bytes, tuple[int, ...]]:
    """(process_id, exec_filename, credentials) of a process, for stamping events."""
    if p is None:
        return _UNKNOWN
    return p.process_id, p.exec_filename.encode(), tuple(p.creds.get(n, -1) for n in CREDENTIALS)


def _columns(snaps: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snapshots as arrays: ids (S16), exec filenames (S256), credentials (8 x n)."""
    ids = np.array([s[0] for s in snaps], "S16")
    exes = np.array([s[1] for s in snaps], "S256")
    creds = np.array([s[2] for s in snaps], np.int32).reshape(len(snaps), len(CREDENTIALS)).T.copy()
    return ids, exes, creds


def time_since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def ticks_at(monotonic_ns: int) -> int:
    """Clock ticks since boot (/proc's start times) at a CLOCK_MONOTONIC time (events' clock)."""
    offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    if monotonic_ns <= 0:
        monotonic_ns = time.monotonic_ns()
    return (monotonic_ns + offset) * CLK_TCK // 1_000_000_000
