"""AST of the filter language.

Leaves test one field against literals; ``And``/``Or``/``Not`` combine them.
Every node carries ``pos``, the 0-based offset in the source text of the
token that starts it, so later stages (type checks) can point at it. ``pos``
takes no part in equality, so two parses of equivalent text compare equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Value = int | str

COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
NEGATED_OP = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


@dataclass(frozen=True)
class Compare:
    """``field op value`` with op one of == != < <= > >=; with ``mask`` set,
    ``field & mask op value`` (the field's bits and mask, then compared)."""

    field: str
    op: str
    value: Value
    pos: int = field(default=0, compare=False)
    mask: int | None = None

    def __str__(self) -> str:
        name = self.field if self.mask is None else f"{self.field} & {self.mask:#x}"
        return f"{name} {self.op} {_literal(self.value)}"


@dataclass(frozen=True)
class Like:
    """``field [not] like "glob"`` (fnmatch: * ? [seq] [!seq], case-sensitive)."""

    field: str
    pattern: str
    negated: bool = False
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.field} {'not like' if self.negated else 'like'} {_literal(self.pattern)}"


@dataclass(frozen=True)
class In:
    """``field [not] in (v1, v2, ...)``."""

    field: str
    values: tuple[Value, ...]
    negated: bool = False
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        items = ", ".join(_literal(v) for v in self.values)
        return f"{self.field} {'not in' if self.negated else 'in'} ({items})"


@dataclass(frozen=True)
class IsNull:
    """``field is [not] null``: empty string, or for container fields: on the host."""

    field: str
    negated: bool = False
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.field} is {'not null' if self.negated else 'null'}"


@dataclass(frozen=True)
class And:
    left: Node
    right: Node
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"({self.left} and {self.right})"


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"({self.left} or {self.right})"


@dataclass(frozen=True)
class Not:
    operand: Node
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"not {self.operand}" if isinstance(self.operand, And | Or) else f"not ({self.operand})"


Leaf = Compare | Like | In | IsNull
Node = Compare | Like | In | IsNull | And | Or | Not
LEAVES = (Compare, Like, In, IsNull)

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _literal(value: Value) -> str:
    """Source text of a literal that parses back to the same value."""
    if isinstance(value, int):
        return str(value)
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def unparse(node: Node) -> str:
    """Expression text of a node (fully parenthesised); parse(unparse(n)) == n."""
    return str(node)


def fields(node: Node) -> set[str]:
    """Names of the fields an expression refers to."""
    if isinstance(node, And | Or):
        return fields(node.left) | fields(node.right)
    if isinstance(node, Not):
        return fields(node.operand)
    return {node.field}


def negate(node: Node) -> Node:
    """The negation of a node, with ``not`` pushed into the leaves."""
    if isinstance(node, Compare):
        return Compare(node.field, NEGATED_OP[node.op], node.value, node.pos, node.mask)
    if isinstance(node, Like):
        return Like(node.field, node.pattern, not node.negated, node.pos)
    if isinstance(node, In):
        return In(node.field, node.values, not node.negated, node.pos)
    if isinstance(node, IsNull):
        return IsNull(node.field, not node.negated, node.pos)
    if isinstance(node, And):
        return Or(negate(node.left), negate(node.right), node.pos)
    if isinstance(node, Or):
        return And(negate(node.left), negate(node.right), node.pos)
    return nnf(node.operand)


def nnf(node: Node) -> Node:
    """Negation normal form: no ``Not`` nodes, negations folded into leaves.

    Sound because every leaf's negation is again a leaf (numbers and byte
    strings are totally ordered, so ``not a < b`` is ``a >= b``).
    """
    if isinstance(node, Not):
        return negate(node.operand)
    if isinstance(node, And):
        return And(nnf(node.left), nnf(node.right), node.pos)
    if isinstance(node, Or):
        return Or(nnf(node.left), nnf(node.right), node.pos)
    return node
