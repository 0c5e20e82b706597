"""prefix_filter: the bounds an eBPF program can test on one string field."""

import pytest

from c8.expr import fields, parse, prefix_filter


@pytest.mark.parametrize("text, expected", [
    ('filename like "/tmp/x*"', {"prefixes": ["/tmp/x"], "exact": []}),
    ('filename == "/etc/shadow"', {"prefixes": [], "exact": ["/etc/shadow"]}),
    ('filename like "/etc/shadow"', {"prefixes": [], "exact": ["/etc/shadow"]}),
    ('filename like "/tmp/?x*"', {"prefixes": ["/tmp/"], "exact": []}),
    ('filename in ("/a", "/b")', {"prefixes": [], "exact": ["/a", "/b"]}),
    ("filename is null", {"prefixes": [], "exact": [""]}),
    ('filename like "/tmp/*" or filename == "/etc/shadow" or filename like "/tmp/x*" or filename == "/tmp/y"',
     {"prefixes": ["/tmp/"], "exact": ["/etc/shadow"]}),
    ('filename like "/tmp/*" and ret == 0', {"prefixes": ["/tmp/"], "exact": []}),
    ('filename like "/*" and filename == "/etc/passwd"', {"prefixes": [], "exact": ["/etc/passwd"]}),
    ('not (filename != "/x" or ret < 0)', {"prefixes": [], "exact": ["/x"]}),
    ('filename like "*foo*"', None),
    ('filename not like "/tmp/*"', None),
    ('filename != "/x"', None),
    ('filename like "/tmp/*" or ret == 0', None),
    ('newname like "/tmp/*"', None),
    ("ret == 0", None),
])
def test_prefix_filter(text, expected):
    assert prefix_filter(parse(text), "filename") == expected


def test_fields():
    assert fields(parse('not (a == 1 or b like "x") and c is null and d in (1, 2)')) == {"a", "b", "c", "d"}
