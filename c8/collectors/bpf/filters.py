"""In-kernel filter configuration: the plan's filter map -> the bytes of a config map value.

A family's enter program reads this one-entry ARRAY before saving anything,
so a filtered-out syscall costs no map entry and no ring space. Layout::

    u32 enabled    bit 0: name patterns, bit 1: uid equality, bit 2: flags mask
    u32 uid
    u32 flags_mask pass when (flags & mask) != 0
    u32 n_patterns
    PATTERNS x {u32 len, u32 kind, u8 bytes[PATTERN_MAX]}

A name passes when any pattern matches (OR). A prefix pattern compares its
``len`` bytes; an exact pattern also compares the terminating NUL
(``len = strlen + 1``), so one comparison loop serves both. Whatever cannot
be expressed is widened, never narrowed (pushdown only removes events nobody
wants): a long pattern is cut to a prefix, and more patterns than fit
disable name filtering.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PATTERNS = 8
PATTERN_MAX = 128
PATTERN_STRIDE = 8 + PATTERN_MAX
PATTERNS_OFF = 16
CONFIG_SIZE = PATTERNS_OFF + PATTERNS * PATTERN_STRIDE

EN_NAMES = 1
EN_UID = 2
EN_FLAGS = 4

KIND_PREFIX = 0
KIND_EXACT = 1

OFF_ENABLED, OFF_UID, OFF_FLAGS_MASK, OFF_N = 0, 4, 8, 12

KNOWN_KEYS = frozenset({"prefixes", "exact", "uid", "ignore_tgids", "flags_mask"})


@dataclass
class Filter:
    """A family's filter as the manager keeps it."""

    config: bytes
    ignore_tgids: set[int] = field(default_factory=set)
    widened: list[str] = field(default_factory=list)  # what could not be pushed down exactly


def _patterns(prefixes: list, exact: list, widened: list[str]) -> list[tuple[int, int, bytes]]:
    out = []
    for p in prefixes:
        b = p.encode() if isinstance(p, str) else bytes(p)
        if len(b) > PATTERN_MAX:
            widened.append(f"prefix {p!r} cut to {PATTERN_MAX} bytes")
            b = b[:PATTERN_MAX]
        if not b:  # the empty prefix matches everything
            return []
        out.append((len(b), KIND_PREFIX, b))
    for e in exact:
        b = e.encode() if isinstance(e, str) else bytes(e)
        if len(b) + 1 > PATTERN_MAX:
            widened.append(f"exact name {e!r} compared as a {PATTERN_MAX}-byte prefix")
            out.append((PATTERN_MAX, KIND_PREFIX, b[:PATTERN_MAX]))
        else:
            out.append((len(b) + 1, KIND_EXACT, b + b"\0"))
    return out


def encode(spec: dict | None) -> Filter:
    """Build the config bytes and the ignored tgids from a plan filter map.

    Keys: ``prefixes``, ``exact`` (lists of names), ``uid`` (int or None),
    ``flags_mask`` (int or None), ``ignore_tgids`` (list of ints).
    """
    spec = dict(spec or {})
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown bpf filter keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    widened: list[str] = []
    enabled = 0
    pats = _patterns(list(spec.get("prefixes") or []), list(spec.get("exact") or []), widened)
    if len(pats) > PATTERNS:
        widened.append(f"{len(pats)} name patterns exceed {PATTERNS}: names not filtered in the kernel")
        pats = []
    if pats:
        enabled |= EN_NAMES
    uid = spec.get("uid")
    if uid is not None:
        enabled |= EN_UID
    mask = spec.get("flags_mask")
    if mask:
        enabled |= EN_FLAGS
    buf = bytearray(CONFIG_SIZE)
    struct.pack_into("<IIII", buf, 0, enabled, int(uid or 0) & 0xFFFFFFFF,
                     int(mask or 0) & 0xFFFFFFFF, len(pats))
    for i, (n, kind, b) in enumerate(pats):
        off = PATTERNS_OFF + i * PATTERN_STRIDE
        struct.pack_into("<II", buf, off, n, kind)
        buf[off + 8: off + 8 + len(b)] = b
    tgids = {int(t) for t in spec.get("ignore_tgids") or []}
    return Filter(bytes(buf), tgids, widened)


def matches(config: bytes, name: bytes, uid: int = 0, flags: int = 0) -> bool:
    """What the kernel program decides for one record (reference for tests)."""
    enabled, cuid, mask, _n = struct.unpack_from("<IIII", config, 0)
    if enabled & EN_UID and uid != cuid:
        return False
    if enabled & EN_FLAGS and not flags & mask:
        return False
    if not enabled & EN_NAMES:
        return True
    padded = name + b"\0" * PATTERN_MAX
    for i in range(PATTERNS):
        off = PATTERNS_OFF + i * PATTERN_STRIDE
        n, _kind = struct.unpack_from("<II", config, off)
        if n and padded[:n] == config[off + 8: off + 8 + n]:
            return True
    return False
