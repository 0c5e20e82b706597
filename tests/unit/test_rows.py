"""c8.schema.rows: the widths of string fields, read in place, whatever the layout."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from c8.schema import rows

_values = st.lists(st.binary(max_size=140), min_size=0, max_size=30)


@settings(max_examples=300, deadline=None)
@given(a=_values, b=_values, wa=st.sampled_from([1, 5, 8, 16, 21, 40, 64, 72, 128, 256]), pad=st.integers(0, 9),
       step=st.sampled_from([1, 2, 3]))
def test_used_width_is_the_longest_value_in_any_layout(a, b, wa, pad, step):
    """Contiguous columns, fields of back-to-back rows (at odd offsets) and rows
    taken every ``step``-th all give the longest value's bytes (embedded NULs
    count, trailing NULs do not), one field at a time or all at once."""
    n = max(len(a), len(b))
    dt = np.dtype([("x", f"V{pad}"), ("a", f"S{wa}"), ("t", "<i4"), ("b", "S136")]) if pad else \
        np.dtype([("a", f"S{wa}"), ("t", "<i4"), ("b", "S136")])
    batch = np.zeros(n, dt)
    batch["a"][: len(a)] = [v[:wa] for v in a]
    batch["b"][: len(b)] = [v[:136] for v in b]
    batch["t"] = -1  # bytes outside the fields are not counted
    for arr in (batch, batch[::step]):
        want = {f: max((len(v) for v in arr[f].tolist()), default=0) for f in ("a", "b")}
        assert {f: rows.used_width(arr[f]) for f in ("a", "b")} == want
        assert {f: rows.used_width(np.ascontiguousarray(arr[f])) for f in ("a", "b")} == want
        assert rows.used_widths(arr, ["a", "b"]) == want
