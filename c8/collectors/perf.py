"""perf_event_open through ctypes: attributes, ioctls and the mmap ring.

Every event a collector opens uses the same sample layout (``SAMPLE_TYPE``), so
one ring holds records of many events and :mod:`c8.collectors.ring` walks them
without knowing which event wrote which. Errors are translated once, here, into
:class:`PerfError` naming the event.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time

NR_PERF_EVENT_OPEN = 298  # x86_64

PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_BPF_OUTPUT = 10

SAMPLE_TID = 1 << 1
SAMPLE_TIME = 1 << 2
SAMPLE_CPU = 1 << 7
SAMPLE_RAW = 1 << 10
SAMPLE_IDENTIFIER = 1 << 16
SAMPLE_TYPE = SAMPLE_IDENTIFIER | SAMPLE_TID | SAMPLE_TIME | SAMPLE_CPU | SAMPLE_RAW

# Byte offsets in a PERF_RECORD_SAMPLE of SAMPLE_TYPE (after the 8-byte header):
# id u64 | pid u32, tid u32 | time u64 | cpu u32, res u32 | raw size u32 | raw data
SAMPLE_ID_OFF = 8
SAMPLE_PID_OFF = 16
SAMPLE_TID_OFF = 20
SAMPLE_TIME_OFF = 24
SAMPLE_CPU_OFF = 32
SAMPLE_RAW_SIZE_OFF = 40
SAMPLE_RAW_OFF = 44

RECORD_LOST = 2
RECORD_SAMPLE = 9

# read() of an event gives {value, lost}: the samples the kernel could not write
# for this event (Linux 6.0). Unlike a PERF_RECORD_LOST, which the kernel writes
# only before the next record that fits, it is counted at once: a ring that
# overflows at the end of a burst and then hears nothing more still tells.
FORMAT_LOST = 1 << 4
_format_lost = True  # cleared when the kernel refuses it (before 6.0)

FLAG_DISABLED = 1 << 0
FLAG_WATERMARK = 1 << 14
FLAG_USE_CLOCKID = 1 << 25

CLOCK_MONOTONIC = 1

IOC_ENABLE = 0x2400
IOC_DISABLE = 0x2401
IOC_SET_OUTPUT = 0x2405
IOC_SET_FILTER = 0x40082406
IOC_ID = 0x80082407
IOC_SET_BPF = 0x40042408

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_RING_PAGES = 256


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr as of PERF_ATTR_SIZE_VER8 (136 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),  # union with sample_freq
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),           # the bitfield word: disabled, watermark, use_clockid...
        ("wakeup", ctypes.c_uint32),          # union wakeup_events / wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("aux_action", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PerfEventAttr) == 136

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class PerfError(OSError):
    """A perf_event_open or ioctl failure, naming the event it concerns."""

    def __init__(self, err: int, what: str, event: str):
        super().__init__(err, f"{what} for {event}: {os.strerror(err)}")
        self.event = event


def make_attr(type_: int, config: int, wakeup_events: int = 0,
              wakeup_watermark: int = 0) -> PerfEventAttr:
    """Attributes of a sampling event with the collectors' common sample layout.

    Wakes the poller after ``wakeup_events`` samples, or once ``wakeup_watermark``
    bytes are in the ring when that is given instead.
    """
    attr = PerfEventAttr()
    attr.type = type_
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = config
    attr.sample_period = 1
    attr.sample_type = SAMPLE_TYPE
    attr.read_format = FORMAT_LOST if _format_lost else 0
    attr.flags = FLAG_DISABLED | FLAG_USE_CLOCKID
    if wakeup_watermark:
        attr.flags |= FLAG_WATERMARK
        attr.wakeup = wakeup_watermark
    else:
        attr.wakeup = max(1, wakeup_events)
    attr.clockid = CLOCK_MONOTONIC
    return attr


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, name: str,
                    group_fd: int = -1, flags: int = 0) -> int:
    """Open an event; close-on-exec always. Raises PerfError naming ``name``."""
    global _format_lost
    PERF_FLAG_FD_CLOEXEC = 1 << 3

    def attempt() -> int:
        return _libc.syscall(NR_PERF_EVENT_OPEN, ctypes.byref(attr), ctypes.c_int(pid),
                             ctypes.c_int(cpu), ctypes.c_int(group_fd),
                             ctypes.c_ulong(flags | PERF_FLAG_FD_CLOEXEC))
    fd = attempt()
    err = ctypes.get_errno() if fd < 0 else 0
    if fd < 0 and err == errno.EINVAL and attr.read_format & FORMAT_LOST:
        attr.read_format &= ~FORMAT_LOST
        fd = attempt()
        if fd >= 0:  # an older kernel: LOST records only, from now on
            _format_lost = False
        else:
            attr.read_format |= FORMAT_LOST
    if fd < 0:
        raise PerfError(err, f"perf_event_open(cpu={cpu})", name)
    return int(fd)


def read_lost(fd: int) -> int | None:
    """Samples of this event the kernel could not write to its ring so far (never
    reset); None when the kernel does not count them (see FORMAT_LOST)."""
    if not _format_lost:
        return None
    data = os.read(fd, 16)
    return int.from_bytes(data[8:16], "little") if len(data) == 16 else None


def open_tracepoint(tp_id: int, cpu: int, name: str, wakeup_events: int = 1,
                    wakeup_watermark: int = 0) -> int:
    """A disabled tracepoint event on one CPU (all processes)."""
    return perf_event_open(make_attr(PERF_TYPE_TRACEPOINT, tp_id, wakeup_events,
                                     wakeup_watermark), -1, cpu, name)


def open_counter(tp_id: int, cpu: int, name: str, pid: int = -1) -> int:
    """A disabled, counting (never sampling) tracepoint event, read with os.read:
    what an eBPF program attaches to (it writes no sample anywhere and costs a
    counter increment), and what ``perf stat`` opens."""
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_TRACEPOINT
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = tp_id
    attr.flags = FLAG_DISABLED
    return perf_event_open(attr, pid, cpu, name)


def open_bpf_output(cpu: int, wakeup_events: int = 1, wakeup_watermark: int = 0) -> int:
    """The PERF_COUNT_SW_BPF_OUTPUT event an eBPF program writes to on ``cpu``."""
    return perf_event_open(make_attr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT,
                                     wakeup_events, wakeup_watermark), -1, cpu, "bpf-output")


_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, req: int, arg: int, what: str, name: str) -> int:
    # libc's ioctl, not fcntl.ioctl: the request codes exceed a C int.
    ret = _libc.ioctl(fd, req, ctypes.c_void_p(arg))
    if ret < 0:
        raise PerfError(ctypes.get_errno() or errno.EIO, what, name)
    return ret


def enable(fd: int, name: str = "?") -> None:
    _ioctl(fd, IOC_ENABLE, 0, "PERF_EVENT_IOC_ENABLE", name)


def disable(fd: int, name: str = "?") -> None:
    _ioctl(fd, IOC_DISABLE, 0, "PERF_EVENT_IOC_DISABLE", name)


def set_output(fd: int, target_fd: int, name: str = "?") -> None:
    """Redirect ``fd``'s records into ``target_fd``'s ring."""
    _ioctl(fd, IOC_SET_OUTPUT, target_fd, "PERF_EVENT_IOC_SET_OUTPUT", name)


def set_filter(fd: int, expr: str | None, name: str = "?") -> None:
    """Set the kernel filter of a tracepoint event (ftrace filter syntax).

    To remove a filter, reopen the event: kernels differ on clearing.
    """
    buf = ctypes.create_string_buffer((expr or "").encode())
    _ioctl(fd, IOC_SET_FILTER, ctypes.addressof(buf), f"PERF_EVENT_IOC_SET_FILTER({expr!r})", name)


def event_id(fd: int, name: str = "?") -> int:
    """The sample id (PERF_SAMPLE_IDENTIFIER value) the kernel gave this event."""
    out = ctypes.c_uint64(0)
    _ioctl(fd, IOC_ID, ctypes.addressof(out), "PERF_EVENT_IOC_ID", name)
    return out.value


def set_bpf(fd: int, prog_fd: int, name: str = "?") -> None:
    _ioctl(fd, IOC_SET_BPF, prog_fd, "PERF_EVENT_IOC_SET_BPF", name)


def ring_pages(requested: int | None) -> int:
    """Data pages for a ring: the largest power of two <= requested (>= 1)."""
    n = max(1, int(requested or DEFAULT_RING_PAGES))
    return 1 << (n.bit_length() - 1)


def mmap_ring(fd: int, data_pages: int, name: str = "ring") -> mmap.mmap:
    """Map 1 metadata page + ``data_pages`` (a power of two) of ``fd``'s ring."""
    if data_pages & (data_pages - 1):
        raise ValueError(f"ring data pages must be a power of two, got {data_pages}")
    try:
        return mmap.mmap(fd, (1 + data_pages) * PAGE_SIZE, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise PerfError(exc.errno or errno.EIO, f"mmap of {1 + data_pages} pages", name) from None


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC now, in the clock of sample times."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
