"""The bpf() system call through ctypes: map create/update/lookup/delete, program load.

``union bpf_attr`` is packed by hand with :mod:`struct` for the few commands
used; the rest of the union stays zero, as the kernel requires.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

NR_BPF = 321  # x86_64

# commands
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_GET_INFO_BY_FD = 15
BTF_LOAD = 18

# map types
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERF_EVENT_ARRAY = 4
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_ARRAY_OF_MAPS = 12
MAP_TYPE_RINGBUF = 27
MAP_TYPE_TASK_STORAGE = 29

F_NO_PREALLOC = 1  # map_flags

# program types
PROG_TYPE_TRACEPOINT = 5

ATTR_SIZE = 128
OBJ_NAME_LEN = 16
LOG_SIZE = 1 << 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed; ``what`` says which call and object."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


class VerifierError(BpfError):
    """BPF_PROG_LOAD refused a program: carries its name and the verifier log."""

    def __init__(self, err: int, program: str, log: str):
        tail = log.strip().splitlines()[-12:]
        super().__init__(err, f"loading program {program!r} failed; verifier log (end):\n"
                         + "\n".join(tail))
        self.program = program
        self.log = log


def bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    """Call bpf(cmd, attr, sizeof attr); raises BpfError naming ``what``."""
    ret = _libc.syscall(ctypes.c_long(NR_BPF), ctypes.c_long(cmd), attr,
                        ctypes.c_uint(len(attr)))
    if ret < 0:
        raise BpfError(ctypes.get_errno() or errno.EIO, what)
    return int(ret)


def _name(name: str) -> bytes:
    # object names: up to 15 of [A-Za-z0-9_.]
    clean = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return clean.encode()[: OBJ_NAME_LEN - 1]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, btf: tuple[int, int, int] | None = None,
               inner_map_fd: int = 0) -> int:
    """Create a map; returns its fd (close-on-exec, as every bpf fd is). ``btf``:
    (BTF fd, key type id, value type id), which some map types require;
    ``inner_map_fd``: the template of a map of maps' values."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIIIII", attr, 0, map_type, key_size, value_size, max_entries, flags,
                     inner_map_fd)
    # inner_map_fd u32 @20, numa_node u32 @24, map_name[16] @28
    attr[28:28 + len(_name(name))] = _name(name)
    if btf is not None:  # btf_fd @48, btf_key_type_id @52, btf_value_type_id @56
        struct.pack_into("<III", attr, 48, *btf)
    return bpf(MAP_CREATE, attr, f"BPF_MAP_CREATE({name or map_type})")


def btf_load(blob: bytes) -> int:
    """Load type information (a BTF blob); returns its fd. A refusal names the
    kernel's reason from its log."""
    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # btf @0, btf_log_buf @8, btf_size @16, btf_log_size @20, btf_log_level @24
    struct.pack_into("<QQIII", attr, 0, ctypes.addressof(data), ctypes.addressof(log), len(blob), len(log), 1)
    try:
        return bpf(BTF_LOAD, attr, "BPF_BTF_LOAD")
    except BpfError as exc:
        raise BpfError(exc.errno, f"BPF_BTF_LOAD ({log.value.decode(errors='replace').strip()[-200:]})") from None


def _elem_attr(map_fd: int, key: ctypes.Array, value: ctypes.Array | None,
               flags: int = 0) -> ctypes.Array:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(key),
                     ctypes.addressof(value) if value is not None else 0, flags)
    return attr


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """Set ``key`` to ``value`` (flags: 0 any, 1 no-exist, 2 exist)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _elem_attr(map_fd, k, v, flags), f"BPF_MAP_UPDATE_ELEM(fd {map_fd})")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of ``key`` (``value_size`` bytes; per-CPU maps: all CPUs'), or None."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP_ELEM, _elem_attr(map_fd, k, v), f"BPF_MAP_LOOKUP_ELEM(fd {map_fd})")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _elem_attr(map_fd, k, None), f"BPF_MAP_DELETE_ELEM(fd {map_fd})")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def prog_load(name: str, insns: bytes, prog_type: int = PROG_TYPE_TRACEPOINT,
              license: str = "GPL", log_size: int = LOG_SIZE) -> int:
    """Load a program; returns its fd. On refusal raises VerifierError with the log.

    The first try runs without a log (fast); a refusal is retried with
    log_level 1 so the error carries the verifier's account.
    """
    lic = ctypes.create_string_buffer(license.encode())
    code = ctypes.create_string_buffer(insns, len(insns))

    def attempt(log_level: int, log: ctypes.Array | None) -> int:
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("<IIQQIIQII", attr, 0, prog_type, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), log_level,
                         len(log) if log is not None else 0,
                         ctypes.addressof(log) if log is not None else 0, 0, 0)
        attr[48:48 + len(_name(name))] = _name(name)  # prog_name @48
        return bpf(PROG_LOAD, attr, f"BPF_PROG_LOAD({name})")

    try:
        return attempt(0, None)
    except BpfError as first:
        log = ctypes.create_string_buffer(log_size)
        try:
            return attempt(1, log)  # a transient failure may pass the second time
        except BpfError as exc:
            text = log.value.decode(errors="replace")
            raise VerifierError(exc.errno or first.errno, name, text) from None


# struct bpf_prog_info (include/uapi/linux/bpf.h): the fields read here
PROG_INFO_SIZE = 232
PROG_INFO_NAME_OFF = 64
PROG_INFO_RECURSION_MISSES_OFF = 208


def prog_info(prog_fd: int) -> tuple[str, int]:
    """(name, recursion_misses) of a loaded program.

    ``recursion_misses`` counts the times the kernel skipped the program because
    a BPF program was already running on that CPU (kernels from 5.12; 0 before).
    """
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, prog_fd, PROG_INFO_SIZE, ctypes.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD(prog fd {prog_fd})")
    got = struct.unpack_from("<I", attr, 4)[0]  # the kernel writes back the size it filled
    name = info.raw[PROG_INFO_NAME_OFF:PROG_INFO_NAME_OFF + OBJ_NAME_LEN].split(b"\0")[0].decode()
    if got < PROG_INFO_RECURSION_MISSES_OFF + 8:
        return name, 0
    return name, struct.unpack_from("<Q", info, PROG_INFO_RECURSION_MISSES_OFF)[0]
