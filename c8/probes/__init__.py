"""Kernel and user function-call probes, shared by broker, collector cpu0 and supervisor.

subscription (symbol, fetchargs) -> kernel_probe / user_probe -> ProbeDefinition
(line for kprobe_events/uprobe_events) -> tracefs.ensure creates it in group
``c8probes`` -> collectors open ``events/c8probes/NAME`` like any tracepoint.
The broker validates at subscribe time; collector cpu0 calls ``ensure``; the
supervisor calls ``remove_all`` at start-up and shutdown.
"""

from c8.probes.definition import (
    GROUP,
    KprobesUnavailable,
    ProbeDefinition,
    ProbeError,
    probe_name,
)
from c8.probes.fetchargs import (
    ArgType,
    Fetch,
    FetchArg,
    FetchArgError,
    parse_fetchargs,
    render_fetchargs,
)
from c8.probes.kprobe import kernel_probe, kprobes_available, resolve_kernel_symbol
from c8.probes.tracefs import ensure, find_tracefs, list_probes, probe_names, remove_all
from c8.probes.uprobe import user_probe

__all__ = [
    "GROUP", "ArgType", "Fetch", "FetchArg", "FetchArgError", "KprobesUnavailable",
    "ProbeDefinition", "ProbeError", "ensure", "find_tracefs", "kernel_probe",
    "kprobes_available", "list_probes", "parse_fetchargs", "probe_name", "probe_names",
    "remove_all", "render_fetchargs", "resolve_kernel_symbol", "user_probe",
]
