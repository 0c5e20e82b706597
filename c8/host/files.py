"""Bounded reads of regular files, safe against whoever controls the path.

Every open is ``O_NONBLOCK`` (opening a FIFO never waits for a writer) and
``O_NOCTTY``; the opened file is checked with fstat to be a regular file
before a single byte is read, so a FIFO, a socket or a device (``/dev/zero``)
is refused; reads stop at a cap, so a file that is larger (or grows) is
refused instead of filling memory. ``follow=False`` adds ``O_NOFOLLOW``: a
symlink as the last component is refused. :func:`read_beneath` opens every
component below a trusted directory with ``O_NOFOLLOW``, so nothing under it
can point the reader elsewhere.

Errors are :class:`OSError` (missing, permission) or its subclasses
:class:`NotRegular` and :class:`TooLarge`, so callers that already treat a
missing file as "unknown" treat these the same way.
"""

from __future__ import annotations

import errno
import json
import os
import stat

DEFAULT_LIMIT = 1 << 20  # bytes; runtime state files are a few KiB
_CHUNK = 1 << 16


class NotRegular(OSError):
    """The path names a FIFO, socket, device or directory, not a regular file."""


class TooLarge(OSError):
    """The file holds more than the reader's cap."""


def _flags(follow: bool) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    return flags if follow else flags | os.O_NOFOLLOW


def open_regular(path: str, *, follow: bool = False, dir_fd: int | None = None) -> int:
    """An fd of ``path`` opened for reading, checked to be a regular file.

    Raises OSError (ELOOP for a symlink when ``follow`` is False),
    :class:`NotRegular` for anything but a regular file.
    """
    fd = os.open(path, _flags(follow), dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, limit: int, name: str = "") -> bytes:
    """At most ``limit`` bytes of an open fd; :class:`TooLarge` if there are more.

    Procfs and tracefs files report size 0, so the cap is enforced on what is
    read, never trusted from st_size.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(errno.EFBIG, f"more than {limit} bytes", name)


def read_bytes(path: str, limit: int = DEFAULT_LIMIT, *, follow: bool = False,
               dir_fd: int | None = None) -> bytes:
    """The content of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path, follow=follow, dir_fd=dir_fd)
    try:
        return read_fd(fd, limit, path)
    finally:
        os.close(fd)


def read_head(path: str, limit: int, *, follow: bool = False, dir_fd: int | None = None) -> bytes:
    """The first ``limit`` bytes of a regular file (the rest ignored, not refused)."""
    fd = open_regular(path, follow=follow, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        total = 0
        while total < limit and (chunk := os.read(fd, min(_CHUNK, limit - total))):
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str, limit: int = DEFAULT_LIMIT, *, follow: bool = False) -> str:
    """:func:`read_bytes` decoded as UTF-8 (invalid bytes replaced)."""
    return read_bytes(path, limit, follow=follow).decode(errors="replace")


def read_beneath(root: str, relpath: str, limit: int = DEFAULT_LIMIT,
                 owner: int | None = None) -> bytes:
    """A regular file below the directory ``root``, no symlink followed below it.

    ``root`` itself is trusted (it may be a symlink, /var/run -> /run); every
    component of ``relpath`` is opened with ``O_NOFOLLOW`` relative to its
    parent's fd, and ``..`` is refused, so whoever can write under ``root``
    cannot point the reader outside it. ``owner``: the file must belong to
    this uid (PermissionError otherwise).
    """
    parts = [p for p in relpath.split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise OSError(errno.EINVAL, "bad relative path", relpath)
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC
    dfd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, dir_flags | os.O_NOFOLLOW, dir_fd=dfd)
            os.close(dfd)
            dfd = nxt
        fd = open_regular(parts[-1], dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        if owner is not None and os.fstat(fd).st_uid != owner:
            raise PermissionError(errno.EPERM, f"not owned by uid {owner}",
                                  os.path.join(root, relpath))
        return read_fd(fd, limit, os.path.join(root, relpath))
    finally:
        os.close(fd)


def parse_json(data: bytes) -> object | None:
    """Parsed JSON, or None when malformed (or nested beyond the parser's depth)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def read_json(path: str, limit: int = DEFAULT_LIMIT, *, follow: bool = False) -> object | None:
    """Parsed JSON of a regular file, or None when missing, unsafe, oversize or malformed."""
    try:
        return parse_json(read_bytes(path, limit, follow=follow))
    except OSError:
        return None


def read_json_beneath(root: str, relpath: str, limit: int = DEFAULT_LIMIT,
                      owner: int | None = None) -> object | None:
    """:func:`read_beneath` parsed as JSON; None on any failure."""
    try:
        return parse_json(read_beneath(root, relpath, limit, owner))
    except OSError:
        return None
