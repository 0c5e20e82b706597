"""Which kernel sources feed which event category, and how raw arrays become events.

A *source* (INTERNALS.md) writes raw records; a *builder* turns one raw array
(sample header + source fields) into schema arrays, with column assignments
only. The broker asks the collectors for the sources of the categories that
live subscriptions want, and pushes filters using each source's field map.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from c8 import schema
from c8.broker import paths, sockaddr
from c8.schema import rows

CLONE_THREAD = 0x00010000

# x86_64 syscall numbers of the calls the eBPF families report.
NR = {
    "open": 2, "creat": 85, "openat": 257, "openat2": 437,
    "rename": 82, "renameat": 264, "renameat2": 316, "link": 86, "linkat": 265,
    "symlink": 88, "symlinkat": 266, "unlink": 87, "unlinkat": 263, "rmdir": 84,
    "mkdir": 83, "mkdirat": 258, "mknod": 133, "mknodat": 259,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260,
    "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
    "recvmsg": 47, "bind": 49, "listen": 50, "accept4": 288, "recvmmsg": 299,
    "sendmmsg": 307, "execve": 59, "execveat": 322,
}

FILE_KIND_BY_NR = {
    **{NR[n]: "DELETE" for n in ("unlink", "unlinkat", "rmdir")},
    **{NR[n]: "CREATE" for n in ("mkdir", "mkdirat", "mknod", "mknodat")},
    **{NR[n]: "ATTRIBUTE_CHANGE" for n in ("chmod", "fchmod", "fchmodat", "fchmodat2",
                                           "chown", "fchown", "lchown", "fchownat")},
    **{NR[n]: "RENAME" for n in ("rename", "renameat", "renameat2")},
    **{NR[n]: "LINK" for n in ("link", "linkat")},
    **{NR[n]: "SYMLINK" for n in ("symlink", "symlinkat")},
}

NET_KIND_BY_NR = {  # the ATTEMPT kind of each call; its RESULT is the next kind code
    NR["connect"]: "CONNECT_ATTEMPT", NR["bind"]: "BIND_ATTEMPT", NR["listen"]: "LISTEN_ATTEMPT",
    NR["accept"]: "ACCEPT_ATTEMPT", NR["accept4"]: "ACCEPT_ATTEMPT",
    NR["sendto"]: "SENDTO_ATTEMPT", NR["sendmsg"]: "SENDTO_ATTEMPT", NR["sendmmsg"]: "SENDTO_ATTEMPT",
    NR["recvfrom"]: "RECVFROM_ATTEMPT", NR["recvmsg"]: "RECVFROM_ATTEMPT", NR["recvmmsg"]: "RECVFROM_ATTEMPT",
}

Built = list[tuple[str, np.ndarray]]


@dataclass
class Source:
    """One kernel source: what it feeds and how its fields map for pushdown."""

    name: str
    build: Callable[[np.ndarray], Built]
    # schema field -> tracepoint field, for PERF_EVENT_IOC_SET_FILTER pushdown
    kernel_fields: dict[str, str] = field(default_factory=dict)


def base(category: str, raw: np.ndarray, kind: str | np.ndarray,
         widths: dict[str, int] | None = None) -> np.ndarray:
    """A schema batch with the sample header copied from a raw array (``widths``:
    string fields held narrower, schema.empty)."""
    out = schema.empty(category, len(raw), widths)
    out["sensor_monotime_nanos"] = raw["time"]
    out["cpu"] = raw["cpu"]
    out["process_pid"] = raw["pid"]
    out["process_tid"] = raw["tid"]
    out["kind"] = schema.kind_code(category, kind) if isinstance(kind, str) else kind
    if raw.dtype.names and "uid" in raw.dtype.names:
        out["uid"] = raw["uid"]
        out["gid"] = raw["gid"]
    return out


def split_exit_code(code: np.ndarray, out: np.ndarray, prefix: str = "exit_") -> None:
    """Raw wait status -> status, signal, core flag (as waitpid(2) decodes it)."""
    code = code.astype(np.int32)
    sig = code & 0x7F
    out[prefix + "code"] = code
    out[prefix + "signal"] = sig
    out[prefix + "status"] = np.where(sig == 0, (code >> 8) & 0xFF, 0)
    if prefix + "core_dumped" in out.dtype.names:
        out[prefix + "core_dumped"] = (code & 0x80) != 0


def lost_event(source: str, count: int, cpu: int = 0, when: int | None = None) -> np.ndarray:
    """One ``lost`` event: ``count`` events lost at ``source`` (kernel, subscriber, ...)."""
    out = schema.empty("lost", 1)
    out["kind"] = schema.kind_code("lost", "LOST")
    out["cpu"] = max(cpu, 0)
    out["sensor_monotime_nanos"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if when is None else when
    out["source"] = source.encode()
    out["count"] = count
    return out


# -- process -------------------------------------------------------------------
def build_newtask(raw: np.ndarray) -> Built:
    out = base("process", raw, "FORK")
    out["fork_child_pid"] = raw["tp_pid"]
    out["fork_clone_flags"] = raw["clone_flags"]
    out["fork_is_thread"] = (raw["clone_flags"] & CLONE_THREAD) != 0
    return [("process", out)]



def build_exec_bpf(raw: np.ndarray) -> Built:
    ok = raw[raw["ret"] == 0]
    out = base("process", ok, "EXEC")
    out["exec_filename"] = exec_filenames(ok)
    out["exec_command_line"] = ok["argv"]
    return [("process", out)]


def exec_filenames(raw: np.ndarray) -> np.ndarray:
    """The names of exec records; an exec of a descriptor (execveat(fd, "",
    AT_EMPTY_PATH): fexecve of a memfd, a runtime re-executing its cloned binary)
    named as the kernel names it, /dev/fd/<fd>."""
    names = raw["filename"]
    by_fd = (raw["nr"] == NR["execveat"]) & (names == b"")
    if not by_fd.any():
        return names
    names = names.copy()
    names[by_fd] = [b"/dev/fd/%d" % fd for fd in raw["dirfd"][by_fd].tolist()]  # few: per exec
    return names


def build_exec_tp(raw: np.ndarray) -> Built:
    out = base("process", raw, "EXEC")
    out["exec_filename"] = raw["filename"]
    return [("process", out)]


def build_exit_bpf(raw: np.ndarray) -> Built:
    whole = raw[raw["group_dead"] != 0]
    out = base("process", whole, "EXIT")
    split_exit_code(whole["exit_code"], out)
    return [("process", out)]


def build_exit_tp(raw: np.ndarray) -> Built:
    whole = raw[raw["group_dead"] != 0] if "group_dead" in raw.dtype.names else raw
    out = base("process", whole, "EXIT")
    out["exit_code"] = -1  # unknown without the eBPF exit program
    out["exit_status"] = -1
    out["exit_signal"] = -1
    return [("process", out)]


# -- syscall -------------------------------------------------------------------
def build_sys_enter(raw: np.ndarray) -> Built:
    out = base("syscall", raw, "ENTER")
    out["id"] = raw["id"]
    args = raw["args"]
    for i in range(6):
        out[f"arg{i}"] = args[:, i]
    return [("syscall", out)]


def build_sys_exit(raw: np.ndarray) -> Built:
    out = base("syscall", raw, "EXIT")
    out["id"] = raw["id"]
    out["ret"] = raw["ret"]
    return [("syscall", out)]


# -- file ----------------------------------------------------------------------
# The names of a file row, 256 bytes each as declared: a batch holds each only as
# wide as its longest value (c8.schema.rows), which cuts an open's row from 1,667
# bytes to 475 (names under 32 bytes) for every later stage. Only the paths stage
# writes names after the build, and it widens first.
FILE_NAMES = ("filename", "path", "oldname", "oldpath", "newname")


def file_base(raw: np.ndarray, kind: str | np.ndarray, **names: np.ndarray) -> np.ndarray:
    """base() for a file batch holding ``names`` (field -> values); each name field
    only as wide as its values, the ones not given at the narrowest."""
    declared = schema.dtype("file")
    widths = {n: rows.width_for(rows.used_width(names[n]) if n in names else 0, declared[n].itemsize)
              for n in FILE_NAMES}
    out = base("file", raw, kind, widths)
    for n, values in names.items():
        out[n] = values
    return out


def build_open(raw: np.ndarray) -> Built:
    path = paths.resolve(raw["pid"], raw["dirfd"], raw["filename"], open_follows(raw["flags"]))
    out = file_base(raw, "OPEN", filename=raw["filename"], path=path)
    out["dirfd"] = raw["dirfd"]
    out["path_status"] = paths.status(raw["dirfd"], raw["filename"], out["path"])
    out["open_flags"] = raw["flags"]
    out["open_mode"] = raw["mode"]
    out["syscall"] = raw["nr"]
    out["ret"] = raw["ret"]
    return [("file", out)]


def _kind_table(table: dict[int, str], category: str) -> np.ndarray:
    """syscall number -> kind code (0: not this category's), as an array to index.
    Entry 0 (read) is in no table: out-of-range numbers are looked up there."""
    lut = np.zeros(max(table) + 1, np.uint8)
    for nr, name in table.items():
        lut[nr] = schema.kind_code(category, name)
    return lut


FILE_KINDS = _kind_table(FILE_KIND_BY_NR, "file")
NET_KINDS = _kind_table(NET_KIND_BY_NR, "network")


def _kinds_by_nr(nrs: np.ndarray, lut: np.ndarray) -> np.ndarray:
    nrs = nrs.astype(np.int64)
    return lut[np.where((nrs >= 0) & (nrs < len(lut)), nrs, 0)]


def _only_known(raw: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records whose syscall has a kind here (usually all of them)."""
    known = kinds != 0
    if known.all():
        return raw, kinds
    return rows.take(raw, known), kinds[known]


O_NOFOLLOW, O_CREAT_EXCL = 0o400000, 0o300
AT_SYMLINK_NOFOLLOW, AT_SYMLINK_FOLLOW = 0x100, 0x400
_FOLLOWING = np.array([NR["chmod"], NR["chown"], NR["fchmodat"]])  # always follow the last symlink
_FOLLOWING_UNLESS_FLAG = np.array([NR["fchmodat2"], NR["fchownat"]])  # unless AT_SYMLINK_NOFOLLOW


def open_follows(flags: np.ndarray) -> np.ndarray:
    """Opens that follow a symlink in the last component: not O_NOFOLLOW, not O_CREAT|O_EXCL."""
    flags = flags.astype(np.int64)
    return ((flags & O_NOFOLLOW) == 0) & ((flags & O_CREAT_EXCL) != O_CREAT_EXCL)


def file1_follows(nrs: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """chmod/chown follow the last symlink; unlink, rmdir, mkdir, mknod, lchown do not."""
    nofollow = (flags.astype(np.int64) & AT_SYMLINK_NOFOLLOW) != 0
    return np.isin(nrs, _FOLLOWING) | (np.isin(nrs, _FOLLOWING_UNLESS_FLAG) & ~nofollow)


def file2_oldpath(raw: np.ndarray, kinds: np.ndarray, newpath: np.ndarray) -> np.ndarray:
    """The canonical source: RENAME and LINK against olddirfd (LINK follows a symlink
    only with AT_SYMLINK_FOLLOW); SYMLINK's target from the link's directory."""
    link_follow = (kinds == schema.kind_code("file", "LINK")) & ((raw["flags"].astype(np.int64) & AT_SYMLINK_FOLLOW) != 0)
    out = paths.resolve(raw["pid"], raw["olddirfd"], raw["oldname"], link_follow)
    sym = kinds == schema.kind_code("file", "SYMLINK")
    if sym.any():
        targets = paths.symlink_targets(raw["pid"][sym], newpath[sym], raw["oldname"][sym])
        out = out.astype(f"S{max(out.dtype.itemsize, targets.dtype.itemsize)}")  # resolve's width is its own
        out[sym] = targets
    return out


def build_file1(raw: np.ndarray) -> Built:
    kinds = _kinds_by_nr(raw["nr"], FILE_KINDS)
    raw, kinds = _only_known(raw, kinds)
    path = paths.resolve(raw["pid"], raw["dirfd"], raw["filename"], file1_follows(raw["nr"], raw["flags"]))
    out = file_base(raw, kinds, filename=raw["filename"], path=path)
    out["dirfd"] = raw["dirfd"]
    out["path_status"] = paths.status(raw["dirfd"], raw["filename"], out["path"])
    out["open_mode"] = raw["mode"]
    out["owner_uid"] = raw["owner_uid"]
    out["owner_gid"] = raw["owner_gid"]
    out["syscall"] = raw["nr"]
    out["ret"] = raw["ret"]
    return [("file", out)]


def build_file2(raw: np.ndarray) -> Built:
    kinds = _kinds_by_nr(raw["nr"], FILE_KINDS)
    raw, kinds = _only_known(raw, kinds)
    path = paths.resolve(raw["pid"], raw["newdirfd"], raw["newname"])
    # filename: the path the operation made, for globs
    out = file_base(raw, kinds, oldname=raw["oldname"], newname=raw["newname"], filename=raw["newname"],
                    path=path, oldpath=file2_oldpath(raw, kinds, path))
    out["dirfd"] = raw["newdirfd"]
    out["olddirfd"] = raw["olddirfd"]
    out["path_status"] = paths.status(raw["newdirfd"], raw["newname"], out["path"])
    out["syscall"] = raw["nr"]
    out["ret"] = raw["ret"]
    return [("file", out)]


CWD_SOURCE = "bpf:cwd"
DUP_SOURCES = ("syscalls:sys_enter_dup2", "syscalls:sys_enter_dup3")
# The window's category of descriptor and cwd changes: file-shaped rows (kind OPEN, the
# descriptor set in ``ret``) for the paths stage only, taken out before identity, never published.
FD_CHANGES = "fd_changes"


def build_cwd(raw: np.ndarray) -> Built:
    """Successful chdir/fchdir: chdir's name resolved like an open's, fchdir's fd in ``dirfd``."""
    ok = raw[raw["ret"] == 0]
    path = paths.resolve(ok["pid"], ok["dirfd"], ok["filename"], np.ones(len(ok), bool))
    out = file_base(ok, "OPEN", filename=ok["filename"], path=path)
    out["dirfd"] = ok["dirfd"]
    out["syscall"] = ok["nr"]
    out["ret"] = paths.AT_FDCWD  # the descriptor it sets: the cwd
    out["path_status"] = paths.status(ok["dirfd"], ok["filename"], out["path"])
    return [(FD_CHANGES, out)]


def build_dup(raw: np.ndarray) -> Built:
    """dup2/dup3 at entry (their arguments say it all; a failure is rare: oldfd not open):
    ``newfd`` names what ``oldfd`` names, close-on-exec with dup3's O_CLOEXEC."""
    out = file_base(raw, "OPEN")
    out["dirfd"] = raw["oldfd"].astype(np.int64).astype(np.int32)
    out["ret"] = raw["newfd"].astype(np.int64).astype(np.int32)
    out["syscall"] = raw["__syscall_nr"]
    if "flags" in raw.dtype.names:
        out["open_flags"] = raw["flags"].astype(np.int64).astype(np.int32)
    out["path_status"] = paths.UNKNOWN
    return [(FD_CHANGES, out)]


# -- network -------------------------------------------------------------------
def build_sock(raw: np.ndarray) -> Built:
    """One record per call: an ATTEMPT (at enter time) and a RESULT (at exit)."""
    op = _kinds_by_nr(raw["nr"], NET_KINDS)
    raw, op = _only_known(raw, op)
    attempt = base("network", raw, op)
    # The record is written at exit; the attempt is stamped just before its result.
    attempt["sensor_monotime_nanos"] = raw["time"] - 1
    attempt["fd"] = raw["fd"]
    attempt["backlog"] = raw["backlog"]
    attempt["syscall"] = raw["nr"]
    fam, addr, port, port_raw = sockaddr.decode(raw["addr"], raw["addrlen"])
    attempt["family"] = fam
    attempt["address"] = addr
    attempt["port"] = port
    attempt["port_raw"] = port_raw
    result = rows.copy(attempt)
    result["kind"] = op + 1  # *_RESULT follows its *_ATTEMPT in KINDS
    result["sensor_monotime_nanos"] = raw["time"]
    result["ret"] = raw["ret"]
    # accept and recv* learn the peer only when they return: their ATTEMPT carries no address
    acc = (op == schema.kind_code("network", "ACCEPT_ATTEMPT")) | (op == schema.kind_code("network", "RECVFROM_ATTEMPT"))
    attempt["address"][acc] = b""
    attempt["port"][acc] = 0
    attempt["port_raw"][acc] = 0
    attempt["family"][acc] = 0
    return [("network", attempt), ("network", result)]


# -- container: cgroup mkdir/rmdir/attach need the container table, so the broker handles
# them itself (Broker._container_cgroup); they are listed here as sources only.
def build_nothing(raw: np.ndarray) -> Built:
    return []


SOURCES: dict[str, Source] = {
    "task:task_newtask": Source("task:task_newtask", build_newtask),
    "bpf:exec": Source("bpf:exec", build_exec_bpf),
    "bpf:exit": Source("bpf:exit", build_exit_bpf),
    "raw_syscalls:sys_enter": Source("raw_syscalls:sys_enter", build_sys_enter,
                                     {"id": "id", "process_tid": "common_pid"}),
    "raw_syscalls:sys_exit": Source("raw_syscalls:sys_exit", build_sys_exit,
                                    {"id": "id", "ret": "ret", "process_tid": "common_pid"}),
    "bpf:open": Source("bpf:open", build_open),
    "bpf:file1": Source("bpf:file1", build_file1),
    "bpf:file2": Source("bpf:file2", build_file2),
    "bpf:sock": Source("bpf:sock", build_sock),
    CWD_SOURCE: Source(CWD_SOURCE, build_cwd),
    **{name: Source(name, build_dup) for name in DUP_SOURCES},
    "cgroup:cgroup_mkdir": Source("cgroup:cgroup_mkdir", build_nothing),
    "cgroup:cgroup_rmdir": Source("cgroup:cgroup_rmdir", build_nothing),
    "cgroup:cgroup_attach_task": Source("cgroup:cgroup_attach_task", build_nothing),
}

# Fallbacks when an eBPF family cannot load on this kernel.
FALLBACK = {
    "bpf:exec": "sched:sched_process_exec",
    "bpf:exit": "sched:sched_process_exit",
}
SOURCES["sched:sched_process_exec"] = Source("sched:sched_process_exec", build_exec_tp)
SOURCES["sched:sched_process_exit"] = Source("sched:sched_process_exit", build_exit_tp)

# Process sources run whenever anything is subscribed: they keep the process table.
# sched_process_exec names every exec from kernel memory: with the eBPF exec
# family running it only fills names that family could not read from user memory
# (a page not yet faulted in, as after vfork/posix_spawn).
PROCESS_SOURCES = ("task:task_newtask", "bpf:exec", "bpf:exit", "sched:sched_process_exec")
# mkdir/rmdir: CREATED/DESTROYED; attach: which container a pid moved into (runc's
# helper, docker exec), applied in time order with the process events
CGROUP_SOURCES = ("cgroup:cgroup_mkdir", "cgroup:cgroup_rmdir", "cgroup:cgroup_attach_task")
# The window's category of cgroup mkdirs and rmdirs: merged by time like any event,
# turned into CREATED/DESTROYED at release in that order (Broker._cgroup_changes),
# never published. Applied as they arrived, a mkdir read late from one CPU after the
# container's rmdir from another gave it a second life: a second CREATED.
CGROUP_CHANGES = "cgroup_changes"


def cgroup_changes(raw: np.ndarray, made: bool) -> np.ndarray:
    """A cgroup_mkdir (``made``) or cgroup_rmdir batch as CGROUP_CHANGES rows."""
    out = np.empty(len(raw), [("sensor_monotime_nanos", "<u8"), ("cpu", "<u4"), ("process_pid", "<i4"),
                              ("process_tid", "<i4"), ("made", "?"), ("path", raw["path"].dtype)])
    out["sensor_monotime_nanos"] = raw["time"]
    out["cpu"] = raw["cpu"]
    out["process_pid"] = raw["pid"]
    out["process_tid"] = raw["tid"]
    out["made"] = made
    out["path"] = raw["path"]
    return out


# The sources of each kind, where a category's kinds come from different sources:
# a subscription whose kinds (listed, or implied by its filter) miss a source
# leaves that source out of the plan.
KIND_SOURCES: dict[str, dict[str, str]] = {
    "syscall": {"ENTER": "raw_syscalls:sys_enter", "EXIT": "raw_syscalls:sys_exit"},
    "file": {"OPEN": "bpf:open", "CREATE": "bpf:file1", "DELETE": "bpf:file1",
             "ATTRIBUTE_CHANGE": "bpf:file1", "RENAME": "bpf:file2", "LINK": "bpf:file2",
             "SYMLINK": "bpf:file2"},
}


def sources_for(category: str, kinds: set[str] | frozenset[str] | None = None) -> list[str]:
    """The sources a subscription to a category needs; ``kinds`` (None: all) narrow
    the syscall and file sources. Process and cgroup sources feed the tables and
    are never narrowed."""
    by_kind = KIND_SOURCES.get(category)
    if by_kind is not None:
        wanted = by_kind if kinds is None else {k: s for k, s in by_kind.items() if k in kinds}
        found = list(dict.fromkeys(wanted.values()))
        if category == "file" and found:  # cwd and fd changes: names resolve from the stream
            found += [CWD_SOURCE, *DUP_SOURCES]
        return found
    if category == "process":
        return list(PROCESS_SOURCES)
    if category == "network":
        return ["bpf:sock"] if kinds is None or kinds else []
    if category == "container":
        return list(CGROUP_SOURCES) + list(PROCESS_SOURCES)
    return []

