"""Bit tests in the filter language: ``field & MASK op value``."""

import numpy as np
import pytest

from c8 import schema
from c8.expr import (
    ExprSyntaxError,
    ExprTypeError,
    check,
    compile_mask,
    evaluate,
    kernel_filter,
    nnf,
    parse,
    unparse,
)

O_WRONLY, O_RDWR, O_CREAT, O_NOCTTY, O_NONBLOCK = 0x1, 0x2, 0x40, 0x100, 0x800


def flags_batch(values):
    b = schema.empty("file", len(values))
    b["open_flags"] = values
    b["kind"] = schema.kind_code("file", "OPEN")
    return b


def test_parse_and_unparse_round_trip():
    node = parse("open_flags & 3 != 0")
    assert node.mask == 3 and node.op == "!=" and node.value == 0
    assert unparse(node) == "open_flags & 0x3 != 0"
    assert parse(unparse(node)) == node
    assert parse("open_flags & 3 != 0") != parse("open_flags != 0")


def test_write_access_on_real_flag_words():
    # touch(1) opens with O_WRONLY|O_CREAT|O_NOCTTY|O_NONBLOCK: no flag list had that word
    values = [0, O_RDWR, O_WRONLY | O_CREAT | O_NOCTTY | O_NONBLOCK, O_NONBLOCK, 0x80000, O_CREAT]
    text = "open_flags & 3 != 0 or open_flags & 0x40 != 0"
    node = parse(text)
    check(node, "file")
    got = compile_mask(node, "file")(flags_batch(values)).tolist()
    assert got == [False, True, True, False, False, True]
    # the vectorised mask agrees with the per-event reference
    assert got == [evaluate(node, {"type": "file", "kind": "OPEN", "open_flags": v}) for v in values]


@pytest.mark.parametrize("text", ["open_flags & 3 == 2", "open_flags & 0xff < 3", "not (open_flags & 1 != 0)",
                                  "open_flags & 0x80000 >= 1", "open_flags & 3 == 7", "open_flags & 3 != -1"])
def test_mask_matches_reference_including_negative_values(text):
    values = [-1, -2, 0, 1, 2, 3, 0x80000, 0x80002, 2**31 - 1, -(2**31)]
    node = parse(text)
    check(node, "file")
    got = compile_mask(node, "file")(flags_batch(values)).tolist()
    assert got == [evaluate(node, {"type": "file", "kind": "OPEN", "open_flags": v}) for v in values]
    assert got == [evaluate(nnf(node), {"type": "file", "kind": "OPEN", "open_flags": v}) for v in values]


def test_unsigned_64_bit_columns():
    b = schema.empty("syscall", 3)
    b["arg0"] = [2**64 - 1, 16, 0]
    node = parse("arg0 & 0x10 != 0")
    assert compile_mask(node, "syscall")(b).tolist() == [True, True, False]


@pytest.mark.parametrize("text, error, message", [
    ("filename & 1 != 0", ExprTypeError, "'&' tests the bits of a number field"),
    ("kind & 1 != 0", ExprTypeError, "'&' tests the bits"),
    ("open_flags & -1 != 0", ExprSyntaxError, "bit mask"),
    ("open_flags & 1", ExprSyntaxError, "expected a comparison after 'open_flags & 1'"),
    ("open_flags & 1 like \"x\"", ExprSyntaxError, "expected a comparison"),
    ("open_flags && 1", ExprSyntaxError, "use 'and'"),
])
def test_errors(text, error, message):
    with pytest.raises(error, match=message):
        check(parse(text), "file")


def test_kernel_filter_pushes_any_bit_set_only():
    fmap = {"id": "id", "ret": "ret"}
    assert kernel_filter(parse("id & 16 != 0"), fmap) == "id & 16"
    assert kernel_filter(parse("id & 16 > 0 and ret == 0"), fmap) == "id & 16 && ret == 0"
    # other bit tests are left to the broker (unknown = keep everything)
    assert kernel_filter(parse("id & 16 == 0"), fmap) is None
    assert kernel_filter(parse("id & 3 == 2"), fmap) is None
    assert kernel_filter(parse("not (id & 16 != 0)"), fmap) is None


def test_empty_batch():
    assert compile_mask(parse("open_flags & 1 != 0"), "file")(flags_batch([])).tolist() == []
    assert isinstance(compile_mask(parse("open_flags & 1 != 0"), "file")(flags_batch([1])), np.ndarray)
