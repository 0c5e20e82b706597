"""kernel_filter / kernel_filter_any: exact output for the common shapes."""

import pytest

from c8.expr import kernel_filter, kernel_filter_any, parse

FIELDS = {"filename": "filename", "pid": "pid", "ret": "ret", "uid": "common_uid"}


@pytest.mark.parametrize("text, expected", [
    ('filename like "/tmp/*"', 'filename ~ "/tmp/*"'),
    ('filename like "*foo*" and (ret >= 0 or uid == 0)', 'filename ~ "*foo*" && (ret >= 0 || common_uid == 0)'),
    ('filename == "/etc/shadow"', 'filename == "/etc/shadow"'),
    ('filename like "/etc/shadow"', 'filename == "/etc/shadow"'),
    ('filename not like "/tmp/*"', '!(filename ~ "/tmp/*")'),
    ("not (ret < 0 or pid == 1)", "ret >= 0 && pid != 1"),
    ("pid in (1, 2, 3)", "(pid == 1 || pid == 2) || pid == 3"),
    ("pid not in (1, 2)", "pid != 1 && pid != 2"),
    # the inexpressible side of an AND is dropped...
    ('ret == 0 and image_name == "x"', "ret == 0"),
    ('ret == 0 and kind == "OPEN"', "ret == 0"),
    ('ret == 0 and filename like "[ab]*"', "ret == 0"),
    ("ret == 0 and pid is null", "ret == 0"),
    # ...and an OR with one is no filter at all
    ('ret == 0 or image_name == "x"', None),
    ('filename like "*.so"', None),            # could differ on a truncated column
    ('filename == "a\\"b"', None),              # the kernel has no escapes
    ('filename like "!x*"', None),              # the kernel would negate
    ('filename like "1*"', None),               # the kernel would match literally
    ('filename < "b"', None),
    ("uid == 4294967296", None),                # out of range: never true, so no filter
    ("uid != 4294967296 and pid > 5", "pid > 5"),
    ("uid == 4294967296 or pid > 5", "pid > 5"),
    ('filename == "' + "x" * 300 + '"', None),
])
def test_kernel_filter(text, expected):
    assert kernel_filter(parse(text), FIELDS) == expected


def test_unmapped_fields_are_not_pushed():
    assert kernel_filter(parse("pid == 1 and ret == 0"), {"pid": "pid"}) == "pid == 1"
    assert kernel_filter(parse("ret == 0"), {"pid": "pid"}) is None


def test_types_for_argument_fields():
    node = parse("arg_dport == 443 and arg_big == 5000000000")
    assert kernel_filter(node, {"arg_dport": "dport", "arg_big": "big"}) == "dport == 443"
    assert kernel_filter(node, {"arg_dport": "dport", "arg_big": "big"},
                         {"arg_dport": "u2", "arg_big": "u8"}) == "dport == 443 && big == 5000000000"


def test_any_ors_subscriptions():
    a, b = parse("pid == 1"), parse('filename like "/tmp/*" and ret < 0')
    assert kernel_filter_any([a, b], FIELDS) == '(pid == 1) || (filename ~ "/tmp/*" && ret < 0)'
    assert kernel_filter_any([a, a], FIELDS) == "pid == 1"
    assert kernel_filter_any([a, None], FIELDS) is None
    assert kernel_filter_any([a, parse('image_name == "x"')], FIELDS) is None
    assert kernel_filter_any([a, parse("uid == -4294967296")], FIELDS) == "pid == 1"  # matches nothing
    assert kernel_filter_any([], FIELDS) is None


def test_too_long_for_the_kernel_means_no_filter():
    node = parse("pid in (" + ", ".join(str(i) for i in range(1000)) + ")")
    assert kernel_filter(node, FIELDS) is None
