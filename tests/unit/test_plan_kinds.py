"""Kinds in the kernel: a filter's ``kind`` predicates narrow the plan exactly as
the same kinds given as a ``"kinds"`` list do.

For random expressions over ``kind`` (==, !=, in, not in, like, not, and, or),
the kinds the expression matches are found by evaluating it on one event of
each kind; the plan of a subscription with that filter must equal the plan of
one with those kinds listed. ANDing a predicate on another field keeps the
kinds (the plan's tracepoints then carry that field's kernel filter).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from c8 import expr, schema
from c8.broker.plan import compute_plan
from c8.broker.subscriptions import parse_spec

CATEGORIES = ("syscall", "file", "network", "process")


@st.composite
def kind_exprs(draw, category: str, depth: int = 3) -> str:
    kinds = schema.KINDS[category]
    if depth == 0 or draw(st.booleans()):
        shape = draw(st.sampled_from(("==", "!=", "in", "not in", "like", "not like")))
        if shape in ("==", "!="):
            return f'kind {shape} "{draw(st.sampled_from(kinds))}"'
        if shape in ("in", "not in"):
            names = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
            return f"kind {shape} (" + ", ".join(f'"{k}"' for k in names) + ")"
        kind = draw(st.sampled_from(kinds))
        pattern = kind[: draw(st.integers(1, len(kind)))] + "*"
        return f'kind {shape} "{pattern}"'
    op = draw(st.sampled_from(("and", "or", "not")))
    if op == "not":
        return f"not ({draw(kind_exprs(category, depth - 1))})"
    return f"({draw(kind_exprs(category, depth - 1))}) {op} ({draw(kind_exprs(category, depth - 1))})"


def matching_kinds(text: str, category: str) -> list[str]:
    node = expr.parse(text)
    return [k for k in schema.KINDS[category] if expr.evaluate(node, {"kind": k, "type": category})]


def plan_of(events: dict) -> dict:
    return compute_plan([parse_spec({"events": events}, b"peer")])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CATEGORIES).flatmap(lambda c: st.tuples(st.just(c), kind_exprs(c))))
def test_plan_for_a_kind_filter_equals_plan_for_its_kinds_list(case):
    category, text = case
    kinds = matching_kinds(text, category)
    by_filter = plan_of({category: {"filter": text}})
    by_list = plan_of({category: {"kinds": kinds}})
    assert by_filter == by_list, (text, kinds)


@settings(max_examples=200, deadline=None)
@given(kind_exprs("syscall"))
def test_other_predicates_keep_the_kinds_and_their_kernel_filter(text):
    kinds = matching_kinds(text, "syscall")
    by_filter = plan_of({"syscall": {"filter": f"id == 110 and ({text})"}})
    by_list = plan_of({"syscall": {"kinds": kinds, "filter": "id == 110"}})
    assert by_filter == by_list, (text, kinds)


def test_enter_only_filter_opens_only_sys_enter():
    """The measured case: `id == 110 and kind == "ENTER"` must not enable sys_exit."""
    plan = plan_of({"syscall": {"filter": 'id == 110 and kind == "ENTER"'}})
    assert "raw_syscalls:sys_enter" in plan["tracepoints"]
    assert "raw_syscalls:sys_exit" not in plan["tracepoints"]
    assert "id == 110" in plan["tracepoints"]["raw_syscalls:sys_enter"]["filter"]


def test_file_kinds_pick_their_ebpf_families():
    plan = plan_of({"file": {"filter": 'kind == "OPEN" and filename like "/etc/*"'}})
    assert "open" in plan["bpf"] and "file1" not in plan["bpf"] and "file2" not in plan["bpf"]
    plan = plan_of({"file": {"filter": 'kind in ("LINK", "DELETE")'}})
    assert {"file1", "file2"} <= set(plan["bpf"]) and "open" not in plan["bpf"]


def test_a_detection_rule_condition_narrows_like_a_subscription():
    """The detector subscribes with each rule's kinds as a `kind in (...)` clause."""
    from c8.detections.engine import _kind_clause

    clause = _kind_clause("file", ("OPEN",))
    plan = plan_of({"file": {"filter": f'{clause} and filename == "/etc/shadow"'}})
    assert set(plan["bpf"]) == {"open", "exec", "exit"}
