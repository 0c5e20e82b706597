"""Property tests: masks agree with the reference evaluator; kernel filters and
eBPF prefix bounds are supersets of the expression.

Expressions are generated as ASTs over a category's real fields; batches are
random draws from small value pools (so predicates hit and miss); the kernel's
filter semantics are simulated below from kernel/trace/trace_events_filter.c.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from c8 import schema
from c8.expr import (
    And,
    Compare,
    In,
    IsNull,
    Like,
    Not,
    Or,
    compile_mask,
    evaluate,
    kernel_filter,
    kernel_filter_any,
    parse,
    prefix_filter,
    unparse,
)
from c8.expr.fieldinfo import CONTAINER_FIELDS

CATEGORIES = ("file", "process", "network", "syscall", "container")
STRINGS = ["", "a", "ab", "/a", "/tmp/x", "/tmp/xy", "/a/foo", "foo", "x.so", "A", "é", 'q"t', "b\\s",
           "it's", "1x", "!a", "a?", "a=b"]
PATTERN_PIECES = ["a", "b", "/", "foo", "*", "*", "*", "?", "a", "/tmp", "x", ".", "[ab]", "[!a]", "é", "1", "!"]
KIND_PIECES = ["*", "?", "E", "X", "C", "_", "ATTEMPT", "EXIT"]
EXTRA_INTS = [2**40, -(2**63) - 1, 2**64, 300, -129, 70000, -70000]
# rows as the broker sends them: the Kubernetes slots after the runtime (labels: a map,
# each label tested as "key=value")
CONTAINERS = {1: ("c1", "web", "i1", "busybox", "docker", "web", "a", "", "foo", {"app": "web", "a": "b"}),
              2: ("c2", "", "i2", "/a/foo", "podman", "", "", "", "", {})}
HOST = ("", "", "", "", "", "", "", "", "", {})
OPS = ("==", "!=", "<", "<=", ">", ">=")


def int_pool(code: str) -> list[int]:
    info = np.iinfo(np.dtype(code))
    lo, hi = int(info.min), int(info.max)
    return sorted({v for v in (0, 1, 2, -1, 255, 65535, lo, lo + 1, hi, hi - 1) if lo <= v <= hi})


@functools.cache
def filterable(category: str) -> dict[str, str]:
    columns = set(schema.dtype(category).names)
    return {name: code for name, code in schema.field_types(category).items()
            if name in columns or name in CONTAINER_FIELDS or name == "type"}


strings = st.sampled_from(STRINGS)
patterns = st.lists(st.sampled_from(PATTERN_PIECES), max_size=4).map("".join)


def leaf_for(category: str, name: str, code: str) -> st.SearchStrategy:
    ops = st.sampled_from(OPS)
    neg = st.booleans()
    if name == "kind":
        kinds = schema.KINDS[category]
        values = st.one_of(st.sampled_from(kinds), st.integers(0, len(kinds) + 1))
        return st.one_of(
            st.builds(Compare, st.just(name), st.sampled_from(("==", "!=")), values),
            st.builds(Compare, st.just(name), ops, st.integers(0, len(kinds) + 1)),
            st.builds(In, st.just(name), st.lists(values, min_size=1, max_size=3).map(tuple), neg),
            st.builds(Like, st.just(name), st.lists(st.sampled_from(KIND_PIECES), max_size=3).map("".join), neg),
        )
    if code.startswith("S"):
        return st.one_of(
            st.builds(Compare, st.just(name), ops, strings),
            st.builds(In, st.just(name), st.lists(strings, min_size=1, max_size=3).map(tuple), neg),
            st.builds(Like, st.just(name), patterns, neg),
            st.builds(IsNull, st.just(name), neg),
        )
    ints = st.sampled_from(int_pool(code) + EXTRA_INTS)
    options = [
        st.builds(Compare, st.just(name), ops, ints),
        st.builds(In, st.just(name), st.lists(ints, min_size=1, max_size=3).map(tuple), neg),
    ]
    if name == "container":
        options.append(st.builds(IsNull, st.just(name), neg))
    return st.one_of(options)


@functools.cache
def expressions(category: str) -> st.SearchStrategy:
    types = filterable(category)
    leaf = st.one_of([leaf_for(category, n, types[n]) for n in sorted(types)])
    return st.recursive(
        leaf,
        lambda kids: st.one_of(st.builds(And, kids, kids), st.builds(Or, kids, kids), st.builds(Not, kids)),
        max_leaves=8,
    )


def make_batch(category: str, seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    batch = schema.empty(category, n)
    for name in batch.dtype.names:
        col = batch[name]
        if name == "kind":
            batch[name] = rng.integers(1, len(schema.KINDS[category]) + 1, n)
        elif name == "container":
            batch[name] = rng.integers(0, 4, n)  # 3 is missing from the table: the host
        elif col.dtype.kind == "S":
            batch[name] = [STRINGS[i].encode() for i in rng.integers(0, len(STRINGS), n)]
        else:
            pool = int_pool(col.dtype.str[1:])
            batch[name] = [pool[i] for i in rng.integers(0, len(pool), n)]
    return batch


def events(category: str, batch: np.ndarray) -> list[dict]:
    out = []
    for row in batch:
        event = {"type": category}
        for name in batch.dtype.names:
            v = row[name]
            event[name] = v.decode() if isinstance(v, bytes) else int(v)
        table = CONTAINERS.get(event["container"], HOST)
        event.update({f: table[i] for f, i in CONTAINER_FIELDS.items()})
        out.append(event)
    return out


@st.composite
def cases(draw):
    category = draw(st.sampled_from(CATEGORIES))
    node = draw(expressions(category))
    batch = make_batch(category, draw(st.integers(0, 2**32)), draw(st.integers(0, 24)))
    return category, node, batch


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(cases())
def test_mask_equals_reference_evaluation(case):
    category, node, batch = case
    mask = compile_mask(node, category)(batch, CONTAINERS)
    expected = [evaluate(node, e) for e in events(category, batch)]
    assert mask.dtype == bool and mask.shape == (len(batch),)
    assert mask.tolist() == expected, unparse(node)
    # the generated AST survives a trip through text
    assert parse(unparse(node)) == node


# --- the kernel's filter, simulated -------------------------------------------------

_KTOKEN = re.compile(r'\s*(?:(&&|\|\||==|!=|<=|>=|<|>|~|!|\(|\))|("[^"]*"|\'[^\']*\')|(-?\d+)|([A-Za-z_]\w*))')


def kernel_tokens(text: str) -> list[tuple[str, object]]:
    tokens, i = [], 0
    while i < len(text):
        m = _KTOKEN.match(text, i)
        assert m and m.end() > i, f"kernel would not lex {text[i:]!r}"
        op, s, num, name = m.groups()
        tokens.append(("op", op) if op else ("str", s[1:-1]) if s else ("num", int(num)) if num else ("name", name))
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
    return tokens


def kernel_glob(pattern: str, value: str) -> bool:
    """filter_parse_regex + filter_build_regex of trace_events_filter.c."""
    negate = pattern.startswith("!")
    if negate:
        pattern = pattern[1:]
    kind, search = "full", pattern
    if not pattern[:1].isdigit():  # MATCH_INDEX matches as MATCH_FULL
        for i, c in enumerate(pattern):
            if c == "*":
                if i == 0:
                    kind = "end"
                elif i == len(pattern) - 1:
                    kind = "middle" if kind == "end" else "front"
                    search = pattern[:i]
                    break
                else:
                    kind = "glob"
                    break
            elif c in "[?\\":
                kind = "glob"
                break
        if kind in ("end", "middle"):
            search = search[1:]
    assert "[" not in pattern and "\\" not in pattern  # never pushed down
    import fnmatch
    hit = {"full": value == search, "front": value.startswith(search), "middle": search in value,
           "end": value.endswith(search), "glob": kind == "glob" and fnmatch.fnmatchcase(value, pattern)}[kind]
    return hit != negate


def kernel_eval(text: str, event: dict) -> bool:
    tokens = kernel_tokens(text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else ("end", None)

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> bool:
        values, seps = [factor()], set()
        while peek() in (("op", "&&"), ("op", "||")):
            seps.add(take()[1])
            values.append(factor())
        assert len(seps) <= 1, f"mixed && and || without parentheses: {text}"
        return all(values) if seps == {"&&"} else any(values)

    def factor() -> bool:
        t = take()
        if t == ("op", "!"):
            return not factor()
        if t == ("op", "("):
            v = expr()
            assert take() == ("op", ")")
            return v
        assert t[0] == "name", text
        op, value = take(), take()
        field = event[t[1]]
        if op[1] == "~":
            assert isinstance(field, str) and value[0] == "str"
            return kernel_glob(value[1], field)
        assert (value[0] == "str") == isinstance(field, str), text
        return {"==": field == value[1], "!=": field != value[1], "<": field < value[1],
                "<=": field <= value[1], ">": field > value[1], ">=": field >= value[1]}[op[1]]

    result = expr()
    assert pos == len(tokens), text
    return result


def kernel_event(event: dict, fieldmap: dict) -> dict:
    # the kernel sees bytes: decode latin-1 so one character is one byte
    return {tp: event[f].encode().decode("latin-1") if isinstance(event[f], str) else event[f]
            for f, tp in fieldmap.items()}


@st.composite
def kernel_cases(draw):
    category, node, batch = draw(cases())
    columns = [n for n in batch.dtype.names if n not in ("kind",)]
    unmapped = draw(st.lists(st.sampled_from(columns), unique=True, max_size=3))
    extra = draw(st.lists(expressions(category), max_size=2))
    fieldmap = {f: f"tp_{f}" for f in columns if f not in unmapped}
    fieldmap.update({"type": "tp_type", "kind": "tp_kind"})  # never pushed: names, not columns
    return category, node, batch, fieldmap, extra


@FAST
@given(kernel_cases())
def test_kernel_filter_is_a_superset(case):
    category, node, batch, fieldmap, extra = case
    text = kernel_filter(node, fieldmap)
    any_text = kernel_filter_any([node, *extra], fieldmap)
    for event in events(category, batch):
        kev = kernel_event(event, fieldmap)
        if evaluate(node, event):
            assert text is None or kernel_eval(text, kev), (unparse(node), text, event)
        if any(evaluate(n, event) for n in (node, *extra)):
            assert any_text is None or kernel_eval(any_text, kev), (any_text, event)


@FAST
@given(cases())
def test_prefix_filter_is_a_superset(case):
    category, node, batch = case
    string_fields = [n for n in batch.dtype.names if batch.dtype[n].kind == "S"]
    for field in string_fields:
        bound = prefix_filter(node, field)
        if bound is None:
            continue
        exact = {e.encode() for e in bound["exact"]}
        prefixes = tuple(p.encode() for p in bound["prefixes"])
        for event in events(category, batch):
            if evaluate(node, event):
                value = event[field].encode()
                assert value in exact or value.startswith(prefixes), (unparse(node), bound, value)


# --- string-heavy expressions: globs, prefixes and truncation at the column width ----

LONG = "/" + "d" * 300  # longer than the S256 columns: stored truncated
PATH_POOL = ["", "/tmp/x", "/tmp/xy", "/tmp/a.so", "/etc/shadow", "/a/foo", "foo", "/tmpx", LONG, LONG + ".so"]
PATH_PIECES = ["/tmp", "/", "x", "a", ".so", "foo", "*", "*", "?", "/etc/shadow", "d", "dd"]


def path_leaf(name: str) -> st.SearchStrategy:
    pool = st.sampled_from(PATH_POOL)
    pats = st.lists(st.sampled_from(PATH_PIECES), min_size=1, max_size=4).map("".join)
    neg = st.booleans()
    return st.one_of(
        st.builds(Compare, st.just(name), st.sampled_from(("==", "!=")), pool),
        st.builds(In, st.just(name), st.lists(pool, min_size=1, max_size=3).map(tuple), neg),
        st.builds(Like, st.just(name), pats, neg),
        st.builds(IsNull, st.just(name), neg),
    )


path_exprs = st.recursive(
    st.one_of(path_leaf("filename"), path_leaf("newname"), st.builds(Compare, st.just("ret"), st.sampled_from(OPS),
                                                                      st.integers(-3, 3))),
    lambda kids: st.one_of(st.builds(And, kids, kids), st.builds(Or, kids, kids), st.builds(Not, kids)),
    max_leaves=5,
)


@st.composite
def path_cases(draw):
    node = draw(path_exprs)
    n = draw(st.integers(1, 16))
    batch = schema.empty("file", n)
    full = draw(st.lists(st.sampled_from(PATH_POOL), min_size=n, max_size=n))
    batch["filename"] = [p.encode() for p in full]  # numpy truncates at the width
    batch["newname"] = [p.encode() for p in draw(st.lists(st.sampled_from(PATH_POOL), min_size=n, max_size=n))]
    batch["ret"] = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    return node, batch, full


@settings(max_examples=200, deadline=None)
@given(path_cases())
def test_string_filters_are_supersets_even_of_truncated_values(case):
    node, batch, full = case
    fieldmap = {"filename": "filename", "ret": "ret", "newname": "newname"}
    text = kernel_filter(node, fieldmap)
    bound = prefix_filter(node, "filename")
    mask = compile_mask(node, "file")(batch, {})
    for i, event in enumerate(events("file", batch)):
        assert mask[i] == evaluate(node, event)
        if not mask[i]:
            continue
        # the kernel sees the whole string, the broker the truncated column
        kev = {"filename": full[i], "ret": event["ret"], "newname": event["newname"]}
        assert text is None or kernel_eval(text, kev), (unparse(node), text, full[i])
        if bound is not None:
            assert event["filename"] in bound["exact"] or event["filename"].startswith(tuple(bound["prefixes"]))


@pytest.mark.parametrize("text", [
    'filename like "*d"', 'filename like "/d*d"', 'filename not like "*.so"', 'filename not like "/*.so*"',
    'filename like "/d*"', 'filename not like "/d*"', 'filename == "/ddd"', 'filename like "/ddd?"',
])
@pytest.mark.parametrize("full", [LONG, LONG + ".so", "/ddd", "/dddd", "/x.so"])
def test_kernel_filter_holds_when_columns_truncate(text, full):
    node = parse(text)
    batch = schema.empty("file", 1)
    batch["filename"] = full.encode()
    kept = compile_mask(node, "file")(batch, {})[0]
    flt = kernel_filter(node, {"filename": "filename"})
    if kept and flt is not None:
        assert kernel_eval(flt, {"filename": full}), (flt, full)


@given(st.lists(st.binary(max_size=12), min_size=1, max_size=20), st.binary(max_size=14))
def test_prefix_like_reads_only_the_prefix_bytes_and_agrees_with_numpy(values, prefix):
    """``like "<prefix>*"`` compares each value's first len(prefix) bytes only; it
    agrees with np.char.startswith on any bytes (NULs, short values, long prefixes)."""
    from c8.expr.mask import _startswith

    col = np.array(values, "S10")
    assert _startswith(col, prefix).tolist() == np.char.startswith(col, prefix).tolist()
