"""run_dir: checked before root writes anything there, then made the sensor user's.

Root writes supervisor.json in run_dir and removes stale sockets from it, so
nobody but root and sensor_user may be able to swap run_dir or what it holds:
a run_dir that is a symlink, that belongs to another user, or below a
directory that another user owns or can write to (without the sticky bit) is
refused at start with a message saying which path and why.
"""

from __future__ import annotations

import os
import stat


class UnsafeRunDir(Exception):
    """run_dir cannot be trusted; the message names the path and the reason."""


def _check_ancestor(path: str, run_dir: str) -> None:
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    sticky = bool(st.st_mode & stat.S_ISVTX)
    if st.st_uid != 0:
        raise UnsafeRunDir(f"run_dir {run_dir}: its parent {path} belongs to uid {st.st_uid}, "
                           "not root, who could replace run_dir; use a directory under a "
                           "root-owned one, such as /var/run/capsule8")
    if mode & stat.S_IWOTH and not sticky:
        raise UnsafeRunDir(f"run_dir {run_dir}: its parent {path} is writable by others "
                           f"(mode {mode:04o}, no sticky bit), who could replace run_dir")
    if mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        raise UnsafeRunDir(f"run_dir {run_dir}: its parent {path} is writable by group "
                           f"{st.st_gid} (mode {mode:04o}, no sticky bit), whose members "
                           "could replace run_dir")


def check(run_dir: str, uid: int) -> None:
    """Raise UnsafeRunDir unless run_dir is safe for root to use (see the module doc).

    run_dir may not exist yet; every directory above it (symlinks resolved:
    /var/run -> /run is fine when root owns both) must be root's and not
    writable by others or a non-root group without the sticky bit.
    """
    path = os.path.abspath(run_dir)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeRunDir(f"run_dir {path} is a symlink (to {os.readlink(path)}): refused, "
                               "set run_dir to the real directory")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeRunDir(f"run_dir {path} exists and is not a directory")
        if st.st_uid not in (0, uid):
            raise UnsafeRunDir(f"run_dir {path} belongs to uid {st.st_uid}, neither root nor "
                               "sensor_user: refused")
    parent = os.path.realpath(os.path.dirname(path))
    ancestors = []
    while True:
        ancestors.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for a in reversed(ancestors):
        if os.path.isdir(a):
            _check_ancestor(a, path)


def prepare(run_dir: str, uid: int, gid: int) -> None:
    """Check run_dir, create it if missing, and make it sensor_user's, mode 0750
    (through an fd opened without following a symlink)."""
    check(run_dir, uid)
    path = os.path.abspath(run_dir)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, uid):  # made by someone else since check()
            raise UnsafeRunDir(f"run_dir {path} belongs to uid {st.st_uid}: refused")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)


def make_missing_dirs(file_paths: list[str], uid: int, gid: int) -> list[str]:
    """Create the missing directory of each file a child writes (the detector's file
    outputs, the broker's sensor_id_file), sensor_user's, 0750: no child keeps
    CAP_DAC_OVERRIDE to make /var/log/capsule8 or /var/lib/capsule8 itself. An
    existing directory is left as it is. Returns the directories made."""
    made = []
    for path in file_paths:
        d = os.path.dirname(os.path.abspath(path))
        if os.path.lexists(d) or d in made:
            continue
        os.makedirs(os.path.dirname(d), mode=0o755, exist_ok=True)
        os.mkdir(d, 0o750)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o750)
        finally:
            os.close(fd)
        made.append(d)
    return made
