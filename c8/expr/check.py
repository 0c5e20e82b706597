"""Type checks of an AST against a category's fields (before it is compiled)."""

from __future__ import annotations

import difflib

from c8 import schema
from c8.expr import glob
from c8.expr.errors import ExprFieldError, ExprTypeError
from c8.expr.fieldinfo import CLIENT_ONLY, is_string
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Not, Or, Value


def check(node: Node, category: str, extra_fields: dict[str, str] | None = None) -> None:
    """Check that every field exists for ``category`` and every value suits its type.

    ``extra_fields`` adds fields of this subscription (``arg_<name>`` -> type
    code such as ``u8`` or ``S64``). Raises ExprFieldError (unknown field,
    with close matches) or ExprTypeError (string vs number, bad subtype name).
    """
    if category not in schema.KINDS:
        raise ExprFieldError(f"unknown event type {category!r} (known: {', '.join(schema.CATEGORIES)})")
    types = dict(schema.field_types(category))
    columns = set(schema.dtype(category).names)
    types.update(extra_fields or {})
    columns.update(extra_fields or {})
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, And | Or):
            stack += [n.right, n.left]  # report the leftmost problem first
        elif isinstance(n, Not):
            stack.append(n.operand)
        else:
            _check_leaf(n, category, types, columns)


def _check_leaf(leaf: Node, category: str, types: dict[str, str], columns: set[str]) -> None:
    name = leaf.field
    if name not in types:
        close = tuple(difflib.get_close_matches(name, sorted(types), n=4, cutoff=0.6))
        hint = f"did you mean {', '.join(close)}?" if close else f"see `c8ctl fields {category}`"
        raise ExprFieldError(f"unknown field '{name}' for {category} events ({hint})",
                             leaf.pos, name, close)
    if name in CLIENT_ONLY and name not in columns:
        raise ExprFieldError(f"field '{name}' is not available to filters", leaf.pos, name)
    string = is_string(types[name])
    if isinstance(leaf, Compare) and leaf.mask is not None and (string or name == "kind"):
        raise ExprTypeError(f"'&' tests the bits of a number field, and '{name}' is not one", leaf.pos, name)
    if name == "kind":
        _check_kind(leaf, category)
        return
    what = "a string" if string else "a number"
    if isinstance(leaf, Compare):
        _check_value(leaf, leaf.value, string, what)
    elif isinstance(leaf, In):
        for v in leaf.values:
            _check_value(leaf, v, string, what)
    elif isinstance(leaf, Like):
        if not string:
            raise ExprTypeError(f"'like' needs a string field, and '{name}' is a number", leaf.pos, name)
    elif isinstance(leaf, IsNull):
        if not string and name != "container":
            raise ExprTypeError(f"'is null' needs a string or container field, and '{name}' is a number",
                                leaf.pos, name)


def _check_value(leaf: Node, value: Value, string: bool, what: str) -> None:
    if string != isinstance(value, str):
        got = f"string {value!r}" if isinstance(value, str) else f"number {value}"
        raise ExprTypeError(f"field '{leaf.field}' is {what}, compared with {got}", leaf.pos, leaf.field)


def _check_kind(leaf: Node, category: str) -> None:
    kinds = schema.KINDS[category]

    def known(value: Value) -> None:
        if isinstance(value, str) and value not in kinds:
            raise ExprTypeError(f"'{value}' is not a kind of {category} events (kinds: {', '.join(kinds)})",
                                leaf.pos, "kind")

    if isinstance(leaf, Compare):
        if isinstance(leaf.value, str) and leaf.op not in ("==", "!="):
            raise ExprTypeError(f"kind names compare only with == and != (got '{leaf.op}')", leaf.pos, "kind")
        known(leaf.value)
    elif isinstance(leaf, In):
        for v in leaf.values:
            known(v)
    elif isinstance(leaf, Like):
        if not any(glob.fnmatchcase(k, leaf.pattern) for k in kinds):
            raise ExprTypeError(f"pattern {leaf.pattern!r} matches no kind of {category} events "
                                f"(kinds: {', '.join(kinds)})", leaf.pos, "kind")
    elif isinstance(leaf, IsNull):
        raise ExprTypeError("'kind' is never null", leaf.pos, "kind")
