"""Raw sockaddr bytes (as the eBPF programs copy them) -> family, address text, port.

Vectorised over a batch: numeric columns with numpy; address text per *unique*
address (np.unique), since a batch holds few distinct peers.
"""

from __future__ import annotations

import ipaddress
import socket

import numpy as np


def decode(addr: np.ndarray, addrlen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(family u2, address S108, port host order u2, port as stored u2) per record.

    ``addr`` is a (n, k) uint8 array or an ``S<k>``/``V<k>`` column of raw sockaddrs.
    """
    n = len(addr)
    raw = np.ascontiguousarray(addr).view(np.uint8).reshape(n, -1) if n else np.zeros((0, 112), np.uint8)
    width = raw.shape[1]
    if width < 28:
        raw = np.pad(raw, ((0, 0), (0, 28 - width)))
    valid = np.asarray(addrlen) >= 2
    family = np.where(valid, raw[:, 0].astype(np.uint16) | (raw[:, 1].astype(np.uint16) << 8), 0).astype(np.uint16)
    inet = (family == socket.AF_INET) | (family == socket.AF_INET6)
    port_be = raw[:, 2].astype(np.uint16) << 8 | raw[:, 3].astype(np.uint16)
    port = np.where(inet, port_be, 0).astype(np.uint16)
    port_raw = np.where(inet, raw[:, 2].astype(np.uint16) | (raw[:, 3].astype(np.uint16) << 8), 0).astype(np.uint16)

    text = np.zeros(n, "S108")
    if n:
        # Key each record by family + the bytes that hold its address.
        key = np.zeros((n, 111), np.uint8)  # family, address bytes, unnamed-unix flag
        key[:, :2] = raw[:, :2]
        v4 = family == socket.AF_INET
        v6 = family == socket.AF_INET6
        ux = family == socket.AF_UNIX
        key[v4, 2:6] = raw[v4, 4:8]
        key[v6, 2:18] = raw[v6, 8:24]
        if ux.any():
            upath = np.zeros((n, 108), np.uint8)
            upath[:, : min(108, width - 2)] = raw[:, 2:min(110, width)]
            # only the addrlen-2 bytes of a unix path are meaningful
            lim = np.clip(np.asarray(addrlen).astype(np.int64) - 2, 0, 108)
            upath[np.arange(108)[None, :] >= lim[:, None]] = 0
            key[ux, 2:110] = upath[ux]
            key[ux, 110] = lim[ux] == 0  # an unnamed socket (addrlen 2) has no path at all
        keys = key.view(f"V{key.shape[1]}").ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        texts = np.array([_text(bytes(u)) for u in uniq], dtype="S108")
        text = texts[inverse.ravel()]
    return family, text, port, port_raw


def _text(key: bytes) -> bytes:
    family = int.from_bytes(key[:2], "little")
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(key[2:6])).encode()
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(key[2:18])).encode()
    if family == socket.AF_UNIX:
        if key[110]:
            return b""
        path = key[2:110]
        if path[:1] == b"\0":  # abstract socket: shown with a leading @
            return b"@" + path[1:].rstrip(b"\0")
        return path.split(b"\0", 1)[0]
    return b""
