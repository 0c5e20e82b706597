"""The sensor's eBPF programs, built with :mod:`c8.collectors.bpf.asm`.

Each syscall of a family gets two tracepoint programs:

- ``sys_enter_<name>``: drop ignored tgids; build the record (header,
  arguments, strings and sockaddrs read from user memory) in this thread's
  slot of the family's TASK_STORAGE map; apply the family's filter; mark the
  record pending (its ``tag``, the last store). A filtered-out call leaves it
  unmarked, so nothing follows.
- ``sys_exit_<name>``: find this thread's pending record, check it is this
  syscall's, set ``ret`` (and read what the kernel wrote back: accept's peer,
  recvfrom's source, recvmsg's msg_name), write it into this CPU's ring and
  unmark it. A record of one name
  (``name_len`` in its layout) has that name read again here when the read at
  entry failed (and then filtered), and is written only up to the name's end.

Per-thread storage costs a pointer chase where a HASH costs a hashed update,
lookup and delete a call (file opens: 488 ns of program time a call against
543, and 5% more opens a second: bench/bench_bpf.py). On a kernel without
task storage for tracepoint programs (before 6.x) the manager loads the same
programs in their ``hash`` form: the record is built in a per-CPU scratch buffer and saved in a pending
HASH keyed by pid_tgid, which the exit looks up and deletes. There the exec
family's records are keyed by the process (tgid in both halves): a thread
other than the leader that execs successfully returns as the leader (the
kernel gives it the tgid as its pid), so its exit would not find a record
keyed by its old tid. (Task storage follows the thread's task_struct, which
survives the exec.)

Family ``exit`` has one program on sched:sched_process_exit that reads the
raw wait status from ``current->exit_code`` (offset from BTF) and outputs at
once. A user string that cannot be read (page not present) leaves its field
empty and passes the enter's name filter. A record of one name has it read
again at exit, when the kernel has faulted it in, and filtered there; a name
still unreadable is kept unfiltered (the filter only widens).

The output is this CPU's BPF ring buffer (bpf_ringbuf_output, Linux 5.8), or
on older kernels this CPU's perf ring (bpf_perf_event_output). A ring buffer
record carries its own time and pid_tgid: every record is built behind a
16-byte prefix (``rec.PREFIX_SIZE``) that the exit program fills just before
the output. Perf output costs about 350 ns a record against 25 for the ring
buffer (measured here: docs/INTERNALS.md), and writes time, pid and CPU itself.

Every record that passed the filters and still does not reach the ring is
counted in the per-CPU counters map (:mod:`c8.collectors.bpf.losses`): a failed
output (a full ring buffer included), a record that could not be saved (no task storage to
be had, the pending HASH full), a saved record whose exit never came.

Register conventions: r6 ctx, r8 record (``PREFIX`` bytes into its map value),
r9 filter config (enter programs).
Stack: fp-8 u32 zero key, fp-16 pid_tgid, fp-24 tgid, fp-48..fp-33 scratch,
fp-56 u32 counter key, fp-64 u32 cpu (the ring's key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from c8.collectors.bpf import filters as flt
from c8.collectors.bpf import losses
from c8.collectors.bpf import records as rec
from c8.collectors.bpf.asm import (
    BPF_ANY,
    BPF_F_CURRENT_CPU,
    DW,
    FP,
    GET_CURRENT_PID_TGID,
    GET_CURRENT_TASK,
    GET_CURRENT_TASK_BTF,
    GET_CURRENT_UID_GID,
    GET_SMP_PROCESSOR_ID,
    KTIME_GET_NS,
    LOCAL_STORAGE_GET_F_CREATE,
    MAP_DELETE_ELEM,
    MAP_LOOKUP_ELEM,
    MAP_UPDATE_ELEM,
    PERF_EVENT_OUTPUT,
    PROBE_READ_KERNEL,
    PROBE_READ_USER,
    PROBE_READ_USER_STR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    RINGBUF_OUTPUT,
    SIZE_OF,
    TASK_STORAGE_GET,
    B,
    Program,
    W,
)

AT_FDCWD = rec.AT_FDCWD
O_CREAT_WRONLY_TRUNC = 0o1101
AT_SYMLINK_NOFOLLOW = 0x100
MAX_ARGS = 64
# What a tracepoint program returns: non-zero lets the kernel go on to the perf
# events of the tracepoint. Zero would hide the event from every other tool
# (perf record, another tracer) tracing the same tracepoint while c8 runs.
KEEP_EVENT = 1

KEY0, PID_TGID, TGID, TMP, COUNTER_KEY, RING_KEY = -8, -16, -24, -48, -56, -64
PREFIX = rec.PREFIX_SIZE


def arg(i: int) -> int:
    """ctx offset of syscall argument ``i`` in a sys_enter record."""
    return 16 + 8 * i


RET_OFF = 16  # sys_exit ctx: long ret
NR_EXECVE, NR_EXECVEAT = 59, 322  # x86_64
NR_OFF = 8  # __syscall_nr


# -- field sources ------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """Copy syscall argument ``index`` into the field."""

    index: int


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Str:
    """Read a user string whose pointer is argument ``index``; names are filtered."""

    index: int


@dataclass(frozen=True)
class OpenHow:
    """openat2: flags and mode from the struct open_how argument ``index`` points to."""

    index: int


@dataclass(frozen=True)
class Argv:
    index: int


@dataclass(frozen=True)
class SockAddr:
    """A sockaddr: ``how`` is ``enter`` (pointer arg, length arg), ``exit_len``
    (pointer arg, int* length arg, read at exit), ``msg_enter``/``msg_exit``
    (a struct msghdr pointer arg; msg_name/msg_namelen)."""

    how: str
    ptr: int
    length: int = -1


@dataclass(frozen=True)
class Syscall:
    name: str
    fields: dict = field(default_factory=dict)


def _s(name: str, **fields) -> Syscall:
    return Syscall(name, fields)


FAMILIES: dict[str, list[Syscall]] = {
    "open": [
        _s("open", filename=Str(0), flags=Arg(1), mode=Arg(2), dirfd=Const(AT_FDCWD)),
        _s("openat", dirfd=Arg(0), filename=Str(1), flags=Arg(2), mode=Arg(3)),
        _s("openat2", dirfd=Arg(0), filename=Str(1), flags=OpenHow(2)),
        _s("creat", filename=Str(0), mode=Arg(1), flags=Const(O_CREAT_WRONLY_TRUNC),
           dirfd=Const(AT_FDCWD)),
    ],
    "file1": [
        _s("unlink", filename=Str(0)),
        _s("unlinkat", dirfd=Arg(0), filename=Str(1), flags=Arg(2)),
        _s("rmdir", filename=Str(0)),
        _s("mkdir", filename=Str(0), mode=Arg(1)),
        _s("mkdirat", dirfd=Arg(0), filename=Str(1), mode=Arg(2)),
        _s("mknod", filename=Str(0), mode=Arg(1)),
        _s("mknodat", dirfd=Arg(0), filename=Str(1), mode=Arg(2)),
        _s("chmod", filename=Str(0), mode=Arg(1)),
        _s("fchmodat", dirfd=Arg(0), filename=Str(1), mode=Arg(2)),
        _s("fchmodat2", dirfd=Arg(0), filename=Str(1), mode=Arg(2), flags=Arg(3)),
        _s("chown", filename=Str(0), owner_uid=Arg(1), owner_gid=Arg(2)),
        _s("lchown", filename=Str(0), owner_uid=Arg(1), owner_gid=Arg(2),
           flags=Const(AT_SYMLINK_NOFOLLOW)),
        _s("fchownat", dirfd=Arg(0), filename=Str(1), owner_uid=Arg(2), owner_gid=Arg(3),
           flags=Arg(4)),
        _s("fchmod", dirfd=Arg(0), mode=Arg(1)),
        _s("fchown", dirfd=Arg(0), owner_uid=Arg(1), owner_gid=Arg(2)),
    ],
    "file2": [
        _s("rename", oldname=Str(0), newname=Str(1)),
        _s("renameat", olddirfd=Arg(0), oldname=Str(1), newdirfd=Arg(2), newname=Str(3)),
        _s("renameat2", olddirfd=Arg(0), oldname=Str(1), newdirfd=Arg(2), newname=Str(3),
           flags=Arg(4)),
        _s("link", oldname=Str(0), newname=Str(1)),
        _s("linkat", olddirfd=Arg(0), oldname=Str(1), newdirfd=Arg(2), newname=Str(3),
           flags=Arg(4)),
        _s("symlink", oldname=Str(0), newname=Str(1)),
        _s("symlinkat", oldname=Str(0), newdirfd=Arg(1), newname=Str(2)),
    ],
    "exec": [
        _s("execve", filename=Str(0), argv=Argv(1), dirfd=Const(AT_FDCWD)),
        _s("execveat", dirfd=Arg(0), filename=Str(1), argv=Argv(2), flags=Arg(4)),
    ],
    "sock": [
        _s("connect", fd=Arg(0), addr=SockAddr("enter", 1, 2)),
        _s("bind", fd=Arg(0), addr=SockAddr("enter", 1, 2)),
        _s("listen", fd=Arg(0), backlog=Arg(1)),
        _s("accept", fd=Arg(0), addr=SockAddr("exit_len", 1, 2)),
        _s("accept4", fd=Arg(0), addr=SockAddr("exit_len", 1, 2), flags=Arg(3)),
        _s("sendto", fd=Arg(0), flags=Arg(3), addr=SockAddr("enter", 4, 5)),
        _s("recvfrom", fd=Arg(0), flags=Arg(3), addr=SockAddr("exit_len", 4, 5)),
        _s("sendmsg", fd=Arg(0), flags=Arg(2), addr=SockAddr("msg_enter", 1)),
        _s("recvmsg", fd=Arg(0), flags=Arg(2), addr=SockAddr("msg_exit", 1)),
        _s("sendmmsg", fd=Arg(0), flags=Arg(3), addr=SockAddr("msg_enter", 1)),
        _s("recvmmsg", fd=Arg(0), flags=Arg(3), addr=SockAddr("msg_exit", 1)),
    ],
    "cwd": [  # never filtered by name: the broker needs every cwd change
        _s("chdir", filename=Str(0)),
        _s("fchdir", dirfd=Arg(0)),
    ],
}

# fields preset to "not applicable" before the syscall's own fields
DEFAULTS = {"dirfd": AT_FDCWD, "olddirfd": AT_FDCWD, "newdirfd": AT_FDCWD,
            "owner_uid": rec.NO_ID, "owner_gid": rec.NO_ID, "fd": -1}

EXIT_FAMILY = "exit"
NAME_FILTERED = ("open", "file1", "file2", "exec")  # families the name patterns apply to
EXEC_FAMILY = "exec"
EXIT_TRACEPOINT = "sched:sched_process_exit"


def family_names() -> list[str]:
    return [*FAMILIES, EXIT_FAMILY]


def scratch_size(family: str) -> int:
    """Bytes of the map value a record is built in: the ring buffer prefix, the
    record, plus slack for exec's bounded argv writes."""
    dt = rec.RECORDS[family][1]
    return PREFIX + dt.itemsize + (rec.ARGV_LEN if family == "exec" else 0)


def pending_size(family: str) -> int:
    """Bytes of a pending HASH value (the HASH form): the prefix and the record."""
    return PREFIX + rec.RECORDS[family][1].itemsize


@dataclass
class MapFds:
    """The maps one family's programs use."""

    output: int  # per CPU: ARRAY_OF_MAPS of ring buffers (ringbuf), else PERF_EVENT_ARRAY
    pending: int  # TASK_STORAGE (per_task) or HASH pid_tgid -> record
    scratch: int  # PERCPU_ARRAY the record is built in (the HASH form; -1 per task)
    config: int
    ignore: int
    counters: int  # the sensor's PERCPU_ARRAY of loss counters (losses.ENTRIES u64)
    per_task: bool = False
    ringbuf: bool = True


# -- building blocks ----------------------------------------------------------
def _task_record(p: Program, maps: MapFds, create: bool) -> None:
    """r0 = this thread's record in the family's TASK_STORAGE (created when asked), or 0."""
    p.call(GET_CURRENT_TASK_BTF).mov(R2, R0).ld_map_fd(R1, maps.pending).movi(R3, 0)
    p.movi(R4, LOCAL_STORAGE_GET_F_CREATE if create else 0).call(TASK_STORAGE_GET)


def _lookup(p: Program, map_fd: int, key_off: int, miss: str) -> None:
    """r0 = lookup(map, fp+key_off); goto miss if absent."""
    p.ld_map_fd(R1, map_fd).mov(R2, FP).addi(R2, key_off).call(MAP_LOOKUP_ELEM)
    p.jmp("jeq", R0, None, 0, miss)


def _count(p: Program, maps: MapFds, family: str, counter: int, done: str) -> None:
    """Add 1 to this CPU's ``counter`` of ``family``, then go on at ``done``. Clobbers r0-r5."""
    p.st(W, FP, COUNTER_KEY, losses.index(family, counter))
    _lookup(p, maps.counters, COUNTER_KEY, done)
    p.movi(R1, 1).atomic_add(DW, R0, 0, R1)


ENOSPC, ENOENT = 28, 2
RB_NO_WAKEUP = 1  # bpf_ringbuf_output flags


def _count_failure(p: Program, maps: MapFds, family: str, counter: int, ok: str) -> None:
    """Unless r0 == 0 (the helper just called succeeded): :func:`_count`; go on at ``ok``.

    For a perf output, -ENOSPC is a full ring: the kernel counts that record itself
    and reports it in the ring as PERF_RECORD_LOST (source kernel), so it is not
    counted again here. A full ring buffer (-EAGAIN) is counted here: the kernel
    keeps no count of it.
    """
    p.jmp("jeq", R0, None, 0, ok)
    if counter == losses.OUTPUT and not maps.ringbuf:
        p.jmp("jeq", R0, None, -ENOSPC, ok)
    _count(p, maps, family, counter, ok)


def _zero(p: Program, reg: int, size: int) -> None:
    for off in range(0, size, 8):
        p.st(DW, reg, off, 0)


def _header(p: Program, tag: int | None, nr_from_ctx: bool) -> None:
    """tag (None: left zero, for now), nr, uid/gid into the record at r8; leaves
    uid_gid in r0."""
    if tag is not None:
        p.st(W, R8, 0, tag)
    if nr_from_ctx:
        p.ldx(W, R1, R6, NR_OFF).stx(W, R8, 4, R1)
    else:
        p.st(W, R8, 4, -1)
    p.call(GET_CURRENT_UID_GID).stx(DW, R8, 8, R0)  # uid low, gid high: one store


def _ignore_check(p: Program, ignore_fd: int, out: str) -> None:
    """pid_tgid -> fp-16, tgid -> fp-24; goto out if the tgid is ignored. Leaves pid_tgid in r7."""
    p.call(GET_CURRENT_PID_TGID).mov(R7, R0).stx(DW, FP, PID_TGID, R0)
    p.mov(R1, R0).rshi(R1, 32).stx(W, FP, TGID, R1)
    p.ld_map_fd(R1, ignore_fd).mov(R2, FP).addi(R2, TGID).call(MAP_LOOKUP_ELEM)
    p.jmp("jne", R0, None, 0, out)


def _process_key(p: Program, reg: int) -> None:
    """reg = pid_tgid -> (tgid << 32) | tgid, the pending key of the exec family. Clobbers r1."""
    p.mov(R1, reg).rshi(R1, 32).mov(reg, R1).lshi(reg, 32).alu("or", reg, R1)


def _sext32(p: Program, reg: int) -> None:
    p.lshi(reg, 32).arshi(reg, 32)


def _read_sockaddr(p: Program, dt: np.dtype, done: str) -> None:
    """Given r2 = length (signed) and r3 = user pointer: addrlen = r2, addr = read(min(r2, 112))."""
    p.stx(W, R8, rec.offset(dt, "addrlen"), R2)
    p.jmp("jeq", R3, None, 0, done)
    p.jmp("jsle", R2, None, 0, done)
    ok = p.fresh("len")
    p.jmp("jle", R2, None, rec.SOCKADDR_LEN, ok)
    p.movi(R2, rec.SOCKADDR_LEN)
    p.label(ok)
    p.mov(R1, R8).addi(R1, rec.offset(dt, "addr")).call(PROBE_READ_USER)


def _read_msghdr_addr(p: Program, dt: np.dtype, done: str) -> None:
    """r3 = struct msghdr *: read msg_name/msg_namelen, then the sockaddr."""
    p.jmp("jeq", R3, None, 0, done)
    p.mov(R1, FP).addi(R1, TMP).movi(R2, 16).call(PROBE_READ_USER)
    p.jmp("jne", R0, None, 0, done)
    p.ldx(DW, R3, FP, TMP).ldx(W, R2, FP, TMP + 8)
    _sext32(p, R2)
    _read_sockaddr(p, dt, done)


def _name_filter(p: Program, name_offs: list[int], passed: str, drop: str) -> None:
    """Pass when any configured pattern matches any of the names (or none is configured).

    A name whose read failed (first byte NUL) passes: the filter only widens.
    """
    p.ldx(W, R1, R9, flt.OFF_ENABLED).andi(R1, flt.EN_NAMES)
    p.jmp("jeq", R1, None, 0, passed)
    for noff in name_offs:
        p.ldx(B, R1, R8, noff).jmp("jeq", R1, None, 0, passed)
    for noff in name_offs:
        for i in range(flt.PATTERNS):
            base = flt.PATTERNS_OFF + i * flt.PATTERN_STRIDE
            nxt = p.fresh("pat")
            p.ldx(W, R2, R9, base).jmp("jeq", R2, None, 0, nxt)
            for j in range(flt.PATTERN_MAX):
                if j:
                    p.jmp("jle", R2, None, j, passed)  # all len bytes compared equal
                p.ldx(B, R3, R8, noff + j).ldx(B, R4, R9, base + 8 + j)
                p.jmp("jne", R3, R4, None, nxt)
            p.ja(passed)
            p.label(nxt)
    p.ja(drop)


def _argv(p: Program, dt: np.dtype, ctx_off: int) -> None:
    """Copy argv strings, NUL-separated, while they fit in the argv field (bounded, unrolled)."""
    done = p.fresh("argv_done")
    base = rec.offset(dt, "argv")
    p.ldx(DW, R7, R6, ctx_off)  # user argv (char **)
    p.movi(R9, 0)  # bytes written so far
    p.jmp("jeq", R7, None, 0, done)
    for i in range(MAX_ARGS):
        p.mov(R1, FP).addi(R1, TMP).movi(R2, 8).mov(R3, R7).addi(R3, 8 * i)
        p.call(PROBE_READ_USER).jmp("jne", R0, None, 0, done)
        p.ldx(DW, R3, FP, TMP).jmp("jeq", R3, None, 0, done)
        # dst = argv + off, size = ARGV_LEN - off (off <= ARGV_LEN-1; scratch has slack)
        p.mov(R1, R8).addi(R1, base).add(R1, R9)
        p.movi(R2, rec.ARGV_LEN).sub(R2, R9)
        p.call(PROBE_READ_USER_STR).jmp("jsle", R0, None, 0, done)
        p.add(R9, R0)
        p.st(W, R8, rec.offset(dt, "argc"), i + 1).stx(W, R8, rec.offset(dt, "argv_len"), R9)
        p.jmp("jgt", R9, None, rec.ARGV_LEN - 1, done)
    p.label(done)


# -- programs -------------------------------------------------------------------
def enter_program(family: str, sc: Syscall, maps: MapFds) -> Program:
    """The sys_enter program of one syscall."""
    tag, dt = rec.RECORDS[family]
    p = Program(f"c8e_{sc.name}")
    out, drop, save = "out", "drop", "save"
    p.mov(R6, R1)
    _ignore_check(p, maps.ignore, out)
    if family == EXEC_FAMILY and not maps.per_task:
        _process_key(p, R7)
        p.stx(DW, FP, PID_TGID, R7)
    p.st(W, FP, KEY0, 0)
    _lookup(p, maps.config, KEY0, out)
    p.mov(R9, R0)
    if maps.per_task:
        got = p.fresh("record")
        _task_record(p, maps, create=True)
        p.jmp("jne", R0, None, 0, got)
        _count(p, maps, family, losses.UPDATE, out)  # no storage to be had
        p.ja(out)
        p.label(got)
    else:
        _lookup(p, maps.scratch, KEY0, out)
    p.mov(R8, R0).addi(R8, PREFIX)
    _zero(p, R8, dt.itemsize)  # tag 0: not pending until the record is complete
    _header(p, None if maps.per_task else tag, nr_from_ctx=True)
    # uid equality (r0 = uid_gid from _header)
    skip = p.fresh("uid")
    p.ldx(W, R1, R9, flt.OFF_ENABLED).andi(R1, flt.EN_UID).jmp("jeq", R1, None, 0, skip)
    p.ldx(W, R2, R9, flt.OFF_UID).mov32(R3, R0).jmp("jne", R3, R2, None, out)
    p.label(skip)

    for name, value in DEFAULTS.items():
        if name in dt.names and name not in sc.fields:
            p.st(SIZE_OF[rec.size(dt, name)], R8, rec.offset(dt, name), value)
    names: list[int] = []
    argv: Argv | None = None
    for name, src in sc.fields.items():
        if isinstance(src, Argv):
            argv = src
            continue
        off = rec.offset(dt, name)
        if isinstance(src, Arg):
            p.ldx(DW, R1, R6, arg(src.index)).stx(SIZE_OF[rec.size(dt, name)], R8, off, R1)
        elif isinstance(src, Const):
            p.st(SIZE_OF[rec.size(dt, name)], R8, off, src.value)
        elif isinstance(src, Str):
            p.mov(R1, R8).addi(R1, off).movi(R2, rec.size(dt, name))
            p.ldx(DW, R3, R6, arg(src.index))
            if "name_len" in dt.names:  # read again at exit if this read fails
                p.stx(DW, R8, rec.offset(dt, "uname"), R3)
            p.call(PROBE_READ_USER_STR)
            if "name_len" in dt.names:
                _store_name_len(p, dt)
            names.append(off)
        elif isinstance(src, OpenHow):  # struct open_how {u64 flags, mode, resolve}
            done = p.fresh("how")
            p.mov(R1, FP).addi(R1, TMP).movi(R2, 16).ldx(DW, R3, R6, arg(src.index))
            p.call(PROBE_READ_USER).jmp("jne", R0, None, 0, done)
            p.ldx(DW, R1, FP, TMP).stx(W, R8, rec.offset(dt, "flags"), R1)
            p.ldx(DW, R1, FP, TMP + 8).stx(W, R8, rec.offset(dt, "mode"), R1)
            p.label(done)
        elif isinstance(src, SockAddr):
            done = p.fresh("addr")
            p.ldx(DW, R3, R6, arg(src.ptr)).stx(DW, R8, rec.offset(dt, "uaddr"), R3)
            if src.how == "enter":
                p.ldx(DW, R2, R6, arg(src.length))
                _sext32(p, R2)
                _read_sockaddr(p, dt, done)
            elif src.how == "msg_enter":
                p.stx(DW, R8, rec.offset(dt, "ulen_ptr"), R3)
                _read_msghdr_addr(p, dt, done)
            elif src.how == "exit_len":
                p.ldx(DW, R1, R6, arg(src.length)).stx(DW, R8, rec.offset(dt, "ulen_ptr"), R1)
            elif src.how == "msg_exit":
                p.stx(DW, R8, rec.offset(dt, "ulen_ptr"), R3)
            else:
                raise ValueError(f"bad sockaddr mode {src.how!r}")
            p.label(done)
        else:
            raise TypeError(f"{sc.name}.{name}: unknown source {src!r}")

    if "flags" in dt.names:
        skip = p.fresh("flags")
        p.ldx(W, R1, R9, flt.OFF_ENABLED).andi(R1, flt.EN_FLAGS).jmp("jeq", R1, None, 0, skip)
        p.ldx(W, R2, R9, flt.OFF_FLAGS_MASK).ldx(W, R3, R8, rec.offset(dt, "flags"))
        p.alu("and", R3, R2).jmp("jeq", R3, None, 0, out)
        p.label(skip)
    if family in NAME_FILTERED:
        if names:
            _name_filter(p, names, save if argv is None else "argv", drop)
        else:  # fchmod/fchown: no name to match; a name filter drops them
            p.ldx(W, R1, R9, flt.OFF_ENABLED).andi(R1, flt.EN_NAMES)
            p.jmp("jne", R1, None, 0, drop)
    if argv is not None:
        p.label("argv")
        _argv(p, dt, arg(argv.index))
    p.label(save)
    if maps.per_task:
        p.st(W, R8, 0, tag)  # pending: the exit outputs it
    else:
        p.ld_map_fd(R1, maps.pending).mov(R2, FP).addi(R2, PID_TGID).mov(R3, R8).addi(R3, -PREFIX)
        p.movi(R4, BPF_ANY)
        p.call(MAP_UPDATE_ELEM)
        _count_failure(p, maps, family, losses.UPDATE, drop)
    p.label(drop)
    p.label(out)
    p.movi(R0, KEEP_EVENT).exit()
    return p


def _store_name_len(p: Program, dt: np.dtype) -> None:
    """name_len = r0 (bytes a string read returned, NUL included), 0 when it failed."""
    ok = p.fresh("len")
    p.jmp("jsgt", R0, None, 0, ok)
    p.movi(R0, 0)
    p.label(ok)
    p.stx(W, R8, rec.offset(dt, "name_len"), R0)


def _read_name_again(p: Program, dt: np.dtype, done: str) -> None:
    """A name unreadable at enter (its page not yet faulted in: bpf may not fault)
    is read again at exit, when the kernel has faulted it in to copy the name."""
    p.ldx(W, R1, R8, rec.offset(dt, "name_len")).jmp("jne", R1, None, 0, done)
    p.ldx(DW, R3, R8, rec.offset(dt, "uname")).jmp("jeq", R3, None, 0, done)
    p.mov(R1, R8).addi(R1, rec.offset(dt, "filename")).movi(R2, rec.NAME_LEN)
    p.call(PROBE_READ_USER_STR)
    _store_name_len(p, dt)  # then on at ``done``, defined by the caller next


def _output(p: Program, maps: MapFds, size: int | tuple[np.dtype, str]) -> None:
    """Write the record at r8 to this CPU's ring; r0 = the helper's result (0: written).

    A size (dtype, field) is the record up to that string field plus its bytes
    (name_len). Ring buffer records get their time and pid_tgid in the prefix
    before r8; a CPU without a ring in the array gives -ENOENT, as an empty
    PERF_EVENT_ARRAY slot does. Clobbers r1-r5, r9.
    """
    if isinstance(size, int):
        p.movi(R9, size)
    else:
        dt, name = size
        ok, fits = p.fresh("size"), p.fresh("fits")
        p.ldx(W, R9, R8, rec.offset(dt, "name_len")).jmp("jle", R9, None, rec.size(dt, name), ok)
        p.movi(R9, rec.size(dt, name))  # bounds the verifier can see
        p.label(ok)
        # Up to where the perf ring would pad (raw data plus its u32 size fill whole
        # u64s): it pads with whatever the ring held before, so the record's own
        # zeros go there.
        p.addi(R9, rec.offset(dt, name) + 4 + 7).andi(R9, -8).addi(R9, -4)
        p.jmp("jle", R9, None, dt.itemsize, fits).movi(R9, dt.itemsize)
        p.label(fits)
    if not maps.ringbuf:
        p.mov(R1, R6).ld_map_fd(R2, maps.output).ld_imm64(R3, BPF_F_CURRENT_CPU).mov(R4, R8)
        p.mov(R5, R9).call(PERF_EVENT_OUTPUT)
        return
    done, ring = p.fresh("ring_none"), p.fresh("ring")
    p.call(KTIME_GET_NS).stx(DW, R8, -PREFIX, R0)
    p.call(GET_CURRENT_PID_TGID).stx(DW, R8, 8 - PREFIX, R0)
    p.call(GET_SMP_PROCESSOR_ID).stx(W, FP, RING_KEY, R0)
    p.ld_map_fd(R1, maps.output).mov(R2, FP).addi(R2, RING_KEY).call(MAP_LOOKUP_ELEM)
    p.jmp("jne", R0, None, 0, ring)
    p.movi(R0, -ENOENT).ja(done)
    p.label(ring)
    # No wakeup: collectors read their rings on a timer (c8.collectors.main.POLL_MS),
    # as they read perf rings below their wakeup watermark; a wakeup costs an irq_work.
    p.mov(R1, R0).mov(R2, R8).addi(R2, -PREFIX).mov(R3, R9).addi(R3, PREFIX).movi(R4, RB_NO_WAKEUP)
    p.call(RINGBUF_OUTPUT)
    p.label(done)


def exit_program(family: str, sc: Syscall, maps: MapFds) -> Program:
    """The sys_exit program of one syscall: complete the pending record and output it."""
    tag, dt = rec.RECORDS[family]
    p = Program(f"c8x_{sc.name}")
    p.mov(R6, R1)
    if maps.per_task:
        _task_record(p, maps, create=False)
        p.jmp("jeq", R0, None, 0, "out")
        p.mov(R8, R0).addi(R8, PREFIX)
        p.ldx(W, R1, R8, 0).jmp("jne", R1, None, tag, "out", wide=False)  # nothing pending
    else:
        p.call(GET_CURRENT_PID_TGID)
        if family == EXEC_FAMILY:
            _process_key(p, R0)
        p.stx(DW, FP, PID_TGID, R0)
        _lookup(p, maps.pending, PID_TGID, "out")
        p.mov(R8, R0).addi(R8, PREFIX)
    # An entry left by another syscall of the family (missed exit): drop it, counted.
    # A successful execveat returns through sys_exit_execve (measured on 6.18: the exit
    # reports nr 59), so an execveat record ends there too: fexecve of a memfd (a
    # fileless program) is an EXEC like any other.
    p.ldx(W, R1, R6, NR_OFF).ldx(W, R2, R8, 4)
    if family == EXEC_FAMILY and sc.name == "execve":
        p.jmp("jeq", R1, R2, None, "same")
        p.jmp("jne", R2, None, NR_EXECVEAT, "stale").jmp("jne", R1, None, NR_EXECVE, "stale")
        p.label("same")
    else:
        p.jmp("jne", R1, R2, None, "stale")
    p.ldx(DW, R1, R6, RET_OFF).stx(DW, R8, rec.offset(dt, "ret"), R1)
    addr = sc.fields.get("addr")
    if isinstance(addr, SockAddr) and addr.how in ("exit_len", "msg_exit"):
        p.jmp("jslt", R1, None, 0, "emit")
        p.ldx(DW, R3, R8, rec.offset(dt, "ulen_ptr"))
        if addr.how == "exit_len":
            p.jmp("jeq", R3, None, 0, "emit")
            p.mov(R1, FP).addi(R1, TMP).movi(R2, 4).call(PROBE_READ_USER)
            p.jmp("jne", R0, None, 0, "emit")
            p.ldx(W, R2, FP, TMP)
            _sext32(p, R2)
            p.ldx(DW, R3, R8, rec.offset(dt, "uaddr"))
            _read_sockaddr(p, dt, "emit")
        else:
            _read_msghdr_addr(p, dt, "emit")
    if "name_len" in dt.names and any(isinstance(s, Str) for s in sc.fields.values()):
        _read_name_again(p, dt, "emit")
        if family in NAME_FILTERED:  # the enter let it pass unread: filter it now
            p.st(W, FP, KEY0, 0)
            _lookup(p, maps.config, KEY0, "emit")
            p.mov(R9, R0)
            _name_filter(p, [rec.offset(dt, "filename")], "emit", "delete")
    p.label("emit")
    _output(p, maps, (dt, "filename") if "name_len" in dt.names else dt.itemsize)
    _count_failure(p, maps, family, losses.OUTPUT, "delete")
    p.ja("delete")
    p.label("stale")
    _count(p, maps, family, losses.STALE, "delete")
    p.label("delete")
    if maps.per_task:
        p.st(W, R8, 0, 0)  # output (or counted): no longer pending
    else:
        p.ld_map_fd(R1, maps.pending).mov(R2, FP).addi(R2, PID_TGID).call(MAP_DELETE_ELEM)
    p.label("out")
    p.movi(R0, KEEP_EVENT).exit()
    return p


def sched_exit_program(maps: MapFds, exit_code_offset: int, group_dead_offset: int = 32) -> Program:
    """sched:sched_process_exit -> one ``exit`` record with the raw wait status."""
    tag, dt = rec.RECORDS[EXIT_FAMILY]
    p = Program("c8_sched_exit")
    p.mov(R6, R1)
    _ignore_check(p, maps.ignore, "out")
    p.st(W, FP, KEY0, 0)
    _lookup(p, maps.scratch, KEY0, "out")
    p.mov(R8, R0).addi(R8, PREFIX)
    _zero(p, R8, dt.itemsize)
    _header(p, tag, nr_from_ctx=False)
    p.mov(R1, R7).rshi(R1, 32).stx(W, R8, rec.offset(dt, "tgid"), R1)
    p.stx(W, R8, rec.offset(dt, "tid"), R7)
    p.ldx(B, R1, R6, group_dead_offset).stx(B, R8, rec.offset(dt, "group_dead"), R1)
    p.call(GET_CURRENT_TASK).mov(R3, R0).addi(R3, exit_code_offset)
    p.mov(R1, R8).addi(R1, rec.offset(dt, "exit_code")).movi(R2, 4).call(PROBE_READ_KERNEL)
    _output(p, maps, dt.itemsize)
    _count_failure(p, maps, EXIT_FAMILY, losses.OUTPUT, "out")
    p.label("out")
    p.movi(R0, KEEP_EVENT).exit()
    return p


def tracepoints(family: str) -> list[tuple[str, str, str]]:
    """(syscall, enter tracepoint, exit tracepoint) of each syscall of a family."""
    return [(sc.name, f"syscalls:sys_enter_{sc.name}", f"syscalls:sys_exit_{sc.name}")
            for sc in FAMILIES[family]]
