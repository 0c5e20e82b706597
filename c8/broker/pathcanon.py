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

Paths are reported as the process sees them: the directory the kernel
opened, read back with ``readlink(/proc/self/fd/<n>)`` (the sensor's view),
less the prefix under which the process's root lies in that view.

The last component is kept as named unless the call follows it (open
without O_NOFOLLOW, ``link`` with AT_SYMLINK_FOLLOW): unlink, rename and
lchown act on the symlink itself, and a deleted file cannot be opened.
"""

from __future__ import annotations

import ctypes
import os
import re

SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
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


class Root:
    """An ``O_PATH`` descriptor of a process's root directory, and where that
    root lies in the sensor's view. Close it (or use it as a context manager)."""

    def __init__(self, fd: int, view: bytes):
        self.fd = fd
        self.view = view

    @classmethod
    def of_pid(cls, pid: int, proc: str = "/proc") -> Root | None:
        """The root of a live process, or None (gone, or not ours to read)."""
        return cls.of_dir(f"{proc}/{pid}/root")

    @classmethod
    def of_dir(cls, path: str) -> Root | None:
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
        return cls(fd, view)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, path: bytes, directory: bool) -> int:
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
        how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(SYS_OPENAT2, self.fd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd

    def _seen(self, path: bytes, directory: bool) -> bytes | None:
        """Where the kernel's resolution of ``path`` lands, as the process sees it."""
        try:
            fd = self._open(path, directory)
        except OSError:  # ENOENT, ELOOP, ENOTDIR, EACCES; ENOSYS before Linux 5.6
            return None
        try:
            return strip_view(os.fsencode(os.readlink(f"/proc/self/fd/{fd}")), self.view)
        except OSError:
            return None
        finally:
            os.close(fd)

    def resolve(self, path: bytes, follow: bool = False, dirs: dict | None = None) -> bytes:
        """The canonical form of ``path`` (absolute, as the process names it).

        Directories are resolved by the kernel inside this root; the last
        component too when ``follow``. When the directory cannot be opened
        (removed since, a loop, not a directory, a magic link) the path is
        cleaned as text (:func:`lexical`). ``dirs`` memoises directories for
        the caller (one batch: never longer, a symlink may be swapped)."""
        if follow:
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
