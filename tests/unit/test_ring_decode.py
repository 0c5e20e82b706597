"""Ring walking and decoding on synthetic ring bytes (no kernel)."""

from __future__ import annotations

import mmap
import struct

import numpy as np
import pytest

from c8.collectors import decode, perf, ring, tracefs

EXEC_FORMAT = """name: sched_process_exec
ID: 365
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;
"""

SYS_ENTER_FORMAT = """name: sys_enter
ID: 443
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:long id;\toffset:8;\tsize:8;\tsigned:1;
\tfield:unsigned long args[6];\toffset:16;\tsize:48;\tsigned:0;
"""

EXEC_ID, ENTER_ID, BPF_ID = 11, 12, 13


def sample(sid: int, pid: int, tid: int, t: int, cpu: int, raw: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE of the collectors' sample layout."""
    pad = (-(4 + len(raw))) % 8
    raw = raw + b"\0" * pad
    size = perf.SAMPLE_RAW_OFF + len(raw)
    return (struct.pack("<IHH", perf.RECORD_SAMPLE, 0, size) + struct.pack("<QIIQII", sid, pid, tid, t, cpu, 0)
            + struct.pack("<I", len(raw)) + raw)


def lost(n: int) -> bytes:
    return struct.pack("<IHHQQ", perf.RECORD_LOST, 0, 24, 99, n)


def other() -> bytes:  # a PERF_RECORD_COMM-like record the walker must skip
    return struct.pack("<IHHII", 3, 0, 24, 1, 1) + b"comm\0\0\0\0"


def exec_raw(filename: bytes, pid: int) -> bytes:
    fixed = struct.pack("<HBBiIii", 365, 0, 0, pid, 0, pid, pid)
    loc = len(fixed) | ((len(filename) + 1) << 16)
    return struct.pack("<HBBiIii", 365, 0, 0, pid, loc, pid, pid) + filename + b"\0"


def enter_raw(nr: int, args: tuple[int, ...]) -> bytes:
    return struct.pack("<HBBiq6Q", 443, 0, 0, 1, nr, *args)


def make_decoder(width: int = 256) -> decode.Decoder:
    d = decode.Decoder(string_width=width)
    d.add_tracepoint(EXEC_ID, tracefs.parse_format(EXEC_FORMAT, "sched"))
    d.add_tracepoint(ENTER_ID, tracefs.parse_format(SYS_ENTER_FORMAT, "raw_syscalls"))
    d.add_bpf_output(BPF_ID)
    return d


def buf_of(data: bytes) -> np.ndarray:
    out = np.empty(len(data), np.uint8)
    out[:] = np.frombuffer(data, np.uint8)
    return out


def check_walk(data: bytes) -> ring.Records:
    b = buf_of(data)
    fast, slow = ring.walk(b), ring.walk_slow(b)
    assert np.array_equal(fast.samples, slow.samples)
    assert (fast.lost, fast.lost_records, fast.other) == (slow.lost, slow.lost_records, slow.other)
    return fast


def test_same_size_run_and_lost_and_other():
    recs = [sample(ENTER_ID, 5, 6, 1000 + i, 1, enter_raw(i, (i,) * 6)) for i in range(50)]
    data = b"".join(recs[:20]) + lost(7) + other() + b"".join(recs[20:]) + lost(3)
    r = check_walk(data)
    assert r.n == 50 and r.lost == 10 and r.lost_records == 2 and r.other == 1
    [(src, arr)] = make_decoder().decode(buf_of(data), r.samples)
    assert src == "raw_syscalls:sys_enter"
    assert arr["id"].tolist() == list(range(50))
    assert arr["args"][:, 5].tolist() == list(range(50))
    assert arr["time"][0] == 1000 and (arr["pid"] == 5).all() and (arr["tid"] == 6).all()
    assert (arr["cpu"] == 1).all()
    assert "common_pid" not in arr.dtype.names


def test_mixed_sources_and_data_loc_strings():
    names = [b"/bin/true", b"/usr/bin/" + b"x" * 300, b""]
    data = b""
    for i in range(30):
        data += sample(ENTER_ID, 1, 1, i, 0, enter_raw(59, (1, 2, 3, 4, 5, 6)))
        if i % 10 == 0:
            data += sample(EXEC_ID, 100 + i, 100 + i, i, 0, exec_raw(names[i // 10], 100 + i))
    r = check_walk(data)
    out = dict(make_decoder(width=64).decode(buf_of(data), r.samples))
    ex = out["sched:sched_process_exec"]
    assert ex.dtype["filename"] == np.dtype("S64")
    assert ex["filename"].tolist() == [b"/bin/true", (b"/usr/bin/" + b"x" * 300)[:64], b""]
    assert ex["tp_pid"].tolist() == [100, 110, 120]
    assert len(out["raw_syscalls:sys_enter"]) == 30


def test_payload_that_looks_like_headers_is_not_a_record():
    # args crafted to be valid-looking LOST/SAMPLE headers inside the payload
    fake_lost = perf.RECORD_LOST | (24 << 48)
    fake_sample = perf.RECORD_SAMPLE | (48 << 48)
    recs = [sample(ENTER_ID, 1, 1, i, 0, enter_raw(1, (fake_lost, fake_sample, 4 << 32, fake_lost, 0, 0)))
            for i in range(10)]
    r = check_walk(b"".join(recs))
    assert r.n == 10 and r.lost == 0


def test_a_fake_header_in_every_record_is_walked_in_numpy(monkeypatch):
    """Interleaved sys_enter/sys_exit put header-like bytes in every record (trace
    flags after the raw size), and a process chooses its syscall arguments: the
    walker must stay exact and vectorised, never one Python step per record."""
    fake = perf.RECORD_SAMPLE | (48 << 48)
    rng = np.random.default_rng(7)
    parts = []
    for i in range(3000):
        args = tuple(int(x) for x in rng.integers(0, 2**63, 6))
        if i % 3:
            args = (fake, 28 | (8 << 48), *args[2:])  # header-like: SAMPLE, and type 28
        parts.append(sample(ENTER_ID, 1, 1, i, 0, enter_raw(i, args)))
        if i % 500 == 0:
            parts.append(lost(3))
    data = b"".join(parts)
    steps = []
    real_chain = ring._chain
    monkeypatch.setattr(ring, "_chain", lambda succ, start: steps.append(start) or real_chain(succ, start))
    r = check_walk(data)
    assert r.n == 3000 and r.lost == 3 * 6
    assert len(steps) <= 8  # one chain per stretch between unexpected headers, not per record


def test_unknown_ids_are_counted_not_decoded():
    data = sample(999, 1, 1, 1, 0, enter_raw(1, (0,) * 6)) + sample(ENTER_ID, 1, 1, 1, 0, enter_raw(1, (0,) * 6))
    d = make_decoder()
    out = d.decode(buf_of(data), check_walk(data).samples)
    assert [s for s, _ in out] == ["raw_syscalls:sys_enter"] and d.unknown == 1


def test_bpf_records_by_tag():
    dt = np.dtype([("tag", "<u4"), ("fd", "<i4"), ("name", "S16")])
    decode.register_bpf_record(7, "testrec", dt)
    rec = np.zeros(3, dt)
    rec["tag"] = 7
    rec["fd"] = [3, 4, 5]
    rec["name"] = [b"a", b"bb", b"ccc"]
    data = b"".join(sample(BPF_ID, 9, 9, i, 1, rec[i].tobytes()) for i in range(3))
    data += sample(BPF_ID, 9, 9, 5, 1, struct.pack("<Ii", 12345, 0))  # unregistered tag
    d = make_decoder()
    [(src, arr)] = d.decode(buf_of(data), check_walk(data).samples)
    assert src == "bpf:testrec"
    assert arr["fd"].tolist() == [3, 4, 5] and arr["name"].tolist() == [b"a", b"bb", b"ccc"]
    assert "tag" not in arr.dtype.names and d.unknown_bpf == 1
    with pytest.raises(ValueError):
        decode.register_bpf_record(8, "bad", np.dtype([("fd", "<i4")]))


def test_bpf_records_that_end_early_read_as_zeros_past_their_end():
    """A one-name record ends with its name (name_len): each reads as its layout with
    zeros past its own end, whatever the longest record of the batch, even when the
    kernel's padding after it holds stale bytes."""
    dt = np.dtype([("tag", "<u4"), ("fd", "<i4"), ("name", "S64"), ("after", "<u8")])
    decode.register_bpf_record(9, "endsearly", dt)
    names = [b"/a", b"/tmp/" + b"x" * 40, b"/etc/shadow"]
    data = b""
    for i, name in enumerate(names):
        rec = np.zeros(1, dt)
        rec["tag"], rec["fd"], rec["name"] = 9, i, name
        raw = rec.tobytes()[: 8 + len(name) + 1]
        data += sample(BPF_ID, 9, 9, i, 1, raw)
    data = data.replace(b"/a\0\0", b"/a\0\xff")  # stale padding after the first name (its raw size
    # covers it: the programs end a record where the kernel would pad, see programs._output)
    d = make_decoder()
    [(src, arr)] = d.decode(buf_of(data), check_walk(data).samples)
    assert src == "bpf:endsearly" and arr["fd"].tolist() == [0, 1, 2]
    assert arr["name"].tolist() == [b"/a\0\xff", names[1], names[2]]  # bytes the record holds
    assert arr["after"].tolist() == [0, 0, 0]


def test_one_name_records_arrive_only_as_wide_as_their_longest_name():
    """A record ending with its one name (``name_len`` in its layout) is decoded with
    the name field as wide as the batch's longest name needs (rounded up to a power
    of two), never cutting one: a 256-byte name still arrives whole."""
    dt = np.dtype([("tag", "<u4"), ("fd", "<i4"), ("name_len", "<u4"), ("_pad", "<u4"), ("filename", "S256")])
    decode.register_bpf_record(10, "onename", dt)

    def batch(names):
        data = b""
        for i, name in enumerate(names):
            rec = np.zeros(1, dt)
            rec["tag"], rec["fd"], rec["name_len"], rec["filename"] = 10, i, len(name) + 1, name
            data += sample(BPF_ID, 9, 9, i, 1, rec.tobytes()[: 16 + min(len(name) + 1, 256)])
        [(src, arr)] = make_decoder().decode(buf_of(data), check_walk(data).samples)
        assert src == "bpf:onename" and arr["fd"].tolist() == list(range(len(names)))
        assert arr["filename"].tolist() == names
        return arr.dtype["filename"].itemsize

    assert batch([b"/a", b"/tmp/" + b"x" * 20]) == 32
    assert batch([b"/a"]) == 8
    assert batch([b"/a", b"/" + b"y" * 255]) == 256


class FakeRing(ring.Ring):
    """A ring over an anonymous mapping laid out as the kernel's (metadata page + data)."""

    def __init__(self, data_pages: int = 1):
        mm = mmap.mmap(-1, (1 + data_pages) * mmap.PAGESIZE)
        struct.pack_into("<QQ", mm, ring.DATA_OFFSET_OFF, mmap.PAGESIZE, data_pages * mmap.PAGESIZE)
        super().__init__(mm)

    def write(self, data: bytes) -> None:
        """What the kernel does: copy at head modulo the size, then publish head."""
        head = self._head.value
        for i, byte in enumerate(data):
            self.data[(head + i) % self.size] = byte
        self._head.value = head + len(data)


def test_ring_wraps_around_and_releases_tail():
    fr = FakeRing(1)
    recs = [sample(ENTER_ID, 1, 2, i, 0, enter_raw(i, (i,) * 6)) for i in range(60)]
    d = make_decoder()
    seen = []
    for k in range(0, 60, 12):
        chunk = b"".join(recs[k:k + 12])  # 12*112 bytes: wraps a 4096-byte ring every few writes
        fr.write(chunk)
        assert fr.pending() == len(chunk)
        buf = fr.read()
        assert fr.pending() == 0 and bytes(buf) == chunk
        [(_, arr)] = d.decode(buf, check_walk(bytes(buf)).samples)
        seen += arr["id"].tolist()
    assert seen == list(range(60))
    assert fr._head.value > fr.size  # it did wrap
    fr.close()


def test_random_mixes_match_reference():
    rng = np.random.default_rng(1)
    parts = []
    for i in range(400):
        k = rng.integers(0, 5)
        if k == 0:
            parts.append(lost(int(rng.integers(1, 5))))
        elif k == 1:
            parts.append(sample(EXEC_ID, 1, 1, i, 0, exec_raw(b"f" * int(rng.integers(0, 40)), 1)))
        elif k == 2:
            parts.append(other())
        else:
            parts.append(sample(ENTER_ID, 1, 1, i, 0, enter_raw(i, tuple(int(x) for x in rng.integers(0, 2**63, 6)))))
    r = check_walk(b"".join(parts))
    assert r.n + r.lost_records + r.other == 400


def test_rel_loc_strings():
    text = """name: rel_test
ID: 9999
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:__rel_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int x;\toffset:12;\tsize:4;\tsigned:1;
"""
    d = decode.Decoder()
    d.add_tracepoint(77, tracefs.parse_format(text, "t"))
    # string right after the fixed part (offset 16): relative to the field's end (12) -> 4
    raw = struct.pack("<HHiIi", 1, 0, 1, 4 | (6 << 16), 42) + b"hello\0"
    data = sample(77, 1, 1, 1, 0, raw)
    [(src, arr)] = d.decode(buf_of(data), check_walk(data).samples)
    assert src == "t:rel_test" and arr["name"][0] == b"hello" and arr["x"][0] == 42


def test_unexpected_record_type_is_stepped_over():
    odd = struct.pack("<IHH", 1000, 0, 16) + b"\xff" * 8  # not a type the fast scan expects
    recs = [sample(ENTER_ID, 1, 1, i, 0, enter_raw(i, (0,) * 6)) for i in range(4)]
    r = check_walk(b"".join(recs[:2]) + odd + b"".join(recs[2:]))
    assert r.n == 4 and r.other == 1


def test_corrupt_and_empty_buffers_stop_cleanly():
    assert ring.walk(buf_of(b"")).n == 0
    assert ring.walk(buf_of(b"\0" * 64)).n == 0
    good = sample(ENTER_ID, 1, 1, 1, 0, enter_raw(1, (0,) * 6))
    assert ring.walk(buf_of(good + b"\0" * 16)).n == 1


def test_long_same_size_runs_are_viewed_and_match_gathering(monkeypatch):
    data = b"".join(sample(ENTER_ID, 3, 4, i, 1, enter_raw(i, (i, 0, 0, 0, 0, 7))) for i in range(100))
    data += sample(EXEC_ID, 5, 5, 100, 1, exec_raw(b"/bin/sh", 5)) + lost(2)
    data += b"".join(sample(ENTER_ID, 3, 4, i, 1, enter_raw(i, (i, 0, 0, 0, 0, 7))) for i in range(100, 200))
    b = buf_of(data)
    r = check_walk(data)
    runs = decode.records(b, np.delete(r.samples, 100), tracefs.parse_format(SYS_ENTER_FORMAT).raw_dtype())
    assert [len(v) for v in runs] == [100, 100] and all(np.shares_memory(v, b) for v in runs)
    viewed = dict(make_decoder().decode(b, r.samples))
    monkeypatch.setattr(decode, "_MIN_RUN", 10**9)  # force the gather path
    gathered = dict(make_decoder().decode(b, r.samples))
    for src in viewed:
        assert viewed[src].tobytes() == gathered[src].tobytes()
    assert viewed["raw_syscalls:sys_enter"]["id"].tolist() == list(range(200))
    assert viewed["sched:sched_process_exec"]["filename"][0] == b"/bin/sh"
