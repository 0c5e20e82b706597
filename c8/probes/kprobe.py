"""Kernel function probes (kprobes): availability, symbol resolution, definitions.

Kernels without CONFIG_KPROBES (like the development VM) have no
``<tracefs>/kprobe_events``; every entry point here then raises
KprobesUnavailable with a message a subscriber can act on.
"""

from __future__ import annotations

import os
import re

from c8.probes.definition import GROUP, KprobesUnavailable, ProbeDefinition, ProbeError, probe_name
from c8.probes.fetchargs import parse_fetchargs, render_fetchargs

_SYMBOL = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?:\+(0[xX][0-9a-fA-F]+|[0-9]+))?\Z")
# Syscall entry points: sys_connect / SyS_connect (Capsule8's and pre-4.17 names)
# became __x64_sys_connect with the pt_regs wrappers; __se_/__do_ hold the body.
_SYSCALL = re.compile(r"(?:sys_|SyS_|__x64_sys_|__se_sys_|__do_sys_|__ia32_sys_)(\w+)\Z")
_TEXT_TYPES = frozenset("tT")
# A static function of kernel/trace/trace_kprobe.c, present iff kprobe events are built in.
_KPROBE_EVENTS_MARKER = "trace_kprobe_create"


def no_kprobes_message(tracefs: str) -> str:
    return (
        "kernel function probes need kprobes (CONFIG_KPROBES); "
        f"this kernel has no {tracefs}/kprobe_events"
    )


def kprobes_available(tracefs: str | None = None, kallsyms: str = "/proc/kallsyms") -> bool:
    """True if the kernel supports kprobe events.

    Looks for ``<tracefs>/kprobe_events``; when tracefs is not readable (the
    broker runs unprivileged and tracefs is 0700), falls back to kallsyms,
    which lists symbol names to everyone.
    """
    from c8.probes.tracefs import find_tracefs

    root = tracefs or find_tracefs(required=False)
    if root:
        try:
            os.stat(os.path.join(root, "kprobe_events"))
            return True
        except FileNotFoundError:
            if os.access(root, os.R_OK | os.X_OK):
                return False
        except PermissionError:
            pass
    try:
        with open(kallsyms) as f:
            return any(line.split()[2:3] == [_KPROBE_EVENTS_MARKER] for line in f)
    except OSError:
        return False


def syscall_candidates(symbol: str) -> list[str]:
    """The names to try for ``symbol``: itself, then the syscall wrappers' names."""
    names = [symbol]
    m = _SYSCALL.match(symbol)
    if m:
        base = m.group(1)
        for name in (f"__x64_sys_{base}", f"__se_sys_{base}", f"__do_sys_{base}", f"sys_{base}"):
            if name not in names:
                names.append(name)
    return names


def resolve_kernel_symbol(symbol: str, kallsyms: str = "/proc/kallsyms") -> str:
    """The kallsyms text symbol (t/T) to probe for ``symbol``.

    ``sys_connect`` or ``SyS_connect`` resolve to ``__x64_sys_connect`` (or
    ``__se_sys_connect`` / ``__do_sys_connect``) on kernels that renamed them.
    Raises ProbeError listing every name tried.
    """
    candidates = syscall_candidates(symbol)
    wanted = set(candidates)
    found: set[str] = set()
    try:
        with open(kallsyms) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted and parts[1] in _TEXT_TYPES:
                    found.add(parts[2])
    except OSError as e:
        raise ProbeError(f"cannot read {kallsyms} to resolve {symbol!r}: {e.strerror}") from e
    for name in candidates:
        if name in found:
            return name
    raise ProbeError(
        f"kernel function {symbol!r} not found in {kallsyms} as a text symbol "
        f"(tried: {', '.join(candidates)})"
    )


def kernel_probe(
    symbol: str,
    fetchargs: str,
    is_return: bool,
    name: str | None = None,
    *,
    maxactive: int = 0,
    tracefs: str | None = None,
    kallsyms: str = "/proc/kallsyms",
) -> ProbeDefinition:
    """Validate a kernel-call probe and build its kprobe_events line.

    ``symbol`` may carry an offset (``tcp_connect+4``; then $argN is refused).
    ``name`` defaults to ``probe_name(("kprobe", "", symbol, args, is_return))``.
    ``maxactive`` (return probes) sets how many concurrent calls are tracked.
    Raises KprobesUnavailable on kernels without kprobes, ProbeError otherwise.
    """
    from c8.probes.tracefs import find_tracefs

    root = tracefs or find_tracefs(required=False) or "/sys/kernel/tracing"
    if not kprobes_available(root, kallsyms):
        raise KprobesUnavailable(no_kprobes_message(root))
    m = _SYMBOL.match(symbol or "")
    if not m:
        raise ProbeError(f"bad kernel symbol {symbol!r}: expected SYMBOL or SYMBOL+OFFSET")
    base, offset_text = m.group(1), m.group(2)
    offset = int(offset_text, 0) if offset_text else 0
    if maxactive < 0 or (maxactive and not is_return):
        raise ProbeError("maxactive applies to return probes only and must be positive")
    args = parse_fetchargs(fetchargs, "kprobe", is_return, function_entry=offset == 0)
    resolved = resolve_kernel_symbol(base, kallsyms)
    place = resolved + (f"+{offset}" if offset else "")
    rendered = render_fetchargs(args)
    name = name or probe_name(("kprobe", "", place, rendered, bool(is_return)))
    head = (f"r{maxactive}" if maxactive else "r") if is_return else "p"
    line = f"{head}:{GROUP}/{name} {place}" + (f" {rendered}" if rendered else "")
    return ProbeDefinition("kprobe", name, line, place, None, args, bool(is_return))
