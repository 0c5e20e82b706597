"""GET on an HTTP API over a unix socket (docker's), bounded in time and size.

One total deadline covers connect, send and every read (a daemon that
accepts and then trickles one byte a second still ends it), the response is
capped, and only a ``200`` with a JSON body counts. HTTP/1.0, so the daemon
closes the connection after the body.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from .files import parse_json

DEADLINE = 0.5          # seconds for the whole request
MAX_RESPONSE = 1 << 20  # bytes, headers and body


class RequestFailed(OSError):
    """The request did not give a 200 with a body within the bounds."""


def get(sock_path: str, path: str, *, deadline: float = DEADLINE,
        max_bytes: int = MAX_RESPONSE) -> bytes:
    """The body of ``GET path`` on the unix socket ``sock_path``.

    Raises OSError (RequestFailed for a non-200 status, a response over
    ``max_bytes``, or one not complete within ``deadline`` seconds).
    """
    st = os.stat(sock_path)
    if not stat.S_ISSOCK(st.st_mode):
        raise RequestFailed(f"{sock_path} is not a socket")
    end = time.monotonic() + deadline

    def remaining() -> float:
        left = end - time.monotonic()
        if left <= 0:
            raise RequestFailed(f"GET {path} on {sock_path}: no complete answer in {deadline}s")
        return left

    chunks: list[bytes] = []
    total = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(remaining())
        s.connect(sock_path)
        s.settimeout(remaining())
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        while True:
            s.settimeout(remaining())
            chunk = s.recv(min(65536, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise RequestFailed(f"GET {path} on {sock_path}: answer over {max_bytes} bytes")
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise RequestFailed(f"GET {path} on {sock_path}: status {status[1:2]}")
    return body


def get_json(sock_path: str, path: str, *, deadline: float = DEADLINE,
             max_bytes: int = MAX_RESPONSE) -> object | None:
    """Parsed JSON body of ``GET path``, or None on any failure."""
    try:
        return parse_json(get(sock_path, path, deadline=deadline, max_bytes=max_bytes))
    except OSError:  # socket.timeout is an OSError too
        return None
