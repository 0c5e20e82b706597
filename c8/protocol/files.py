"""Files the sensor writes, made safely whoever else can write near them.

Alert files, supervisor.json and log files hold what monitored processes did
(command lines, file names), and root writes some of them in directories the
sensor user owns. So:

- no symlink is followed at the file's own name (``O_NOFOLLOW``), and a FIFO,
  device or socket planted there is refused (``O_NONBLOCK`` open, then fstat)
  instead of blocking or writing into it;
- an existing file must belong to the writer (or root): a file another user
  planted is refused, not appended to;
- the mode is fixed (0640 by default) with fchmod, whatever the umask;
- :func:`write_atomic` writes a temporary file opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` beside the target and renames it over the
  target through a directory fd: readers never see half a file, and a
  symlink planted at the target's name is replaced, never followed.

Errors are OSError; :class:`UnsafeFile` (a subclass) says what was refused.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import BinaryIO

FILE_MODE = 0o640


class UnsafeFile(OSError):
    """A path refused: not a regular file, or owned by someone else."""


def _check_opened(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(errno.EINVAL, "not a regular file: refusing to write to it", path)
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeFile(errno.EPERM, f"belongs to uid {st.st_uid}, not to the sensor: "
                                      "refusing to write to it", path)
    return st


def open_fd(path: str, *, truncate: bool = False, mode: int = FILE_MODE,
            gid: int | None = None) -> int:
    """An fd of regular file `path` opened for appending (creating it with `mode`).

    `truncate` empties it first. `gid`: give the file this group (root only).
    Raises OSError: ELOOP for a symlink, ENXIO for a FIFO without a reader,
    :class:`UnsafeFile` for anything else that is not the sensor's regular file.
    """
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
             | os.O_NOCTTY | os.O_CLOEXEC)
    fd = os.open(path, flags, mode)
    try:
        st = _check_opened(fd, path)
        os.set_blocking(fd, True)
        if truncate:
            os.ftruncate(fd, 0)
        if gid is not None and st.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)  # the umask took bits away, or it predates us
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: str, *, truncate: bool = False, mode: int = FILE_MODE,
                gid: int | None = None) -> BinaryIO:
    """:func:`open_fd` as a binary file object (buffered; flush after each record)."""
    return os.fdopen(open_fd(path, truncate=truncate, mode=mode, gid=gid), "ab")


def write_atomic(path: str, data: bytes, *, mode: int = FILE_MODE, gid: int | None = None) -> None:
    """Replace `path` with `data` atomically: a fresh temporary file (O_EXCL,
    O_NOFOLLOW) in the same directory, renamed over `path` through a directory fd
    opened without following a symlink. `gid`: the file's group (root only)."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            try:
                if gid is not None:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)
