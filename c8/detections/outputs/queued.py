"""Outputs whose receiver may stall: a bounded queue drained by the output's own thread.

The detector never waits on a receiver: ``send`` and ``notice`` put the
message on a bounded queue and return at once; when the queue is full the
message is dropped and counted. One worker thread per output delivers the
queue in order, each delivery bounded by a deadline (the subclass's
``deliver``), so a blackholed syslog or webhook receiver only fills its own
queue: other outputs and the rules run on.

Drops are never silent: ``tick`` (about once a second, from the detector)
logs the drops since the last report with counts (at most every
DROP_REPORT_S), and puts a notice on the queue for the receiver itself
("N alerts dropped by <output>: its queue was full"), which arrives once the
receiver drains again. ``stats`` carries the totals.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from c8.detections.outputs.base import Output, alert_dict, notice_dict

log = logging.getLogger("c8.detections.outputs")

DROP_REPORT_S = 10.0    # at most one drop report per output in this time
CLOSE_S = 1.5           # what closing an output may take (the detector has 5 s to stop)
_STOP = object()


class QueuedOutput(Output):
    """Base of outputs with a worker thread; subclasses implement ``deliver``."""

    def __init__(self, name: str | None = None, queue_size: int = 1000):
        super().__init__(name)
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        self.queue_size = queue_size
        self.delivered = 0          # messages the receiver took
        self.failed = 0             # messages given up on (receiver down, refused, deadline)
        self.dropped = 0            # alerts dropped because the queue was full
        self.dropped_notices = 0    # notices dropped likewise
        self._reported = 0          # self.dropped at the last report
        self._last_report = float("-inf")
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"output {self.name}", daemon=True)
        self._thread.start()

    # -- the detector's side: never blocks ----------------------------------------
    def send(self, alert) -> None:
        if not self._put(("alert", alert_dict(alert))):
            with self._lock:
                self.dropped += 1

    def notice(self, text: str, details: dict | None = None) -> None:
        if not self._put(("notice", notice_dict(text, details))):
            with self._lock:
                self.dropped_notices += 1

    def _put(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def tick(self) -> None:
        """Report drops since the last report: a log line with counts, and a notice."""
        now = time.monotonic()
        with self._lock:
            new = self.dropped - self._reported
            if not new or now - self._last_report < DROP_REPORT_S:
                return
            self._reported, self._last_report = self.dropped, now
            total = self.dropped
        text = (f"{new} alerts dropped by {self.name}: its queue of {self.queue_size} was full "
                f"(receiver slow or stalled); {total} dropped in all")
        log.warning("output %s", text)
        self.notice(text, {"dropped": new, "dropped_total": total})

    # -- the worker's side -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stop.is_set():  # closing: what is left is abandoned
                return
            kind, obj = item
            try:
                ok = self.deliver(kind, obj)
            except Exception:  # a bug in one delivery must not end the worker
                log.exception("output %s: delivery failed", self.name)
                ok = False
            with self._lock:
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1

    def deliver(self, kind: str, obj: dict) -> bool:
        """Deliver one message ("alert" or "notice") within the output's deadline;
        True when the receiver took it. Runs on the worker thread only."""
        raise NotImplementedError

    def close(self, timeout: float = CLOSE_S) -> None:
        """Deliver what is queued within ``timeout`` in all, then stop the worker
        (the supervisor gives the whole detector STOP_TIMEOUT to exit)."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=max(deadline - time.monotonic(), 0))
        except queue.Full:
            pass
        self._thread.join(max(deadline - time.monotonic(), 0))
        self._stop.set()  # cut short a backoff, abandon the rest of the queue
        self._thread.join(0.1)
        left = self._queue.qsize()
        if self._thread.is_alive() or left:
            log.warning("output %s: closed with %d messages undelivered (receiver stalled)",
                        self.name, left)
        self.release()

    def release(self) -> None:
        """Free the subclass's resources after the worker stopped (or was abandoned)."""

    def stats(self) -> dict:
        with self._lock:
            return {"delivered": self.delivered, "dropped": self.dropped,
                    "dropped_notices": self.dropped_notices, "failed": self.failed,
                    "queued": self._queue.qsize()}
