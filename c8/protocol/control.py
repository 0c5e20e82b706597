"""Control requests and replies: msgpack maps on the broker's ROUTER socket.

Request: ``{"id": any, "command": str, "properties": {...}}``.
Reply:   ``{"id": same, "status": "ok", ...}`` or
         ``{"id": same, "status": "error", "code": int, "reason": str}``.

Commands: subscribe (properties: the subscription spec; the reply carries
``subscription``, and batches then follow on the same connection), unsubscribe
(``subscription``), list, status, probes, heartbeat.
"""

from __future__ import annotations

from typing import Any

import msgpack

from c8.protocol import errors

COMMANDS = ("subscribe", "unsubscribe", "list", "status", "probes", "heartbeat")
MAX_REQUEST_BYTES = 1 << 20


def request(command: str, properties: dict | None = None, req_id: Any = None) -> bytes:
    return msgpack.packb({"id": req_id, "command": command, "properties": properties or {}})


def parse_request(raw: bytes) -> dict:
    """Decode and validate a request; raises ProtocolError naming what is wrong."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise errors.ProtocolError(errors.BAD_MESSAGE, f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types on garbage
        raise errors.ProtocolError(errors.BAD_MESSAGE, f"request is not msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise errors.ProtocolError(errors.BAD_MESSAGE, f"request must be a map, got {type(msg).__name__}")
    command = msg.get("command")
    if not isinstance(command, str):
        raise errors.ProtocolError(errors.BAD_MESSAGE, "request has no 'command' string")
    if command not in COMMANDS:
        raise errors.ProtocolError(errors.UNKNOWN_COMMAND, f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    props = msg.get("properties", {})
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise errors.ProtocolError(errors.BAD_MESSAGE, "'properties' must be a map")
    return {"id": msg.get("id"), "command": command, "properties": props}


def ok(req_id: Any = None, **fields: Any) -> bytes:
    return msgpack.packb({"id": req_id, "status": "ok", **fields}, default=str)


def error(req_id: Any, code: int, reason: str) -> bytes:
    return msgpack.packb({"id": req_id, "status": "error", "code": code,
                          "error": errors.NAMES.get(code, "ERROR"), "reason": reason}, default=str)


def parse_reply(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)
