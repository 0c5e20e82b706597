"""What a probe is once validated: its tracefs definition line and parts.

Probe names are derived from what the probe does, so two subscriptions that
ask for the same probe share one kernel probe (the broker reference-counts).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

GROUP = "c8probes"
# tracefs event names: a C identifier of at most MAX_EVENT_NAME_LEN (64) bytes.
_MAX_EVENT_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


class ProbeError(ValueError):
    """A probe request that cannot be honoured; the message says why and names the part."""


class KprobesUnavailable(ProbeError):
    """The kernel has no kprobe_events (CONFIG_KPROBES or CONFIG_KPROBE_EVENTS off)."""


@dataclass(frozen=True)
class ProbeDefinition:
    """A validated probe: ``line`` is what is written to kprobe_events/uprobe_events.

    ``args`` are the parsed fetch arguments (``c8.probes.fetchargs.FetchArg``),
    in the order the tracefs format file lists them.
    """

    kind: Literal["kprobe", "uprobe"]
    name: str
    line: str
    symbol: str
    executable: str | None
    args: tuple
    is_return: bool = False

    @property
    def source(self) -> str:
        """The source name used in plans and batches: ``c8probes:NAME``."""
        return f"{GROUP}:{self.name}"

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)


def probe_name(definition_parts) -> str:
    """A deterministic, tracefs-safe event name for a probe.

    ``definition_parts`` is a sequence such as ``(kind, target, symbol,
    fetchargs, is_return)``; equal parts give the same name. The name reads
    ``<k|u><p|r>_<symbol>_<hash>`` so ``ls events/c8probes`` stays legible.
    """
    parts = tuple(definition_parts)
    digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:12]
    kind = str(parts[0]) if parts else ""
    is_return = bool(parts[4]) if len(parts) > 4 else False
    prefix = ("k" if kind.startswith("k") else "u") + ("r" if is_return else "p")
    symbol = _UNSAFE.sub("_", str(parts[2]) if len(parts) > 2 else "").strip("_")
    room = _MAX_EVENT_NAME - len(prefix) - len(digest) - 2
    return f"{prefix}_{symbol[:room]}_{digest}" if symbol else f"{prefix}_{digest}"
