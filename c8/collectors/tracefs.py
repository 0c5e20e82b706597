"""tracefs: locate (and mount) it, read event ids, parse event ``format`` files.

A parsed :class:`EventFormat` describes the raw record of a tracepoint (the
bytes perf delivers as PERF_SAMPLE_RAW): each field's offset, size, signedness
and kind, from which :mod:`c8.collectors.decode` builds numpy views.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from c8.host import tracefs as host_tracefs
from c8.host.files import read_text

CANDIDATES = host_tracefs.CANDIDATES
FORMAT_LIMIT = 1 << 16  # bytes of an event's format file

# field kinds
INT = "int"          # integer of size 1/2/4/8 (pointers too)
ARRAY = "array"      # fixed array of integers: unsigned long args[6]
CHARS = "chars"      # fixed char array: char comm[16] -> S16
DATA_LOC = "data_loc"  # u32: offset (low 16 bits, from record start), length (high 16)
REL_LOC = "rel_loc"  # u32: offset from the end of the field itself, length high 16
BYTES = "bytes"      # anything else of fixed size: opaque bytes

_FIELD_RE = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*(?:signed:(?P<signed>-?\d+);)?")
_ARRAY_RE = re.compile(r"^(?P<type>.*?)\s*(?P<name>\w+)\s*\[(?P<count>[^\]]*)\]$")


class TracefsError(OSError):
    """tracefs is missing, or an event does not exist."""


@dataclass(frozen=True)
class FormatField:
    """One field of a tracepoint's raw record."""

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    kind: str
    count: int = 1  # elements, for ARRAY/CHARS

    @property
    def is_common(self) -> bool:
        return self.name.startswith("common_")

    @property
    def is_string(self) -> bool:
        return self.kind in (DATA_LOC, REL_LOC)

    def raw_dtype(self) -> np.dtype:
        """The numpy type of this field as it lies in the raw record."""
        if self.kind in (DATA_LOC, REL_LOC):
            return np.dtype("<u4")
        if self.kind == INT and self.size in (1, 2, 4, 8):
            return np.dtype(f"<{'i' if self.signed else 'u'}{self.size}")
        if self.kind == CHARS:
            return np.dtype(f"S{self.size}")
        if self.kind == ARRAY:
            elem = self.size // self.count
            return np.dtype((f"<{'i' if self.signed else 'u'}{elem}", (self.count,)))
        return np.dtype((np.uint8, (self.size,)))


@dataclass(frozen=True)
class EventFormat:
    """A tracepoint's id, name and raw record layout."""

    system: str
    name: str
    id: int
    fields: tuple[FormatField, ...]

    @property
    def source(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def payload(self) -> tuple[FormatField, ...]:
        """Fields without the common_* header."""
        return tuple(f for f in self.fields if not f.is_common)

    @property
    def string_fields(self) -> tuple[FormatField, ...]:
        return tuple(f for f in self.fields if f.is_string)

    @property
    def fixed_size(self) -> int:
        """Bytes of the fixed part of the record (dynamic strings follow it)."""
        return max((f.offset + f.size for f in self.fields), default=0)

    def raw_dtype(self) -> np.dtype:
        """A structured dtype viewing the fixed part of the raw record."""
        fs = self.fields
        return np.dtype({"names": [f.name for f in fs],
                         "formats": [f.raw_dtype() for f in fs],
                         "offsets": [f.offset for f in fs],
                         "itemsize": self.fixed_size})


def _field(decl: str, offset: int, size: int, signed: bool) -> FormatField:
    decl = " ".join(decl.split())
    if decl.startswith(("__data_loc ", "__rel_loc ")):
        kind = DATA_LOC if decl.startswith("__data_loc") else REL_LOC
        rest = decl.split(" ", 1)[1]
        name = rest.rsplit(" ", 1)[-1]
        return FormatField(name, rest.rsplit(" ", 1)[0], offset, size, signed, kind)
    m = _ARRAY_RE.match(decl)
    if m:
        ctype, name = m["type"].strip(), m["name"]
        try:
            count = int(m["count"], 0)
        except ValueError:  # symbolic length: infer from the size
            count = 0
        base = ctype.split()[-1] if ctype else ""
        if base == "char" and "*" not in ctype:
            return FormatField(name, ctype, offset, size, signed, CHARS, size)
        if count > 0 and size % count == 0 and size // count in (1, 2, 4, 8):
            return FormatField(name, ctype, offset, size, signed, ARRAY, count)
        return FormatField(name, ctype, offset, size, signed, BYTES)
    name = re.split(r"[\s*]+", decl)[-1]
    ctype = decl[: len(decl) - len(name)].strip()
    kind = INT if size in (1, 2, 4, 8) else BYTES
    return FormatField(name, ctype, offset, size, signed, kind)


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse the text of an ``events/<system>/<name>/format`` file."""
    name = ""
    event_id = -1
    fields: list[FormatField] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("name:"):
            name = s.split(":", 1)[1].strip()
        elif s.startswith("ID:"):
            event_id = int(s.split(":", 1)[1])
        elif s.startswith("field:"):
            m = _FIELD_RE.match(s)
            if not m:
                raise ValueError(f"unparsable format line in {system}:{name}: {s!r}")
            fields.append(_field(m["decl"], int(m["offset"]), int(m["size"]),
                                 (m["signed"] or "0") not in ("0",)))
    if not fields:
        raise ValueError(f"format of {system}:{name} has no fields")
    return EventFormat(system, name, event_id, tuple(fields))


def find_tracefs(mount: bool = True) -> str:
    """The tracefs directory (c8.host.tracefs); mounts it at /sys/kernel/tracing
    if none is found and ``mount``; TracefsError without one."""
    found = host_tracefs.mount_tracefs() if mount else host_tracefs.find_tracefs()
    if found:
        return found
    raise TracefsError(f"tracefs not found at {' or '.join(CANDIDATES)} and could not be mounted")


def event_dir(source: str, root: str | None = None) -> str:
    """Directory of ``group:name`` (or ``group/name``) under tracefs/events."""
    group, _, name = source.replace("/", ":").partition(":")
    if not group or not name:
        raise TracefsError(f"bad tracepoint name {source!r}: want group:name")
    return os.path.join(root or find_tracefs(), "events", group, name)


def event_id(source: str, root: str | None = None) -> int:
    """The perf config id of a tracepoint."""
    path = os.path.join(event_dir(source, root), "id")
    try:
        return int(read_text(path, 64))
    except FileNotFoundError:
        raise TracefsError(f"no such tracepoint {source!r} ({path})") from None


def read_format(source: str, root: str | None = None) -> EventFormat:
    """Read and parse the format of tracepoint ``group:name``."""
    path = os.path.join(event_dir(source, root), "format")
    try:
        text = read_text(path, FORMAT_LIMIT)
    except FileNotFoundError:
        raise TracefsError(f"no such tracepoint {source!r} ({path})") from None
    return parse_format(text, system=source.replace("/", ":").partition(":")[0])
