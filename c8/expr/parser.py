r"""Text -> AST: the one parser of the filter language.

Grammar (keywords are case-insensitive; whitespace separates tokens)::

    expression := or_expr EOF
    or_expr    := and_expr ( "or" and_expr )*
    and_expr   := not_expr ( "and" not_expr )*
    not_expr   := "not" not_expr | primary
    primary    := "(" or_expr ")" | predicate
    predicate  := FIELD [ "&" NUMBER ] compare_op value
                | FIELD [ "not" ] "like" STRING
                | FIELD [ "not" ] "in" "(" value ( "," value )* [ "," ] ")"
                | FIELD "is" [ "not" ] "null"
    compare_op := "==" | "!=" | "<" | "<=" | ">" | ">="
    value      := NUMBER | STRING
    FIELD      := [A-Za-z_][A-Za-z0-9_]*        (not a keyword)
    NUMBER     := [-] ( "0x" HEX+ | DIGIT+ )    (integers only)
    STRING     := '"' char* '"' | "'" char* "'"
                  escapes: \\ \" \' \n \t \r \xHH (NUL is not allowed)
    keywords   := and or not like in is null

``field & MASK op value`` tests bits: ``open_flags & 3 != 0``. ``and`` binds tighter than ``or``; ``not`` tighter than both. Chains of the
same operator are built as balanced trees, and nesting is bounded, so later
recursive passes never run out of stack on long or hostile input. Costs are
bounded too: a number has at most ``max_number_digits`` digits (checked
before conversion: int() of a long digit string is quadratic, and over 4,300
digits raises) and an expression at most ``max_terms`` predicates.
"""

from __future__ import annotations

from dataclasses import dataclass

from c8.expr.errors import ExprLimitError, ExprSyntaxError
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Not, Or, Value

KEYWORDS = frozenset({"and", "or", "not", "like", "in", "is", "null"})
MAX_NESTING = 50  # parentheses and `not`s inside one another
MAX_DEPTH = 200  # depth of the resulting tree
MAX_NUMBER_DIGITS = 32  # a 64-bit value has at most 20 decimal or 16 hex digits: room for leading zeros

_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | _DIGITS | {"."}  # parent.exec_filename, ancestor.pid
_SIMPLE_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")


@dataclass(frozen=True)
class Token:
    kind: str  # name, keyword, number, string, op, (, ), ",", end
    text: str  # source text
    value: Value | None
    pos: int

    def describe(self) -> str:
        if self.kind == "end":
            return "end of input"
        if self.kind == "string":
            return f"string {self.text}"
        if self.kind == "number":
            return f"number {self.text}"
        if self.kind == "keyword":
            return f"keyword '{self.text}'"
        if self.kind == "name":
            return f"name '{self.text}'"
        return f"'{self.text}'"


def tokenize(text: str, max_number_digits: int = MAX_NUMBER_DIGITS) -> list[Token]:
    """Split text into tokens; raises ExprSyntaxError on a bad character,
    ExprLimitError on a number of more than ``max_number_digits`` digits."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _NAME_START:
            j = i + 1
            while j < n and text[j] in _NAME_CHARS:
                j += 1
            word = text[i:j]
            if word.lower() in KEYWORDS:
                tokens.append(Token("keyword", word.lower(), None, i))
            else:
                tokens.append(Token("name", word, None, i))
            i = j
        elif c in _DIGITS or (c == "-" and i + 1 < n and text[i + 1] in _DIGITS):
            i = _number(text, i, tokens, max_number_digits)
        elif c == "-":
            raise ExprSyntaxError("expected a number after '-'", i)
        elif c in "\"'":
            i = _string(text, i, tokens)
        elif c in "(),":
            tokens.append(Token(c, c, None, i))
            i += 1
        elif c == "&" and not text.startswith("&&", i):
            tokens.append(Token("&", c, None, i))
            i += 1
        else:
            for op in _OPERATORS:
                if text.startswith(op, i):
                    tokens.append(Token("op", op, None, i))
                    i += len(op)
                    break
            else:
                raise ExprSyntaxError(f"unexpected character {_show(c)}{_hint(c)}", i)
    tokens.append(Token("end", "", None, n))
    return tokens


def _show(c: str) -> str:
    return repr(c) if c.isprintable() else f"U+{ord(c):04X}"


def _hint(c: str) -> str:
    return {
        "=": " (use '==' to compare)",
        "!": " (use 'not', or '!=' to compare)",
        "&": " (use 'and'; '&' alone tests bits: field & 0x3 != 0)",
        "|": " (use 'or')",
    }.get(c, "")


def _number(text: str, start: int, tokens: list[Token], max_digits: int) -> int:
    i = start + 1 if text[start] == "-" else start
    hexadecimal = text.startswith(("0x", "0X"), i)
    first = i + 2 if hexadecimal else i
    j = first
    while j < len(text) and text[j] in (_HEX if hexadecimal else _DIGITS):
        j += 1
    if hexadecimal and j == first:
        raise ExprSyntaxError("expected hexadecimal digits after '0x'", start)
    if j - first > max_digits:
        raise ExprLimitError(f"number of {j - first} digits ({text[start:start + 12]}...): "
                             f"at most {max_digits} digits", start, "number_digits", max_digits)
    value = int(text[first:j], 16 if hexadecimal else 10)
    if j < len(text) and (text[j] in _NAME_CHARS or text[j] == "."):
        raise ExprSyntaxError(
            f"malformed number {text[start:j + 1]!r} (integers only: decimal or 0x hex)", start)
    if text[start] == "-":
        value = -value
    tokens.append(Token("number", text[start:j], value, start))
    return j


def _string(text: str, start: int, tokens: list[Token]) -> int:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while True:
        if i >= len(text):
            raise ExprSyntaxError(f"unterminated string: expected a closing {quote}", start)
        c = text[i]
        if c == quote:
            break
        if c == "\\":
            if i + 1 >= len(text):
                raise ExprSyntaxError(f"unterminated string: expected a closing {quote}", start)
            e = text[i + 1]
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
                continue
            hh = text[i + 2 : i + 4]
            if e == "x" and len(hh) == 2 and all(h in _HEX for h in hh):
                code = int(hh, 16)
                if code == 0:
                    raise ExprSyntaxError("strings cannot contain NUL (\\x00)", i)
                out.append(chr(code))
                i += 4
                continue
            raise ExprSyntaxError(
                f"unknown escape '\\{e}' in string (known: \\\\ \\\" \\' \\n \\t \\r \\xHH)", i)
        if c == "\0":
            raise ExprSyntaxError("strings cannot contain NUL", i)
        out.append(c)
        i += 1
    value = "".join(out)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ExprSyntaxError("string is not valid text (lone surrogate)", start) from None
    tokens.append(Token("string", text[start : i + 1], value, start))
    return i + 1


class _Parser:
    def __init__(self, text: str, max_number_digits: int, max_terms: int | None):
        self.tokens = tokenize(text, max_number_digits)
        self.i = 0
        self.nesting = 0
        self.terms = 0
        self.max_terms = max_terms

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        t = self.tokens[self.i]
        if t.kind != "end":
            self.i += 1
        return t

    def at_keyword(self, word: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.text == word

    def fail(self, expected: str, token: Token | None = None) -> ExprSyntaxError:
        token = token or self.tok
        return ExprSyntaxError(f"expected {expected}, got {token.describe()}", token.pos)

    def expression(self) -> Node:
        node = self.or_expr()
        if self.tok.kind != "end":
            if self.tok.kind == ")":
                raise ExprSyntaxError("unbalanced ')': no '(' to close", self.tok.pos)
            raise self.fail("'and', 'or' or end of input")
        return node

    def or_expr(self) -> Node:
        parts = [self.and_expr()]
        while self.at_keyword("or"):
            self.advance()
            parts.append(self.and_expr())
        return _balanced(Or, parts)

    def and_expr(self) -> Node:
        parts = [self.not_expr()]
        while self.at_keyword("and"):
            self.advance()
            parts.append(self.not_expr())
        return _balanced(And, parts)

    def not_expr(self) -> Node:
        if self.at_keyword("not"):
            t = self.advance()
            self.enter(t)
            node = Not(self.not_expr(), t.pos)
            self.nesting -= 1
            return node
        return self.primary()

    def enter(self, t: Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise ExprSyntaxError(f"expression nested too deeply (more than {MAX_NESTING})", t.pos)

    def primary(self) -> Node:
        t = self.tok
        if t.kind == "(":
            self.advance()
            self.enter(t)
            node = self.or_expr()
            self.nesting -= 1
            if self.tok.kind != ")":
                raise self.fail(f"')' to close the '(' at column {t.pos + 1}")
            self.advance()
            return node
        if t.kind == "name":
            return self.predicate()
        if t.kind == "keyword" and t.text not in ("and", "or"):
            raise ExprSyntaxError(
                f"expected a field name, got keyword '{t.text}' (keywords cannot be field names)",
                t.pos)
        raise self.fail("a field name, 'not' or '('")

    def predicate(self) -> Node:
        name = self.advance()
        self.terms += 1
        if self.max_terms is not None and self.terms > self.max_terms:
            raise ExprLimitError(f"more than {self.max_terms} terms (comparisons, like, in, is null)",
                                 name.pos, "terms", self.max_terms)
        field, pos = name.text, name.pos
        t = self.tok
        mask = None
        if t.kind == "&":
            self.advance()
            m = self.tok
            if m.kind != "number" or not 0 <= m.value < 2**63:  # type: ignore[operator]
                raise self.fail("a bit mask (a number from 0 to 2**63-1) after '&'")
            self.advance()
            mask, t = m.value, self.tok
            if t.kind != "op":
                raise self.fail(f"a comparison after '{field} & {m.text}' (e.g. != 0)")
        if t.kind == "op":
            self.advance()
            return Compare(field, t.text, self.value(f"after '{t.text}'"), pos, mask)
        negated = False
        if self.at_keyword("not"):
            self.advance()
            negated = True
            if not (self.at_keyword("like") or self.at_keyword("in")):
                raise self.fail(f"'like' or 'in' after '{field} not'")
        if self.at_keyword("like"):
            self.advance()
            p = self.tok
            if p.kind != "string":
                raise self.fail("a quoted glob pattern after 'like'")
            self.advance()
            return Like(field, p.value, negated, pos)  # type: ignore[arg-type]
        if self.at_keyword("in"):
            self.advance()
            if self.tok.kind != "(":
                raise self.fail("'(' after 'in'")
            self.advance()
            values = [self.value("in the list after 'in'")]
            while self.tok.kind == ",":
                self.advance()
                if self.tok.kind == ")":
                    break
                values.append(self.value("after ','"))
            if self.tok.kind != ")":
                raise self.fail("',' or ')' in the list after 'in'")
            self.advance()
            return In(field, tuple(values), negated, pos)
        if self.at_keyword("is"):
            self.advance()
            neg = False
            if self.at_keyword("not"):
                self.advance()
                neg = True
            if not self.at_keyword("null"):
                raise self.fail(f"'null' after 'is{' not' if neg else ''}'")
            self.advance()
            return IsNull(field, neg, pos)
        raise self.fail(
            f"an operator after field '{field}' (== != < <= > >= like, not like, in, not in, is null)")

    def value(self, where: str) -> Value:
        t = self.tok
        if t.kind not in ("number", "string"):
            raise self.fail(f"a value (number or quoted string) {where}")
        self.advance()
        return t.value  # type: ignore[return-value]


def _balanced(kind: type, parts: list[Node]) -> Node:
    if len(parts) == 1:
        return parts[0]
    mid = len(parts) // 2
    left, right = _balanced(kind, parts[:mid]), _balanced(kind, parts[mid:])
    return kind(left, right, left.pos)


def _depth(node: Node) -> int:
    depth, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        depth = max(depth, d)
        if isinstance(n, And | Or):
            stack += [(n.left, d + 1), (n.right, d + 1)]
        elif isinstance(n, Not):
            stack.append((n.operand, d + 1))
    return depth


def parse(text: str, max_number_digits: int = MAX_NUMBER_DIGITS, max_terms: int | None = None) -> Node:
    """Parse a filter expression into an AST.

    Raises ExprSyntaxError naming the column and what was expected, e.g.
    ``at column 14: expected a value (number or quoted string) after '==', got end of input``;
    ExprLimitError (a subclass) past ``max_number_digits`` digits in a number or
    ``max_terms`` predicates (None: unbounded).
    """
    if not isinstance(text, str):
        raise ExprSyntaxError(f"expression must be text, got {type(text).__name__}", None)
    if not text.strip():
        raise ExprSyntaxError("empty expression: expected a field name, 'not' or '('", 0)
    node = _Parser(text, max_number_digits, max_terms).expression()
    if _depth(node) > MAX_DEPTH:
        raise ExprSyntaxError(f"expression nested too deeply (tree depth over {MAX_DEPTH})", 0)
    return node
