"""/proc readers: bounded, non-blocking, regular files only (c8.host.files).

Every reader takes ``proc`` (a fake tree in tests) and returns an "unknown"
value (None, [], "") when the process is gone or its file unreadable, so
callers never handle a vanished pid as an error. A process is untrusted:
its command line is cut at a cap, never refused.

One caveat no reader here can remove: reading another process's
``cmdline`` takes its mm lock, which that process can hold for long
(measured: a thread blocked in mmap() of a FUSE direct_io file whose page
an unanswered read keeps locked holds it for writing). Callers that must
never wait read it off their critical path (the broker's container worker
and its process lookups, c8.broker.lookups, do).
"""

from __future__ import annotations

import os
import stat as _stat
from typing import NamedTuple

from .files import read_bytes, read_head

PROC = "/proc"
CMDLINE_LIMIT = 1 << 16  # bytes of argv kept
SMALL_LIMIT = 1 << 16    # stat, status, cgroup


class Stat(NamedTuple):
    """Fields of /proc/<pid>/stat the sensor uses."""

    start_ticks: int  # start time, clock ticks since boot
    ppid: int
    comm: str


def pids(proc: str = PROC) -> list[int]:
    """Every process id in ``proc`` (empty when unreadable)."""
    try:
        return [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return []


def tasks(pid: int, proc: str = PROC) -> list[int]:
    """Thread ids of a process, sorted ([] when gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"{proc}/{pid}/task") if t.isdigit())
    except OSError:
        return []


def cmdline_raw(pid: int, proc: str = PROC, limit: int = CMDLINE_LIMIT) -> bytes:
    """The NUL-separated argv of a process, cut at ``limit`` bytes (b"" when gone)."""
    try:
        return read_head(f"{proc}/{pid}/cmdline", limit)
    except OSError:
        return b""


def argv(pid: int, proc: str = PROC, limit: int = CMDLINE_LIMIT) -> list[str]:
    """argv of a process ([] when gone, unreadable, or a kernel thread)."""
    raw = cmdline_raw(pid, proc, limit)
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def command_line(pid: int, proc: str = PROC, limit: int = CMDLINE_LIMIT) -> bytes:
    """argv joined by spaces (b"" when gone)."""
    return cmdline_raw(pid, proc, limit).rstrip(b"\0").replace(b"\0", b" ")


def stat(pid: int, proc: str = PROC) -> Stat | None:
    """(start time in ticks, parent pid, comm), or None when gone or malformed."""
    try:
        data = read_bytes(f"{proc}/{pid}/stat", SMALL_LIMIT)
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    close = data.rfind(b")")
    rest = data[close + 2:].split()
    try:
        return Stat(int(rest[19]), int(rest[1]), data[data.find(b"(") + 1:close].decode(errors="replace"))
    except (IndexError, ValueError):
        return None


def ppid(pid: int, proc: str = PROC) -> int | None:
    """Parent pid, or None when gone."""
    st = stat(pid, proc)
    return st.ppid if st else None


_IDS = {"Uid:": ("uid", "euid", "suid", "fsuid"), "Gid:": ("gid", "egid", "sgid", "fsgid")}


def credentials(pid: int, proc: str = PROC) -> dict[str, int]:
    """{uid, euid, suid, fsuid, gid, egid, sgid, fsgid} from /proc/<pid>/status ({} when gone)."""
    try:
        text = read_bytes(f"{proc}/{pid}/status", SMALL_LIMIT).decode(errors="replace")
    except OSError:
        return {}
    return _parse_ids(text)


def _parse_ids(status: str) -> dict[str, int]:
    creds: dict[str, int] = {}
    for line in status.splitlines():
        names = _IDS.get(line[:4])
        if names:
            try:
                creds.update(zip(names, map(int, line.split()[1:5]), strict=True))
            except ValueError:
                return {}
    return creds


def cgroup_lines(pid: int, proc: str = PROC) -> list[str] | None:
    """Lines of /proc/<pid>/cgroup, or None when gone."""
    try:
        return read_bytes(f"{proc}/{pid}/cgroup", SMALL_LIMIT).decode(errors="replace").splitlines()
    except OSError:
        return None


def cwd(pid: int, proc: str = PROC) -> str:
    """The working directory of a process ("" when it cannot be known)."""
    try:
        return os.readlink(f"{proc}/{pid}/cwd")
    except OSError:
        return ""


def fd_path(pid: int, fd: int, proc: str = PROC) -> str:
    """What fd ``fd`` of a process names ("" when it cannot be known)."""
    try:
        return os.readlink(f"{proc}/{pid}/fd/{fd}")
    except OSError:
        return ""


def exe(pid: int, proc: str = PROC) -> str:
    """The path of a process's executable ("" when unknown)."""
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return ""


def exe_stat(pid: int, proc: str = PROC) -> os.stat_result | None:
    """fstat of the executable a process runs (opened through /proc/<pid>/exe
    with O_PATH: the very inode, whatever its path now names), or None."""
    try:
        fd = os.open(f"{proc}/{pid}/exe", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _root_exe(st: os.stat_result | None) -> bool:
    return (st is not None and _stat.S_ISREG(st.st_mode) and st.st_uid == 0
            and not st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH))


def root_credentials(creds: dict[str, int]) -> bool:
    """True for :func:`credentials` that are root's own: real, effective, saved and
    filesystem uids all 0 (a setuid program run by a user is not)."""
    return bool(creds) and all(creds.get(k) == 0 for k in ("uid", "euid", "suid", "fsuid"))


def runs_as_root(pid: int, proc: str = PROC) -> bool:
    """True when the process is root's own: real, effective, saved and
    filesystem uids all 0 (a setuid run by a user is not), and its executable
    is a regular file owned by root, writable by nobody else."""
    return advertiser(pid, proc).trusted


class Advertiser(NamedTuple):
    """A process whose command line may name where runtimes keep state."""

    argv: list[str]
    uid: int | None  # real uid; None when gone
    trusted: bool    # runs as root a root-owned executable (:func:`runs_as_root`)


def advertiser(pid: int, proc: str = PROC) -> Advertiser:
    """argv, real uid and trust of a process.

    Everything is read through one fd of /proc/<pid>, which names that very
    process: if it exits and its pid is reused between the reads, the later
    reads fail instead of describing the newcomer.
    """
    try:
        dfd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Advertiser([], None, False)
    try:
        try:
            raw = read_head("cmdline", CMDLINE_LIMIT, dir_fd=dfd)
            status = read_bytes("status", SMALL_LIMIT, dir_fd=dfd).decode(errors="replace")
        except OSError:
            return Advertiser([], None, False)
        args = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
        creds = _parse_ids(status)
        uid = creds.get("uid")
        if not root_credentials(creds):
            return Advertiser(args, uid, False)
        try:
            efd = os.open("exe", os.O_PATH | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return Advertiser(args, uid, False)
        try:
            return Advertiser(args, uid, _root_exe(os.fstat(efd)))
        finally:
            os.close(efd)
    finally:
        os.close(dfd)


def boot_id(proc: str = PROC) -> str:
    """This boot's id, or "unknown-boot"."""
    try:
        return read_bytes(f"{proc}/sys/kernel/random/boot_id", 256).decode(errors="replace").strip()
    except OSError:
        return "unknown-boot"
