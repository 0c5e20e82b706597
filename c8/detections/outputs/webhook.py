"""Alerts POSTed as JSON to an HTTPS endpoint from the output's own thread.

The detector never waits on the network: ``send`` puts the alert on a bounded
queue and returns (``QueuedOutput``); when the queue is full the alert is
dropped and counted. The worker retries a failed POST (connection error,
deadline, non-2xx status other than a redirect) with exponential backoff:
backoff_s, 2*backoff_s, ... up to max_backoff_s.

A webhook URL often carries a secret (``https://user:pass@host/``,
``?token=...``, a path like ``/services/T0/B0/XXXX``), so:

- ``https://`` only; ``http://`` is refused unless the output says
  ``insecure: true`` (the token would cross the network in clear).
- The URL is never logged or put in an error as given: ``redact_url`` keeps
  the scheme, host, port and first path segment, and shows later path
  segments and query values as ``***``; user info becomes a Basic
  Authorization header and shows as ``***@``. Headers are never logged.
- Redirects are not followed (http.client follows none): a 3xx is a failed
  delivery, logged with the redacted Location, and not retried, so a
  receiver cannot bounce the alerts and their credentials elsewhere.
- Each POST has a total deadline of ``timeout`` (connect, send, response):
  a watchdog shuts the socket down at the deadline, so a receiver that trickles
  its answer byte by byte cannot hold the worker. Proxies from the environment
  are not used, and at most MAX_RESPONSE bytes of the answer are read.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import ssl
import threading
import urllib.parse

from c8.detections.outputs.queued import QueuedOutput

log = logging.getLogger("c8.detections.outputs.webhook")

MAX_RESPONSE = 64 * 1024
REDACTED = "***"


class InsecureURL(ValueError):
    """An http:// webhook URL without ``insecure: true``."""


def redact_url(url: str) -> str:
    """The URL with its secrets shown as ``***`` (user info, query values, path
    segments after the first, fragment); safe to log."""
    try:
        parts = urllib.parse.urlsplit(str(url))
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{REDACTED}@" if "@" in parts.netloc else "") + host + (f":{port}" if port else "")
    segments = parts.path.split("/")
    # "/a/b/c" -> ["", "a", "b", "c"]: keep the first named segment
    path = "/".join(s if i <= 1 or not s else REDACTED for i, s in enumerate(segments))
    query = "&".join(f"{k}={REDACTED}" if v else k for k, v in
                     urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


class WebhookOutput(QueuedOutput):
    """POSTs each alert as one JSON document to ``url``."""

    type = "webhook"

    def __init__(self, url: str, timeout: float = 5.0, queue_size: int = 1000, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, headers: dict | None = None,
                 insecure: bool = False, name: str | None = None):
        if not isinstance(url, str):
            raise ValueError(f"url must be a string, got {type(url).__name__}")
        self.redacted = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"url {self.redacted}: not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {self.redacted}: must be https://host/...")
        if parts.scheme == "http" and insecure is not True:
            raise InsecureURL(f"url {self.redacted}: plain http would send alerts (and any token "
                              "in the URL) in clear; use https://, or set insecure: true on "
                              "this output to allow it")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port
        self.target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "c8-detector",
                        **(headers or {})}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers.setdefault("Authorization", f"Basic {token}")
        # texts that must never reach a log line (error messages may quote them)
        self._secrets = [s for s in (url, parts.netloc.rpartition("@")[0], parts.query, parts.path,
                                     *(str(v) for v in self.headers.values()))
                         if len(s) >= 4 and s != "/"]
        self._ssl = ssl.create_default_context() if self.https else None
        self.attempts = 0
        self.redirects = 0
        super().__init__(name, queue_size)

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text

    def deliver(self, kind: str, obj: dict) -> bool:
        body = json.dumps(obj, default=str).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                status, location = self._post(body)
            except (OSError, http.client.HTTPException) as exc:
                problem = self._scrub(f"{type(exc).__name__}: {exc}")
            else:
                if 200 <= status < 300:
                    return True
                if 300 <= status < 400:
                    self.redirects += 1
                    log.warning("webhook %s: answered %d (redirect to %s): redirects are not "
                                "followed; alert not delivered", self.redacted, status,
                                redact_url(location) if location else "nowhere")
                    return False
                problem = f"HTTP status {status}"
            if attempt == self.retries:
                log.warning("webhook %s: giving up after %d attempts: %s",
                            self.redacted, attempt + 1, problem)
                return False
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, self.max_backoff_s)
        return False

    def _post(self, body: bytes) -> tuple[int, str | None]:
        """One POST within ``timeout`` in all; (status, Location header)."""
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        watchdog = threading.Timer(self.timeout, _shutdown, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("POST", self.target, body=body, headers=self.headers)
            resp = conn.getresponse()
            resp.read(MAX_RESPONSE)
            return resp.status, resp.getheader("Location")
        finally:
            watchdog.cancel()
            conn.close()

    def stats(self) -> dict:
        return {**super().stats(), "attempts": self.attempts, "redirects": self.redirects}


def _shutdown(conn: http.client.HTTPConnection) -> None:
    """The deadline passed: unblock whatever the worker waits for on this connection."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
