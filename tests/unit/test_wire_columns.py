"""The columnar wire form: every value round-trips; string columns travel narrow."""

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from c8.protocol import batch as wire
from c8.schema import rows as rowops

DT = np.dtype([("t", "<u8"), ("path", "S256"), ("address", "S108"), ("comm", "S8"), ("arg", "<i8", (2,))])


def roundtrip(arr: np.ndarray) -> tuple[np.ndarray, dict]:
    msg = msgpack.unpackb(msgpack.packb(wire.columns("file", arr), use_bin_type=True), raw=False)
    return wire.decode_columns(msg), msg


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=256), st.binary(max_size=108),
                          st.binary(max_size=8)), max_size=40))
def test_every_value_round_trips(rows):
    arr = np.zeros(len(rows), DT)
    for i, (t, path, addr, comm) in enumerate(rows):
        arr[i] = (t, path, addr, comm, (i, -i))
    back, msg = roundtrip(arr)
    assert back.dtype.names == DT.names and all(back[n].tolist() == arr[n].tolist() for n in DT.names)
    # cut columns arrive narrow; the declared widths travel along and restore every byte
    assert all(back.dtype[n].itemsize <= msg["widths"].get(n, DT[n].itemsize) == DT[n].itemsize for n in DT.names)
    assert rowops.widen(back, DT, ("path", "address")).tobytes() == arr.tobytes()
    # columns are read from the rows in place: a strided slice, at odd field offsets
    odd = np.zeros(len(rows), [("k", "u1"), *[(n, DT.fields[n][0]) for n in DT.names]])
    for n in DT.names:
        odd[n] = arr[n]
    back, _ = roundtrip(odd[::2])
    assert rowops.widen(back, odd.dtype, ("path", "address")).tobytes() == odd[::2].copy().tobytes()


def test_string_columns_are_cut_to_the_longest_value():
    arr = np.zeros(3, DT)
    arr["path"] = [b"/etc/passwd", b"/x", b"a\x00b"]  # an inner NUL is kept
    _, msg = roundtrip(arr)
    assert msg["dtypes"]["path"] == "|S11" and len(msg["columns"]["path"]) == 3 * 11
    assert msg["widths"] == {"path": 256, "address": 108}
    assert msg["dtypes"]["address"] == "|S1"  # all empty: one byte a row
    assert msg["dtypes"]["comm"] == "|S8"  # narrow columns go as they are


def test_a_message_without_widths_still_decodes():
    arr = np.zeros(2, DT)
    arr["path"] = b"/bin/sh"
    msg = msgpack.unpackb(msgpack.packb(wire.columns("file", arr), use_bin_type=True), raw=False)
    msg["columns"]["path"] = np.ascontiguousarray(arr["path"]).tobytes()
    msg["dtypes"]["path"] = "|S256"
    del msg["widths"]["path"]
    assert wire.decode_columns(msg)["path"].tolist() == [b"/bin/sh"] * 2


@pytest.mark.parametrize("change, what", [
    (lambda m: m.update(n=10**12), "not 1000000000000 values"),  # rows the columns do not hold
    (lambda m: m.update(n=-1), "not a row count"),
    (lambda m: m["dtypes"].update(t="|O"), "'t' holds"),        # objects from bytes
    (lambda m: m["dtypes"].update(t="no such type"), "no type"),
    (lambda m: m["columns"].update(comm=b"x"), "'comm' holds"),  # a short column
])
def test_a_message_that_does_not_hold_its_rows_is_refused_by_name(change, what):
    """A column must hold exactly n values of its type, checked before any rows are
    made: a message claiming 10**12 rows is refused, not allocated."""
    arr = np.zeros(2, DT)
    msg = msgpack.unpackb(msgpack.packb(wire.columns("file", arr), use_bin_type=True), raw=False)
    change(msg)
    with pytest.raises(ValueError, match=what):
        wire.decode_columns(msg)
