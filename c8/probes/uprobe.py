"""User function probes (uprobes): definitions from executable + symbol."""

from __future__ import annotations

from c8.probes.definition import GROUP, ProbeDefinition, probe_name
from c8.probes.elf import resolve_executable, symbol_file_offset
from c8.probes.fetchargs import parse_fetchargs, render_fetchargs


def user_probe(
    executable: str, symbol: str, fetchargs: str, is_return: bool, name: str | None = None
) -> ProbeDefinition:
    """Validate a user-call probe and build its uprobe_events line.

    ``executable`` is a path or a bare library/program name (``libc.so.6``);
    ``symbol`` a function in its .symtab or .dynsym, optionally versioned
    (``connect@@GLIBC_2.2.5``). The line reads
    ``p:c8probes/NAME /real/path:0xFILEOFFSET args`` (``r:`` for returns).
    ``name`` defaults to ``probe_name(("uprobe", path, symbol, args, is_return))``.
    Raises ProbeError naming the file, symbol or argument at fault.
    """
    args = parse_fetchargs(fetchargs, "uprobe", is_return)
    path = resolve_executable(executable)
    offset = symbol_file_offset(path, symbol)
    rendered = render_fetchargs(args)
    name = name or probe_name(("uprobe", path, symbol, rendered, bool(is_return)))
    line = f"{'r' if is_return else 'p'}:{GROUP}/{name} {path}:0x{offset:x}" + (
        f" {rendered}" if rendered else ""
    )
    return ProbeDefinition("uprobe", name, line, symbol, path, args, bool(is_return))
