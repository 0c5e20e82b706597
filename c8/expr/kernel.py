"""AST -> tracepoint filter string (PERF_EVENT_IOC_SET_FILTER), as a superset.

The kernel's event filter knows ``== != < <= > >=`` and ``&`` (any bit set) on numbers, ``== !=`` and
the glob ``~`` on strings, ``&& || !`` and parentheses. The expression is put
in negation normal form; each leaf becomes a kernel predicate or *unknown*
(taken as true: the kernel keeps the event and the broker decides). An AND
drops its unknown side; an OR with an unknown side is unknown. So the kernel
filter keeps every event the full expression keeps, and the broker still
evaluates the full expression on what arrives.

Leaves are left unknown when the kernel would read them differently:
- string literals with quotes, backslashes or non-printable bytes (the kernel
  has no escapes), or as long as the column width (truncated columns);
- globs with ``[`` or ``\\``, starting with ``!`` (the kernel negates) or a
  digit (the kernel then matches literally), and globs whose verdict could
  change when the schema column truncates the string;
- integers outside the field's type range (the kernel would wrap them); they
  fold to constants instead.
The fieldmap must pair fields of the same value and signedness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from c8.expr.fieldinfo import (
    CONTAINER_FIELDS,
    all_field_types,
    constant_compare,
    int_range,
    is_string,
    string_width,
)
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Or, nnf

MAX_FILTER = 4095  # the kernel copies at most a page, NUL included
_UNKNOWN_STRING_WIDTH = 256  # config string_width default
_SAFE_INT = (0, 2**31 - 1)  # integers any field type reads alike


class _False:
    """A sub-expression no event satisfies."""


FALSE = _False()
Result = str | None | _False  # filter text, unknown (true), or never


def kernel_filter(node: Node, fieldmap: Mapping[str, str],
                  types: Mapping[str, str] | None = None) -> str | None:
    """The tracepoint filter implied by ``node``, over tracepoint field names.

    ``fieldmap`` maps schema fields to tracepoint fields; other fields are
    not testable in the kernel. ``types`` (field -> type code) defaults to
    the schema's; pass it for ``arg_`` fields. Returns None for no filter.
    """
    result = _filter(node, fieldmap, types)
    return result if isinstance(result, str) else None


def kernel_filter_any(nodes: Iterable[Node | None], fieldmap: Mapping[str, str],
                      types: Mapping[str, str] | None = None) -> str | None:
    """One filter keeping what any of several subscriptions wants (their OR).

    A subscription without a filter (None), or whose filter the kernel cannot
    express, makes the result None; one that matches nothing adds nothing.
    """
    parts: list[str] = []
    for node in nodes:
        if node is None:
            return None
        result = _filter(node, fieldmap, types)
        if result is None:
            return None
        if isinstance(result, str) and result not in parts:
            parts.append(result)
    if not parts:
        return None
    text = parts[0] if len(parts) == 1 else " || ".join(f"({p})" for p in parts)
    return text if len(text) <= MAX_FILTER else None


def _filter(node: Node, fieldmap: Mapping[str, str], types: Mapping[str, str] | None) -> Result:
    all_types = dict(all_field_types())
    all_types.update(types or {})
    result = _convert(nnf(node), fieldmap, all_types)
    if isinstance(result, str) and len(result) > MAX_FILTER:
        return None
    return result


def _and(left: Result, right: Result) -> Result:
    if left is FALSE or right is FALSE:
        return FALSE
    if left is None:
        return right
    if right is None:
        return left
    return f"{_group(left)} && {_group(right)}"


def _or(left: Result, right: Result) -> Result:
    if left is None or right is None:
        return None
    if left is FALSE:
        return right
    if right is FALSE:
        return left
    return f"{_group(left)} || {_group(right)}"


def _group(text: str) -> str:
    return text if isinstance(text, _Atom) else f"({text})"


class _Atom(str):
    """One kernel predicate: needs no parentheses when combined."""


def _convert(node: Node, fieldmap: Mapping[str, str], types: Mapping[str, str]) -> Result:
    if isinstance(node, And):
        return _and(_convert(node.left, fieldmap, types), _convert(node.right, fieldmap, types))
    if isinstance(node, Or):
        return _or(_convert(node.left, fieldmap, types), _convert(node.right, fieldmap, types))
    name = node.field
    if name not in fieldmap or name in ("kind", "type") or name in CONTAINER_FIELDS:
        return None
    target = fieldmap[name]
    code = types.get(name, "")
    if isinstance(node, Compare) and node.mask is not None:
        return _bits(target, node, code)
    if isinstance(node, Compare):
        return _compare(target, node.op, node.value, code)
    if isinstance(node, In):
        if not node.negated:
            result: Result = FALSE
            for v in node.values:
                result = _or(result, _compare(target, "==", v, code))
            return result
        result = None
        for v in node.values:
            result = _and(result, _compare(target, "!=", v, code))
        return result
    if isinstance(node, Like):
        return _glob(target, node.pattern, node.negated, code)
    if isinstance(node, IsNull):
        return None  # rarely useful in the kernel; keep filters simple
    return None


def _compare(target: str, op: str, value: int | str, code: str) -> Result:
    if isinstance(value, int):
        if is_string(code):
            return None
        known = int_range(code)
        lo, hi = known or _SAFE_INT
        const = constant_compare(op, value, lo, hi)
        if const is not None:
            # out of the field's range: a constant; of an unknown type: not pushed
            return None if const or known is None else FALSE
        return _Atom(f"{target} {op} {value}")
    if not is_string(code) or op not in ("==", "!=") or not _safe_string(value, code):
        return None
    return _Atom(f'{target} {op} "{value}"')


def _bits(target: str, node: Compare, code: str) -> Result:
    """``field & M != 0`` is the kernel's ``field & M`` (true when any bit is set);
    other bit tests stay unknown."""
    known = int_range(code)
    if known is None or is_string(code) or not 0 < node.mask <= known[1]:
        return None
    if (node.op, node.value) in (("!=", 0), (">", 0)):
        return _Atom(f"{target} & {node.mask}")
    return None


def _safe_string(value: str, code: str) -> bool:
    width = string_width(code) or _UNKNOWN_STRING_WIDTH
    return (len(value.encode("utf-8")) < width
            and all(" " <= c <= "~" and c not in "\"'\\" for c in value))


def _glob(target: str, pattern: str, negated: bool, code: str) -> Result:
    if not is_string(code) or not _safe_string(pattern, code) or "[" in pattern:
        return None
    if pattern[:1] == "!" or pattern[:1].isdigit():
        return None
    wild = "*" in pattern
    # A column holds the first `width` bytes: the verdict on the truncated value
    # must imply the kernel's verdict on the whole string.
    if not negated:
        safe = not wild or pattern.endswith("*")
    else:
        safe = not wild or (pattern.endswith("*") and "*" not in pattern[:-1])
    if not safe:
        return None
    if not wild and "?" not in pattern:
        return _Atom(f'{target} {"!=" if negated else "=="} "{pattern}"')
    text = f'{target} ~ "{pattern}"'
    return _Atom(f"!({text})" if negated else text)
