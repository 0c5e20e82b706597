"""c8-exporter: the export process (supervisor -> broker -> *exporter* -> NATS JetStream).

An ordinary client of the broker, like the detector: it subscribes with
``export.events`` and appends every batch of every message to the spool as it
came; it follows the detector's alert file when detections run; a publisher
thread drains the spool into JetStream (c8.export.publisher). Every second it
writes ``<run_dir>/export.json`` (connected, spool, lost) for ``c8ctl status``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from c8.export import messages
from c8.export.alerts import AlertFollower
from c8.export.publisher import Publisher
from c8.export.spool import Spool

log = logging.getLogger("c8.export")

STATUS_FILE = "export.json"
EXPORT_QUEUE = 256          # messages the broker may queue for the exporter
BROKER_SILENCE_S = 5.0
MAX_BACKOFF_S = 10.0
ALERTS_FILE = "alerts.jsonl"  # c8.supervisor.config.EXPORT_ALERTS_FILE


def _sensor_id(client_factory, run_dir: str | None, stop: threading.Event) -> str | None:
    """The sensor id, from the broker's status (it may still be starting)."""
    backoff = 0.2
    while not stop.is_set():
        try:
            return client_factory(run_dir=run_dir, timeout=2.0).status()["sensor_id"]
        except Exception as exc:
            log.info("waiting for the broker (%s)", exc)
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
    return None


class Exporter:
    """The exporter's parts: spool, publisher thread, alert follower, broker subscription."""

    def __init__(self, config: dict, stop: threading.Event, client_factory=None):
        if client_factory is None:
            from c8.clients.client import Client as client_factory
        self.client_factory = client_factory
        self.config = config
        self.export = config["export"]
        self.stop = stop
        self.run_dir = config.get("run_dir")
        self.spool = Spool(os.path.join(self.export["spool_dir"], "spool"),
                           int(self.export["spool_bytes"]))
        self.sensor_id = ""
        self.publisher: Publisher | None = None
        self.follower: AlertFollower | None = None
        self.batches = 0
        self.subscribed = False

    def run(self) -> None:
        sid = _sensor_id(self.client_factory, self.run_dir, self.stop)
        if sid is None:
            return
        self.sensor_id = sid
        self.publisher = Publisher(self.spool, self.export["nats"], sid, self.stop)
        self.spool.on_append = self.publisher.wake
        threads = [threading.Thread(target=self.publisher.run, name="publisher", daemon=True),
                   threading.Thread(target=self._side_loop, name="alerts-status", daemon=True)]
        if (self.config.get("detections") or {}).get("enabled"):
            self.follower = AlertFollower(os.path.join(self.export["spool_dir"], ALERTS_FILE),
                                          self.spool, sid,
                                          os.path.join(self.export["spool_dir"], "alerts.pos"))
        for t in threads:
            t.start()
        log.info("exporting as sensor %s to %s, stream %s", sid,
                 ", ".join(self.export["nats"]["url"]), self.export["nats"]["stream"])
        spec = self.export.get("events") or {}
        if spec.get("events"):
            self._subscribe_loop(spec)
        else:
            log.info("export.events is empty: alerts only")
            self.stop.wait()
        for t in threads:
            t.join(timeout=5)

    # -- the broker subscription ---------------------------------------------------------
    def _subscribe_loop(self, spec: dict) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            try:
                sub = self.client_factory(run_dir=self.run_dir).subscribe(spec, queue=EXPORT_QUEUE)
            except Exception as exc:  # broker restarting, or a spec it refuses (logged)
                log.warning("cannot subscribe to the broker (%s); retrying in %.0fs", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            log.info("subscribed to the broker (%s)", sorted(spec["events"]))
            self.subscribed = True
            try:
                reason = self._consume(sub)
            finally:
                self.subscribed = False
                sub.close()
            if not self.stop.is_set():
                log.warning("subscription ended (%s); subscribing again", reason)

    def _consume(self, sub) -> str:
        quiet = 0.0
        while not self.stop.is_set():
            got = False
            for msg in sub.messages(timeout=1.0):
                got = True
                if msg.get("type") == "batches":
                    for suffix, mid, n, payload in messages.from_broker(msg, self.sensor_id):
                        self.spool.append(suffix, mid, n, payload)
                        self.batches += 1
                if self.stop.is_set():
                    break
            if sub.ended:
                return f"ended by the broker: {sub.ended}"
            quiet = 0.0 if got else quiet + 1.0
            if quiet >= BROKER_SILENCE_S:
                return f"no message from the broker for {BROKER_SILENCE_S:.0f}s"
        return "stopping"

    # -- alerts and the status file --------------------------------------------------------
    def _side_loop(self) -> None:
        last = None
        while not self.stop.wait(0.2):
            if self.follower is not None:
                try:
                    self.follower.poll()
                except Exception:
                    log.exception("following the alert file")
            st = self.status()
            if st != last:
                self._write_status(st)
                last = st

    def status(self) -> dict:
        """What export.json holds (c8ctl status)."""
        pub = self.publisher
        st = {"sensor_id": self.sensor_id, "stream": self.export["nats"]["stream"],
              "connected": bool(pub and pub.connected), "server": pub and pub.server,
              "published": pub.published if pub else 0, "last_error": pub and pub.last_error,
              "subscribed": self.subscribed}
        st.update(self.spool.stats())
        return st

    def _write_status(self, st: dict) -> None:
        if not self.run_dir:
            return
        path = os.path.join(self.run_dir, STATUS_FILE)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o640)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(st, pid=os.getpid(), time=time.time()), f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)


def run(config: dict) -> None:
    """Entry point of the c8-exporter child (``c8.export.main:run``)."""
    from setproctitle import setproctitle

    setproctitle("c8-exporter")
    level = str(config.get("log_level") or "info").upper()
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s c8-exporter %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nats").setLevel(logging.ERROR)  # its reconnect noise; ours is enough
    stop = threading.Event()

    def on_signal(signum, frame):  # only queue: the loops act within a second
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exporter = Exporter(config, stop)
    try:
        exporter.run()
    finally:
        stop.set()
        exporter.spool.close()
        log.info("stopped after %d batches", exporter.batches)
