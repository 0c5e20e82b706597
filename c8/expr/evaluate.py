"""Reference evaluation of an AST on one event dict: the oracle for the
vectorised masks, and the evaluator for the container table's few rows.

Strings are compared as UTF-8 bytes (as the batch columns hold them), so
ordering and ``?`` in globs mean the same thing here and on arrays.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from c8 import schema
from c8.expr import glob
from c8.expr.errors import ExprFieldError, ExprTypeError
from c8.expr.fieldinfo import CONTAINER_FIELDS, LABEL_FIELDS, lineage_field
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Not, Or, Value

OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}


def evaluate(node: Node, event: Mapping[str, Any]) -> bool:
    """Whether one event (field -> value, strings as str or bytes) satisfies the expression.

    ``kind`` may be the subtype name or its code (then ``type`` names the
    category); container fields missing from the event count as empty (host).
    """
    if isinstance(node, And):
        return evaluate(node.left, event) and evaluate(node.right, event)
    if isinstance(node, Or):
        return evaluate(node.left, event) or evaluate(node.right, event)
    if isinstance(node, Not):
        return not evaluate(node.operand, event)
    if node.field == "kind":
        return _kind(node, event)
    relation = lineage_field(node.field)
    if relation is not None:  # from the event's process_lineage (parent first)
        rel, name = relation
        chain = event.get("process_lineage") or []
        values = [as_bytes(a[name]) if isinstance(a[name], str | bytes) else int(a[name]) for a in chain]
        if rel == "parent":
            return leaf_matches(node, values[0] if values else (0 if name == "pid" else b""))
        return any(leaf_matches(node, v) for v in values)
    if node.field in LABEL_FIELDS:
        return labels_match(node, event.get(node.field) or {})
    if node.field in event:
        value = event[node.field]
    elif node.field in CONTAINER_FIELDS:
        value = ""
    else:
        raise ExprFieldError(f"event has no field '{node.field}'", node.pos, node.field)
    return leaf_matches(node, as_bytes(value) if isinstance(value, str | bytes) else int(value))


def labels_match(leaf: Node, labels: Mapping[str, str]) -> bool:
    """A leaf on a map of labels, each tested as the text ``key=value``: true when
    any label matches (``k8s_labels == "app=web"``, ``like "app=*"``, ``in (...)``);
    the negated forms (``!=``, ``not like``, ``not in``) when none does; ``is null``
    when there is none."""
    if isinstance(leaf, IsNull):
        return (not labels) != leaf.negated
    negated = (isinstance(leaf, Compare) and leaf.op == "!=") or (isinstance(leaf, In | Like) and leaf.negated)
    if isinstance(leaf, Compare):
        if not isinstance(leaf.value, str) or leaf.mask is not None:
            raise ExprTypeError(f"field '{leaf.field}' holds key=value strings: {leaf} does not suit it",
                                leaf.pos, leaf.field)
        positive: Node = Compare(leaf.field, "==" if negated else leaf.op, leaf.value, leaf.pos)
    elif isinstance(leaf, In):
        positive = In(leaf.field, leaf.values, False, leaf.pos)
    else:
        positive = Like(leaf.field, leaf.pattern, False, leaf.pos)
    hit = any(leaf_matches(positive, f"{k}={v}".encode("utf-8", "surrogateescape"))
              for k, v in labels.items())
    return hit != negated


def as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def literal(value: Value) -> bytes | int:
    return value.encode("utf-8") if isinstance(value, str) else value


def leaf_matches(leaf: Node, value: bytes | int) -> bool:
    """One leaf on one value (bytes for string fields, int for numbers)."""
    try:
        if isinstance(leaf, Compare):
            if leaf.mask is not None:
                value = value & leaf.mask
            return OPS[leaf.op](value, literal(leaf.value))
        if isinstance(leaf, In):
            return (value in {literal(v) for v in leaf.values}) != leaf.negated
        if isinstance(leaf, Like):
            if not isinstance(value, bytes):
                raise TypeError
            return glob.fnmatchcase(value, leaf.pattern.encode("utf-8")) != leaf.negated
        if isinstance(leaf, IsNull):
            return (value in (b"", 0)) != leaf.negated
    except TypeError:
        raise ExprTypeError(f"field '{leaf.field}' does not suit {leaf}", leaf.pos, leaf.field) from None
    raise TypeError(f"not an expression node: {leaf!r}")


def _kind(leaf: Node, event: Mapping[str, Any]) -> bool:
    value = event.get("kind")
    if value is None:
        raise ExprFieldError("event has no field 'kind'", leaf.pos, "kind")
    if isinstance(value, str | bytes):
        name = value.decode() if isinstance(value, bytes) else value
    else:
        category = event.get("type")
        if category is None:
            raise ExprFieldError("a kind code needs the event's 'type'", leaf.pos, "type")
        category = category.decode() if isinstance(category, bytes) else category
        name = schema.kind_name(category, int(value))
    if isinstance(leaf, Like):
        return glob.fnmatchcase(name, leaf.pattern) != leaf.negated
    category = event.get("type")
    category = category.decode() if isinstance(category, bytes) else category

    def norm(v: Value) -> str:
        if isinstance(v, str):
            return v
        if category is None:
            raise ExprFieldError("comparing kind with a number needs the event's 'type'", leaf.pos, "type")
        return schema.kind_name(category, v) if 1 <= v <= len(schema.KINDS[category]) else f"#{v}"

    if isinstance(leaf, Compare):
        if leaf.op in ("==", "!="):
            return (name == norm(leaf.value)) == (leaf.op == "==")
        if isinstance(leaf.value, int) and category is not None:
            return OPS[leaf.op](schema.kind_code(category, name), leaf.value)
        raise ExprTypeError(f"kind names compare only with == and != (got '{leaf.op}')", leaf.pos, "kind")
    if isinstance(leaf, In):
        return (name in {norm(v) for v in leaf.values}) != leaf.negated
    raise ExprTypeError("'kind' is never null", leaf.pos, "kind")
