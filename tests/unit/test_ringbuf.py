"""The BPF ring buffer walk: the vectorised walk finds exactly the records the plain
loop does, whatever the records hold, and never reads past one not yet committed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from c8.collectors import ringbuf
from c8.collectors.ringbuf import BUSY, DISCARD, HEADER, PAGE_SHIFT

DATA_PAGE = 3  # where the kernel's ring object keeps its data (pg_off of the first page)


def _header(size: int, at: int, length: int, flags: int = 0) -> int:
    """The header the kernel writes at ring position ``at``."""
    return ((DATA_PAGE + ((at % size) >> PAGE_SHIFT)) << 32) | length | flags


@st.composite
def rings(draw):
    """(buf, pos, size, records): a ring's unread bytes from ``pos``, each record's
    payload partly random and partly slots made to look like headers (of this
    position, or any), the last record maybe not committed yet, some discarded."""
    size = (1 << draw(st.integers(0, 3))) * (1 << PAGE_SHIFT)
    pos = draw(st.integers(0, 1 << 40)) * 8
    lengths = draw(st.lists(st.integers(0, 600), min_size=1, max_size=40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = bytearray()
    records = []
    for i, n in enumerate(lengths):
        total = (n + HEADER + 7) & ~7
        if len(out) + total > size:
            break
        at = pos + len(out)
        busy = i == len(lengths) - 1 and draw(st.booleans())
        discard = draw(st.integers(0, 9)) == 0
        flags = (BUSY if busy else 0) | (DISCARD if discard else 0)
        body = bytearray(rng.integers(0, 256, total - HEADER, dtype=np.uint8).tobytes())
        for slot in range(0, (total - HEADER) // 8):  # slots that look like headers
            kind = rng.integers(0, 6)
            if kind == 0:  # a header for exactly this position
                fake = _header(size, at + HEADER + 8 * slot, int(rng.integers(0, 2000)))
            elif kind == 1:  # a header of some page of the ring, small length
                fake = ((DATA_PAGE + int(rng.integers(0, size >> PAGE_SHIFT))) << 32) | int(rng.integers(0, 300))
            else:
                continue
            body[8 * slot: 8 * slot + 8] = fake.to_bytes(8, "little")
        out += _header(size, at, n, flags).to_bytes(8, "little") + body
        if not busy and not discard:
            records.append((len(out) - total + HEADER, n))
        if busy:
            break
    return np.frombuffer(bytes(out), np.uint8), pos, size, records


@settings(max_examples=300, deadline=None)
@given(rings())
def test_the_walk_finds_exactly_the_committed_records(ring):
    buf, pos, size, records = ring
    starts, lengths, used = ringbuf.walk(buf, pos, size)
    s_starts, s_lengths, s_used = ringbuf.walk_slow(buf, pos, size)
    assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == records
    assert starts.tolist() == s_starts.tolist() and lengths.tolist() == s_lengths.tolist()
    assert used == s_used
    # used stops at the first record not committed, or at the end
    assert used <= len(buf) and used % 8 == 0


def test_a_first_record_not_committed_yet_releases_nothing():
    size = 1 << PAGE_SHIFT
    buf = np.frombuffer(_header(size, 0, 16, BUSY).to_bytes(8, "little") + bytes(16), np.uint8)
    starts, lengths, used = ringbuf.walk(buf, 0, size)
    assert len(starts) == 0 and used == 0


def test_records_built_to_mimic_a_chain_inside_a_payload_are_not_taken():
    """A payload that holds a whole run of well-formed headers, each ending where the
    next begins, for its own positions: only the real record is found."""
    size = 1 << PAGE_SHIFT
    inner = b"".join(_header(size, HEADER + 16 * k, 8).to_bytes(8, "little") + bytes(8) for k in range(30))
    buf = np.frombuffer(_header(size, 0, len(inner)).to_bytes(8, "little") + inner
                        + _header(size, HEADER + len(inner), 24).to_bytes(8, "little") + bytes(24), np.uint8)
    starts, lengths, used = ringbuf.walk(buf, 0, size)
    assert starts.tolist() == [HEADER, 2 * HEADER + len(inner)] and lengths.tolist() == [len(inner), 24]
    assert used == len(buf)


def test_records_decode_with_the_time_and_thread_the_program_wrote():
    """What the exit program writes (time, pid_tgid, then an open record cut after
    its name) decodes to the same columns a perf sample gives; a record too short
    to hold the prefix is counted, not decoded."""
    from c8.collectors.bpf import records
    from c8.collectors.decode import Decoder

    tag, dt = records.RECORDS["open"]
    size = 1 << PAGE_SHIFT
    out = bytearray()
    names = [b"/etc/passwd", b"/tmp/" + b"x" * 100, b"/"]
    for i, name in enumerate(names):
        rec = np.zeros(1, dt)
        rec["tag"], rec["nr"], rec["uid"], rec["ret"] = tag, 257, 1000 + i, 3 + i
        rec["dirfd"], rec["flags"], rec["filename"], rec["name_len"] = -100, 0o2000000, name, len(name) + 1
        body = (10**9 + i).to_bytes(8, "little") + ((4000 << 32) | (4000 + i)).to_bytes(8, "little") \
            + rec.tobytes()[: records.offset(dt, "filename") + len(name) + 1]
        out += _header(size, len(out), len(body)).to_bytes(8, "little") + body.ljust((len(body) + 7) & ~7, b"\xee")
    out += _header(size, len(out), 8).to_bytes(8, "little") + bytes(8)  # not one of the programs'
    buf = np.frombuffer(bytes(out), np.uint8)
    starts, lengths, used = ringbuf.walk(buf, 0, size)
    assert used == len(buf) and len(starts) == 4
    dec = Decoder()
    [(source, arr)] = dec.decode_ringbuf(buf, starts, lengths, cpu=1)
    assert source == "bpf:open" and dec.unknown_bpf == 1
    assert arr["time"].tolist() == [10**9, 10**9 + 1, 10**9 + 2]
    assert arr["pid"].tolist() == [4000] * 3 and arr["tid"].tolist() == [4000, 4001, 4002]
    assert arr["cpu"].tolist() == [1] * 3 and arr["uid"].tolist() == [1000, 1001, 1002]
    assert arr["filename"].tolist() == names and arr["ret"].tolist() == [3, 4, 5]
    assert arr["flags"].tolist() == [0o2000000] * 3 and arr["dirfd"].tolist() == [-100] * 3
