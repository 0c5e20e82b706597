"""Find non-default metadata roots from running daemons' command lines.

dockerd ``--data-root``/``-g``/``--graph``, ``--exec-root`` and ``-H unix://``;
containerd ``--state``; podman/cri-o ``--root``/``--runroot``; conmon ``-b
<store>/<driver>-containers/<id>/userdata`` (podman's monitor: outlives the
podman command) and its ``--exit-command-arg --root X``; runc/crun ``--root``
and the same ``--bundle`` form.
"""

from __future__ import annotations

import os

from . import Roots


def _options(argv: list[str]) -> dict[str, list[str]]:
    """``--opt value`` / ``--opt=value`` / ``-o value`` pairs, every value kept."""
    found: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(argv):
            key, value = arg, argv[i + 1]
        else:
            continue
        found.setdefault(key, []).append(value)
    return found


def roots_from_cmdline(argv: list[str], roots: Roots) -> None:
    """Add to ``roots`` what one process's argv reveals."""
    if not argv:
        return
    prog = os.path.basename(argv[0])
    opts = _options(argv[1:])

    def each(*keys: str) -> list[str]:
        return [v for k in keys for v in opts.get(k, [])]

    if prog == "dockerd":
        for root in each("--data-root", "-g", "--graph"):
            roots.add("docker", root)
        for root in each("--exec-root"):
            roots.add("runc", os.path.join(root, "runtime-runc", "moby"))
        for host in each("-H", "--host"):
            if host.startswith("unix://"):
                roots.add("docker_sockets", host[len("unix://"):])
    elif prog == "containerd":
        for state in each("--state"):
            roots.add("containerd", state)
    elif prog in ("podman", "crio"):
        for root in each("--root", "--runroot"):
            roots.add("storage", root)
    elif prog == "conmon":
        for bundle in each("-b", "--bundle"):
            _storage_from_bundle(bundle, roots)
        args = each("--exit-command-arg")
        for i, arg in enumerate(args[:-1]):
            if arg in ("--root", "--runroot"):
                roots.add("storage", args[i + 1])
    elif prog in ("runc", "crun"):
        for root in each("--root"):
            roots.add(prog, root)
        for bundle in each("-b", "--bundle"):  # podman's and cri-o's runc, via conmon
            _storage_from_bundle(bundle, roots)


def _storage_from_bundle(bundle: str, roots: Roots) -> None:
    """<store>/<driver>-containers/<id>/userdata -> <store> (containers/storage)."""
    parts = bundle.rstrip("/").split("/")
    if len(parts) > 3 and parts[-1] == "userdata" and parts[-3].endswith("-containers"):
        roots.add("storage", "/".join(parts[:-3]))


def discover(roots: Roots, proc: str = "/proc") -> Roots:
    """Add the roots of every running daemon to ``roots`` (in place) and return it."""
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return roots
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:  # gone, or a kernel thread we may not read
            continue
        if raw:
            roots_from_cmdline([a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")],
                               roots)
    return roots
