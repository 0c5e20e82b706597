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
stalled file system never stalls the broker. Nothing is kept between batches: a cached answer would
let a process swap a symlink under it.

When the process has exited by then (most short-lived programs have), its
root, cwd and fds cannot be asked: an absolute name is cleaned as text
(:func:`pathcanon.lexical`, right unless a symlinked directory precedes a
``..``) and a relative one gets an empty path. An empty name (unreadable by
the eBPF program) gets an empty path too. An empty name with an fd (fchmod,
fchown, ``AT_EMPTY_PATH``) resolves to what the fd names.
"""

from __future__ import annotations

import os

import numpy as np

from c8.broker import pathcanon
from c8.host import proc as hostproc

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
    """Canonical absolute paths for ``names`` (an ``S<n>`` column), same width.

    ``dirfds``: the dirfd each name is relative to (``AT_FDCWD``: the cwd), or
    the fd itself for an empty name. ``follow``: where the call follows a
    symlink in the last component (open without O_NOFOLLOW). Empty where the
    path cannot be known (see the module docstring).
    """
    n = len(names)
    if n == 0:
        return names.copy()
    pids = np.asarray(pids).astype(np.int64)
    dirfds = np.asarray(dirfds).astype(np.int64)
    follow = np.zeros(n, bool) if follow is None else np.asarray(follow, bool)
    first, inverse, odd = _unique_rows(pids, dirfds, follow, names)
    SLOW.new_batch()
    batch = _Batch(proc, max_resolve)
    try:
        rows = zip(pids[first].tolist(), dirfds[first].tolist(), follow[first].tolist(),
                   names[first].tolist(), strict=True)
        found = [batch.one(p, d, nm, f) for p, d, f, nm in rows]
        out = np.array(found, dtype=names.dtype)[inverse]  # cut at the field's width
        for i in np.flatnonzero(odd).tolist():  # hash collisions: each row on its own
            out[i] = batch.one(int(pids[i]), int(dirfds[i]), names[i].tobytes().rstrip(b"\0"), bool(follow[i]))
    finally:
        batch.close()
    return out


# Keyed per sensor run: names are chosen by monitored processes, so they must not
# be able to make two names share a hash (collisions are checked anyway).
_KEY = np.frombuffer(os.urandom(8 * 66), np.uint64) | np.uint64(1)


def _unique_rows(pids: np.ndarray, dirfds: np.ndarray, follow: np.ndarray, names: np.ndarray):
    """(first row of each distinct (pid, dirfd, follow, name), group of each row, rows
    whose group's first row differs from them). A keyed 64-bit hash per row and
    np.unique on it: 3-10 times faster than np.unique on the rows themselves."""
    n, width = len(names), names.dtype.itemsize
    padded = -(-width // 8) * 8
    raw = np.ascontiguousarray(names if padded == width else names.astype(f"S{padded}"))
    words = raw.view(np.uint64).reshape(n, -1)
    key = np.resize(_KEY[2:], words.shape[1])
    with np.errstate(over="ignore"):
        h = (words * key).sum(axis=1, dtype=np.uint64)
        h ^= pids.view(np.uint64) * _KEY[0] + dirfds.view(np.uint64) * _KEY[1] + follow.astype(np.uint64)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    rep = first[inverse]
    odd = (names != names[rep]) | (pids != pids[rep]) | (dirfds != dirfds[rep]) | (follow != follow[rep])
    return first, inverse, odd


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
    out = resolve(pids, np.full(n, AT_FDCWD), full, np.ones(n, bool), proc, max_resolve)
    return out.astype(targets.dtype)
