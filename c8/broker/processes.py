"""The process table: who each pid is, so every event carries its identity.

Seeded from /proc at start, kept by FORK/EXEC/EXIT events in time order.
Lookups are per *unique* pid of a batch (np.unique), never per event.
A process is (boot id, tgid, start time): ``process_id`` is a 16-hex-digit
hash of the three, so pid reuse gives a new id (psutil's lesson).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from c8.host import proc as hostproc
from c8.protocol.batch import LINEAGE_DEPTH

CLK_TCK = os.sysconf("SC_CLK_TCK")
CREDENTIALS = ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid")


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
    """(exe path, command line) from /proc; empty strings when unreadable."""
    return hostproc.exe(pid, proc), hostproc.command_line(pid, proc).decode(errors="replace")


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

    def __init__(self, proc: str = "/proc", max_entries: int = 65536):
        self.proc = proc
        self.boot = boot_id()
        self.max_entries = max_entries
        self.by_pid: dict[int, Process] = {}
        self._dead: list[int] = []
        self._history: dict[int, list[tuple[int, tuple]]] = {}  # pid -> [(time, snapshot)] this window

    # -- building -------------------------------------------------------------
    def seed(self) -> int:
        """Learn every live process from /proc (start-up)."""
        for name in os.listdir(self.proc):
            if name.isdigit():
                self._from_proc(int(name))
        return len(self.by_pid)

    def _from_proc(self, pid: int) -> Process | None:
        stat = read_stat(pid, self.proc)
        if stat is None:
            return None
        start, ppid, _comm = stat
        exe, cmd = read_cmdline(pid, self.proc)
        p = Process(pid, make_process_id(self.boot, pid, start), ppid, exe, cmd,
                    read_credentials(pid, self.proc))
        self._put(p)
        return p

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
        """The process of a tgid, learnt from /proc on a miss."""
        p = self.by_pid.get(pid)
        if p is None:
            p = self._from_proc(pid)
        return p

    def on_fork(self, parent: int, child: int, is_thread: bool, time_ns: int = 0) -> bytes:
        """Record a new process at ``time_ns``; returns the child's process_id (the
        parent's for threads)."""
        if is_thread:
            p = self.get(parent)
            return p.process_id if p else b""
        stat = read_stat(child, self.proc)
        if stat is not None and stat[1] == parent:
            start = stat[0]
        else:
            # The child is already gone: its start time is "now" in ticks since boot.
            start = int(time_since_boot() * CLK_TCK)
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
        p = self.get(pid)
        before = _snapshot(p)
        if p is None:
            p = Process(pid, make_process_id(self.boot, pid, int(time_since_boot() * CLK_TCK)))
            self._put(p)
        p.exec_filename, p.command_line = filename, command_line
        creds = read_credentials(pid, self.proc)  # setuid binaries change them at exec
        if creds:
            p.creds = creds
        self._changed(pid, time_ns, before)

    def on_exit(self, pid: int) -> None:
        """Mark exited; the entry lives until the end of the current window."""
        p = self.by_pid.get(pid)
        if p is not None:
            p.exited = True
            self._dead.append(pid)

    def begin_window(self) -> None:
        """A new window: identity changes are remembered from here on."""
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
    def fill(self, batch: np.ndarray) -> None:
        """Set process_id, process_exec_filename and unknown credentials of a batch,
        each as of the event's time: per unique pid from the table, and for pids
        whose identity changed in this window, per event from that pid's history."""
        if len(batch) == 0:
            return
        col = batch["process_pid"]
        if (col == col[0]).all():  # one process (a storm): no sort
            pids, inverse = col[:1], np.zeros(len(col), np.intp)
        else:
            pids, inverse = np.unique(col, return_inverse=True)
        snaps = [_snapshot(self.get(pid) if pid > 0 else None) for pid in pids.tolist()]
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
