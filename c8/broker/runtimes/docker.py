"""docker: <data-root>/containers/<id>/config.v2.json, or the API on its socket.

config.v2.json has ``Name`` ("/web"), ``Config.Image`` (what the user asked
for: "busybox", "nginx:1.25") and ``Image`` (the image id, "sha256:<hex>").
The file exists from ``docker create`` on, so it is there before the
container's cgroup. The API (GET /containers/<id>/json) gives the same
fields when the data root is not readable (rootless, remote mounts).
"""

from __future__ import annotations

import json
import os
import socket

from . import Metadata
from .oci import read_json


def _metadata(doc: object) -> Metadata | None:
    if not isinstance(doc, dict):
        return None
    config = doc.get("Config") or {}
    return Metadata("docker", str(doc.get("Name", "")).lstrip("/"), str(doc.get("Image", "")),
                    str(config.get("Image", "")))


def read_docker(roots: list[str], container_id: str) -> Metadata | None:
    """From the first data root holding the container's config.v2.json."""
    for root in roots:
        meta = _metadata(read_json(os.path.join(root, "containers", container_id,
                                                "config.v2.json")))
        if meta is not None:
            return meta
    return None


def api_get(sock_path: str, path: str, timeout: float = 0.5) -> object | None:
    """GET ``path`` from a docker-style HTTP API on a unix socket; parsed JSON
    body on 200, else None. HTTP/1.0 so the daemon closes the connection."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def read_docker_api(sockets: list[str], container_id: str) -> Metadata | None:
    """From the first docker socket that knows the container."""
    for sock_path in sockets:
        if os.path.exists(sock_path):
            meta = _metadata(api_get(sock_path, f"/containers/{container_id}/json"))
            if meta is not None:
                return meta
    return None
