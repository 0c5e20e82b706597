"""AST -> a function computing a boolean mask over a whole structured batch.

Every leaf is one or a few numpy operations on a column; nothing runs Python
per event. String columns are fixed-width bytes: literals are encoded to
UTF-8 and compared as bytes. ``like`` uses startswith/endswith/find fast
paths for the common shapes (``p*``, ``*s``, ``*m*``) and otherwise matches
each *distinct* value once (np.unique + fnmatch + the inverse index).
Container fields (with the Kubernetes ones) are evaluated on the batch's small
container table, then mapped onto the ``container`` column with np.isin.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from c8 import schema
from c8.expr import glob
from c8.expr.errors import ExprFieldError, ExprTypeError
from c8.expr.evaluate import labels_match, leaf_matches, literal
from c8.expr.fieldinfo import (
    CONTAINER_FIELDS,
    LABEL_FIELDS,
    constant_compare,
    int_range,
    lineage_field,
)
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Not, Or

Containers = Mapping[int, Sequence[str]]
MaskFn = Callable[[np.ndarray, Containers | None], np.ndarray]
_Leaf = Callable[[np.ndarray, Containers | None], np.ndarray]

_NUMPY_OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
              ">": np.greater, ">=": np.greater_equal}


def compile_mask(node: Node, category: str) -> MaskFn:
    """A function ``(batch, containers) -> bool array`` evaluating ``node`` on every event.

    ``batch`` has dtype ``c8.schema.dtype(category)`` (plus any ``arg_`` columns);
    ``containers`` maps the ``container`` column's values to rows
    (container_id, container_name, image_id, image_name, runtime, k8s_namespace,
    k8s_pod_name, k8s_pod_uid, k8s_container_name, k8s_labels); index 0 and
    indices missing from it are the host (all fields empty). Call ``check``
    first: a field the batch lacks raises ExprFieldError when the mask runs.
    """
    fn = _compile(node, category)

    def mask(batch: np.ndarray, containers: Containers | None = None) -> np.ndarray:
        return np.asarray(fn(batch, containers), dtype=bool)

    return mask


PREFIX_SET_MIN = 8  # ORed `field like "p*"` leaves on one field matched together from this many


def _compile(node: Node, category: str) -> _Leaf:
    if isinstance(node, Or):
        grouped = _prefix_groups(node, category)
        if grouped is not None:
            return grouped
    if isinstance(node, And | Or):
        left, right = _compile(node.left, category), _compile(node.right, category)
        is_and = isinstance(node, And)

        def both(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
            m = left(batch, containers)
            # skip the right side when the left already decides every event
            if is_and and not m.any():
                return m
            if not is_and and m.all():
                return m
            r = right(batch, containers)
            return (m & r) if is_and else (m | r)

        return both
    if isinstance(node, Not):
        inner = _compile(node.operand, category)
        return lambda batch, containers: ~inner(batch, containers)
    if node.field in CONTAINER_FIELDS:
        return _container_leaf(node)
    if lineage_field(node.field):
        return _lineage_leaf(node)
    if node.field == "type":
        hit = leaf_matches(node, category.encode())
        return lambda batch, containers: np.full(len(batch), hit)
    if node.field == "kind":
        return _kind_leaf(node, category)
    return _column_leaf(node)


def _or_leaves(node: Node) -> list[Node]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Or):
            stack += [n.right, n.left]
        else:
            out.append(n)
    return out


def _plain_prefix(leaf: Node) -> bytes | None:
    """``p`` for a leaf ``field like "p*"`` (p without glob characters), else None."""
    if not isinstance(leaf, Like) or leaf.negated or leaf.field in CONTAINER_FIELDS or leaf.field in ("type", "kind"):
        return None
    pattern = _STARS.sub(b"*", leaf.pattern.encode("utf-8"))
    if len(pattern) < 2 or not pattern.endswith(b"*") or any(c in pattern[:-1] for c in (b"*", b"?", b"[")):
        return None
    return pattern[:-1]


def _prefix_groups(node: Or, category: str) -> _Leaf | None:
    """An OR chain with many ``field like "p*"`` leaves on one field, as one sorted-prefix
    test per distinct value (O(n log k)) beside the other leaves, instead of one pass
    over the column per leaf (O(n k)). None when no field has PREFIX_SET_MIN of them."""
    leaves = _or_leaves(node)
    by_field: dict[str, list[tuple[bytes, Node]]] = {}
    for leaf in leaves:
        p = _plain_prefix(leaf)
        if p is not None:
            by_field.setdefault(leaf.field, []).append((p, leaf))
    groups = {f: g for f, g in by_field.items() if len(g) >= PREFIX_SET_MIN}
    if not groups:
        return None
    grouped = {id(leaf) for g in groups.values() for _, leaf in g}
    parts = [_prefix_set_leaf(g[0][1], [p for p, _ in g]) for g in groups.values()]
    parts += [_compile(leaf, category) for leaf in leaves if id(leaf) not in grouped]

    def any_of(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
        m = parts[0](batch, containers)
        for part in parts[1:]:
            if m.all():
                break
            m = m | part(batch, containers)
        return m

    return any_of


def _prefix_set_leaf(first: Node, prefixes: list[bytes]) -> _Leaf:
    kept: list[bytes] = []
    for p in sorted(set(prefixes)):  # sorted, a covered prefix follows the one covering it
        if not kept or not p.startswith(kept[-1]):
            kept.append(p)

    def covered(value: bytes) -> bool:
        at = bisect.bisect_right(kept, value) - 1
        return at >= 0 and value.startswith(kept[at])

    def run(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
        col = _column(batch, first)
        if col.dtype.kind != "S":
            return _number_leaf(first, col)  # raises as each leaf would
        if len(col) == 0:
            return np.zeros(0, bool)
        uniq, inverse = np.unique(col, return_inverse=True)
        hits = np.fromiter((covered(bytes(u)) for u in uniq), bool, len(uniq))
        return hits[inverse.reshape(-1)]

    return run


def _column(batch: np.ndarray, leaf: Node) -> np.ndarray:
    names = batch.dtype.names or ()
    if leaf.field not in names:
        raise ExprFieldError(f"batch has no column '{leaf.field}'", leaf.pos, leaf.field)
    return batch[leaf.field]


def _column_leaf(leaf: Node) -> _Leaf:
    def run(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
        col = _column(batch, leaf)
        if col.dtype.kind == "S":
            return _string_leaf(leaf, col)
        return _number_leaf(leaf, col)

    return run


def _number_leaf(leaf: Node, col: np.ndarray) -> np.ndarray:
    rng = int_range(col.dtype.str[1:]) if col.dtype.kind in "iu" else None
    if isinstance(leaf, Compare):
        value = leaf.value
        if not isinstance(value, int):
            raise ExprTypeError(f"field '{leaf.field}' is a number, compared with a string", leaf.pos, leaf.field)
        if leaf.mask is not None:
            # Python int semantics: the value's bits (two's complement) and the
            # mask (0 <= mask < 2**63), so the result fits int64 and is >= 0
            const = constant_compare(leaf.op, value, 0, leaf.mask)
            if const is not None:
                return np.full(len(col), const)
            masked = col.astype(np.int64) & np.int64(leaf.mask)
            return _NUMPY_OPS[leaf.op](masked, np.int64(value))
        if rng is not None:
            const = constant_compare(leaf.op, value, *rng)
            if const is not None:
                return np.full(len(col), const)
            value = col.dtype.type(value)
        return _NUMPY_OPS[leaf.op](col, value)
    if isinstance(leaf, In):
        if not all(isinstance(v, int) for v in leaf.values):
            raise ExprTypeError(f"field '{leaf.field}' is a number, listed with strings", leaf.pos, leaf.field)
        values = [v for v in leaf.values if rng is None or rng[0] <= v <= rng[1]]
        hit = np.isin(col, np.array(values, dtype=col.dtype)) if values else np.zeros(len(col), bool)
        return ~hit if leaf.negated else hit
    if isinstance(leaf, IsNull):
        return (col != 0) if leaf.negated else (col == 0)
    raise ExprTypeError(f"'like' needs a string field, and '{leaf.field}' is a number", leaf.pos, leaf.field)


def _string_leaf(leaf: Node, col: np.ndarray) -> np.ndarray:
    if isinstance(leaf, Compare):
        if not isinstance(leaf.value, str):
            raise ExprTypeError(f"field '{leaf.field}' is a string, compared with a number", leaf.pos, leaf.field)
        return _NUMPY_OPS[leaf.op](col, np.bytes_(literal(leaf.value)))
    if isinstance(leaf, In):
        if not all(isinstance(v, str) for v in leaf.values):
            raise ExprTypeError(f"field '{leaf.field}' is a string, listed with numbers", leaf.pos, leaf.field)
        hit = np.isin(col, np.array([literal(v) for v in leaf.values], dtype=bytes))
        return ~hit if leaf.negated else hit
    if isinstance(leaf, IsNull):
        return (col != b"") if leaf.negated else (col == b"")
    hit = like(col, leaf.pattern.encode("utf-8"))
    return ~hit if leaf.negated else hit


_STARS = re.compile(rb"\*+")


def like(col: np.ndarray, pattern: bytes) -> np.ndarray:
    """fnmatchcase(value, pattern) for every value of a fixed-width bytes column."""
    pattern = _STARS.sub(b"*", pattern)  # '**' matches what '*' does
    if not any(c in pattern for c in (b"?", b"[")):
        parts = pattern.split(b"*")
        if len(parts) == 1:
            return col == np.bytes_(pattern)
        if pattern == b"*":
            return np.ones(len(col), bool)
        if len(parts) == 2 and parts[1] == b"":
            return _startswith(col, parts[0])
        if len(parts) == 2 and parts[0] == b"":
            return np.char.endswith(col, parts[1])
        if len(parts) == 3 and parts[0] == parts[2] == b"":
            return np.char.find(col, parts[1]) >= 0
    if len(col) == 0:
        return np.zeros(0, bool)
    uniq, inverse = np.unique(col, return_inverse=True)
    match = glob.compile(pattern)
    hits = np.fromiter((match(bytes(u)) is not None for u in uniq), bool, len(uniq))
    return hits[inverse.reshape(-1)]


def _startswith(col: np.ndarray, prefix: bytes) -> np.ndarray:
    """``np.char.startswith`` from the first ``len(prefix)`` bytes of each value alone
    (12 times faster on a 256-byte column: the rest is never read). Exact for a
    prefix without NUL bytes: a shorter value reads as NUL-padded, and differs."""
    if b"\0" in prefix:
        return np.char.startswith(col, prefix)
    if len(prefix) > col.dtype.itemsize:  # no value is that long (a batch holding names narrow)
        return np.zeros(len(col), bool)
    if not prefix:
        return np.ones(len(col), bool)
    return col.astype(f"S{len(prefix)}") == np.bytes_(prefix)


def _kind_leaf(leaf: Node, category: str) -> _Leaf:
    kinds = schema.KINDS[category]

    def code(v: object) -> int:
        if isinstance(v, int):
            return v
        if v not in kinds:
            raise ExprTypeError(f"'{v}' is not a kind of {category} events (kinds: {', '.join(kinds)})",
                                leaf.pos, "kind")
        return schema.kind_code(category, v)

    if isinstance(leaf, Compare):
        if isinstance(leaf.value, str) and leaf.op not in ("==", "!="):
            raise ExprTypeError(f"kind names compare only with == and != (got '{leaf.op}')", leaf.pos, "kind")
        numeric = Compare("kind", leaf.op, code(leaf.value), leaf.pos)
        return lambda batch, containers: _number_leaf(numeric, _column(batch, leaf))
    if isinstance(leaf, In):
        numeric = In("kind", tuple(code(v) for v in leaf.values), leaf.negated, leaf.pos)
    elif isinstance(leaf, Like):
        codes = tuple(schema.kind_code(category, k) for k in kinds if glob.fnmatchcase(k, leaf.pattern))
        numeric = In("kind", codes, leaf.negated, leaf.pos)
    else:
        raise ExprTypeError("'kind' is never null", leaf.pos, "kind")
    return lambda batch, containers: _number_leaf(numeric, _column(batch, leaf))


def _lineage_leaf(leaf: Node) -> _Leaf:
    """``parent.<f>`` / ``ancestor.<f>``: evaluated once per distinct process_id of the
    batch on its lineage table (``containers.processes``, c8.protocol.batch.Tables),
    then mapped onto the events. No lineage known: the parent's fields are empty
    (0 for pid), and no ancestor matches."""
    rel, name = lineage_field(leaf.field)

    def value(ancestor: dict) -> bytes | int:
        v = ancestor[name]
        return v if isinstance(v, int) else str(v).encode("utf-8", "surrogateescape")

    def run(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
        lineage = getattr(containers, "lineage", None)
        keys, inverse = np.unique(_column(batch, Compare("process_id", "==", "", leaf.pos)),
                                  return_inverse=True)
        hits = np.zeros(len(keys), bool)
        for i, key in enumerate(keys.tolist()):
            chain = lineage(key.decode(errors="replace")) if lineage is not None else []
            if rel == "parent":
                hits[i] = leaf_matches(leaf, value(chain[0]) if chain else (0 if name == "pid" else b""))
            else:
                hits[i] = any(leaf_matches(leaf, value(a)) for a in chain)
        return hits[inverse.reshape(-1)]

    return run


def _container_leaf(leaf: Node) -> _Leaf:
    slot = CONTAINER_FIELDS[leaf.field]
    if leaf.field in LABEL_FIELDS:
        def matches(row: Sequence | None) -> bool:
            value = row[slot] if row is not None and len(row) > slot else None
            return labels_match(leaf, value if isinstance(value, Mapping) else {})
    else:
        def matches(row: Sequence | None) -> bool:
            # rows of an older sensor lack the k8s fields: empty
            return leaf_matches(leaf, _text(row[slot] if row is not None and len(row) > slot else None))

    def run(batch: np.ndarray, containers: Containers | None) -> np.ndarray:
        col = _column(batch, Compare("container", "==", 0, leaf.pos))
        table = {int(k): v for k, v in (containers or {}).items() if int(k) != 0}
        host_hit = matches(None)  # the host, and indices the table lacks
        hits = [k for k, row in table.items() if matches(row)]
        known = np.fromiter(table, np.int64, len(table))
        mask = np.isin(col, np.array(hits, np.int64))
        if host_hit:
            mask |= ~np.isin(col, known)
        return mask

    return run


def _text(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)
