"""Alerts as RFC 5424 syslog messages over UDP, TCP or a unix socket.

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [c8@32473 rule=".." ..] MSG

PRI is facility * 8 + severity, the severity being the rule's priority
(emergency 0 .. debug 7). UDP sends one message per datagram; TCP uses
octet-counting framing (RFC 6587: "LEN SP MSG"); a unix socket is tried as a
datagram socket first (as /dev/log is), then as a stream with octet counting.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import socket

from c8.detections.outputs.base import Output, alert_dict

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


def _sd_escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


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
            f"{_token(msgid, 32)} {sd_text} {msg}")


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


class SyslogOutput(Output):
    """Sends alerts to a syslog receiver (protocol: udp, tcp or unix)."""

    type = "syslog"

    def __init__(self, address: str | None = None, protocol: str = "udp", facility="daemon",
                 app_name: str = "c8", timeout: float = 5.0, name: str | None = None):
        super().__init__(name)
        if protocol not in ("udp", "tcp", "unix"):
            raise ValueError(f"syslog protocol must be udp, tcp or unix, got {protocol!r}")
        self.protocol = protocol
        if address is None:
            address = "/dev/log" if protocol == "unix" else "127.0.0.1:514"
        self.address = parse_address(address, protocol)
        self.facility = facility_code(facility)
        self.app_name = app_name
        self.timeout = timeout
        self.hostname = socket.gethostname()
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._framed = protocol == "tcp"

    def _connect(self) -> socket.socket:
        if self.protocol == "udp":
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
        elif self.protocol == "tcp":
            s = socket.create_connection(self.address, timeout=self.timeout)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(self.address)
            except OSError as exc:
                s.close()
                if exc.errno != errno.EPROTOTYPE:  # the socket is a stream
                    raise
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.address)
                self._framed = True
        s.settimeout(self.timeout)
        return s

    def _transmit(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")
        for attempt in (0, 1):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                # framing is known once connected (a unix socket may be a stream)
                data = str(len(raw)).encode() + b" " + raw if self._framed else raw
                if self.protocol == "udp":
                    self._sock.sendto(data, self.address)
                else:
                    self._sock.sendall(data)
                self.sent += 1
                return
            except OSError as exc:
                self._drop_socket()
                if attempt:
                    self.failed += 1
                    log.warning("syslog %s %s: %s", self.protocol, self.address, exc)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, alert) -> None:
        d = alert_dict(alert)
        proc = d.get("process") or {}
        cont = d.get("container") or {}
        sd = {"rule": d.get("rule"), "priority": d.get("priority"),
              "process_id": proc.get("process_id"), "pid": proc.get("pid"),
              "exe": proc.get("exec_filename"), "container_id": cont.get("container_id")}
        severity = SEVERITIES.get(str(d.get("priority", "")).lower(), SEVERITIES["warning"])
        msg = d.get("output") or d.get("rule") or ""
        self._transmit(format_message(self.facility, severity, msg, app_name=self.app_name,
                                      hostname=self.hostname, msgid="alert", sd=sd))

    def notice(self, text: str) -> None:
        self._transmit(format_message(self.facility, SEVERITIES["warning"], text,
                                      app_name=self.app_name, hostname=self.hostname,
                                      msgid="notice"))

    def close(self) -> None:
        self._drop_socket()

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed}
