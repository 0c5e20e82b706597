"""Fetch arguments of kprobe/uprobe events: parse, validate, render, type.

The syntax is the kernel's (Documentation/trace/kprobetrace.rst and
uprobetracer.rst). Grammar, as accepted here::

    args     := arg (WS arg)*
    arg      := [NAME "="] fetch [":" TYPE]
    fetch    := "%" REG                      register (x86_64 names: di, si, r8, ...)
              | "@" ADDR                     memory at an address
              | "@" SYM [("+"|"-") OFFS]     kernel symbol (kprobes only)
              | "@+" OFFS                    file offset in the probed file (uprobes only)
              | "$stack" N | "$stack"        stack entry N / stack pointer
              | "$retval"                    return value (return probes only)
              | "$comm"                      task name (string)
              | "$arg" N                     Nth function argument (kprobes at function entry)
              | ("+"|"-") ["u"] OFFS "(" fetch ")"   dereference (u: user memory)
              | "\\" IMM | '\\"' STR '"'     immediate value / string
    TYPE     := (u|s|x)(8|16|32|64) | char | string | ustring | symbol | symstr
              | %pd | %pD | b WIDTH "@" OFFSET "/" CONTAINER   (bitfield)
              | TYPE "[" N "]"               (array, memory fetches only)

Arguments without a name are named ``arg1``, ``arg2``... and arguments
without a type get the kernel's default (``x64``); rendering always spells
both out, so the kernel's format file and ours agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from c8.probes.definition import ProbeError

Kind = Literal["kprobe", "uprobe"]

# arch/x86/kernel/ptrace.c regoffset_table for CONFIG_X86_64.
X86_64_REGISTERS = frozenset(
    "ax bx cx dx si di bp sp r8 r9 r10 r11 r12 r13 r14 r15 orig_ax ip cs flags ss".split()
)
# What people write instead, and the kernel's name for it.
_REGISTER_HINTS = {
    **{p + r: r for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip") for p in ("r", "e")},
    **{f"r{n}{s}": f"r{n}" for n in range(8, 16) for s in ("d", "w", "b")},
    "rflags": "flags",
    "eflags": "flags",
}
# Field names every trace event or probe event already has (trace_probe.c).
RESERVED_NAMES = frozenset(
    ("common_type", "common_flags", "common_preempt_count", "common_pid", "common_tgid",
     "__probe_ip", "__probe_ret_ip", "__probe_func")
)
MAX_ARGS = 128          # MAX_TRACE_ARGS
MAX_NAME_LEN = 32       # MAX_ARG_NAME_LEN
MAX_ARRAY_LEN = 64      # MAX_ARRAY_LEN
MAX_DEREF_DEPTH = 8     # well inside FETCH_INSN_MAX (16)
# A 64-bit value has at most 22 octal, 20 decimal or 16 hex digits; longer ones are
# refused before int() (quadratic in the length, and over 4,300 digits it raises).
MAX_NUMBER_DIGITS = 24
DEFAULT_TYPE = "x64"    # the kernel's default for unsigned long on 64-bit
STRING_TYPES = frozenset(("string", "ustring", "symstr", "%pd", "%pD"))
_KPROBE_ONLY_TYPES = frozenset(("symbol", "symstr", "%pd", "%pD"))

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_SCALAR = re.compile(r"([usx])(8|16|32|64)\Z")
_BITFIELD = re.compile(r"b(\d+)@(\d+)/(8|16|32|64)\Z")
_ARRAY = re.compile(r"(.+)\[(\d+)\]\Z")
_LONG_NUMBER = re.compile(rf"0[xX][0-9a-fA-F]{{{MAX_NUMBER_DIGITS + 1},}}|[0-9]{{{MAX_NUMBER_DIGITS + 1},}}")


def _number(text: str) -> int:
    """An integer as the kernel's kstrto*(base 0) reads it: 0x hex, 0 octal, else decimal."""
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    if len(text) > 1 and text[0] == "0":
        return int(text[1:], 8)
    return int(text, 10)


@dataclass(frozen=True)
class Fetch:
    """One fetch expression. ``op`` is one of: reg, mem, sym, foffs, stack,
    stackptr, retval, comm, arg, deref, imm, immstr."""

    op: str
    value: int | str = 0
    offset: int = 0            # sym and deref
    user: bool = False         # deref of user memory (+u0(...))
    inner: Fetch | None = None

    def render(self) -> str:
        op, v = self.op, self.value
        if op == "reg":
            return f"%{v}"
        if op == "mem":
            return f"@0x{v:x}"
        if op == "sym":
            return f"@{v}" + (f"{self.offset:+d}" if self.offset else "")
        if op == "foffs":
            return f"@+0x{v:x}"
        if op == "stack":
            return f"$stack{v}"
        if op == "stackptr":
            return "$stack"
        if op == "retval":
            return "$retval"
        if op == "comm":
            return "$comm"
        if op == "arg":
            return f"$arg{v}"
        if op == "imm":
            return f"\\{v}"
        if op == "immstr":
            return f'\\"{v}"'
        sign = "-" if self.offset < 0 else "+"
        return f"{sign}{'u' if self.user else ''}{abs(self.offset)}({self.inner.render()})"

    @property
    def is_memory(self) -> bool:
        """True when the value is read from memory (so string/array types apply)."""
        return self.op in ("deref", "mem", "sym", "foffs")


@dataclass(frozen=True)
class ArgType:
    """A fetch type: ``base`` is u32, s8, x64, char, string, ..., or ``bitfield``."""

    base: str
    array: int | None = None
    width: int = 0        # bitfield: bit width
    shift: int = 0        # bitfield: bit offset
    container: int = 0    # bitfield: container size in bits

    def render(self) -> str:
        text = f"b{self.width}@{self.shift}/{self.container}" if self.base == "bitfield" else self.base
        return text + (f"[{self.array}]" if self.array is not None else "")

    @property
    def is_string(self) -> bool:
        return self.base in STRING_TYPES

    def dtype(self, string_width: int = 256) -> np.dtype:
        """The numpy dtype of the decoded column (strings as fixed ``S<width>``).

        Mirrors the tracefs format file: integers keep their size and sign
        (x types and char are unsigned), ``symbol`` is an unsigned long, a bitfield is
        its unsigned container, strings are ``__data_loc`` decoded to bytes.
        """
        if self.is_string:
            scalar = np.dtype(f"S{string_width}")
        elif self.base == "symbol":
            scalar = np.dtype("<u8")
        elif self.base == "bitfield":
            scalar = np.dtype(f"<u{self.container // 8}")
        else:
            sign, bits = self.base[0], 8 if self.base == "char" else int(self.base[1:])
            scalar = np.dtype(f"<{'i' if sign == 's' else 'u'}{bits // 8}")
        return np.dtype((scalar, (self.array,))) if self.array is not None else scalar


@dataclass(frozen=True)
class FetchArg:
    """One named, typed fetch argument."""

    name: str
    fetch: Fetch
    type: ArgType

    def render(self) -> str:
        return f"{self.name}={self.fetch.render()}:{self.type.render()}"


class FetchArgError(ProbeError):
    """A fetch argument the kernel would refuse; the message names the argument."""


def parse_fetchargs(
    text: str, kind: Kind, is_return: bool, function_entry: bool = True
) -> tuple[FetchArg, ...]:
    """Parse and validate a whitespace-separated fetch-argument list.

    ``kind`` is "kprobe" or "uprobe"; ``is_return`` for r/ret probes;
    ``function_entry`` is False for a kprobe at ``symbol+offset`` ($argN then
    has no meaning). Raises FetchArgError naming the argument and the problem.
    """
    if kind not in ("kprobe", "uprobe"):
        raise ValueError(f"kind must be 'kprobe' or 'uprobe', not {kind!r}")
    tokens = (text or "").split()
    if len(tokens) > MAX_ARGS:
        raise FetchArgError(f"too many fetch arguments: {len(tokens)} (the kernel allows {MAX_ARGS})")
    args: list[FetchArg] = []
    seen: set[str] = set()
    for index, token in enumerate(tokens, 1):
        arg = _Parser(token, kind, is_return, function_entry, index).arg()
        if arg.name in seen:
            raise FetchArgError(f"argument {arg.name!r} ({token}): name used twice")
        seen.add(arg.name)
        args.append(arg)
    return tuple(args)


def render_fetchargs(args) -> str:
    """The kernel syntax of parsed arguments, names and types spelled out."""
    return " ".join(a.render() for a in args)


def normalize_fetchargs(text: str, kind: Kind, is_return: bool) -> str:
    """Parse then render: equal meanings give equal text (used for probe names)."""
    return render_fetchargs(parse_fetchargs(text, kind, is_return))


def _short(token: str, keep: int = 64) -> str:
    """A token as shown in messages: long (hostile) ones cut, saying so."""
    return token if len(token) <= keep else f"{token[:keep]}... ({len(token)} characters)"


class _Parser:
    """Recursive-descent parser of one ``NAME=FETCH:TYPE`` token."""

    def __init__(self, token: str, kind: Kind, is_return: bool, entry: bool, index: int):
        self.token, self.kind, self.is_return, self.entry, self.index = token, kind, is_return, entry, index
        self.label = f"argument {index} ({_short(token)})"

    def fail(self, problem: str) -> FetchArgError:
        return FetchArgError(f"{self.label}: {problem}")

    def arg(self) -> FetchArg:
        body = self.token
        name = f"arg{self.index}"
        head, eq, rest = body.partition("=")
        if eq and not head.startswith(("+", "-", "\\", "%", "@", "$")):
            name, body = head, rest
            self.label = f"argument {name!r} ({_short(self.token)})"
            if not _NAME.match(name):
                raise self.fail("invalid name: use letters, digits and '_', not starting with a digit")
            if len(name) > MAX_NAME_LEN:
                raise self.fail(f"name longer than {MAX_NAME_LEN} characters")
            if name in RESERVED_NAMES:
                raise self.fail(f"name {name!r} is reserved by the kernel")
        if not body:
            raise self.fail("empty fetch expression")
        long = _LONG_NUMBER.search(body)
        if long:
            digits = len(long.group(0)) - (2 if long.group(0)[:2] in ("0x", "0X") else 0)
            raise self.fail(f"number of {digits} digits ({long.group(0)[:12]}...): at most "
                            f"{MAX_NUMBER_DIGITS} digits (no 64-bit value is longer)")
        fetch_text, type_text = self._split_type(body)
        fetch, end = self.fetch(fetch_text, 0, depth=0)
        if end != len(fetch_text):
            raise self.fail(f"unexpected {fetch_text[end:]!r} after {fetch_text[:end]!r}")
        return FetchArg(name, fetch, self.type(type_text, fetch))

    @staticmethod
    def _split_type(body: str) -> tuple[str, str | None]:
        # The type follows the last ':' outside an immediate string.
        if body.startswith('\\"'):
            close = body.find('"', 2)
            if close < 0:
                return body, None
            rest = body[close + 1:]
            return (body[: close + 1], rest[1:]) if rest.startswith(":") else (body, None)
        fetch, colon, type_text = body.rpartition(":")
        return (fetch, type_text) if colon else (body, None)

    # -- fetch expressions -------------------------------------------------

    def fetch(self, s: str, i: int, depth: int) -> tuple[Fetch, int]:
        if i >= len(s):
            raise self.fail("missing fetch expression")
        c = s[i]
        if c == "%":
            return self._register(s, i + 1)
        if c == "@":
            return self._memory(s, i + 1)
        if c == "$":
            return self._variable(s, i + 1)
        if c in "+-":
            return self._deref(s, i, depth)
        if c == "\\":
            return self._immediate(s, i + 1)
        raise self.fail(
            f"unknown fetch expression {s[i:]!r}: expected %REG, @ADDR, $stackN, $retval, "
            "$comm, $argN, +|-OFFS(FETCHARG) or \\IMM"
            + (" (BTF argument names are not supported)" if _NAME.match(s[i:]) else "")
        )

    def _register(self, s: str, i: int) -> tuple[Fetch, int]:
        m = re.compile(r"[A-Za-z0-9_]+").match(s, i)
        reg = m.group(0) if m else ""
        if reg not in X86_64_REGISTERS:
            hint = _REGISTER_HINTS.get(reg.lower())
            raise self.fail(
                f"unknown register %{reg} for x86_64"
                + (f" (the kernel calls it %{hint})" if hint else f" (known: {', '.join(sorted(X86_64_REGISTERS))})")
            )
        return Fetch("reg", reg), m.end()

    def _memory(self, s: str, i: int) -> tuple[Fetch, int]:
        if s.startswith("+", i):
            if self.kind != "uprobe":
                raise self.fail("@+OFFSET (file offset) is for uprobes only")
            m = _NUMBER.match(s, i + 1)
            if not m:
                raise self.fail("@+ needs a file offset")
            return Fetch("foffs", _number(m.group(0))), m.end()
        m = _NUMBER.match(s, i)
        if m:
            return Fetch("mem", _number(m.group(0))), m.end()
        m = _SYMBOL.match(s, i)
        if not m:
            raise self.fail("@ needs an address or a symbol")
        if self.kind != "kprobe":
            raise self.fail("@SYMBOL is for kprobes only (uprobes take @ADDR or @+OFFSET)")
        offset, end = 0, m.end()
        o = re.compile(r"([+-])(0[xX][0-9a-fA-F]+|[0-9]+)").match(s, end)
        if o:
            offset = _number(o.group(2)) * (-1 if o.group(1) == "-" else 1)
            end = o.end()
        return Fetch("sym", m.group(0), offset=offset), end

    def _variable(self, s: str, i: int) -> tuple[Fetch, int]:
        m = re.compile(r"[a-z]+[0-9]*").match(s, i)
        word = m.group(0) if m else ""
        end = m.end() if m else i
        if word == "retval":
            if not self.is_return:
                raise self.fail("$retval is only available on return probes")
            return Fetch("retval"), end
        if word == "comm":
            return Fetch("comm"), end
        if word == "stack":
            return Fetch("stackptr"), end
        if word.startswith("stack") and word[5:].isdigit():
            return Fetch("stack", int(word[5:])), end
        if word.startswith("arg") and word[3:].isdigit():
            n = int(word[3:])
            if self.kind == "uprobe":
                raise self.fail("$argN is not available on uprobes: use registers (%di, %si, %dx, %cx, %r8, %r9)")
            if not self.entry:
                raise self.fail("$argN needs a probe at a function's entry (no +offset)")
            if n < 1:
                raise self.fail("$argN counts from 1")
            return Fetch("arg", n), end
        raise self.fail(f"unknown variable ${word or s[i:]}: expected $stackN, $stack, $retval, $comm or $argN")

    def _deref(self, s: str, i: int, depth: int) -> tuple[Fetch, int]:
        sign = -1 if s[i] == "-" else 1
        i += 1
        user = s.startswith("u", i)
        if user:
            i += 1
        m = _NUMBER.match(s, i)
        if not m:
            raise self.fail("a dereference needs an offset: +|-[u]OFFS(FETCHARG)")
        if not s.startswith("(", m.end()):
            raise self.fail("a dereference needs its base in parentheses: +|-[u]OFFS(FETCHARG)")
        if depth + 1 > MAX_DEREF_DEPTH:
            raise self.fail(f"more than {MAX_DEREF_DEPTH} nested dereferences")
        inner, end = self.fetch(s, m.end() + 1, depth + 1)
        if inner.op in ("comm", "immstr"):
            raise self.fail("cannot dereference $comm or an immediate string")
        if not s.startswith(")", end):
            raise self.fail("unbalanced parentheses in dereference")
        return Fetch("deref", offset=sign * _number(m.group(0)), user=user, inner=inner), end + 1

    def _immediate(self, s: str, i: int) -> tuple[Fetch, int]:
        if s.startswith('"', i):
            close = s.find('"', i + 1)
            if close < 0:
                raise self.fail("immediate string without its closing quote")
            return Fetch("immstr", s[i + 1 : close]), close + 1
        m = re.compile(r"-?(0[xX][0-9a-fA-F]+|[0-9]+)").match(s, i)
        if not m:
            raise self.fail("\\ needs an immediate number or a quoted string")
        text = m.group(0)
        value = -_number(text[1:]) if text.startswith("-") else _number(text)
        return Fetch("imm", value), m.end()

    # -- types ---------------------------------------------------------------

    def type(self, text: str | None, fetch: Fetch) -> ArgType:
        if text is None:
            text = "string" if fetch.op in ("comm", "immstr") else DEFAULT_TYPE
        array = None
        m = _ARRAY.match(text)
        if m:
            text, array = m.group(1), int(m.group(2))
            if not 1 <= array <= MAX_ARRAY_LEN:
                raise self.fail(f"array length {array} out of range 1..{MAX_ARRAY_LEN}")
        elif "[" in text:
            raise self.fail(f"bad array type {text!r}: expected TYPE[N]")
        b = _BITFIELD.match(text)
        if b:
            width, shift, container = (int(x) for x in b.groups())
            if width < 1 or width + shift > container:
                raise self.fail(f"bitfield b{width}@{shift}/{container} does not fit its {container}-bit container")
            if array is not None:
                raise self.fail("arrays of bitfields are not supported")
            t = ArgType("bitfield", None, width, shift, container)
        elif _SCALAR.match(text) or text in ("char", "symbol") or text in STRING_TYPES:
            t = ArgType(text, array)
        else:
            raise self.fail(
                f"bad type {text!r}: expected u8..u64, s8..s64, x8..x64, char, string, ustring, "
                "symbol, symstr, %pd, %pD, b<width>@<offset>/<container> or TYPE[N]"
            )
        if t.base in _KPROBE_ONLY_TYPES and self.kind != "kprobe":
            raise self.fail(f"type {t.base!r} is for kernel probes only")
        if fetch.op in ("comm", "immstr") and t.base not in ("string", "ustring"):
            raise self.fail(f"{fetch.render()} can only be fetched as a string")
        if t.base in ("string", "ustring") and not (fetch.is_memory or fetch.op in ("comm", "immstr")):
            raise self.fail(f"type {t.base!r} needs memory: dereference the pointer, e.g. +0({fetch.render()}):{t.base}")
        if array is not None and not fetch.is_memory:
            raise self.fail(f"an array type needs memory: dereference the pointer, e.g. +0({fetch.render()}):{text}[{array}]")
        return t
