"""Container runtime metadata: where each runtime keeps it, and how to read it.

cgroup path -> (runtime, id) is ``c8.broker.containers``; this package turns an
id into a name and an image, reading the files each runtime leaves on disk
(or docker's API on its unix socket) through ``c8.host`` (regular files
only, no symlink followed below a root, size caps, typed JSON, a deadline on
the socket). Readers never raise on missing, malformed or hostile data: they
return None, and the table retries later.

Roots are trusted paths: the defaults, the configuration, and what a daemon
running as root from a root-owned executable advertises on its command line
(``discovery``); at most ``MAX_ROOTS`` of each kind.

    roots (defaults + running daemons' command lines) -> readers -> Metadata
                                                 (+ Kubernetes identity: ``k8s``)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .k8s import K8s


@dataclass(frozen=True)
class Metadata:
    """What a runtime knows about one container. ``runtime`` may refine the
    cgroup's guess (a kubepods path names no runtime; /<id> may be runc or crun).
    ``k8s``: the pod it runs in, when a CRI runtime's annotations say (``runtimes.k8s``)."""

    runtime: str
    name: str = ""
    image_id: str = ""
    image_name: str = ""
    k8s: K8s | None = None


MAX_ROOTS = 16  # per kind: a flood of advertised roots cannot grow every lookup
ROOT_KINDS = ("docker", "docker_sockets", "storage", "runc", "crun", "containerd")


def _default(*paths: str):
    return field(default_factory=lambda: list(paths))


@dataclass
class Roots:
    """Where to look for runtime metadata. Every list is searched in order;
    :func:`c8.broker.runtimes.discovery.discover` adds the roots that running
    daemons were started with."""

    docker: list[str] = _default("/var/lib/docker")
    """docker data roots (``--data-root``): containers/<id>/config.v2.json"""
    docker_sockets: list[str] = _default("/var/run/docker.sock")
    """docker API sockets (``-H unix://...``): GET /containers/<id>/json"""
    storage: list[str] = _default("/var/lib/containers/storage", "/run/containers/storage")
    """containers/storage graph roots and run roots (podman, cri-o)"""
    runc: list[str] = _default("/run/runc", "/run/docker/runtime-runc/moby")
    """runc state roots (``runc --root``): <root>/<id>/state.json"""
    crun: list[str] = _default("/run/crun")
    """crun state roots: <root>/<id>/status"""
    containerd: list[str] = _default("/run/containerd")
    """containerd state dirs: io.containerd.runtime.v2.task/<ns>/<id>/config.json"""

    refused: int = 0
    """roots not added: relative, or beyond MAX_ROOTS of their kind"""

    def add(self, kind: str, path: str) -> bool:
        """Add ``path`` to the ``kind`` list unless present; True if added.
        Relative paths and roots beyond MAX_ROOTS of a kind are refused (counted)."""
        paths: list[str] = getattr(self, kind)
        path = path.rstrip("/") or "/"
        if path in paths:
            return False
        if not path.startswith("/") or "\0" in path or len(paths) >= MAX_ROOTS:
            self.refused += 1
            return False
        paths.append(path)
        return True
