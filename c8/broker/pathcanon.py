"""Canonical paths as the kernel resolves them, inside a process's root.

A path is canonical when it is absolute, has no ``.``, ``..`` or repeated
slashes, and no directory component is a symlink. The kernel resolves a name
component by component: ``..`` after a symlinked directory climbs from the
symlink's target, and ``..`` at the process's root stays there (chroot,
containers). A textual clean-up (:func:`lexical`) gets ``..`` wrong after a
symlink, so where the process still lives its name is resolved again by the
kernel itself: ``openat2(RESOLVE_IN_ROOT)`` from an ``O_PATH`` descriptor of
``/proc/<pid>/root``, which resolves every symlink (absolute ones too) and
every ``..`` as if that directory were ``/`` and never leaves it. The sensor
never follows a monitored process's symlink out of that process's root, and
never through a magic link (``/proc/<pid>/fd/<n>``: RESOLVE_NO_MAGICLINKS).
It never waits on a file system either (a stalled NFS server, a FUSE daemon
that does not answer): RESOLVE_CACHED resolves from the dentry cache only,
which holds what the process's own call just looked up, and fails with
EAGAIN where a lookup would have to ask the file system or write (a
symlink's atime); those are retried beside the caller with a deadline
(:class:`SlowLookups`), else the name is cleaned as text. Kernels before 5.12
refuse the flag (EINVAL): resolution is then skipped rather than done in a
way that can block.

Paths are reported as the process sees them: the directory the kernel
opened, read back with ``readlink(/proc/self/fd/<n>)`` (the sensor's view),
less the prefix under which the process's root lies in that view.

The last component is kept as named unless the call follows it (open
without O_NOFOLLOW, ``link`` with AT_SYMLINK_FOLLOW) and it is a symlink:
unlink, rename and lchown act on the symlink itself, a deleted file cannot be
opened, and a file renamed since the event keeps the name it was opened by.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import threading
import time

SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20  # Linux 5.12+: only what the dentry cache holds, never a wait
_DELETED = b" (deleted)"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def lexical(path: bytes) -> bytes:
    """``path`` (absolute) with ``.``, ``..`` and repeated slashes removed as text;
    ``..`` at ``/`` stays at ``/``, as the kernel does. Right whenever no
    directory before a ``..`` is a symlink."""
    parts: list[bytes] = []
    for comp in path.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return b"/" + b"/".join(parts)


_PROC_OWN_ROOT = re.compile(rb"^/+proc/+(self|thread-self|\d+)/+root(?=/|$)")


def own_root(path: bytes, pid: int) -> bytes:
    """``/proc/self/root/X`` (or thread-self, or the caller's own pid) names ``/X``
    in the caller's root: the same file, by a magic link the resolver never follows."""
    m = _PROC_OWN_ROOT.match(path)
    if m and (m.group(1) in (b"self", b"thread-self") or int(m.group(1)) == pid):
        return path[m.end():] or b"/"
    return path


def split_last(path: bytes) -> tuple[bytes, bytes]:
    """(directory part, last component); the last component is empty when the
    path names a directory by its form (trailing slash, ``.``, ``..``, ``/``)."""
    head, _, last = path.rpartition(b"/")
    if last in (b"", b".", b".."):
        return path, b""
    return head or b"/", last


def strip_view(view: bytes, root_view: bytes) -> bytes | None:
    """A path of the sensor's view as the process sees it (None: outside its root)."""
    if not view.startswith(b"/") or view.endswith(_DELETED):
        return None
    if root_view in (b"", b"/"):
        return view
    if view == root_view:
        return b"/"
    if view.startswith(root_view + b"/"):
        return view[len(root_view):]
    return None


def _resolve_at(dirfd: int, path: bytes, directory: bool, resolve: int = 0) -> tuple[bytes | None, int]:
    """(the sensor's view of where ``path`` lands from ``dirfd``, errno): openat2
    with O_PATH inside ``dirfd`` as root, readlink of the result, close."""
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:  # ENOENT, ELOOP, ENOTDIR, EACCES, EAGAIN (not cached); EINVAL/ENOSYS: old kernel
        return None, ctypes.get_errno()
    try:
        return os.fsencode(os.readlink(f"/proc/self/fd/{fd}")), 0
    except OSError as exc:
        return None, exc.errno or 0
    finally:
        os.close(fd)


class SlowLookups:
    """Lookups the dentry cache cannot answer, done beside the caller with a deadline.

    RESOLVE_CACHED also refuses what is cached but needs a write: the first
    follow of a symlink whose atime is due (relatime, strictatime). Such a
    lookup is retried without it on one of ``workers`` threads; the caller
    waits at most ``deadline`` seconds per lookup and ``budget`` seconds per
    batch (:meth:`new_batch`), then gives up (the name is cleaned as text). A
    lookup that never returns (a FUSE daemon that does not answer) holds its
    thread, and while every thread is held no retry is made: the broker never
    waits longer than the deadline, and never grows threads.
    """

    def __init__(self, workers: int = 2, deadline: float = 0.01, budget: float = 0.02):
        self.workers, self.deadline, self.budget = workers, deadline, budget
        self.busy = 0
        self.lock = threading.Lock()
        self.left = budget
        self.timeouts = 0  # lookups given up at the deadline (they may still be running)

    def new_batch(self) -> None:
        self.left = self.budget

    def resolve(self, root_fd: int, path: bytes, directory: bool) -> bytes | None:
        if self.left <= 0:
            return None
        with self.lock:
            if self.busy >= self.workers:
                return None
            self.busy += 1
        try:
            fd = os.dup(root_fd)  # the caller may close root_fd while the thread still runs
        except OSError:
            with self.lock:
                self.busy -= 1
            return None
        box: list = []
        done = threading.Event()

        def work():
            try:
                box.append(_resolve_at(fd, path, directory)[0])
            finally:
                os.close(fd)
                with self.lock:
                    self.busy -= 1
                done.set()
        start = time.monotonic()
        threading.Thread(target=work, name="c8-path-lookup", daemon=True).start()
        finished = done.wait(min(self.deadline, self.left))
        self.left -= time.monotonic() - start
        if not finished:
            self.timeouts += 1
            return None
        return box[0]


class Root:
    """An ``O_PATH`` descriptor of a process's root directory, and where that
    root lies in the sensor's view. Close it (or use it as a context manager)."""

    def __init__(self, fd: int, view: bytes, slow: SlowLookups | None = None):
        self.fd = fd
        self.view = view
        self.slow = slow  # where a lookup the dentry cache cannot answer may go

    @classmethod
    def of_pid(cls, pid: int, proc: str = "/proc", slow: SlowLookups | None = None) -> Root | None:
        """The root of a live process, or None (gone, or not ours to read)."""
        return cls.of_dir(f"{proc}/{pid}/root", slow)

    @classmethod
    def of_dir(cls, path: str, slow: SlowLookups | None = None) -> Root | None:
        """A directory taken as a root (tests use a scratch tree)."""
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            view = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            os.close(fd)
            return None
        return cls(fd, view, slow)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _seen(self, path: bytes, directory: bool) -> bytes | None:
        """Where the kernel's resolution of ``path`` lands, as the process sees it."""
        view, err = _resolve_at(self.fd, path, directory, RESOLVE_CACHED)
        if err == errno.EAGAIN and self.slow is not None:
            view = self.slow.resolve(self.fd, path, directory)
        return strip_view(view, self.view) if view is not None else None

    def _is_link(self, path: bytes) -> bool | None:
        """Whether ``path`` names a symlink inside this root (None: cannot tell now:
        gone, not cached)."""
        how = _OpenHow(os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                       RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_CACHED)
        fd = _libc.syscall(SYS_OPENAT2, self.fd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            return None
        try:
            return stat.S_ISLNK(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def resolve(self, path: bytes, follow: bool = False, dirs: dict | None = None) -> bytes:
        """The canonical form of ``path`` (absolute, as the process names it).

        Directories are resolved by the kernel inside this root; the last
        component too when ``follow``. When the directory cannot be opened
        (removed since, a loop, not a directory, a magic link) the path is
        cleaned as text (:func:`lexical`). ``dirs`` memoises directories for
        the caller (one batch: never longer, a symlink may be swapped)."""
        if follow and self._is_link(path) is not False:
            # Only a symlink is followed: a file's own name stays as the event gave it
            # (read back from the kernel it would be its name now, after a rename).
            seen = self._seen(path, False)
            if seen is not None:
                return seen
        head, last = split_last(path)
        if dirs is None:
            seen = self._seen(head, True)
        else:
            if head not in dirs:
                dirs[head] = self._seen(head, True)
            seen = dirs[head]
        if seen is None:
            return lexical(path)
        if not last:
            return seen
        return seen.rstrip(b"/") + b"/" + last
