"""What an eBPF program can test on one string field: prefixes and exact values.

``prefix_filter`` bounds the values of one field that can satisfy an
expression, as ``{"prefixes": [...], "exact": [...]}``: every event the
expression keeps has the field equal to an exact value or starting with a
prefix. It is a superset, computed on the negation normal form: leaves on
other fields, and negative leaves, bound nothing; an AND is bounded by
either side (the tighter one is kept); an OR needs both sides bounded.
"""

from __future__ import annotations

from bisect import bisect_right

from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Or, nnf

Bound = tuple[frozenset[str], frozenset[str]]  # (prefixes, exact)

_META = "*?["


def prefix_filter(node: Node, field: str) -> dict[str, list[str]] | None:
    """Prefixes and exact values of ``field`` covering every matching event, or None.

    ``filename like "/tmp/x*"`` gives prefixes ["/tmp/x"]; ``filename ==
    "/etc/shadow"`` gives exact ["/etc/shadow"]; ``filename like "*foo*"``
    gives None (no bound).
    """
    bound = _bound(nnf(node), field)
    if bound is None:
        return None
    prefixes, exact = _normalise(bound)
    return {"prefixes": sorted(prefixes), "exact": sorted(exact)}


def _bound(node: Node, field: str) -> Bound | None:
    if isinstance(node, And):
        left, right = _bound(node.left, field), _bound(node.right, field)
        if left is None or right is None:
            return left or right
        return min(left, right, key=_looseness)
    if isinstance(node, Or):
        left, right = _bound(node.left, field), _bound(node.right, field)
        if left is None or right is None:
            return None
        return left[0] | right[0], left[1] | right[1]
    if node.field != field:
        return None
    if isinstance(node, Compare):
        if node.op == "==" and isinstance(node.value, str):
            return frozenset(), frozenset({node.value})
        return None
    if isinstance(node, In):
        if node.negated or not all(isinstance(v, str) for v in node.values):
            return None
        return frozenset(), frozenset(node.values)  # type: ignore[arg-type]
    if isinstance(node, IsNull):
        return None if node.negated else (frozenset(), frozenset({""}))
    if isinstance(node, Like) and not node.negated:
        cut = min((i for i, c in enumerate(node.pattern) if c in _META), default=None)
        if cut is None:
            return frozenset(), frozenset({node.pattern})
        if cut == 0:
            return None
        return frozenset({node.pattern[:cut]}), frozenset()
    return None


def _looseness(bound: Bound) -> tuple[int, int]:
    # fewer, longer prefixes let fewer events through; exact values are tightest
    prefixes, exact = bound
    shortest = min((len(p) for p in prefixes), default=1 << 30)
    return len(prefixes), -shortest + len(exact)


def _normalise(bound: Bound) -> Bound:
    """Drop prefixes covered by a shorter one, and exact values a prefix covers.

    O(k log k): sorted, the strings starting with a prefix follow it
    contiguously, so a prefix is covered exactly when it starts with the last
    one kept; an exact value is covered only by the greatest kept prefix not
    above it (kept prefixes are prefix-free).
    """
    prefixes, exact = bound
    kept: list[str] = []
    for p in sorted(prefixes):
        if not kept or not p.startswith(kept[-1]):
            kept.append(p)

    def covered(e: str) -> bool:
        at = bisect_right(kept, e) - 1
        return at >= 0 and e.startswith(kept[at])

    return frozenset(kept), frozenset(e for e in exact if not covered(e))
