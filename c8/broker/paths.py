"""File names -> canonical absolute paths, as the kernel resolved them.

A syscall's path argument is resolved by the kernel against the caller's cwd
(``AT_FDCWD``) or a directory fd, inside the caller's root; the eBPF record
carries the name as passed and the fd. The broker resolves it again when the
batch arrives (:mod:`c8.broker.pathcanon`): ``.``, ``..``, repeated slashes
and symlinked directories, inside ``/proc/<pid>/root``.

Work is bounded per batch: one resolution per unique (pid, dirfd, name,
follow) of the batch (``np.unique`` on the raw columns, no per-event
objects), one root and one base per unique pid and (pid, dirfd), and at most
``MAX_RESOLVE`` resolutions through the kernel per call; beyond that names
are cleaned as text. Resolution reads the dentry cache only; what it cannot
answer is retried beside the caller within 20 ms per call (``SLOW``), so a
stalled file system never stalls the broker. No resolution is kept between
batches: a cached answer would let a process swap a symlink under it.

When the process has exited by then (most short-lived programs have), its
root, cwd and fds cannot be asked: an absolute name is cleaned as text
(:func:`pathcanon.lexical`, right unless a symlinked directory precedes a
``..``) and a relative one gets an empty path. An empty name (unreadable by
the eBPF program) gets an empty path too. An empty name with an fd (fchmod,
fchown, ``AT_EMPTY_PATH``) resolves to what the fd names.

That first answer, read from /proc when the batch arrives, is only the
fallback for relative and fd-only names: at release, :class:`FromStream`
resolves them against the directories, cwds and descriptors the process's
own earlier events named (:mod:`c8.broker.fdtable`), as they were at the
event's time. ``path_status`` tells which answer an event carries
(:func:`status`).
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np

from c8 import schema
from c8.broker import pathcanon
from c8.host import proc as hostproc
from c8.schema import rows

log = logging.getLogger("c8.broker.paths")

AT_FDCWD = -100
MAX_RESOLVE = 1024  # kernel resolutions (3 syscalls each) per call; the rest as text
# Lookups the dentry cache cannot answer (pathcanon.SlowLookups): 2 threads, at most
# 10 ms each and 20 ms per call, shared by every call of this process.
SLOW = pathcanon.SlowLookups()


class _Batch:
    """Per-call memo: each pid's root, each (pid, dirfd)'s base, opened once."""

    def __init__(self, proc: str, max_resolve: int):
        self.proc = proc
        self.roots: dict[int, pathcanon.Root | None] = {}
        self.bases: dict[tuple[int, int], bytes] = {}
        self.dirs: dict[int, dict[bytes, bytes | None]] = {}
        self.left = max_resolve

    def root(self, pid: int) -> pathcanon.Root | None:
        if pid not in self.roots:
            self.roots[pid] = pathcanon.Root.of_pid(pid, self.proc, SLOW) if pid > 0 else None
        return self.roots[pid]

    def base(self, pid: int, dirfd: int, root: pathcanon.Root) -> bytes:
        """The directory (or file) ``dirfd`` names, as the process sees it (b"": unknown)."""
        key = (pid, dirfd)
        if key not in self.bases:
            seen = hostproc.cwd(pid, self.proc) if dirfd == AT_FDCWD else hostproc.fd_path(pid, dirfd, self.proc)
            self.bases[key] = pathcanon.strip_view(os.fsencode(seen), root.view) or b"" if seen else b""
        return self.bases[key]

    def close(self) -> None:
        for root in self.roots.values():
            if root is not None:
                root.close()

    def one(self, pid: int, dirfd: int, name: bytes, follow: bool) -> bytes:
        if not name and dirfd < 0:
            return b""  # the name could not be read
        root = self.root(pid)
        if name.startswith(b"/"):
            full = name
        else:
            base = self.base(pid, dirfd, root) if root is not None else b""
            if not base:
                return b""
            full = base + b"/" + name if name else base
        full = pathcanon.own_root(full, pid)
        if root is not None and self.left > 0:
            self.left -= 1
            return root.resolve(full, follow, self.dirs.setdefault(pid, {}))
        return pathcanon.lexical(full)


def resolve(pids: np.ndarray, dirfds: np.ndarray, names: np.ndarray, follow: np.ndarray | None = None,
            proc: str = "/proc", max_resolve: int = MAX_RESOLVE) -> np.ndarray:
    """Canonical absolute paths for ``names`` (an ``S<n>`` column), as wide as
    the longest of them: a name can resolve to a longer path, and most paths
    are far shorter than a path field (c8.schema.rows). A caller that writes
    other values into the result widens it first.

    ``dirfds``: the dirfd each name is relative to (``AT_FDCWD``: the cwd), or
    the fd itself for an empty name. ``follow``: where the call follows a
    symlink in the last component (open without O_NOFOLLOW). Empty where the
    path cannot be known (see the module docstring).
    """
    n = len(names)
    if n == 0:
        return np.zeros(0, f"S{rows.MIN_WIDTH}")
    pids = np.asarray(pids).astype(np.int64)
    dirfds = np.asarray(dirfds).astype(np.int64)
    follow = np.zeros(n, bool) if follow is None else np.asarray(follow, bool)
    first, inverse, odd = _unique_rows(pids, dirfds, follow, names)
    SLOW.new_batch()
    batch = _Batch(proc, max_resolve)
    try:
        rows_in = zip(pids[first].tolist(), dirfds[first].tolist(), follow[first].tolist(),
                      names[first].tolist(), strict=True)
        found = [batch.one(p, d, nm, f) for p, d, f, nm in rows_in]
        # hash collisions: each row on its own
        alone = {i: batch.one(int(pids[i]), int(dirfds[i]), names[i].tobytes().rstrip(b"\0"), bool(follow[i]))
                 for i in np.flatnonzero(odd).tolist()}
    finally:
        batch.close()
    longest = max(map(len, itertools.chain(found, alone.values())), default=0)
    out = np.array(found, dtype=f"S{max(longest, 1)}")[inverse]
    for i, path in alone.items():
        out[i] = path
    return out


# Keyed per sensor run: names are chosen by monitored processes, so they must not
# be able to make two names share a hash (collisions are checked anyway).
_KEY = np.frombuffer(os.urandom(8 * 66), np.uint64) | np.uint64(1)


def _unique_rows(pids: np.ndarray, dirfds: np.ndarray, follow: np.ndarray, names: np.ndarray):
    """(first row of each distinct (pid, dirfd, follow, name), group of each row, rows
    whose group's first row differs from them). A keyed 64-bit hash per row and
    np.unique on it: 3-10 times faster than np.unique on the rows themselves.
    Only the words up to the batch's longest name are hashed and compared (a
    21-byte name is 3 of a 256-byte column's 32), one 8-byte column at a time:
    numpy's reductions along a row cost more than the few words they add
    (27 ns an open event, where the row-wise form took 83)."""
    n, width = len(names), names.dtype.itemsize
    padded = -(-width // 8) * 8
    raw = np.ascontiguousarray(names if padded == width else names.astype(f"S{padded}"))
    words = raw.view(np.uint64).reshape(n, -1)
    used = max(1, -(-rows.used_width(names) // 8))  # NUL words past every name: equal
    cols = [words[:, j] for j in range(used)]
    with np.errstate(over="ignore"):
        h = np.zeros(n, np.uint64)
        for j, col in enumerate(cols):
            h += col * _KEY[2 + j % 64]
        h ^= pids.view(np.uint64) * _KEY[0] + dirfds.view(np.uint64) * _KEY[1] + follow.astype(np.uint64)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    rep = first[inverse]
    odd = (pids != pids[rep]) | (dirfds != dirfds[rep]) | (follow != follow[rep])
    for col in cols:
        odd |= col != col[rep]
    return first, inverse, odd


# path_status values (docs/events.md)
ABSOLUTE, STREAM, PROC, UNREADABLE, UNKNOWN = b"absolute", b"stream", b"proc", b"unreadable", b"unknown"


def first_bytes(names: np.ndarray) -> np.ndarray:
    """The first byte of each name of an ``S<n>`` column (0: empty): one byte copied per row."""
    return np.asarray(names).astype("S1").view(np.uint8)


def status(dirfds: np.ndarray, names: np.ndarray, found: np.ndarray) -> np.ndarray:
    """``path_status`` of paths :func:`resolve` found when the batch arrived:
    absolute, proc (a relative or fd-only name, its base read from /proc),
    unreadable (no name, no fd) or unknown (empty: base not known)."""
    first = first_bytes(names)
    known = first_bytes(found) != 0
    out = np.where(first == ord("/"), ABSOLUTE, PROC).astype("S16")
    out[~known] = UNKNOWN
    out[(first == 0) & (np.asarray(dirfds) < 0)] = UNREADABLE
    return out


def symlink_targets(pids: np.ndarray, links: np.ndarray, targets: np.ndarray,
                    proc: str = "/proc", max_resolve: int = MAX_RESOLVE) -> np.ndarray:
    """What symlinks point at, canonical: a relative target is resolved from the
    directory holding the link (``links``: the links' canonical paths), as the
    kernel does when the link is followed; every component is followed."""
    n = len(targets)
    if n == 0:
        return targets.copy()
    first = np.ascontiguousarray(targets).view(np.uint8).reshape(n, -1)[:, 0]
    rel = (first != ord("/")) & (first != 0)
    linkdir = np.char.rpartition(links, b"/")[:, 0]
    joined = np.char.add(np.char.add(linkdir, b"/"), targets)
    # a relative target of an unknown link stays unknown
    full = np.where(rel, np.where(np.char.str_len(links) > 0, joined, b""), targets)
    width = max(targets.dtype.itemsize, full.dtype.itemsize)
    full = full.astype(f"S{width}")
    return resolve(pids, np.full(n, AT_FDCWD), full, np.ones(n, bool), proc, max_resolve)


# -- paths from the event stream (release stage, after identity) ------------------
O_CLOEXEC = 0o2000000
_NR_FD_ONLY = np.array([33, 81, 91, 93, 292])  # dup2, fchdir, fchmod, fchown, dup3: no name, the fd itself
_TWO_NAMES = np.array([schema.kind_code("file", k) for k in ("RENAME", "LINK", "SYMLINK")])
_NR_CWD = np.array([80, 81])              # chdir, fchdir (rows of catalog.build_cwd)
_NR_FOLLOWING = np.array([90, 92, 268])   # chmod, chown, fchmodat: follow the last symlink
_MAX_CHAIN = 64                           # openat(fd of an openat(fd of ...)) depth resolved per window
_MAX_INHERITED = 1024                     # names looked up one by one per window (children born in it)


def _keys(pids: np.ndarray, fds: np.ndarray) -> np.ndarray:
    return (pids.astype(np.int64) << 32) | (fds.astype(np.int64) & 0xFFFFFFFF)


class FromStream:
    """Relative and fd-only names resolved against descriptors learnt from the stream.

    Runs on each window after identity, before numbering. For each file event
    whose name is relative to a dirfd or the cwd, or that names only an fd
    (fchmod, fchown), the base is the path of the latest successful OPEN of
    that descriptor number by that process earlier in the window, else by its
    parent before a fork in the window, else the :class:`FdTable` as it stood
    at the window's start. A base that is itself a relative OPEN is resolved
    first (chains, up to ``_MAX_CHAIN`` deep per window). When no base is
    known the event keeps what /proc said when it arrived (``path_status``
    proc or unknown). chdir/fchdir rows (``cwd``, catalog.build_cwd) are
    resolved the same way and set the cwd (key AT_FDCWD). Then the window's
    OPEN results, cwd changes, forks, execs and exits are applied to the
    table in time order.

    Work per window: numpy over the file events; Python per unique (pid, fd)
    looked up in the table, per event only for children born in the window
    using an inherited fd before opening their own (at most ``_MAX_INHERITED``;
    the rest keep what /proc said), per process event, and per
    (pid, fd) opened in the window (deduplicated, so a storm reopening fd 3
    costs one).
    """

    def __init__(self, table, proc: str = "/proc"):
        self.table = table
        self.proc = proc
        self.resolved = 0  # events whose path came from the stream
        self.failures = 0  # windows this stage failed on (logged): their paths stay as /proc said

    def stats(self) -> dict:
        return dict(self.table.stats(), resolved=self.resolved, failures=self.failures)

    def apply(self, window: dict[str, np.ndarray], cwd: np.ndarray | None = None) -> None:
        """Resolve the window's file events and learn from them and its process events.
        ``cwd``: the window's chdir/fchdir rows (catalog.build_cwd), which set cwds
        and are resolved like opens, then dropped."""
        events = _process_events(window.get("process"))
        fb = window.get("file")
        if cwd is not None and len(cwd):
            both = cwd if fb is None else rows.concat([fb, cwd])
            order = np.argsort(both["sensor_monotime_nanos"], kind="stable")
            fb = rows.take(both, order)
            files = order < (0 if window.get("file") is None else len(window["file"]))
        if fb is None or not len(fb):
            for ev in events:
                self._apply_event(ev)
            return
        births = {child: (t, parent) for t, kind, parent, child in events if kind == b"fork"}
        index = _DefIndex(fb)
        try:
            fb = self._resolve(fb, index, births)
        except Exception:  # a bug here must not stop the pipeline: the window keeps /proc's paths
            self.failures += 1
            log.exception("resolving the paths of a window of %d file events failed", len(fb))
        self._learn(fb, index, events)
        if cwd is not None and len(cwd):
            if "file" in window:
                window["file"] = rows.take(fb, files)
        else:
            window["file"] = fb

    # -- lookups ----------------------------------------------------------------------
    def _bases(self, fb, index, rows, fds, births):
        """(row of the OPEN naming each base, or -1; base text from the table, or b"")."""
        pids = fb["process_pid"][rows].astype(np.int64)
        base_row = index.latest(pids, fds, rows)
        base_text = np.zeros(len(rows), "S256")
        miss = np.flatnonzero(base_row < 0)
        if not len(miss):
            return base_row, base_text
        times = fb["sensor_monotime_nanos"]
        born = np.isin(pids[miss], np.fromiter(births, np.int64, len(births))) if births else np.zeros(len(miss), bool)
        for j in miss[born][:_MAX_INHERITED].tolist():  # children born in this window: the parent's fd at fork
            row, text = self._inherited(fb, index, births, int(pids[j]), int(fds[j]), int(times[rows[j]]))
            base_row[j] = row
            base_text[j] = text
        rest = miss[~born]
        if len(rest):
            keys = _keys(pids[rest], fds[rest])
            uniq, inverse = np.unique(keys, return_inverse=True)
            found = [self.table.get(k >> 32, ((k & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000) or b""
                     for k in uniq.tolist()]
            base_text[rest] = np.array(found, "S256")[inverse.ravel()]
        return base_row, base_text

    def _inherited(self, fb, index, births, pid: int, fd: int, t: int) -> tuple[int, bytes]:
        for _ in range(64):  # a chain of forks within one window
            born = births.get(pid)
            if born is None or born[0] > t:
                break
            t, pid = born
            row = index.latest_before_time(pid, fd, t)
            if row >= 0:
                return row, b""
        return -1, self.table.get(pid, fd) or b""

    # -- resolution ---------------------------------------------------------------------
    def _resolve(self, fb, index, births) -> np.ndarray:
        """Write the paths the stream knows; returns the batch written (its path
        fields widened to the schema's first when they were held narrower)."""
        names, dirfds = fb["filename"], fb["dirfd"].astype(np.int64)
        first = first_bytes(names)
        fd_only = (first == 0) & (dirfds >= 0) & np.isin(fb["syscall"], _NR_FD_ONLY)
        rel = (first != 0) & (first != ord("/"))
        uses = np.flatnonzero(rel | fd_only)
        kinds = fb["kind"]
        if len(uses) or np.isin(kinds, _TWO_NAMES).any():
            fb = rows.widen(fb, schema.dtype("file"), ("path", "oldpath"))
        if len(uses):
            self._resolve_path(fb, index, births, uses, fd_only[uses])
        self._resolve_oldpath(fb, index, births)
        return fb

    def _resolve_path(self, fb, index, births, uses, fd_only) -> None:
        base_row, base_text = self._bases(fb, index, uses, fb["dirfd"][uses].astype(np.int64), births)
        # a base that is itself one of these uses waits for it (chains of openat)
        pos = np.searchsorted(uses, base_row).clip(max=len(uses) - 1)
        base_use = np.where((base_row >= 0) & (uses[pos] == base_row), pos, -1)
        text = np.zeros(len(uses), "S512")
        done = np.zeros(len(uses), bool)
        known = np.zeros(len(uses), bool)
        names = fb["filename"][uses]
        paths_now = fb["path"]
        for _ in range(_MAX_CHAIN):
            ready = ~done & ((base_use < 0) | done[np.maximum(base_use, 0)])
            if not ready.any():
                break
            r = np.flatnonzero(ready)
            base = np.where(base_use[r] >= 0, text[np.maximum(base_use[r], 0)],
                            np.where(base_row[r] >= 0, paths_now[np.maximum(base_row[r], 0)], base_text[r]))
            ok = (first_bytes(base) == ord("/")) & ((base_use[r] < 0) | known[np.maximum(base_use[r], 0)])
            joined = np.char.add(np.char.add(base, b"/"), names[r])
            text[r] = np.where(fd_only[r], base, joined)
            known[r] = ok
            done[r] = True
        hit = np.flatnonzero(known)
        if not len(hit):
            return
        rows = uses[hit]
        out = text[hit].copy()
        relative = ~fd_only[hit]
        if relative.any():
            follow = _follows(fb[rows[relative]])
            out[relative] = resolve(fb["process_pid"][rows[relative]], np.full(int(relative.sum()), AT_FDCWD),
                                    out[relative], follow, self.proc)
        fb["path"][rows] = out.astype(fb.dtype["path"])
        fb["path_status"][rows] = STREAM
        self.resolved += len(rows)
        sym = rows[fb["kind"][rows] == schema.kind_code("file", "SYMLINK")]
        if len(sym):  # a relative target is resolved from the link's directory, now known
            fb["oldpath"][sym] = symlink_targets(fb["process_pid"][sym], fb["path"][sym], fb["oldname"][sym],
                                                 self.proc)

    def _resolve_oldpath(self, fb, index, births) -> None:
        kinds = fb["kind"]
        two = (kinds == schema.kind_code("file", "RENAME")) | (kinds == schema.kind_code("file", "LINK"))
        if not two.any():
            return
        first = first_bytes(fb["oldname"])
        rows = np.flatnonzero(two & (first != 0) & (first != ord("/")))
        if not len(rows):
            return
        base_row, base_text = self._bases(fb, index, rows, fb["olddirfd"][rows].astype(np.int64), births)
        base = np.where(base_row >= 0, fb["path"][np.maximum(base_row, 0)], base_text)
        ok = first_bytes(base) == ord("/")
        if not ok.any():
            return
        rows, base = rows[ok], base[ok]
        full = np.char.add(np.char.add(base, b"/"), fb["oldname"][rows]).astype("S512")
        follow = np.zeros(len(rows), bool)  # linkat's AT_SYMLINK_FOLLOW is not kept: the link itself
        fb["oldpath"][rows] = resolve(fb["process_pid"][rows], np.full(len(rows), AT_FDCWD), full, follow,
                                      self.proc).astype(fb.dtype["oldpath"])

    # -- learning -------------------------------------------------------------------------
    def _learn(self, fb, index, events) -> None:
        """The window's OPEN results and process events, in time order, into the table."""
        rows = index.rows_by_time
        if not events:
            self._learn_rows(fb, rows)
            return
        cuts = np.searchsorted(fb["sensor_monotime_nanos"][rows], [t for t, *_ in events]).tolist()
        start = 0
        for cut, ev in zip(cuts, events, strict=True):
            if cut > start:
                self._learn_rows(fb, rows[start:cut])
                start = cut
            self._apply_event(ev)
        self._learn_rows(fb, rows[start:])

    def _learn_rows(self, fb, rows) -> None:
        if not len(rows):
            return
        pids = fb["process_pid"][rows].astype(np.int64)
        fds = fb["ret"][rows].astype(np.int64)
        if len(rows) > 8:  # the last OPEN of each (pid, fd) is the one that counts
            keys = _keys(pids, fds)
            _, last = np.unique(keys[::-1], return_index=True)
            keep = np.sort(len(rows) - 1 - last)
            rows, pids, fds = rows[keep], pids[keep], fds[keep]
        paths = fb["path"][rows].tolist()
        cloexec = ((fb["open_flags"][rows].astype(np.int64) & O_CLOEXEC) != 0).tolist()
        by_pid: dict[int, list] = {}
        for pid, fd, path, ce in zip(pids.tolist(), fds.tolist(), paths, cloexec, strict=True):
            by_pid.setdefault(pid, []).append((fd, path, ce))
        for pid, items in by_pid.items():
            self.table.learn(pid, items)

    def _apply_event(self, ev) -> None:
        _t, kind, pid, child = ev
        if kind == b"fork":
            self.table.fork(pid, child)
        elif kind == b"exec":
            self.table.exec(pid)
        else:
            self.table.exit(pid)


class _DefIndex:
    """The successful OPENs of a window, searchable by (pid, fd) and time."""

    def __init__(self, fb: np.ndarray):
        self.n = len(fb)
        ok = (fb["kind"] == schema.kind_code("file", "OPEN")) & ((fb["ret"] >= 0) | np.isin(fb["syscall"], _NR_CWD))
        self.rows_by_time = np.flatnonzero(ok)
        self.times = fb["sensor_monotime_nanos"]
        self.fb = fb
        self.uniq = None  # sorted on the first lookup: a window of absolute names needs none

    def _sort(self) -> None:
        rows = self.rows_by_time
        keys = _keys(self.fb["process_pid"][rows], self.fb["ret"][rows])
        self.uniq, rank = np.unique(keys, return_inverse=True)
        combined = rank.ravel().astype(np.int64) * (self.n + 1) + rows  # (key, row) in one sortable int
        order = np.argsort(combined, kind="stable")
        self.combined = combined[order]
        self.rows = rows[order]

    def latest(self, pids: np.ndarray, fds: np.ndarray, before: np.ndarray) -> np.ndarray:
        """For each (pid, fd), the row of its latest OPEN before row ``before`` (-1: none)."""
        if self.uniq is None:
            self._sort()
        out = np.full(len(pids), -1, np.int64)
        if not len(self.uniq):
            return out
        keys = _keys(pids, fds)
        rank = np.searchsorted(self.uniq, keys).clip(max=len(self.uniq) - 1)
        present = self.uniq[rank] == keys
        pos = np.searchsorted(self.combined, rank * (self.n + 1) + before) - 1
        hit = present & (pos >= 0)
        hit[hit] &= self.combined[pos[hit]] // (self.n + 1) == rank[hit]
        out[hit] = self.rows[pos[hit]]
        return out

    def latest_before_time(self, pid: int, fd: int, t: int) -> int:
        before = int(np.searchsorted(self.times, t))
        return int(self.latest(np.array([pid]), np.array([fd]), np.array([before]))[0])


def _process_events(pb: np.ndarray | None) -> list[tuple[int, bytes, int, int]]:
    """(time, fork|exec|exit, pid, child) of a window's process events, in time order;
    thread creation is left out (threads share their process's descriptors)."""
    if pb is None or not len(pb):
        return []
    kinds = pb["kind"]
    fork, exe = schema.kind_code("process", "FORK"), schema.kind_code("process", "EXEC")
    names = {fork: b"fork", exe: b"exec", schema.kind_code("process", "EXIT"): b"exit"}
    keep = np.flatnonzero(~((kinds == fork) & (pb["fork_is_thread"] != 0)))
    return [(t, names[k], pid, child) for t, k, pid, child in zip(
        pb["sensor_monotime_nanos"][keep].tolist(), kinds[keep].tolist(), pb["process_pid"][keep].tolist(),
        pb["fork_child_pid"][keep].tolist(), strict=True) if k in names]


def _follows(fb: np.ndarray) -> np.ndarray:
    """Which of these file events follow a symlink in the last component: open without
    O_NOFOLLOW or O_CREAT|O_EXCL; chmod, chown, fchmodat. (fchownat's and fchmodat2's
    flags are not kept: the link itself.)"""
    flags = fb["open_flags"].astype(np.int64)
    opens = (fb["kind"] == schema.kind_code("file", "OPEN")) & ((flags & 0o400000) == 0) & ((flags & 0o300) != 0o300)
    return opens | np.isin(fb["syscall"], _NR_FOLLOWING)
