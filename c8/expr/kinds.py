"""Which kinds of a category an expression can match: the plan's reach.

A subscription that says ``kind == "ENTER"`` in its filter needs only the
sources that make ENTER events, exactly as one that lists ``"kinds":
["ENTER"]``. :func:`kinds_of` reads that from the expression: in negation
normal form, a ``kind`` leaf matches the kinds it names, any other leaf may
match every kind, ``and`` intersects and ``or`` unites. The result is exact
for expressions on ``kind`` alone and a sound over-approximation otherwise
(it never drops a kind some event could match).
"""

from __future__ import annotations

from c8 import schema
from c8.expr import glob
from c8.expr.nodes import And, Compare, In, Like, Node, Or, nnf


def kinds_of(node: Node | None, category: str) -> frozenset[str] | None:
    """The kind names ``node`` can match in ``category``; None when it does not narrow them."""
    if node is None:
        return None
    every = frozenset(schema.KINDS[category])
    found = _reach(nnf(node), category, every)
    return None if found == every else found


def _reach(node: Node, category: str, every: frozenset[str]) -> frozenset[str]:
    if isinstance(node, And):
        return _reach(node.left, category, every) & _reach(node.right, category, every)
    if isinstance(node, Or):
        return _reach(node.left, category, every) | _reach(node.right, category, every)
    if getattr(node, "field", None) != "kind":
        return every
    return _leaf(node, category, every)


def _name(value: int | str, category: str) -> str | None:
    if isinstance(value, str):
        return value
    kinds = schema.KINDS[category]
    return kinds[value - 1] if 1 <= value <= len(kinds) else None


def _leaf(leaf: Node, category: str, every: frozenset[str]) -> frozenset[str]:
    if isinstance(leaf, Compare):
        if leaf.mask is not None:
            return every
        if leaf.op in ("==", "!="):
            named = frozenset({_name(leaf.value, category)}) & every
            return named if leaf.op == "==" else every - named
        # order comparisons: on codes (the checker refuses them with names)
        if not isinstance(leaf.value, int):
            return every
        codes = {k: schema.kind_code(category, k) for k in every}
        ops = {"<": int.__lt__, "<=": int.__le__, ">": int.__gt__, ">=": int.__ge__}
        return frozenset(k for k, c in codes.items() if ops[leaf.op](c, leaf.value))
    if isinstance(leaf, In):
        named = frozenset(_name(v, category) for v in leaf.values) & every
        return every - named if leaf.negated else named
    if isinstance(leaf, Like):
        named = frozenset(k for k in every if glob.fnmatchcase(k, leaf.pattern))
        return every - named if leaf.negated else named
    return every  # 'kind is null' is refused by the checker; never narrow on it
