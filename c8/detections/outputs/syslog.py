r"""Alerts as RFC 5424 syslog messages over UDP, TCP or a unix socket.

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [c8@32473 rule=".." ..] MSG

PRI is facility * 8 + severity, the severity being the rule's priority
(emergency 0 .. debug 7). UDP sends one message per datagram; TCP uses
octet-counting framing (RFC 6587: "LEN SP MSG"); a unix socket is tried as a
datagram socket first (as /dev/log is), then as a stream with octet counting.

Monitored processes choose argv and file names, so every text from an event is
escaped (``escape``): backslash, newline, CR, tab, ESC and every other C0
control, DEL, C1 controls, Unicode line/paragraph separators and bidi
overrides become backslash escapes (``\\``, ``\n``, ``\r``, ``\t``, ``\x1b``,
``\u2028``), and bytes that are not UTF-8 (raw bytes, or surrogate-escaped
text) become ``\xNN``. A message is thus always one line, whatever its
framing, and a receiver or terminal showing it runs no escape sequence.
Structured-data values are escaped first, then get RFC 5424's own escapes
(``\"``, ``\\``, ``\]``).

Delivery runs on the output's own thread behind a bounded queue
(``QueuedOutput``), each message within ``timeout``: a stalled receiver
(a TCP peer that never reads, a full /dev/log) drops and counts alerts of this
output only, and never holds the detector.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import socket
import time

from c8.detections.outputs.queued import QueuedOutput

log = logging.getLogger("c8.detections.outputs.syslog")

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}
SEVERITIES = {
    "emergency": 0, "alert": 1, "critical": 2, "error": 3, "warning": 4,
    "notice": 5, "informational": 6, "debug": 7,
}
ENTERPRISE_ID = 32473  # the IANA number reserved for documentation and examples
NILVALUE = "-"


def facility_code(value) -> int:
    """A facility from its name ("local0") or number (0..23)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 23:
        return value
    if isinstance(value, str) and value.lower() in FACILITIES:
        return FACILITIES[value.lower()]
    raise ValueError(f"unknown syslog facility {value!r}; use one of {', '.join(FACILITIES)} or 0..23")


# backslash, C0, DEL, C1, line/paragraph separators, bidi controls, lone surrogates
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(value) -> str:
    """One line of safe text: control characters and non-UTF-8 bytes as backslash escapes."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "surrogateescape")
    return _UNSAFE.sub(_escape_one, str(value))


def _sd_escape(value) -> str:
    # RFC 5424 section 6.3.3 escapes on top of ours, so ours survive its unescaping
    return escape(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _token(value, limit: int) -> str:
    """A header field: printable ASCII without spaces, or the nil value."""
    text = "".join(c for c in str(value or "") if 33 <= ord(c) <= 126)[:limit]
    return text or NILVALUE


def format_message(facility: int, severity: int, msg: str, *, app_name: str = "c8",
                   hostname: str | None = None, procid: str | int | None = None,
                   msgid: str = "alert", sd: dict | None = None,
                   timestamp: datetime.datetime | None = None) -> str:
    """One RFC 5424 message (without transport framing)."""
    ts = (timestamp or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    ts_text = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if sd:
        params = " ".join(f'{k}="{_sd_escape(v)}"' for k, v in sd.items() if v not in (None, ""))
        sd_text = f"[c8@{ENTERPRISE_ID} {params}]" if params else NILVALUE
    else:
        sd_text = NILVALUE
    return (f"<{facility * 8 + severity}>1 {ts_text} {_token(hostname or socket.gethostname(), 255)} "
            f"{_token(app_name, 48)} {_token(procid if procid is not None else os.getpid(), 128)} "
            f"{_token(msgid, 32)} {sd_text} {escape(msg)}")


def parse_address(address: str, protocol: str) -> tuple[str, int] | str:
    """("host", port) for udp/tcp ("127.0.0.1:514", "[::1]:514", "host"), a path for unix."""
    if protocol == "unix":
        return address
    host, port = address, 514
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif address.count(":") == 1:
        host, p = address.split(":")
        port = int(p)
    if not 0 < port < 65536:
        raise ValueError(f"syslog address {address!r}: bad port")
    return host, port


class SyslogOutput(QueuedOutput):
    """Sends alerts to a syslog receiver (protocol: udp, tcp or unix) from its own thread.

    ``timeout`` bounds each message (connect and send together); ``queue_size``
    bounds the alerts waiting for the receiver (beyond it they are dropped and
    counted).
    """

    type = "syslog"

    def __init__(self, address: str | None = None, protocol: str = "udp", facility="daemon",
                 app_name: str = "c8", timeout: float = 5.0, queue_size: int = 1000,
                 name: str | None = None):
        if protocol not in ("udp", "tcp", "unix"):
            raise ValueError(f"syslog protocol must be udp, tcp or unix, got {protocol!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"syslog timeout must be > 0, got {timeout!r}")
        self.protocol = protocol
        if address is None:
            address = "/dev/log" if protocol == "unix" else "127.0.0.1:514"
        self.address = parse_address(address, protocol)
        self.facility = facility_code(facility)
        self.app_name = app_name
        self.timeout = timeout
        self.hostname = socket.gethostname()
        self._sock: socket.socket | None = None
        self._framed = protocol == "tcp"
        super().__init__(name, queue_size)  # starts the worker: everything above is set

    def _connect(self, deadline: float) -> socket.socket:
        remaining = max(deadline - time.monotonic(), 0.001)
        if self.protocol == "udp":
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
        elif self.protocol == "tcp":
            s = socket.create_connection(self.address, timeout=remaining)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.settimeout(remaining)
            try:
                s.connect(self.address)
            except OSError as exc:
                s.close()
                if exc.errno != errno.EPROTOTYPE:  # the socket is a stream
                    raise
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(remaining)
                s.connect(self.address)
                self._framed = True
        return s

    def _transmit(self, text: str) -> bool:
        raw = text.encode("utf-8", "replace")
        deadline = time.monotonic() + self.timeout
        for attempt in (0, 1):  # a second try on a fresh connection (the peer may have closed it)
            try:
                if self._sock is None:
                    self._sock = self._connect(deadline)
                # framing is known once connected (a unix socket may be a stream)
                data = str(len(raw)).encode() + b" " + raw if self._framed else raw
                # sendall's timeout bounds the whole send: a peer that never reads costs
                # at most the time left to this message
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                if self.protocol == "udp":
                    self._sock.sendto(data, self.address)
                else:
                    self._sock.sendall(data)
                return True
            except OSError as exc:
                # a partial frame would corrupt the stream: start a new connection
                self._drop_socket()
                if attempt or time.monotonic() >= deadline:
                    log.warning("syslog %s %s: %s", self.protocol, self.address, exc)
                    return False
        return False

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def deliver(self, kind: str, obj: dict) -> bool:
        if kind == "notice":
            return self._transmit(format_message(self.facility, SEVERITIES["warning"],
                                                 obj.get("message", ""), app_name=self.app_name,
                                                 hostname=self.hostname, msgid="notice"))
        proc = obj.get("process") or {}
        cont = obj.get("container") or {}
        sd = {"rule": obj.get("rule"), "priority": obj.get("priority"),
              "process_id": proc.get("process_id"), "pid": proc.get("pid"),
              "exe": proc.get("exec_filename"), "container_id": cont.get("container_id")}
        if (obj.get("count") or 1) > 1:  # a folded alert (fold.py): how many events, first and last
            sd.update(count=obj["count"], first=obj.get("first_name"), last=obj.get("last_name"))
        severity = SEVERITIES.get(str(obj.get("priority", "")).lower(), SEVERITIES["warning"])
        msg = obj.get("output") or obj.get("rule") or ""
        return self._transmit(format_message(self.facility, severity, msg, app_name=self.app_name,
                                             hostname=self.hostname, msgid="alert", sd=sd))

    def release(self) -> None:
        if not self._thread.is_alive():  # else the worker still owns the socket
            self._drop_socket()
