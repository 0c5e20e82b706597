"""Record layouts written by the sensor's eBPF programs, one numpy dtype per family.

Every record starts with the same 24-byte header: ``tag`` (u32, the layout),
``nr`` (the syscall number; -1 for sched records), ``uid``/``gid`` of the
caller, ``ret`` (the syscall's return value, filled at sys_exit). Strings are
fixed NUL-padded byte arrays; ``argv`` holds the arguments separated by NULs
(a decoder turns them into spaces). Records are 8-byte multiples.

The families' names are the contract with the broker (source ``bpf:<name>``).
"""

from __future__ import annotations

import numpy as np

NAME_LEN = 256
ARGV_LEN = 1024
SOCKADDR_LEN = 112
NO_ID = 0xFFFFFFFF  # owner uid/gid of a record whose syscall sets none ("unchanged")
AT_FDCWD = -100

TAG_BASE = 0xC8B00000

HEADER = [("tag", "<u4"), ("nr", "<i4"), ("uid", "<u4"), ("gid", "<u4"), ("ret", "<i8")]
HEADER_SIZE = 24

# Before each record in its map value, and before it in a BPF ring buffer: the
# time (CLOCK_MONOTONIC ns, as perf samples have it) and pid_tgid of the output,
# which a perf ring's sample header carries instead.
PREFIX = [("time", "<u8"), ("pid_tgid", "<u8")]
PREFIX_SIZE = 16


def _dtype(fields: list[tuple]) -> np.dtype:
    dt = np.dtype(HEADER + fields, align=True)
    if dt.itemsize % 8:
        raise AssertionError(f"record of {dt.itemsize} bytes is not a multiple of 8")
    return dt


# Records of one name end with it, and only its bytes are written to the ring
# (name_len: bytes read, NUL included; 0 when unreadable): a 20-byte path costs
# a 72-byte record, not 304. uname is the user pointer, kept for the read again
# at syscall exit when the first failed (the page was not yet faulted in).
OPEN = _dtype([("dirfd", "<i4"), ("flags", "<u4"), ("mode", "<u4"), ("name_len", "<u4"),
               ("uname", "<u8"), ("filename", f"S{NAME_LEN}")])

FILE1 = _dtype([("dirfd", "<i4"), ("mode", "<u4"), ("owner_uid", "<u4"), ("owner_gid", "<u4"),
                ("flags", "<u4"), ("name_len", "<u4"), ("uname", "<u8"), ("filename", f"S{NAME_LEN}")])

FILE2 = _dtype([("olddirfd", "<i4"), ("newdirfd", "<i4"), ("flags", "<u4"), ("_pad", "<u4"),
                ("oldname", f"S{NAME_LEN}"), ("newname", f"S{NAME_LEN}")])

EXEC = _dtype([("dirfd", "<i4"), ("flags", "<u4"), ("argc", "<u4"), ("argv_len", "<u4"),
               ("filename", f"S{NAME_LEN}"), ("argv", f"S{ARGV_LEN}")])

# uaddr/ulen_ptr: user pointers saved at enter for the reads done at exit
SOCK = _dtype([("fd", "<i4"), ("addrlen", "<i4"), ("backlog", "<i4"), ("flags", "<u4"),
               ("uaddr", "<u8"), ("ulen_ptr", "<u8"), ("addr", "u1", (SOCKADDR_LEN,))])

EXIT = _dtype([("tgid", "<i4"), ("tid", "<i4"), ("exit_code", "<i4"), ("group_dead", "u1"),
               ("_pad", "u1", (3,))])

# chdir (the name) and fchdir (the fd): the broker's table of cwds (c8.broker.fdtable)
CWD = _dtype([("dirfd", "<i4"), ("_pad", "<u4"), ("filename", f"S{NAME_LEN}")])

RECORDS: dict[str, tuple[int, np.dtype]] = {
    "open": (TAG_BASE | 1, OPEN),
    "file1": (TAG_BASE | 2, FILE1),
    "file2": (TAG_BASE | 3, FILE2),
    "exec": (TAG_BASE | 4, EXEC),
    "sock": (TAG_BASE | 5, SOCK),
    "exit": (TAG_BASE | 6, EXIT),
    "cwd": (TAG_BASE | 7, CWD),
}


def offset(dtype: np.dtype, field: str) -> int:
    """Byte offset of ``field`` in a record."""
    return dtype.fields[field][1]


def size(dtype: np.dtype, field: str) -> int:
    """Byte size of ``field`` in a record."""
    return dtype.fields[field][0].itemsize


def argv_text(argv: np.ndarray) -> np.ndarray:
    """``argv`` column (S1024, NUL-separated) -> space-separated command lines (S1024)."""
    raw = np.ascontiguousarray(argv).view(np.uint8).reshape(len(argv), -1).copy()
    # NULs before the last non-NUL byte separate arguments
    nz = raw != 0
    last = np.where(nz.any(axis=1), raw.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1), -1)
    inner = (~nz) & (np.arange(raw.shape[1]) < last[:, None])
    raw[inner] = ord(" ")
    return raw.reshape(-1).view(argv.dtype)


def _register() -> None:
    """Declare the layouts to the collector's decoder, when it is there."""
    try:
        from c8.collectors import decode
        register = decode.register_bpf_record
    except (ImportError, AttributeError):
        return
    if decode.PREFIX_SIZE != PREFIX_SIZE:
        raise AssertionError("the decoder's ring buffer prefix differs from the programs'")
    for name, (tag, dt) in RECORDS.items():
        register(tag, name, dt)


_register()
