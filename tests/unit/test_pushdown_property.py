"""The whole filter pipeline equals the expression: for random subscriptions and
random batches, what survives the kernel (the tracepoint filter ORed across the
subscriptions sharing a source, simulated as trace_events_filter.c reads it)
and the eBPF filename bound (as the planner computes it), then each
subscription's broker mask, is exactly the set of events on which evaluating
the subscription's expression in Python is true."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from c8.broker import catalog
from c8.broker.plan import string_bound
from c8.expr import compile_mask, evaluate, kernel_filter_any, unparse
from tests.unit.test_expr_properties import (
    CONTAINERS,
    events,
    expressions,
    kernel_eval,
    kernel_event,
    make_batch,
)

# the real sources' field maps, and random ones for categories without a tracepoint map
REAL_MAPS = {
    "syscall": [catalog.SOURCES["raw_syscalls:sys_enter"].kernel_fields,
                catalog.SOURCES["raw_syscalls:sys_exit"].kernel_fields],
}
CATEGORIES = ("file", "process", "network", "syscall", "container")


@st.composite
def pipelines(draw):
    category = draw(st.sampled_from(CATEGORIES))
    nodes = draw(st.lists(expressions(category), min_size=1, max_size=4))
    batch = make_batch(category, draw(st.integers(0, 2**32)), draw(st.integers(0, 32)))
    columns = [n for n in batch.dtype.names if n != "kind"]
    if category in REAL_MAPS:
        fieldmap = dict(draw(st.sampled_from(REAL_MAPS[category])))
    else:
        mapped = draw(st.lists(st.sampled_from(columns), unique=True, max_size=len(columns)))
        fieldmap = {f: f"tp_{f}" for f in mapped}
    return category, nodes, batch, fieldmap


def kernel_keeps(category: str, nodes: list, batch: np.ndarray, fieldmap: dict) -> np.ndarray:
    """Which events the kernel and the eBPF program let through for these subscriptions."""
    keep = np.ones(len(batch), bool)
    text = kernel_filter_any(nodes, fieldmap)
    bound = string_bound(nodes) if category == "file" else None
    for i, event in enumerate(events(category, batch)):
        if text is not None:
            keep[i] = kernel_eval(text, kernel_event(event, {f: t for f, t in fieldmap.items() if f in event}))
        if bound is not None and keep[i]:
            name = event["filename"]
            keep[i] = name in bound["exact"] or name.startswith(tuple(bound["prefixes"]))
    return keep


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_kernel_then_broker_equals_python_evaluation(case):
    category, nodes, batch, fieldmap = case
    keep = kernel_keeps(category, nodes, batch, fieldmap)
    survivors = batch[keep]
    index = np.flatnonzero(keep)
    every = events(category, batch)
    for node in nodes:
        mask = compile_mask(node, category)(survivors, CONTAINERS)
        delivered = index[mask].tolist()
        expected = [i for i, e in enumerate(every) if evaluate(node, e)]
        assert delivered == expected, (unparse(node), [unparse(n) for n in nodes], fieldmap)


def test_pipeline_drops_what_nobody_wants():
    """A non-vacuous case: the kernel removes events, and the result is still exact."""
    from c8.expr import parse

    batch = make_batch("syscall", 7, 200)
    batch["id"] = np.arange(200) % 5
    nodes = [parse("id == 1"), parse("id == 3 and arg0 == 0")]
    keep = kernel_keeps("syscall", nodes, batch, catalog.SOURCES["raw_syscalls:sys_enter"].kernel_fields)
    assert keep.sum() == np.isin(batch["id"], (1, 3)).sum() < len(batch)
    for node in nodes:
        got = np.flatnonzero(keep)[compile_mask(node, "syscall")(batch[keep], {})]
        assert got.tolist() == [i for i, e in enumerate(events("syscall", batch)) if evaluate(node, e)]
