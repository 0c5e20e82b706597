"""The c8probes group in tracefs: list, create, remove probe events.

Definitions are appended to ``uprobe_events`` / ``kprobe_events`` (never
opened with O_TRUNC, which would drop every probe on the host, ours or not).
Only probes of group ``c8probes`` are ever removed.
"""

from __future__ import annotations

import glob
import os

from c8.host import tracefs as host_tracefs
from c8.probes.definition import GROUP, ProbeError
from c8.probes.kprobe import no_kprobes_message

_FILES = {"uprobe": "uprobe_events", "kprobe": "kprobe_events"}


def find_tracefs(required: bool = True) -> str | None:
    """The mounted tracefs directory (c8.host.tracefs), or None (or ProbeError if ``required``)."""
    found = host_tracefs.find_tracefs()
    if found:
        return found
    if required:
        raise ProbeError(
            "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing) or not readable"
        )
    return None


def parse_line(line: str) -> tuple[str, str, str, str, tuple[str, ...]]:
    """Split a probe definition into (head, group, name, place, args).

    ``head`` is p, r or rN (maxactive); ``place`` the symbol or PATH:OFFSET.
    """
    words = line.split()
    if len(words) < 2 or ":" not in words[0]:
        raise ProbeError(f"bad probe definition {line!r}: expected 'p:GROUP/NAME PLACE [ARGS]'")
    head, _, event = words[0].partition(":")
    group, slash, name = event.partition("/")
    if not slash:
        group, name = "", event
    return head, group, name, words[1], tuple(words[2:])


def kind_of(line: str) -> str:
    """"uprobe" for PATH:OFFSET places (absolute paths), else "kprobe"."""
    return "uprobe" if parse_line(line)[3].startswith("/") else "kprobe"


def _normalized(line: str) -> tuple:
    """A definition as the kernel lists it back (offsets padded, +0 added) compares equal."""
    head, group, name, place, args = parse_line(line)
    if place.startswith("/"):
        path, _, offset = place.rpartition(":")
        offset = offset.split("(", 1)[0]
        try:
            place = (path, int(offset, 16))
        except ValueError:
            pass
    elif place.endswith("+0"):
        place = place[:-2]
    return head[:1], group, name, place, args


def _read_probes(root: str) -> dict[str, tuple[str, str]]:
    """{name: (kind, line)} of the c8probes group, from both probe files."""
    found: dict[str, tuple[str, str]] = {}
    for kind, file in _FILES.items():
        try:
            with open(os.path.join(root, file)) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            if not line.strip():
                continue
            _, group, name, _, _ = parse_line(line)
            if group == GROUP:
                found[name] = (kind, line)
    return found


def list_probes(tracefs: str | None = None) -> dict[str, str]:
    """{name: definition line as the kernel shows it} of every c8probes probe."""
    root = tracefs or find_tracefs()
    return {name: line for name, (_, line) in _read_probes(root).items()}


def probe_names(tracefs: str | None = None) -> list[str]:
    """Names of the c8probes probes that exist now, sorted."""
    return sorted(list_probes(tracefs))


def _error_log_entry(root: str, command: str) -> str | None:
    """The kernel's explanation of the last failed ``command``, from error_log."""
    try:
        with open(os.path.join(root, "error_log")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for i in range(len(lines) - 1, 0, -1):
        text = lines[i].strip()
        if not text.startswith("Command:") or text[len("Command:"):].strip() != command.strip():
            continue
        message = lines[i - 1].split("error:", 1)[-1].strip()
        if i + 1 < len(lines) and "^" in lines[i + 1]:
            start = lines[i].index("Command:") + len("Command:")
            start += len(lines[i][start:]) - len(lines[i][start:].lstrip())
            pos = lines[i + 1].index("^") - start
            if 0 <= pos < len(command):
                message += f" (at {command[pos:].split()[0]!r})"
        return message
    return None


def _write(root: str, file: str, text: str) -> str | None:
    """Append one command to a probe file; the error text, or None on success."""
    try:
        fd = os.open(os.path.join(root, file), os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        return f"cannot open {root}/{file}: {e.strerror} (errno {e.errno})"
    try:
        os.write(fd, (text + "\n").encode())
        return None
    except OSError as e:
        message = f"{e.strerror} (errno {e.errno})"
        detail = _error_log_entry(root, text)
        return f"{message}: {detail}" if detail else message
    finally:
        os.close(fd)


def _disable(root: str, name: str) -> None:
    """Turn off a probe's event wherever ftrace enabled it (top level and instances)."""
    pattern = os.path.join(root, "instances", "*", "events", GROUP, name, "enable")
    for path in [os.path.join(root, "events", GROUP, name, "enable"), *glob.glob(pattern)]:
        try:
            with open(path, "r+") as f:
                if f.read(1) == "1":
                    f.seek(0)
                    f.write("0")
        except OSError:
            pass  # gone already, or not ours to change: removal reports the outcome


def _remove(root: str, name: str, kind: str) -> str | None:
    _disable(root, name)
    return _write(root, _FILES[kind], f"-:{GROUP}/{name}")


def ensure(definitions: dict[str, str], tracefs: str | None = None) -> dict[str, str | None]:
    """Make the c8probes probes exactly ``definitions`` ({name: definition line}).

    Creates missing probes, removes c8probes probes not listed (disabling
    their ftrace events first), replaces one whose definition changed.
    Returns {name: None | error} for every wanted name, plus an entry for
    each unwanted probe that could not be removed (EBUSY while a perf event
    still holds it open: retry after closing it). Errors carry the errno
    and, when present, the kernel's error_log explanation.
    """
    root = tracefs or find_tracefs()
    current = _read_probes(root)
    result: dict[str, str | None] = {}
    for name, (kind, line) in current.items():
        wanted = definitions.get(name)
        if wanted is not None and _same(line, wanted):
            continue
        error = _remove(root, name, kind)
        if error:
            result[name] = f"cannot remove {GROUP}/{name}: {error}"
    for name, line in definitions.items():
        if name in result:
            continue
        if name in current and _same(current[name][1], line):
            result[name] = None
            continue
        result[name] = _create(root, name, line)
    return result


def _same(a: str, b: str) -> bool:
    try:
        return _normalized(a) == _normalized(b)
    except ProbeError:
        return False


def _create(root: str, name: str, line: str) -> str | None:
    try:
        _, group, line_name, _, _ = parse_line(line)
        kind = kind_of(line)
    except ProbeError as e:
        return str(e)
    if group != GROUP or line_name != name:
        return f"definition {line!r} is not {GROUP}/{name}"
    file = _FILES[kind]
    if kind == "kprobe" and not os.path.exists(os.path.join(root, file)):
        return no_kprobes_message(root)
    return _write(root, file, line)


def remove_all(tracefs: str | None = None) -> dict[str, str | None]:
    """Remove every c8probes probe (shutdown, and start-up after a dead sensor).

    Returns {name: None | error} for the probes found; {} without tracefs.
    """
    root = tracefs or find_tracefs(required=False)
    if root is None:
        return {}
    return {name: None for name in _read_probes(root)} | ensure({}, root)
