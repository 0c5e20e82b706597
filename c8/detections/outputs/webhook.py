"""Alerts POSTed as JSON to an HTTP(S) endpoint from a worker thread.

The detector never waits on the network: ``send`` puts the alert on a bounded
queue and returns; when the queue is full the alert is dropped and counted.
The worker retries a failed POST (connection error, timeout, non-2xx status)
with exponential backoff: backoff_s, 2*backoff_s, ... up to max_backoff_s.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request

from c8.detections.outputs.base import Output, alert_dict, notice_dict

log = logging.getLogger("c8.detections.outputs.webhook")

_STOP = object()


class WebhookOutput(Output):
    """POSTs each alert as one JSON document to ``url``."""

    type = "webhook"

    def __init__(self, url: str, timeout: float = 5.0, queue_size: int = 1000, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, headers: dict | None = None,
                 name: str | None = None):
        super().__init__(name)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "c8-detector",
                        **(headers or {})}
        self.dropped = 0      # queue full
        self.failed = 0       # gave up after retries
        self.delivered = 0
        self.attempts = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"webhook {self.name}", daemon=True)
        self._thread.start()

    def _enqueue(self, obj: dict) -> None:
        try:
            self._queue.put_nowait(obj)
        except queue.Full:
            self.dropped += 1

    def send(self, alert) -> None:
        self._enqueue(alert_dict(alert))

    def notice(self, text: str) -> None:
        self._enqueue(notice_dict(text))

    def _run(self) -> None:
        while True:
            obj = self._queue.get()
            if obj is _STOP:
                return
            self._deliver(json.dumps(obj, default=str).encode())

    def _deliver(self, body: bytes) -> None:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                self.delivered += 1
                return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                # HTTPError (non-2xx) is a URLError too
                if attempt == self.retries:
                    self.failed += 1
                    log.warning("webhook %s: giving up after %d attempts: %s",
                                self.url, attempt + 1, exc)
                    return
            if self._stop.wait(delay):
                self.failed += 1
                return
            delay = min(delay * 2, self.max_backoff_s)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within timeout), then stop the worker."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stop.set()  # cut short a backoff still running
        self._thread.join(1.0)

    def stats(self) -> dict:
        return {"delivered": self.delivered, "dropped": self.dropped, "failed": self.failed,
                "attempts": self.attempts, "queued": self._queue.qsize()}
