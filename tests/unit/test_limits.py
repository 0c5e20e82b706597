"""Bounded costs of hostile input: long numbers, many terms, many prefixes, many patterns."""

from __future__ import annotations

import time

import pytest

from c8 import expr
from c8.detections.rules import load_rules_text
from c8.expr.errors import ExprLimitError
from c8.expr.parser import MAX_NUMBER_DIGITS
from c8.probes.fetchargs import FetchArgError, parse_fetchargs

HUGE = "1" * 5000


@pytest.mark.parametrize("text", [
    f"process_pid == {HUGE}",
    f"process_pid == -{HUGE}",
    f"process_pid == 0x{'f' * 5000}",
    f"process_pid in (1, {HUGE})",
    f"open_flags & {HUGE} != 0",
])
def test_a_5000_digit_number_is_a_limit_error_naming_the_limit(text):
    t0 = time.monotonic()
    with pytest.raises(ExprLimitError) as err:
        expr.parse(text)
    assert time.monotonic() - t0 < 0.5
    assert err.value.limit == "number_digits" and err.value.maximum == MAX_NUMBER_DIGITS
    assert "number of 5000 digits" in str(err.value) and f"at most {MAX_NUMBER_DIGITS} digits" in str(err.value)
    assert isinstance(err.value, expr.ExprError)  # every caller's ExprError handler catches it


def test_numbers_up_to_the_limit_parse_and_the_limit_is_a_parameter():
    assert expr.parse("uid == " + "0" * 31 + "7").value == 7
    assert expr.parse("uid == 0x" + "0" * 30 + "ff").value == 255
    with pytest.raises(ExprLimitError, match="at most 4 digits"):
        expr.parse("uid == 12345", max_number_digits=4)
    assert expr.parse("uid == 1234", max_number_digits=4).value == 1234


def test_terms_are_counted_and_bounded():
    text = " or ".join(f"uid == {i}" for i in range(11))
    assert expr.parse(text, max_terms=11) is not None
    with pytest.raises(ExprLimitError, match="more than 10 terms") as err:
        expr.parse(text, max_terms=10)
    assert err.value.limit == "terms" and err.value.maximum == 10


def test_prefix_normalisation_of_16000_prefixes_is_fast_and_exact():
    k = 16_000
    text = " or ".join(f'filename like "/a{i:06d}*"' for i in range(k))
    node = expr.parse(text)
    t0 = time.monotonic()
    bound = expr.prefix_filter(node, "filename")
    took = time.monotonic() - t0
    assert took < 1.0, f"prefix normalisation of {k} prefixes took {took:.2f}s"
    assert bound == {"prefixes": [f"/a{i:06d}" for i in range(k)], "exact": []}


def test_prefix_normalisation_keeps_only_uncovered_prefixes_and_exacts():
    text = " or ".join([
        'filename like "/tmp/*"', 'filename like "/tmp/a/*"', 'filename like "/tm*"', 'filename like "/var/*"',
        'filename == "/tmpfile"', 'filename == "/var"', 'filename == "/etc/passwd"', 'filename like "/va*"',
        'filename like "/x/y*"', 'filename like "/x/z*"', 'filename == "/x/yy"', 'filename == "/x/"',
    ])
    assert expr.prefix_filter(expr.parse(text), "filename") == {
        "prefixes": ["/tm", "/va", "/x/y", "/x/z"], "exact": ["/etc/passwd", "/x/"]}


@pytest.mark.parametrize("fetchargs", [
    f"x=+{HUGE}(%di):u32",
    f"x=@{HUGE}",
    f"x=@0x{'f' * 5000}",
    f"x=\\{HUGE}",
    f"x=$stack{HUGE}",
    f"x=+0(%di):u8[{HUGE}]",
])
def test_a_5000_digit_number_in_fetchargs_is_refused_naming_the_limit(fetchargs):
    with pytest.raises(FetchArgError) as err:
        parse_fetchargs(fetchargs, "uprobe" if "@0x" in fetchargs or "@1" in fetchargs else "kprobe", False)
    msg = str(err.value)
    assert "argument 'x'" in msg and "number of 5000 digits" in msg and "at most 24 digits" in msg
    assert len(msg) < 300  # the hostile token is cut in the message


def test_fetchargs_numbers_of_64_bits_still_parse():
    (arg,) = parse_fetchargs("x=+18446744073709551615(%di):u64", "kprobe", False)
    assert arg.fetch.offset == 18446744073709551615
    (arg,) = parse_fetchargs("x=@0xffffffffffffffff", "uprobe", False)
    assert arg.fetch.value == 0xFFFFFFFFFFFFFFFF


RULE = """
- rule: fine
  priority: warning
  events: [process]
  condition: process_pid == 1
  output: "x"
- rule: huge
  priority: warning
  events: [process]
  condition: process_pid == {number}
  output: "x"
"""


def test_a_rule_with_a_5000_digit_number_is_refused_and_the_others_load():
    rules, errs = load_rules_text(RULE.format(number=HUGE), "huge.yaml")
    assert [r.name for r in rules] == ["fine"]
    assert len(errs) == 1
    assert str(errs[0]).startswith("huge.yaml: rule 'huge': condition: at column 16: number of 5000 digits")
    assert f"at most {MAX_NUMBER_DIGITS} digits" in str(errs[0])


def test_a_rule_file_with_a_5000_digit_yaml_number_is_refused_clearly():
    rules, errs = load_rules_text(f"- list: big\n  items: [{HUGE}]\n" + RULE.format(number=1), "list.yaml")
    assert rules == []
    assert len(errs) == 1 and "list.yaml: a number in the file is too long" in str(errs[0])
    assert "no rule of this file loaded" in str(errs[0])


def test_glob_matches_as_fnmatch_does():
    import fnmatch

    from c8.expr import glob
    names = ["/tmp/a.txt", "/tmp/b.TXT", "x[1]", "EXEC", "", "/a/b/c", "abc?"]
    patterns = ["*.txt", "/tmp/?.*", "x[[]1]", "E*C", "*", "[!/]*", "abc[?]", "/a/*/c", ""]
    for p in patterns:
        for n in names:
            assert glob.fnmatchcase(n, p) == fnmatch.fnmatchcase(n, p), (n, p)
            assert glob.fnmatchcase(n.encode(), p.encode()) == fnmatch.fnmatchcase(n.encode(), p.encode())


def test_glob_cache_is_bounded_in_entries_and_pattern_size():
    from c8.expr import glob
    for i in range(3 * glob.MAX_CACHED):
        assert glob.fnmatchcase(f"/x{i}y", f"/x{i}?")
    assert glob.cache_info().currsize <= glob.MAX_CACHED
    before = glob.cache_info()
    long = "*" + "a" * (glob.MAX_CACHED_LENGTH + 1) + "?"
    assert glob.fnmatchcase("b" + "a" * (glob.MAX_CACHED_LENGTH + 1) + "c", long)
    after = glob.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)  # never looked up, never kept


def test_many_ored_prefixes_match_as_their_leaves_do_and_cheaply():
    import random

    import numpy as np

    from c8 import schema
    rng = random.Random(18)
    alphabet = "ab/c*?"
    prefixes = ["".join(rng.choice("ab/c") for _ in range(rng.randint(1, 4))) for _ in range(40)]
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(500)]
    batch = schema.empty("file", len(values))
    batch["filename"] = [v.encode() for v in values]
    batch["ret"] = np.arange(len(values)) % 7
    leaves = [f'filename like "{p}*"' for p in prefixes] + ['filename like "*b?"', "ret == 3",
                                                            'filename like "a**"', 'filename == "ccc"']
    rng.shuffle(leaves)
    node = expr.parse(" or ".join(leaves))
    expr.check(node, "file")
    got = expr.compile_mask(node, "file")(batch)
    each = np.zeros(len(values), bool)
    for leaf in leaves:
        each |= expr.compile_mask(expr.parse(leaf), "file")(batch)
    assert got.tolist() == each.tolist()
    assert 0 < got.sum() < len(values)
    # 16,000 prefixes on a 2,000-event batch: one sorted-prefix pass, not 16,000 column passes
    big = expr.parse(" or ".join(f'filename like "/a{i:06d}*"' for i in range(16_000)))
    batch = schema.empty("file", 2000)
    batch["filename"] = [f"/a{i * 11:06d}/x".encode() for i in range(2000)]
    mask = expr.compile_mask(big, "file")
    t0 = time.monotonic()
    hits = mask(batch)
    assert time.monotonic() - t0 < 0.1
    assert hits.tolist() == [i * 11 < 16_000 for i in range(2000)]
