"""docker: <data-root>/containers/<id>/config.v2.json, or the API on its socket.

config.v2.json has ``Name`` ("/web"), ``Config.Image`` (what the user asked
for: "busybox", "nginx:1.25") and ``Image`` (the image id, "sha256:<hex>").
The file exists from ``docker create`` on, so it is there before the
container's cgroup. The API (GET /containers/<id>/json) gives the same
fields when the data root is not readable (rootless, remote mounts); it is
asked through c8.host.unixhttp (one total deadline, a body cap).
"""

from __future__ import annotations

from c8.host import typed, unixhttp
from c8.host.files import read_json_beneath

from . import Metadata

CONFIG_LIMIT = 4 << 20


def _metadata(doc: object) -> Metadata | None:
    if not isinstance(doc, dict):
        return None
    return Metadata("docker", typed.text(doc, "Name").lstrip("/"), typed.text(doc, "Image"),
                    typed.text(doc, "Config", "Image"))


def read_docker(roots: list[str], container_id: str) -> Metadata | None:
    """From the first data root holding the container's config.v2.json."""
    for root in roots:
        meta = _metadata(read_json_beneath(root, f"containers/{container_id}/config.v2.json",
                                           CONFIG_LIMIT))
        if meta is not None:
            return meta
    return None


def api_get(sock_path: str, path: str, timeout: float = unixhttp.DEADLINE) -> object | None:
    """GET ``path`` from a docker-style HTTP API on a unix socket; parsed JSON
    body on 200, else None. ``timeout`` bounds the whole request."""
    return unixhttp.get_json(sock_path, path, deadline=timeout)


def read_docker_api(sockets: list[str], container_id: str) -> Metadata | None:
    """From the first docker socket that knows the container."""
    for sock_path in sockets:
        meta = _metadata(api_get(sock_path, f"/containers/{container_id}/json"))
        if meta is not None:
            return meta
    return None
