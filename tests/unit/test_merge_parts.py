"""Merger.release on many parts: whole parts pass untouched, straddling parts
split, every event released exactly once, in time order, numbered gap-free."""

import numpy as np

from c8.broker.merge import Merger
from c8.broker.sequence import Sequence

DT = np.dtype([("sensor_monotime_nanos", "<u8"), ("sensor_sequence_number", "<u8"), ("v", "<i8")])


def parts(rng, n_parts: int):
    out, v = [], 0
    for _ in range(n_parts):
        n = int(rng.integers(1, 50))
        a = np.zeros(n, DT)
        start = int(rng.integers(0, 1000))
        t = np.sort(rng.integers(start, start + 300, n)) if rng.random() < 0.8 else rng.integers(0, 1300, n)
        a["sensor_monotime_nanos"] = t
        a["v"] = np.arange(v, v + n)
        v += n
        out.append(a)
    return out, v


def test_release_matches_reference_over_many_cutoffs():
    rng = np.random.default_rng(7)
    for _ in range(50):
        m = Merger(holdback_ns=100)
        seq = Sequence()
        ps, total = parts(rng, int(rng.integers(1, 12)))
        for p in ps:
            m.add("syscall", p.copy())
        got = []
        for now in sorted(rng.integers(0, 1500, 6).tolist()) + [None]:
            w = m.release(now or 0, flush=now is None)
            seq.number(w)
            if "syscall" in w:
                b = w["syscall"]
                assert (np.diff(b["sensor_monotime_nanos"].astype(np.int64)) >= 0).all()
                if now is not None:
                    assert (b["sensor_monotime_nanos"] <= now - 100).all()
                got.append(b)
        allb = np.concatenate(got)
        assert sorted(allb["v"].tolist()) == list(range(total))
        assert allb["sensor_sequence_number"].tolist() == list(range(1, total + 1))
        assert not m.pending


def test_part_entirely_in_the_future_is_kept_whole():
    m = Merger(holdback_ns=10)
    a = np.zeros(3, DT)
    a["sensor_monotime_nanos"] = [100, 110, 120]
    m.add("file", a)
    assert m.release(50) == {}
    assert m.pending["file"][0] is a
    w = m.release(125)
    assert w["file"]["sensor_monotime_nanos"].tolist() == [100, 110]
    assert m.pending["file"][0]["sensor_monotime_nanos"].tolist() == [120]


def test_row_helpers_match_numpy():
    from c8 import schema
    from c8.schema import rows

    a = schema.empty("file", 5)
    a["sensor_monotime_nanos"] = [5, 3, 4, 1, 2]
    a["path"] = [b"/a", b"/b", b"/c", b"/d", b"/e"]
    order = np.argsort(a["sensor_monotime_nanos"])
    assert rows.take(a, order).tobytes() == a[order].tobytes()
    mask = a["sensor_monotime_nanos"] > 2
    assert rows.take(a, mask).tobytes() == a[mask].tobytes()
    assert rows.concat([a, a[:2]]).tobytes() == np.concatenate([a, a[:2]]).tobytes()
    assert rows.concat([a[:1], a[1:]]).dtype == a.dtype
    assert (schema.empty("file", 3)["uid"] == -1).all() and (schema.empty("file", 3)["process_pid"] == 0).all()
