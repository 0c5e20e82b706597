"""The eBPF capture layer against the real kernel: every family loads, attaches,
and writes exact, complete records for real workloads into its CPU's ring: a
BPF ring buffer (this kernel), or a perf ring (kernels before 5.8; forced here).

The ring readers here are deliberately minimal and independent of
c8.collectors.ring/ringbuf/decode: the CPU's ring buffer, or a BPF-output event
on the CPU, mmapped and walked in Python. Workloads run in children pinned to
that CPU.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (CAP_BPF, CAP_PERFMON)", allow_module_level=True)

from c8.collectors.bpf import maps, programs, records  # noqa: E402
from c8.collectors.bpf.manager import PERF, RINGBUF, BpfManager, fetch_output  # noqa: E402
from c8.supervisor.config import child_config  # noqa: E402

CPU = 1 if os.cpu_count() and os.cpu_count() > 1 else 0
FAMILIES = ["open", "file1", "file2", "exec", "sock", "exit"]
TAGS = {tag: (name, dt) for name, (tag, dt) in records.RECORDS.items()}
PAGES = 512

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Output:
    """A ring of ``cpu`` plugged into (and out of) the programs' ``output`` map."""

    cpu: int
    output: int
    fd: int

    def plug(self) -> None:
        maps.output_set(self.output, self.cpu, self.fd)

    def unplug(self) -> bool:
        return maps.output_clear(self.output, self.cpu)


class Ring(_Output):
    """A PERF_COUNT_SW_BPF_OUTPUT event on one CPU with its mmap ring (TID | RAW samples)."""

    def __init__(self, cpu: int, output: int):
        self.cpu, self.output = cpu, output
        attr = bytearray(128)
        # type SOFTWARE, size, config BPF_OUTPUT, period 1, sample_type TID|RAW, flags 0, wakeup 1
        struct.pack_into("<IIQQQQQI", attr, 0, 1, 128, 10, 1, (1 << 1) | (1 << 10), 0, 0, 1)
        buf = ctypes.create_string_buffer(bytes(attr), 128)
        fd = _libc.syscall(298, buf, -1, cpu, -1, 1 << 3)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "perf_event_open(BPF_OUTPUT)")
        self.fd = int(fd)
        self.size = PAGES * mmap.PAGESIZE
        self.mm = mmap.mmap(self.fd, (PAGES + 1) * mmap.PAGESIZE)
        self.lost = 0
        self.plug()

    def read(self) -> list[tuple[int, int, bytes]]:
        """(pid, tid, raw bytes) of every new sample."""
        head = struct.unpack_from("<Q", self.mm, 1024)[0]
        tail = struct.unpack_from("<Q", self.mm, 1032)[0]
        base = mmap.PAGESIZE
        data = bytes(self.mm[base: base + self.size])
        out = []
        pos = tail
        while pos < head:
            off = pos % self.size
            chunk = (data + data)[off: off + 8]
            rtype, _misc, size = struct.unpack("<IHH", chunk)
            body = (data + data)[off: off + size]
            if rtype == 9:
                pid, tid, raw_size = struct.unpack_from("<III", body, 8)
                out.append((pid, tid, body[20: 20 + raw_size]))
            elif rtype == 2:
                self.lost += struct.unpack_from("<Q", body, 16)[0]
            pos += size
        struct.pack_into("<Q", self.mm, 1032, head)
        return out

    def close(self) -> None:
        self.unplug()
        self.mm.close()
        os.close(self.fd)


class RingBuffer(_Output):
    """The manager's BPF ring buffer of one CPU, plugged into its output array,
    walked one record at a time: (header len/flags u32, pg_off u32, then the
    record: time u64, pid_tgid u64, the layout of its tag)."""

    def __init__(self, manager: BpfManager, cpu: int):
        out = manager.output_for(cpu)
        self.cpu, self.output, self.fd, self.size = cpu, out.fd, out.ring, out.ring_size
        self.cons = mmap.mmap(self.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.data = mmap.mmap(self.fd, mmap.PAGESIZE + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=mmap.PAGESIZE)
        self.lost = 0
        self.times: list[int] = []
        self.plug()

    def read(self) -> list[tuple[int, int, bytes]]:
        """(pid, tid, record bytes) of every new record."""
        prod = struct.unpack_from("<Q", self.data, 0)[0]
        pos = struct.unpack_from("<Q", self.cons, 0)[0]
        out = []
        while pos < prod:
            at = mmap.PAGESIZE + pos % self.size
            word = struct.unpack_from("<I", self.data, at)[0]
            if word & (1 << 31):
                break  # not committed yet
            n = word & 0x3FFFFFFF
            body = self.data[at + 8: at + 8 + n]
            t, pid_tgid = struct.unpack_from("<QQ", body)
            self.times.append(t)
            out.append((pid_tgid >> 32, pid_tgid & 0xFFFFFFFF, body[16:]))
            pos += (n + 8 + 7) & ~7
        struct.pack_into("<Q", self.cons, 0, pos)
        return out

    def close(self) -> None:
        self.unplug()
        self.cons.close()
        self.data.close()
        os.close(self.fd)
        os.close(self.output)


def decode(raw: bytes) -> tuple[str, np.void] | None:
    tag = struct.unpack_from("<I", raw)[0]
    if tag not in TAGS:
        return None
    name, dt = TAGS[tag]
    # records of one name end where its bytes do (name_len): the rest reads as zeros
    return name, np.frombuffer(raw[: dt.itemsize].ljust(dt.itemsize, b"\0"), dt)[0]


class Capture:
    def __init__(self, ring: Ring):
        self.ring = ring
        self.events: list[tuple[int, str, np.void]] = []

    def drain(self) -> None:
        for pid, _tid, raw in self.ring.read():
            d = decode(raw)
            if d:
                self.events.append((pid, d[0], d[1]))

    def clear(self) -> None:
        self.drain()
        self.events.clear()

    def of(self, pid: int, family: str) -> list[np.void]:
        return [r for p, f, r in self.events if p == pid and f == family]

    def wait(self, pred, timeout: float = 10.0) -> list:
        """Drain until ``pred(events)`` returns something truthy, or fail."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for records")
            time.sleep(0.02)


@pytest.fixture(scope="module", params=["per_task", "hash", "hash-perf"])
def manager(request, tmp_path_factory):
    """Every family loaded, in each form the programs take: records waiting in task
    storage (this kernel) or in a HASH (kernels without task storage for
    tracepoint programs, 5.8 to 6.x), written to BPF ring buffers, and in a
    HASH written to perf rings (kernels before 5.8). The last two are forced here."""
    per_task = request.param == "per_task"
    output = PERF if request.param.endswith("perf") else RINGBUF
    m = BpfManager(str(tmp_path_factory.mktemp("run")), per_task=per_task, output=output)
    st = m.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})
    assert st == {f: {"loaded": True, "error": None} for f in FAMILIES}
    assert all(m.family_maps(f).per_task == per_task for f in FAMILIES if f != "exit")
    assert all(m.family_maps(f).ringbuf == (output == RINGBUF) for f in FAMILIES)
    yield m
    m.close()


# Tests of the HASH that holds records between enter and exit (its entries, its size)
HASH_FORM = pytest.mark.parametrize("manager", ["hash"], indirect=True)


def test_task_storage_is_found_on_this_kernel(tmp_path):
    """Left to find out, the manager loads the per-task form here (6.18 has task
    storage for tracepoint programs), and the form stays for later families."""
    with BpfManager(str(tmp_path)) as m:
        assert m.apply({"open": {}}) == {"open": {"loaded": True, "error": None}}
        assert m.per_task and m.family_maps("open").per_task
        assert m.apply({"open": {}, "sock": {}})["sock"]["loaded"] and m.family_maps("sock").per_task
        assert m.output.kind == RINGBUF and m.family_maps("open").ringbuf  # Linux 6.18 has them


@pytest.fixture(scope="module")
def ring(manager):
    r = RingBuffer(manager, CPU) if manager.output.kind == RINGBUF else Ring(CPU, manager.map_fd)
    yield r
    r.close()


@pytest.fixture
def cap(ring):
    c = Capture(ring)
    c.clear()
    return c


def _pin():
    os.sched_setaffinity(0, {CPU})


def run_child(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run python code in a child pinned to CPU; returns the process (pid in .args)."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                         preexec_fn=_pin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=30)
    if check:
        assert p.returncode == 0, err.decode()
    p.stdout_text = out.decode()  # type: ignore[attr-defined]
    return p


def test_open_existing_and_missing(cap, tmp_path):
    existing = tmp_path / "present"
    existing.write_text("x")
    missing = tmp_path / "absent"
    p = run_child("""
        import os, sys
        fd = os.open(sys.argv[1], os.O_RDONLY); print(fd)
        try: os.open(sys.argv[2], os.O_RDONLY)
        except FileNotFoundError: pass
        fd2 = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    """, str(existing), str(missing), str(tmp_path / "created"))
    fd = int(p.stdout_text.split()[0])

    def found():
        recs = {r["filename"]: r for r in cap.of(p.pid, "open")}
        keys = [str(x).encode() for x in (existing, missing, tmp_path / "created")]
        return recs if all(k in recs for k in keys) else None

    recs = cap.wait(found)
    ok = recs[str(existing).encode()]
    assert ok["ret"] == fd and ok["flags"] & 3 == os.O_RDONLY and ok["dirfd"] == -100
    assert ok["nr"] in (2, 257) and ok["uid"] == 0 and ok["gid"] == 0
    bad = recs[str(missing).encode()]
    assert bad["ret"] == -2
    created = recs[str(tmp_path / "created").encode()]
    assert created["ret"] >= 0 and created["mode"] == 0o640
    assert created["flags"] & (os.O_CREAT | os.O_TRUNC | os.O_WRONLY) == \
        os.O_CREAT | os.O_TRUNC | os.O_WRONLY


# The name lives in a read-only page no instruction touches before open(): 4 MiB of
# .rodata on each side keep the loader's faults (and their fault-around) away.
# bpf may not fault a page in, so the read at syscall entry fails; the kernel
# faults it in to copy the name, and the read at exit succeeds.
UNFAULTED_OPEN = r"""
#include <fcntl.h>
#include <stdio.h>
__attribute__((aligned(4096))) const char before[4 << 20] = {1};
__attribute__((aligned(4096))) const char name[4096] = NAME;
__attribute__((aligned(4096))) const char after[4 << 20] = {1};
int main(void) { printf("%d\n", open(name, O_RDONLY)); return 0; }
"""


def _open_unfaulted(target, workdir) -> subprocess.Popen:
    """Build and run a program that opens ``target`` by a name not yet faulted in
    (UNFAULTED_OPEN); it prints open's return."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("this test needs gcc")
    src = workdir / "unfaulted.c"
    src.write_text(UNFAULTED_OPEN)
    binary = workdir / "unfaulted"
    subprocess.run([gcc, "-O0", "-fno-toplevel-reorder", f'-DNAME="{target}"', "-o", str(binary), str(src)],
                   check=True)
    return subprocess.Popen([str(binary)], preexec_fn=_pin, stdout=subprocess.PIPE)


def test_a_record_holds_only_its_names_bytes_and_a_name_unread_at_entry_is_read_at_exit(cap, tmp_path):
    target = tmp_path / "target-of-an-unfaulted-name"
    target.write_text("x")
    p = _open_unfaulted(target, tmp_path)
    out, _ = p.communicate(timeout=30)
    assert int(out) >= 0
    want = str(target).encode()
    dt = records.RECORDS["open"][1]
    got: list[bytes] = []

    deadline = time.monotonic() + 10
    while not (mine := [r for r in got if want in r]) and time.monotonic() < deadline:
        got += [raw for pid, _tid, raw in cap.ring.read()
                if pid == p.pid and struct.unpack_from("<I", raw)[0] == records.RECORDS["open"][0]]
        time.sleep(0.02)
    assert mine, [np.frombuffer(r[: dt.itemsize].ljust(dt.itemsize, b"\0"), dt)[0] for r in got]
    raw = mine[0]
    rec = np.frombuffer(raw[: dt.itemsize].ljust(dt.itemsize, b"\0"), dt)[0]
    assert rec["filename"] == want and rec["name_len"] == len(want) + 1 and rec["ret"] >= 0
    # only the name's bytes were written, up to where perf would pad the raw data with
    # stale ring bytes: every byte after the name is the record's own zero
    assert len(raw) < records.offset(dt, "filename") + len(want) + 1 + 8 < dt.itemsize
    assert (len(raw) + 4) % 8 == 0 and raw[records.offset(dt, "filename") + len(want):] == \
        bytes(len(raw) - records.offset(dt, "filename") - len(want))


def test_file_ops(cap, tmp_path):
    a, b, d, f = (str(tmp_path / n) for n in ("a", "b", "d", "f"))
    open(a, "w").close()
    open(f, "w").close()
    p = run_child("""
        import os, sys
        a, b, d, f = sys.argv[1:5]
        os.rename(a, b); os.unlink(b); os.mkdir(d, 0o750); os.chmod(f, 0o600)
        os.rmdir(d)
        try: os.unlink(a)
        except FileNotFoundError: pass
    """, a, b, d, f)

    def done():
        f1 = cap.of(p.pid, "file1")
        f2 = cap.of(p.pid, "file2")
        return (f1, f2) if len([r for r in f1 if r["filename"] == a.encode()]) and f2 else None

    f1, f2 = cap.wait(done)
    ren = [r for r in f2 if r["oldname"] == a.encode()]
    assert len(ren) == 1 and ren[0]["newname"] == b.encode() and ren[0]["ret"] == 0
    by = {}
    for r in f1:
        by.setdefault(r["filename"], []).append(r)
    unl_b = by[b.encode()][0]
    assert unl_b["nr"] in (87, 263) and unl_b["ret"] == 0
    mk = [r for r in by[d.encode()] if r["nr"] in (83, 258)]
    assert len(mk) == 1 and mk[0]["mode"] == 0o750 and mk[0]["ret"] == 0
    rm = [r for r in by[d.encode()] if r["nr"] == 84]
    assert len(rm) == 1 and rm[0]["ret"] == 0
    ch = by[f.encode()][0]
    assert ch["nr"] in (90, 268, 452) and ch["mode"] == 0o600 and ch["ret"] == 0
    assert ch["owner_uid"] == records.NO_ID
    assert by[a.encode()][0]["ret"] == -2


def test_exec_full_argv(cap):
    p = subprocess.Popen(["/bin/true", "a", "b", "c"], preexec_fn=_pin)
    assert p.wait(timeout=10) == 0

    recs = cap.wait(lambda: cap.of(p.pid, "exec"))
    assert len(recs) == 1
    r = recs[0]
    assert r["filename"] == b"/bin/true" and r["ret"] == 0 and r["argc"] == 4
    assert r["argv"] == b"/bin/true\0a\0b\0c"
    assert r["argv_len"] == len(b"/bin/true\0a\0b\0c\0")
    assert records.argv_text(np.array([r["argv"]]))[0] == b"/bin/true a b c"


def test_exec_from_a_thread_other_than_the_leader(manager, cap):
    """A thread that execs returns from execve as the leader (its pid becomes the
    tgid): its EXEC is recorded all the same, and no pending entry is left behind
    (HASH form: the record is keyed by the process; per task: the thread's
    task_struct, and its storage, survive the exec)."""
    pending = manager.family_maps("exec").pending
    p = run_child("""
        import os, threading
        t = threading.Thread(target=os.execv, args=("/bin/true", ["/bin/true", "from-a-thread"]))
        t.start(); t.join()
    """)
    recs = cap.wait(lambda: [r for r in cap.of(p.pid, "exec") if r["filename"] == b"/bin/true"])
    assert len(recs) == 1 and recs[0]["ret"] == 0 and recs[0]["argv"] == b"/bin/true\0from-a-thread"
    if not manager.per_task:  # task storage has no keys to walk: freed with the thread
        assert not any(struct.unpack("<Q", k)[0] >> 32 == p.pid for k in _keys(pending))


def test_exec_by_execveat_of_an_open_file_or_a_memfd_is_recorded(manager, cap):
    """execveat(fd, "", AT_EMPTY_PATH), as runc execs its cloned binary and as fileless
    malware execs a memfd (fexecve): a successful one returns through
    sys_exit_execve (the exit reports nr 59), and its record is output there, never
    dropped. A failed one returns through its own exit and is recorded too."""
    manager.losses()
    p = run_child("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        argv = (ctypes.c_char_p * 3)(b"/bin/true", b"via-execveat", None)
        envp = (ctypes.c_char_p * 1)(None)
        bad = os.open("/etc/hostname", os.O_RDONLY)  # not executable: EACCES
        assert libc.syscall(322, bad, b"", argv, envp, 0x1000) == -1
        fd = os.open("/bin/true", os.O_RDONLY)
        libc.syscall(322, fd, b"", argv, envp, 0x1000)  # AT_EMPTY_PATH
        raise SystemExit(f"execveat failed: {ctypes.get_errno()}")
    """)
    m = run_child("""
        import os
        fd = os.memfd_create("payload", 0)
        with open("/bin/true", "rb") as f:
            os.write(fd, f.read())
        os.execve(fd, ["payload", "from-a-memfd"], {})  # fexecve
    """)
    cap.wait(lambda: cap.of(p.pid, "exit") and cap.of(m.pid, "exit"))
    recs = [r for r in cap.of(p.pid, "exec") if r["nr"] == 322]
    assert [(r["ret"] < 0, r["argv"]) for r in recs] == [(True, b"/bin/true\0via-execveat"),
                                                          (False, b"/bin/true\0via-execveat")]
    assert recs[1]["ret"] == 0 and recs[1]["filename"] == b""
    fileless = [r for r in cap.of(m.pid, "exec") if r["nr"] == 322]
    assert len(fileless) == 1 and fileless[0]["ret"] == 0 and fileless[0]["argv"] == b"payload\0from-a-memfd"
    assert _lost(manager.losses(), "exec", "stale") == 0


def _keys(map_fd: int) -> list[bytes]:
    """The keys of a pending map (u64 pid_tgid)."""
    import ctypes

    from c8.collectors.bpf import syscalls as sc
    out, key = [], None
    while True:
        k = ctypes.create_string_buffer(key or b"\0" * 8, 8)
        nk = ctypes.create_string_buffer(8)
        attr = ctypes.create_string_buffer(sc.ATTR_SIZE)
        struct.pack_into("<IIQQ", attr, 0, map_fd, 0, ctypes.addressof(k) if key is not None else 0,
                         ctypes.addressof(nk))
        try:
            sc.bpf(sc.MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
        except sc.BpfError:
            return out
        key = nk.raw
        out.append(key)


def test_exec_long_argv_truncated_in_bounds(cap):
    args = ["x" * 100] * 20  # 2 KiB of arguments: fills 1024 bytes exactly
    p = subprocess.Popen(["/bin/true", *args], preexec_fn=_pin)
    assert p.wait(timeout=10) == 0
    r = cap.wait(lambda: cap.of(p.pid, "exec"))[0]
    assert r["argv_len"] == 1024
    # 10 + 10 * 101 bytes of whole arguments, then a 4-byte cut one ("xxx" and NUL)
    assert r["argv"] == b"/bin/true" + (b"\0" + b"x" * 100) * 10 + b"\0xxx"
    assert r["argc"] == 12


def _sockaddr_in(raw: np.ndarray) -> tuple[int, int, bytes]:
    b = bytes(raw)
    family = struct.unpack_from("<H", b)[0]
    port = struct.unpack_from(">H", b, 2)[0]
    addr = b[4:8] if family == socket.AF_INET else b[8:24]
    return family, port, addr


def test_sockets(cap):
    srv4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv4.bind(("127.0.0.1", 0))
    srv4.listen(4)
    srv6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv6.bind(("::1", 0))
    srv6.listen(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    p4, p6, pu = srv4.getsockname()[1], srv6.getsockname()[1], udp.getsockname()[1]
    try:
        p = run_child("""
            import socket, sys
            p4, p6, pu = map(int, sys.argv[1:4])
            a = socket.create_connection(("127.0.0.1", p4))
            b = socket.socket(socket.AF_INET6); b.connect(("::1", p6))
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"hi", ("127.0.0.1", pu))
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(7)
            c = socket.create_connection(s.getsockname())
            conn, peer = s.accept()
            print(s.fileno(), s.getsockname()[1], c.getsockname()[1], conn.fileno())
        """, str(p4), str(p6), str(pu))
        lfd, lport, cport, afd = map(int, p.stdout_text.split())
        assert udp.recvfrom(16)[0] == b"hi"

        def done():
            recs = cap.of(p.pid, "sock")
            nrs = [int(r["nr"]) for r in recs]
            return recs if nrs.count(42) >= 3 and {43, 288} & set(nrs) and 50 in nrs \
                and 44 in nrs else None

        try:
            recs = cap.wait(done)
        except AssertionError:
            raise AssertionError(f"got {[(int(r['nr']), int(r['ret'])) for r in cap.of(p.pid, 'sock')]}") from None
        connects = [r for r in recs if r["nr"] == 42]
        addrs = {_sockaddr_in(r["addr"]) for r in connects}
        assert (socket.AF_INET, p4, bytes([127, 0, 0, 1])) in addrs
        assert (socket.AF_INET6, p6, socket.inet_pton(socket.AF_INET6, "::1")) in addrs
        assert (socket.AF_INET, lport, bytes([127, 0, 0, 1])) in addrs
        for r in connects:
            assert r["ret"] == 0 and r["addrlen"] in (16, 28)
        send = [r for r in recs if r["nr"] == 44]
        assert _sockaddr_in(send[0]["addr"]) == (socket.AF_INET, pu, bytes([127, 0, 0, 1]))
        assert send[0]["ret"] == 2 and send[0]["addrlen"] == 16
        listen = [r for r in recs if r["nr"] == 50]
        assert len(listen) == 1 and listen[0]["backlog"] == 7 and listen[0]["fd"] == lfd
        assert listen[0]["ret"] == 0
        binds = [r for r in recs if r["nr"] == 49]
        assert any(_sockaddr_in(r["addr"])[:1] == (socket.AF_INET,) and r["fd"] == lfd
                   for r in binds)
        acc = [r for r in recs if r["nr"] in (43, 288)]
        assert len(acc) == 1 and acc[0]["fd"] == lfd and acc[0]["ret"] == afd
        assert _sockaddr_in(acc[0]["addr"]) == (socket.AF_INET, cport, bytes([127, 0, 0, 1]))
        assert acc[0]["addrlen"] == 16
    finally:
        srv4.close()
        srv6.close()
        udp.close()


def test_recvfrom_reads_source_at_exit(cap):
    p = run_child("""
        import socket
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
        s.sendto(b"abc", r.getsockname())
        data, src = r.recvfrom(64)
        print(s.getsockname()[1])
    """)
    sport = int(p.stdout_text)
    recs = cap.wait(lambda: [r for r in cap.of(p.pid, "sock") if r["nr"] == 45])
    assert recs[0]["ret"] == 3
    assert _sockaddr_in(recs[0]["addr"]) == (socket.AF_INET, sport, bytes([127, 0, 0, 1]))


def test_exit_codes(cap):
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], preexec_fn=_pin)
    assert p.wait(timeout=10) == 3
    k = subprocess.Popen(["sleep", "30"], preexec_fn=_pin)
    # wait until it is really running sleep before killing it
    cap.wait(lambda: cap.of(k.pid, "exec"))
    k.send_signal(signal.SIGKILL)
    assert k.wait(timeout=10) == -9

    def done():
        a = [r for r in cap.of(p.pid, "exit") if r["group_dead"]]
        b = [r for r in cap.of(k.pid, "exit") if r["group_dead"]]
        return (a, b) if a and b else None

    a, b = cap.wait(done)
    assert a[0]["exit_code"] == 0x300 and a[0]["tgid"] == p.pid and a[0]["tid"] == p.pid
    assert b[0]["exit_code"] == 9 and b[0]["tgid"] == k.pid


def test_prefix_filter_drops_in_kernel(manager, cap, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES}
                       | {"open": {"filter": {"prefixes": [str(keep) + "/"],
                                              "exact": [str(tmp_path / "exact-one")],
                                              "ignore_tgids": [os.getpid()]}}})
    assert st["open"] == {"loaded": True, "error": None}
    try:
        p = run_child("""
            import os, sys
            keep, other = sys.argv[1], sys.argv[2]
            for i in range(200):
                d = keep if i % 10 == 0 else other
                try: os.close(os.open(os.path.join(d, f"f{i}"), os.O_RDONLY))
                except FileNotFoundError: pass
            for n in (other + "/exact-one", other + "/exact-one-not"):
                try: os.open(n, os.O_RDONLY)
                except FileNotFoundError: pass
        """, str(keep), str(tmp_path))
        want = {f"{keep}/f{i}".encode() for i in range(0, 200, 10)} | {
            str(tmp_path / "exact-one").encode()}
        # the child's exit record comes after all its opens in the same ring
        cap.wait(lambda: cap.of(p.pid, "exit"))
        got = [r["filename"] for r in cap.of(p.pid, "open")]
        assert set(got) == want and len(got) == len(want)  # the interpreter's own opens too
        assert all(r["ret"] == -2 for r in cap.of(p.pid, "open"))
    finally:
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


def test_a_name_unread_at_entry_is_filtered_at_exit(manager, cap, tmp_path):
    # The enter cannot read these names (UNFAULTED_OPEN), so its filter lets them
    # pass; the exit reads them and must filter them: only the kept one arrives.
    keep, other = tmp_path / "keep", tmp_path / "other"
    keep.mkdir()
    other.mkdir()
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES}
                       | {"open": {"filter": {"prefixes": [str(keep) + "/"],
                                              "ignore_tgids": [os.getpid()]}}})
    assert st["open"] == {"loaded": True, "error": None}
    try:
        runs = {}
        for d in (keep, other):
            (d / "target").write_text("x")
            p = _open_unfaulted(d / "target", d)
            out, _ = p.communicate(timeout=30)
            assert int(out) >= 0
            runs[d] = p.pid
        cap.wait(lambda: all(cap.of(pid, "exit") for pid in runs.values()))
        kept = cap.of(runs[keep], "open")
        assert [r["filename"] for r in kept] == [str(keep / "target").encode()], kept
        assert kept[0]["ret"] >= 0
        assert cap.of(runs[other], "open") == []  # nor the loader's own opens
    finally:
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


def test_ignore_tgids_drop_everything(manager, cap, tmp_path):
    # the test process itself is ignored: its opens never show up
    for i in range(5):
        (tmp_path / f"mine{i}").write_text("")
    p = run_child("import os; os.close(os.open('/dev/null', 0))")
    cap.wait(lambda: cap.of(p.pid, "exit"))
    assert not cap.of(os.getpid(), "open")
    assert any(r["filename"] == b"/dev/null" for r in cap.of(p.pid, "open"))


def test_unload_and_reload_family(manager, cap):
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES
                        if f != "open"})
    assert "open" not in st and "open" not in manager.families
    p = run_child("import os; os.close(os.open('/dev/null', 0))")
    cap.wait(lambda: cap.of(p.pid, "exit"))
    assert not cap.of(p.pid, "open")
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})
    assert st["open"] == {"loaded": True, "error": None}
    p = run_child("import os; os.close(os.open('/dev/null', 0))")
    cap.wait(lambda: [r for r in cap.of(p.pid, "open") if r["filename"] == b"/dev/null"])


def test_unknown_family_reports_error_others_keep_working(manager):
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES}
                       | {"nosuch": {}})
    assert st["nosuch"]["loaded"] is False and "nosuch" in st["nosuch"]["error"]
    assert all(st[f]["loaded"] for f in FAMILIES)
    manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


def test_serve_hands_out_the_output_of_a_cpu(manager):
    """A collector without CAP_BPF gets the output map, and (ring buffers) the ring of
    its CPU made by the manager, over bpf.sock; a CPU that does not exist is refused."""
    path = manager.serve()
    assert os.stat(path).st_mode & 0o777 == 0o600
    out = fetch_output(manager.run_dir, 0, timeout=5)
    try:
        assert out.kind == manager.output.kind and out.ring_size == manager.output.ring_size
        assert os.readlink(f"/proc/self/fd/{out.fd}") == "anon_inode:bpf-map"
        # the same map: an entry set through the received fd is visible through the owner's
        if out.kind == RINGBUF:
            assert os.readlink(f"/proc/self/fd/{out.ring}") == "anon_inode:bpf-map"
            maps.output_set(out.fd, 0, out.ring)
            assert maps.output_clear(manager.map_fd, 0)
        else:
            r = Ring(0, out.fd)
            assert r.unplug() and not maps.output_clear(manager.map_fd, 0)
            r.close()
    finally:
        for fd in (out.fd, out.ring):
            if fd >= 0:
                os.close(fd)
    with pytest.raises(OSError, match="unexpected answer"):
        fetch_output(manager.run_dir, manager.n_cpus, timeout=5)


def test_openat2_fchmod_link_symlink(cap, tmp_path):
    f = str(tmp_path / "t")
    p = run_child("""
        import ctypes, os, struct, sys
        f = sys.argv[1]
        libc = ctypes.CDLL(None, use_errno=True)
        how = struct.pack("<QQQ", os.O_WRONLY | os.O_CREAT, 0o604, 0)
        fd = libc.syscall(437, -100, f.encode(), how, len(how))
        assert fd >= 0, ctypes.get_errno()
        os.fchmod(fd, 0o611)
        os.link(f, f + ".hard"); os.symlink(f, f + ".soft")
        print(fd)
    """, f)
    fd = int(p.stdout_text)

    def done():
        o = [r for r in cap.of(p.pid, "open") if r["nr"] == 437]
        f1 = [r for r in cap.of(p.pid, "file1") if r["nr"] == 91]
        f2 = cap.of(p.pid, "file2")
        return (o, f1, f2) if o and f1 and len(f2) >= 2 else None

    o, f1, f2 = cap.wait(done)
    assert o[0]["filename"] == f.encode() and o[0]["ret"] == fd and o[0]["dirfd"] == -100
    assert o[0]["flags"] == os.O_WRONLY | os.O_CREAT and o[0]["mode"] == 0o604
    assert f1[0]["dirfd"] == fd and f1[0]["mode"] == 0o611 and f1[0]["filename"] == b""
    pairs = {(int(r["nr"]), r["oldname"], r["newname"], int(r["ret"])) for r in f2}
    assert {(86, f.encode(), (f + ".hard").encode(), 0),
            (88, f.encode(), (f + ".soft").encode(), 0)} <= pairs


@HASH_FORM
def test_filtered_calls_leave_no_pending_entries(manager, tmp_path):
    m = manager.family_maps("file1")
    manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES}
                  | {"file1": {"filter": {"prefixes": ["/nonexistent-prefix/"]}}})
    try:
        run_child("""
            import os, sys
            for i in range(300):
                try: os.unlink(os.path.join(sys.argv[1], str(i)))
                except FileNotFoundError: pass
        """, str(tmp_path))
        # exits consume what enters saved; filtered enters save nothing
        deadline = time.monotonic() + 5
        while maps.pending_count(m.pending) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert maps.pending_count(m.pending) <= 2
    finally:
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


def test_btf_offsets_of_the_running_kernel():
    from c8.collectors.bpf import btf
    pid = btf.member_offset("task_struct", "pid")
    assert btf.member_offset("task_struct", "tgid") == pid + 4
    assert btf.member_offset("task_struct", "real_parent") > pid


def test_other_tools_still_see_the_tracepoints(manager):
    """With the programs attached, a perf event of another tool on the same
    tracepoint still counts every call: the programs return non-zero, which lets
    the kernel go on to the tracepoint's perf events (zero would hide the event
    from perf record, perf stat and other tracers while c8 runs)."""
    from c8.collectors import perf, tracefs

    for tp, call in (("syscalls:sys_enter_openat", lambda: os.close(os.open("/dev/null", os.O_RDONLY))),
                     ("syscalls:sys_exit_openat", lambda: os.close(os.open("/dev/null", os.O_RDONLY))),
                     ("syscalls:sys_enter_connect", lambda: socket.socket().connect_ex(("127.0.0.1", 9)))):
        fd = perf.open_counter(tracefs.event_id(tp), -1, tp, pid=0)  # this process, any CPU: like `perf stat`
        try:
            perf.enable(fd, tp)
            for _ in range(100):
                call()
            perf.disable(fd, tp)
            count = struct.unpack("<Q", os.read(fd, 8))[0]
        finally:
            os.close(fd)
        assert count >= 100, (tp, count)


# -- losses counted in the kernel (c8.collectors.bpf.losses) ------------------------------
OPENS = 50
NOBODY = 2_000_000_007  # a uid no process here has: the open family filters on it
OPEN_FILES = """
    import os, sys
    if len(sys.argv) > 3:
        os.setuid(int(sys.argv[3]))
    for i in range(int(sys.argv[2])):
        try: os.close(os.open(os.path.join(sys.argv[1], f"f{i}"), os.O_RDONLY))
        except OSError: pass  # ENOENT, or EACCES as NOBODY: the record is the same
"""


def _only_opens_under(manager, prefix: str) -> None:
    """The open family keeps only calls of uid NOBODY under ``prefix``: no other
    process's open reaches the code that can fail, so every count below is this
    test's. (A prefix alone is not enough: a name the program cannot read, not yet
    paged in, passes the filter, and fresh processes make a few such opens a second.)"""
    st = manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES}
                       | {"open": {"filter": {"prefixes": [prefix], "uid": NOBODY,
                                              "ignore_tgids": [os.getpid()]}}})
    assert st["open"] == {"loaded": True, "error": None}


def _lost(losses, family: str, cause: str, cpu: int | None = CPU) -> int:
    return sum(n for c, f, why, n in losses if f == family and why == cause and c == cpu)


def test_output_failures_are_counted_on_their_cpu(manager, ring, cap, tmp_path):
    """With the CPU's output slot empty (no ring buffer in the array, or no perf
    event), the output fails (-ENOENT): each record is counted as lost on that
    CPU, and none is written."""
    prefix = str(tmp_path) + "/"
    _only_opens_under(manager, prefix)
    try:
        manager.losses()  # what came before this test
        assert ring.unplug()
        try:
            p = run_child(OPEN_FILES, prefix, str(OPENS), str(NOBODY))
        finally:
            ring.plug()
        lost = manager.losses()
        assert _lost(lost, "open", "output") == OPENS, lost
        assert manager.loss_totals["open"]["output"] >= OPENS
        # the slot is back: the same workload is written whole, nothing counted
        q = run_child(OPEN_FILES, prefix, str(OPENS), str(NOBODY))
        cap.wait(lambda: cap.of(q.pid, "exit"))
        assert len(cap.of(q.pid, "open")) == OPENS and not cap.of(p.pid, "open")
        assert _lost(manager.losses(), "open", "output") == 0
    finally:
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


def test_a_full_ring_is_counted_whole(manager, ring, cap, tmp_path):
    """A ring nobody reads fills: every record that does not fit is counted, by the
    programs for a ring buffer (the kernel counts nothing there) and by the kernel
    for a perf ring (PERF_RECORD_LOST, source kernel): written + lost = calls."""
    prefix = str(tmp_path) + "/"
    _only_opens_under(manager, prefix)
    calls = 3 * PAGES * mmap.PAGESIZE // 64  # far more than fit: a record is over 64 bytes
    try:
        cap.clear()
        manager.losses()
        ring.lost = 0
        p = run_child(OPEN_FILES, prefix, str(calls), str(NOBODY))  # nobody reads meanwhile
        written = len([raw for pid, _tid, raw in ring.read() if pid == p.pid and decode(raw)
                       and decode(raw)[0] == "open"])
        counted = _lost(manager.losses(), "open", "output")
        assert 0 < written < calls
        if manager.output.kind == RINGBUF:
            assert written + counted == calls, (written, counted)
        else:  # the kernel tells with the next record that fits, for the whole ring
            run_child(OPEN_FILES, prefix, "1", str(NOBODY))
            ring.read()
            assert counted == 0 and written + ring.lost >= calls, (written, ring.lost)
    finally:
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})


@pytest.mark.parametrize("manager", ["per_task", "hash"], indirect=True)
def test_ring_buffer_records_carry_their_time_and_thread(manager, ring, cap, tmp_path):
    """A ring buffer record has no sample header: the program writes the time
    (CLOCK_MONOTONIC, the clock of perf samples) and pid_tgid before it."""
    cap.clear()
    ring.times.clear()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    p = run_child(OPEN_FILES, str(tmp_path), "3")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    got = [(pid, tid, t) for (pid, tid, raw), t in zip(ring.read(), ring.times, strict=True)
           if pid == p.pid and decode(raw) and decode(raw)[0] == "open"
           and str(tmp_path).encode() in bytes(decode(raw)[1]["filename"])]
    assert len(got) == 3 and all(tid == p.pid and before < t < after for _, tid, t in got), got
    assert [t for *_, t in got] == sorted(t for *_, t in got)


@HASH_FORM
def test_pending_map_full_is_counted(manager, cap, tmp_path):
    """A syscall whose record cannot be saved (pending HASH full: -E2BIG) is counted."""
    import errno

    from c8.collectors.bpf import syscalls as sc

    prefix = str(tmp_path) + "/"
    _only_opens_under(manager, prefix)
    pending = manager.family_maps("open").pending
    value = bytes(programs.pending_size("open"))
    keys = []
    try:
        while True:  # fill it with pid_tgids no thread has (tgids stop at 2^22)
            key = struct.pack("<Q", ((0xFFFF0000 + len(keys)) << 32) | len(keys))
            try:
                sc.map_update(pending, key, value)
            except sc.BpfError as exc:
                assert exc.errno == errno.E2BIG, exc
                break
            keys.append(key)
        assert len(keys) <= maps.PENDING_ENTRIES
        manager.losses()
        p = run_child(OPEN_FILES, prefix, str(OPENS), str(NOBODY))
    finally:
        for key in keys:
            sc.map_delete(pending, key)
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})
    lost = _lost(manager.losses(), "open", "update")
    cap.wait(lambda: cap.of(p.pid, "exit"))
    written = len(cap.of(p.pid, "open"))
    # an entry freed by another thread's exit meanwhile lets one through: then it is written
    assert lost + written == OPENS and lost > OPENS // 2, (lost, written)


@HASH_FORM
def test_stale_record_is_counted(manager, cap, tmp_path):
    """A saved record whose syscall's exit never came is dropped by the next exit of
    the family on that thread, and counted."""
    _only_opens_under(manager, str(tmp_path) + "/")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        print(os.getpid(), flush=True)
        sys.stdin.readline()
        os.close(os.open("/dev/null", os.O_RDONLY))  # filtered out: saves nothing
    """)], preexec_fn=_pin, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pid = int(child.stdout.readline())
        rec = np.zeros(1, records.RECORDS["open"][1])
        rec["tag"], rec["nr"] = records.RECORDS["open"][0], 9999  # no such syscall
        from c8.collectors.bpf import syscalls as sc
        sc.map_update(manager.family_maps("open").pending, struct.pack("<Q", (pid << 32) | pid),
                      bytes(records.PREFIX_SIZE) + rec.tobytes())  # a value: prefix, record
        manager.losses()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})
    assert _lost(manager.losses(), "open", "stale") == 1


@pytest.mark.parametrize("manager", ["per_task"], indirect=True)
def test_a_record_left_pending_is_superseded_by_the_threads_next_enter(manager, cap, tmp_path):
    """Per task, a record whose exit never came (planted here in the thread's own
    storage, keyed by its pidfd, as openat with another name) is cleared by the
    thread's next enter of the family: a filtered-out open (another uid) neither
    outputs it nor counts it stale."""
    from c8.collectors.bpf import syscalls as sc

    _only_opens_under(manager, str(tmp_path) + "/")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        print(os.getpid(), flush=True)
        sys.stdin.readline()
        os.close(os.open("/dev/null", os.O_RDONLY))  # filtered out
        print("opened", flush=True)
        sys.stdin.readline()
    """)], preexec_fn=_pin, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    task_map = manager.family_maps("open").pending
    try:
        pid = int(child.stdout.readline())
        rec = np.zeros(1, records.RECORDS["open"][1])
        rec["tag"], rec["nr"], rec["filename"] = records.RECORDS["open"][0], 257, b"/planted"
        rec["name_len"] = len(b"/planted") + 1
        pidfd = os.pidfd_open(pid)
        try:
            value = bytes(records.PREFIX_SIZE) + rec.tobytes()  # the prefix, then the record
            sc.map_update(task_map, struct.pack("<i", pidfd), value)
            assert sc.map_lookup(task_map, struct.pack("<i", pidfd), len(value)) == value
            manager.losses()
            child.stdin.write(b"go\n")
            child.stdin.flush()
            assert child.stdout.readline() == b"opened\n"
            left = np.frombuffer(sc.map_lookup(task_map, struct.pack("<i", pidfd), len(value))
                                 [records.PREFIX_SIZE:], rec.dtype)
            assert left["tag"][0] == 0 and b"planted" not in left.tobytes()  # cleared, not marked
        finally:
            os.close(pidfd)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
        manager.apply({f: {"filter": {"ignore_tgids": [os.getpid()]}} for f in FAMILIES})
    cap.wait(lambda: cap.of(pid, "exit"))
    assert cap.of(pid, "open") == [] and _lost(manager.losses(), "open", "stale") == 0


def test_subscriber_hears_of_output_failures(tmp_path):
    """End to end: records the kernel could not write (this CPU's ring buffer taken
    out of the output array behind the collector's back) reach the subscriber as ``lost``
    events of source ``ebpf:open`` on that CPU.

    The count is at least the workload's: the pushed-down prefix keeps other
    processes' opens out, except those whose name the program could not read
    (the filter widens for them), which fail on that CPU too while the slot is
    empty. test_output_failures_are_counted_on_their_cpu checks the count exactly.
    """
    from tests.integration.sensor import Sensor

    files = tmp_path / "files"
    files.mkdir()
    (tmp_path / "sensor").mkdir()
    sensor = Sensor(tmp_path / "sensor").start()
    try:
        spec = {"events": {"file": {"filter": f'filename like "{files}/*"'}}}
        with sensor.client.subscribe(spec) as sub:
            # every collector says where its CPU's records go (c8ctl status)
            assert {c.get("bpf_output") for c in sensor.status()["collectors"].values()} == {RINGBUF}
            out = fetch_output(sensor.run_dir, CPU)
            try:
                assert maps.output_clear(out.fd, CPU)  # the collector of CPU still holds its ring
            finally:
                os.close(out.fd)
                os.close(out.ring)
            run_child(OPEN_FILES, str(files), str(OPENS))
            lost, opens, cpus = 0, 0, set()
            deadline = time.monotonic() + 15
            for ev in sub.events(idle=3):
                if ev["type"] == "lost" and ev["source"] == "ebpf:open":
                    lost += ev["count"]
                    cpus.add(ev["cpu"])
                elif ev["type"] == "file" and ev["filename"].startswith(str(files)):
                    opens += 1
                if lost >= OPENS or time.monotonic() > deadline:
                    break
    finally:
        sensor.stop()
    assert lost >= OPENS and opens == 0 and cpus == {CPU}, (lost, opens, cpus)


def test_a_loss_notice_the_queue_refused_is_sent_later(tmp_path):
    """A collector whose queue to the broker is full cannot send the kernel's lost
    count when it reads it: the count waits and reaches the broker with the next
    stats period, whole (nothing lost without a count that arrives)."""
    import zmq

    from c8.collectors.main import Collector
    from c8.protocol import batch, paths

    col = Collector(child_config(run_dir=str(tmp_path), ring_pages=1), CPU)  # nobody reads yet
    pull = None
    try:
        col.apply_plan({"generation": 1, "enabled": True, "bpf": {},
                        "tracepoints": {"raw_syscalls:sys_enter": {"filter": None}}})
        while col._send_header({"kind": "filler"}):  # the queue to the broker fills up
            pass
        run_child("import os\nfor _ in range(20000): os.getppid()")  # overflows a 1-page ring
        col.drain()
        # the kernel writes PERF_RECORD_LOST with the first record that fits again
        run_child("import os\nfor _ in range(100): os.getppid()")
        col.drain()
        assert col.state.lost > 0
        assert col.state.unsent_lost == {("kernel", CPU): col.state.lost}
        pull = col.ctx.socket(zmq.PULL)  # the broker comes: the queue drains
        pull.bind(paths.ipc(paths.ingest(str(tmp_path))))
        told = 0
        deadline = time.monotonic() + 10
        while col.state.unsent_lost and time.monotonic() < deadline:
            col._report_losses()
            while pull.poll(50):
                header, _ = batch.unpack(pull.recv_multipart())
                if header.get("kind") == "lost" and header.get("source") == "kernel":
                    told += header["count"]
        assert not col.state.unsent_lost
        while pull.poll(200):
            header, _ = batch.unpack(pull.recv_multipart())
            if header.get("kind") == "lost" and header.get("source") == "kernel":
                told += header["count"]
        assert told == col.state.lost
    finally:
        col.close()
        if pull is not None:
            pull.close(0)


def test_a_burst_that_ends_with_the_ring_full_is_counted_whole(tmp_path):
    """The kernel writes a PERF_RECORD_LOST only before the next record that fits:
    a burst that overflows the ring and is followed by silence would never be told.
    The collector reads each event's own lost count (PERF_FORMAT_LOST) every stats
    period: what was read plus what was told lost is exactly what the process did."""
    import zmq

    from c8.collectors import perf
    from c8.collectors.main import Collector
    from c8.protocol import batch, paths

    calls = 20000
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        sys.stdin.readline()
        for _ in range({calls}):
            os.getppid()
        print("done", flush=True)
        sys.stdin.readline()
    """)], preexec_fn=_pin, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    col = Collector(child_config(run_dir=str(tmp_path), ring_pages=1), CPU)
    pull = col.ctx.socket(zmq.PULL)
    pull.bind(paths.ipc(paths.ingest(str(tmp_path))))
    try:
        col.apply_plan({"generation": 1, "enabled": True, "bpf": {},
                        "tracepoints": {"raw_syscalls:sys_enter":
                                        {"filter": f"common_pid == {child.pid} && id == 110"}}})
        assert not col.state.errors, col.state.errors
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"  # nobody read meanwhile: overflowed
        read, told = 0, 0
        col.drain()  # what fit; no record came after the loss, so no PERF_RECORD_LOST
        col._report_losses()
        while pull.poll(200):
            header, arr = batch.unpack(pull.recv_multipart())
            if header.get("kind") == "samples":
                read += len(arr)
            elif header.get("kind") == "lost" and header.get("source") == "kernel":
                told += header["count"]
        assert perf.read_lost(col.sources["raw_syscalls:sys_enter"].fd) is not None  # Linux >= 6.0 here
        assert read < calls and told > 0, (read, told)
        assert read + told == calls, (read, told)
    finally:
        child.stdin.close()
        child.wait(10)
        col.close()
        pull.close(0)


def test_progress_is_told_between_programs(tmp_path):
    """Loading and unloading take seconds: the caller (collector cpu0) is called back
    after each program attached and each family unloaded, to read its ring meanwhile."""
    calls = []
    with BpfManager(str(tmp_path)) as m:
        st = m.apply({"open": {}, "exit": {}}, progress=lambda: calls.append(len(m.families)))
        assert st == {"open": {"loaded": True, "error": None}, "exit": {"loaded": True, "error": None}}
        n_progs = sum(len(m._families[f].progs) for f in ("open", "exit"))
        assert len(calls) == n_progs and n_progs >= 5
        calls.clear()
        m.apply({"exit": {}}, progress=lambda: calls.append(sorted(m.families)))
        assert calls == [["exit"]]  # once, after the open family's programs are gone

        def boom():
            raise RuntimeError("the caller's trouble")
        st = m.apply({"exit": {}, "open": {}}, progress=boom)  # never fails a family
        assert st["open"] == {"loaded": True, "error": None}


def test_the_collectors_ring_reader_follows_a_small_ring_round_and_round(tmp_path):
    """c8's own reader (c8.collectors.ringbuf and the decoder) on a 4-page ring the
    programs wrap around a dozen times: read between rounds of 50 opens, every open
    arrives once, in order, whole, with its thread, and nothing is lost."""
    from c8.collectors import ringbuf
    from c8.collectors.decode import Decoder

    rounds, per_round = 40, 50
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        for r in range({rounds}):
            sys.stdin.readline()
            for i in range({per_round}):
                try: os.close(os.open(os.path.join(sys.argv[1], f"r{{r}}-f{{i}}-" + "x" * (i % 40)), 0))
                except OSError: pass
            print("done", flush=True)
    """), str(tmp_path)], preexec_fn=_pin, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    size = 4 * mmap.PAGESIZE
    with BpfManager(str(tmp_path / "run"), output=RINGBUF, ring_size=size) as m:
        st = m.apply({"open": {"filter": {"prefixes": [str(tmp_path) + "/"], "ignore_tgids": [os.getpid()]}}})
        assert st["open"]["loaded"], st
        out = m.output_for(CPU)
        rb = ringbuf.RingBuffer(out.ring, size)
        maps.output_set(out.fd, CPU, out.ring)
        dec = Decoder()
        names, tids, through = [], set(), 0
        try:
            m.losses()
            for _ in range(rounds):
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.stdout.readline() == "done\n"
                buf, starts, lengths = rb.read()
                through += int(((lengths + 8 + 7) & ~7).sum())
                for source, arr in dec.decode_ringbuf(buf, starts, lengths, CPU):
                    assert source == "bpf:open"
                    mine = arr[arr["pid"] == child.pid]
                    names += [n.decode() for n in mine["filename"]]
                    tids |= set(mine["tid"].tolist())
            lost = m.losses()
        finally:
            child.stdin.close()
            child.wait(10)
            rb.close()
            os.close(out.fd)
    want = [str(tmp_path / f"r{r}-f{i}-{'x' * (i % 40)}") for r in range(rounds) for i in range(per_round)]
    assert names == want and tids == {child.pid}
    assert not [x for x in lost if x[1] == "open"], lost
    assert through > 10 * size  # it went round the ring at least ten times
