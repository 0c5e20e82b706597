"""compile_mask on concrete batches: fast paths, container table, kind names, ranges."""

import numpy as np
import pytest

from c8 import schema
from c8.expr import ExprFieldError, compile_mask, parse
from c8.expr.mask import like

CONTAINERS = {1: ("c1", "web", "i1", "busybox:1", "docker"), 2: ("c2", "db", "i2", "postgres", "podman")}


def file_batch():
    b = schema.empty("file", 6)
    b["filename"] = [b"/tmp/foo", b"/etc/shadow", b"", b"/lib/x.so", b"/tmp/a?b", b"foo"]
    b["ret"] = [0, -13, 3, 0, -2, 5]
    b["uid"] = [1000, 0, 0, 1000, 1000, 5]
    b["kind"] = [1, 1, 2, 1, 3, 1]
    b["container"] = [0, 1, 2, 1, 7, 0]  # 7 is not in the table: counted as the host
    return b


@pytest.mark.parametrize("text, expected", [
    ('filename like "*foo*" and (ret >= 0 or uid == 0)', [1, 0, 0, 0, 0, 1]),
    ('filename like "/tmp/*"', [1, 0, 0, 0, 1, 0]),
    ('filename like "*.so"', [0, 0, 0, 1, 0, 0]),
    ('filename like "/tmp/a[?]b"', [0, 0, 0, 0, 1, 0]),
    ('filename like "/???/*"', [1, 1, 0, 1, 1, 0]),
    ('filename not like "*"', [0, 0, 0, 0, 0, 0]),
    ("filename is null", [0, 0, 1, 0, 0, 0]),
    ('filename in ("foo", "/etc/shadow")', [0, 1, 0, 0, 0, 1]),
    ('filename > "/lib"', [1, 0, 0, 1, 1, 1]),
    ('kind == "OPEN"', [1, 1, 0, 1, 0, 1]),
    ('kind not in ("OPEN", "DELETE")', [0, 0, 1, 0, 0, 0]),
    ('kind like "CREATE"', [0, 0, 1, 0, 0, 0]),
    ('image_name like "busy*"', [0, 1, 0, 1, 0, 0]),
    ("container_id is null", [1, 0, 0, 0, 1, 1]),
    ("container is not null", [0, 1, 1, 1, 1, 0]),
    ('container_name in ("db", "")', [1, 0, 1, 0, 1, 1]),
    ('type == "file"', [1] * 6),
    ('type != "file"', [0] * 6),
    ("uid == 4294967296", [0] * 6),     # out of i4 range: never equal, never wraps to 0
    ("uid < 4294967296", [1] * 6),
    ("ret > -0x8000000000000001", [1] * 6),
    ("uid in (0, 99999999999)", [0, 1, 1, 0, 0, 0]),
    ("not (uid != 0)", [0, 1, 1, 0, 0, 0]),
])
def test_masks(text, expected):
    mask = compile_mask(parse(text), "file")(file_batch(), CONTAINERS)
    assert mask.dtype == bool
    assert mask.astype(int).tolist() == expected


def test_like_fast_paths_agree_with_the_general_matcher():
    col = np.array([b"", b"a", b"ab", b"ba", b"aba", b"/x/ab/y"], "S8")
    for pattern in (b"a*", b"*a", b"*ab*", b"**a**", b"ab", b"*", b"a*b", b"?b*"):
        import fnmatch
        assert like(col, pattern).tolist() == [fnmatch.fnmatchcase(bytes(v), pattern) for v in col]


def test_missing_column_is_a_field_error():
    with pytest.raises(ExprFieldError, match="arg_x"):
        compile_mask(parse("arg_x == 1"), "kernel_call")(schema.empty("kernel_call", 2), {})


def test_extra_argument_columns():
    dt = np.dtype(schema.dtype("kernel_call").descr + [("arg_dport", "<u2")])
    b = np.zeros(3, dt)
    b["arg_dport"] = [22, 443, 80]
    mask = compile_mask(parse("arg_dport in (443, 80) and arg_dport != 80"), "kernel_call")(b, {})
    assert mask.tolist() == [False, True, False]


def test_empty_batch():
    mask = compile_mask(parse('filename like "a*b" and image_name == "x"'), "file")(schema.empty("file", 0), {})
    assert mask.shape == (0,)


def test_large_batch_is_vectorised():
    # 200k events with few distinct names: the general glob runs once per distinct value
    n = 200_000
    b = schema.empty("file", n)
    b["filename"] = np.array([b"/tmp/a.txt", b"/etc/passwd", b"/home/u/x.so"] * (n // 3 + 1))[:n]
    b["ret"] = np.arange(n) % 7 - 3
    fn = compile_mask(parse('filename like "/*/?.*" and ret >= 0 or filename like "/etc/*"'), "file")
    mask = fn(b, {})
    assert mask.sum() == sum(1 for i in range(n) if i % 3 == 1 or i % 7 >= 3)
