"""Find non-default metadata roots from running daemons' command lines.

dockerd ``--data-root``/``-g``/``--graph``, ``--exec-root`` and ``-H unix://``;
containerd ``--state``; podman/cri-o ``--root``/``--runroot``; conmon ``-b
<store>/<driver>-containers/<id>/userdata`` (podman's monitor: outlives the
podman command) and its ``--exit-command-arg --root X``; runc/crun ``--root``
and the same ``--bundle`` form.

A root is where the broker reads state that decides a container's name and
image, so only root's own daemons may name one: a process counts when it
runs as root (every uid 0) from a root-owned executable no one else may
write (``c8.host.proc.advertiser``). A user's process named ``runc``
advertising ``--root /tmp/x`` is ignored and counted; its command line is
never read (a user's process can make that read wait, see c8.host.proc).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from c8.host import proc as hostproc

from . import Roots

DAEMONS = frozenset({"dockerd", "containerd", "podman", "crio", "conmon", "runc", "crun"})


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


def discover(roots: Roots, proc: str = "/proc",
             trusted: Callable[[int, str], hostproc.Advertiser] = hostproc.advertiser) -> int:
    """Add to ``roots`` (in place) the roots of every running daemon of root's.

    ``trusted(pid, proc)`` gives the process's argv and whether it may name roots.
    Returns how many runtime processes were ignored as untrusted."""
    ignored = 0
    for pid in hostproc.pids(proc):
        # A user's process can hold its command line's lock for as long as it likes
        # (see c8.host.proc): only root's own are read. Of the others, status and
        # stat (no such lock) tell whether they look like a runtime, to count them.
        if not hostproc.root_credentials(hostproc.credentials(pid, proc)):
            st = hostproc.stat(pid, proc)
            ignored += st is not None and st.comm in DAEMONS
            continue
        argv = hostproc.argv(pid, proc, limit=4096)
        if not argv or os.path.basename(argv[0]) not in DAEMONS:
            continue
        argv, _, ok = trusted(pid, proc)  # read again, through one fd of that very process
        if not ok:
            ignored += 1
            continue
        roots_from_cmdline(argv, roots)
    return ignored
