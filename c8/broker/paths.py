"""Relative file names -> absolute paths, through /proc while the process lives.

A syscall's path argument is resolved by the kernel against the caller's cwd
(``AT_FDCWD``) or a directory fd; the eBPF record carries the name as passed
and the fd. The broker resolves it when the batch arrives, reading
``/proc/<pid>/cwd`` or ``/proc/<pid>/fd/<dirfd>`` once per unique
(pid, dirfd) of the batch. That is best effort: a process that has exited
(or closed the fd, or changed directory since) cannot be asked, and then the
path stays the name as passed. An empty name with a valid fd (fchmod,
fchown, ``AT_EMPTY_PATH``) resolves to the fd's own path.
"""

from __future__ import annotations

import os

import numpy as np

from c8.host import proc as hostproc

AT_FDCWD = -100


def _base(pid: int, dirfd: int) -> bytes:
    """The directory (or file) a (pid, dirfd) names, or b"" when it cannot be known."""
    return os.fsencode(hostproc.cwd(pid) if dirfd == AT_FDCWD else hostproc.fd_path(pid, dirfd))


def resolve(pids: np.ndarray, dirfds: np.ndarray, names: np.ndarray) -> np.ndarray:
    """Absolute paths for ``names`` (an ``S<n>`` column), same width.

    Absolute names are kept; relative ones get their base prepended where it
    can be read; the rest (the base is unknown) keep the name as passed.
    """
    out = names.copy()
    n = len(names)
    if n == 0:
        return out
    first = np.ascontiguousarray(names).view(np.uint8).reshape(n, -1)[:, 0]
    dirfds = np.asarray(dirfds).astype(np.int64)
    # relative names, and empty names naming an fd (fchmod(fd), AT_EMPTY_PATH)
    todo = ((first != ord("/")) & (first != 0)) | ((first == 0) & (dirfds >= 0))
    if not todo.any():
        return out
    idx = np.flatnonzero(todo)
    keys = np.stack([np.asarray(pids)[idx].astype(np.int64), dirfds[idx]], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    bases = np.array([_base(int(p), int(d)) for p, d in uniq.tolist()], dtype=object)
    base = bases[inverse.ravel()].astype(f"S{names.dtype.itemsize}") if len(bases) else None
    known = np.char.str_len(base) > 0
    rel = names[idx]
    stem = np.char.rstrip(base, b"/")  # cwd "/" -> "" + "/" + name
    joined = np.where(np.char.str_len(rel) > 0, np.char.add(np.char.add(stem, b"/"), rel), base)
    out[idx[known]] = joined[known].astype(names.dtype)  # cut at the field's width
    return out
