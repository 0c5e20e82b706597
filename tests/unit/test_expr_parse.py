"""Parser: grammar, positions, error messages, and fuzzing (only ExprError may escape)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from c8.expr import (
    And,
    Compare,
    ExprError,
    ExprSyntaxError,
    In,
    IsNull,
    Like,
    Not,
    Or,
    fields,
    parse,
    unparse,
)


def test_example_from_the_design():
    node = parse('filename like "*foo*" and (ret >= 0 or uid == 0)')
    assert node == And(Like("filename", "*foo*"), Or(Compare("ret", ">=", 0), Compare("uid", "==", 0)))
    assert fields(node) == {"filename", "ret", "uid"}


def test_keywords_are_case_insensitive_and_fields_are_not():
    assert parse("Uid IN (1, 2) AnD NOT x Is NoT NuLL") == And(
        In("Uid", (1, 2)), Not(IsNull("x", negated=True)))


@pytest.mark.parametrize("text, value", [
    ("a == 10", 10), ("a == 0x1f", 31), ("a == 0XFF", 255), ("a == -5", -5), ("a == -0x10", -16),
    ("a == 007", 7), ('a == "x\\"y"', 'x"y'), ("a == 'it\\'s'", "it's"), ('a == "\\x41\\n\\t\\\\"', "A\n\t\\"),
    ("a == \"'\"", "'"), ("a == ''", ""),
])
def test_literals(text, value):
    node = parse(text)
    assert node == Compare("a", "==", value)
    assert type(node.value) is type(value)


def test_all_operators():
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert parse(f"a {op} 1") == Compare("a", op, 1)
    assert parse('a not like "x*"') == Like("a", "x*", negated=True)
    assert parse('a not in ("x", "y",)') == In("a", ("x", "y"), negated=True)
    assert parse("a is null") == IsNull("a")


def test_precedence_not_and_or():
    assert parse("a == 1 or b == 2 and not c == 3") == Or(
        Compare("a", "==", 1), And(Compare("b", "==", 2), Not(Compare("c", "==", 3))))


def test_positions_point_at_the_field():
    node = parse("  (uid == 0) and\n   filename like 'x'")
    assert node.left.pos == 3
    assert node.right.pos == 20


@pytest.mark.parametrize("text, column, words", [
    ('filename ==', 12, ["after '=='", "end of input"]),
    ("uid == 0 and", 13, ["field name", "end of input"]),
    ("uid = 0", 5, ["'='", "=="]),
    ("(uid == 0", 10, ["')'", "column 1"]),
    ("uid == 0)", 9, ["')'"]),
    ('name like 5', 11, ["pattern", "number 5"]),
    ("uid in 1", 8, ["'(' after 'in'"]),
    ("uid in (1 2)", 11, ["',' or ')'"]),
    ("uid is nothing", 8, ["'null'"]),
    ("uid 5", 5, ["operator after field 'uid'"]),
    ('x == "abc', 6, ["unterminated"]),
    ('x == "a\\qb"', 8, ["escape"]),
    ("x == 12ab", 6, ["malformed number"]),
    ("x == 1.5", 6, ["malformed number"]),
    ("x == 0x", 6, ["hexadecimal"]),
    ("x == - 1", 6, ["number after '-'"]),
    ("and == 1", 1, ["field name"]),
    ("uid == 1 && gid == 2", 10, ["'&'", "and"]),
    ("", 1, ["empty"]),
    ('x == "a\\x00"', 8, ["NUL"]),
])
def test_syntax_errors_name_the_column_and_the_expectation(text, column, words):
    with pytest.raises(ExprSyntaxError) as info:
        parse(text)
    err = info.value
    assert err.column == column, str(err)
    assert str(err).startswith(f"at column {column}: ")
    for word in words:
        assert word in str(err)


def test_expected_value_message_matches_the_contract():
    with pytest.raises(ExprSyntaxError, match=r"^at column 14: expected a value .*after '==', got end of input"):
        parse("process_id ==")


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(ExprSyntaxError, match="nested too deeply"):
        parse("(" * 5000 + "a == 1" + ")" * 5000)
    with pytest.raises(ExprSyntaxError, match="nested too deeply"):
        parse("not " * 5000 + "a == 1")


def test_long_chains_parse_into_shallow_trees():
    node = parse(" or ".join(f"a == {i}" for i in range(20000)))
    assert fields(node) == {"a"}  # recursion over the tree must not overflow
    assert parse(unparse(node)) == node


_TOKENS = st.sampled_from([
    "a", "uid", "filename", "==", "!=", "<", "<=", ">", ">=", "like", "not", "in", "is", "null",
    "and", "or", "(", ")", ",", "'x*'", '"y"', "0", "-1", "0x1f", '"\\', "'", "=", "!", "-", "0x",
    "\\x", "1.5", "é", "\x00", " ", "\n",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_TOKENS, max_size=25).map(" ".join),
                 st.lists(_TOKENS, max_size=25).map("".join)))
def test_fuzz_parse_raises_only_expr_errors(text):
    try:
        node = parse(text)
    except ExprError as e:
        assert str(e)
        return
    assert parse(unparse(node)) == node
