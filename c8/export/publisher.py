"""The JetStream side of the exporter: connect, make the stream, drain the spool in order.

Runs an asyncio loop in its own thread (nats-py is asyncio). One record at a
time: publish with its Nats-Msg-Id, wait for JetStream's acknowledgement, then
move the spool's cursor. Any failure (server away, stream leader being
elected, timeout) leaves the record first in the spool and retries it after a
short backoff, so records reach the stream in spool order and a retry of one
that did arrive is dropped by JetStream's duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time

import orjson

from c8.export import STREAM_SUBJECTS, messages, subject
from c8.export.spool import Spool

log = logging.getLogger("c8.export.publisher")

PUBLISH_TIMEOUT = 5.0
STATUS_EVERY = 10.0   # a c8.<sensor_id>.status message (c8ctl fleet sensors)
STATUS_MIN = 1.0      # sooner when the counters moved, but no more often than this
MAX_BACKOFF = 2.0
CONNECT_TIMEOUT = 10.0  # then start over (and look at the stop flag)


def connect_options(nats_cfg: dict) -> dict:
    """nats.connect keyword arguments from the export.nats configuration."""
    opts: dict = {"servers": list(nats_cfg["url"]), "name": f"c8-exporter {socket.gethostname()}",
                  "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
                  "connect_timeout": 2, "allow_reconnect": True}
    for key in ("user", "password", "token"):
        if nats_cfg.get(key):
            opts[key] = nats_cfg[key]
    if nats_cfg.get("creds_file"):
        opts["user_credentials"] = nats_cfg["creds_file"]
    if nats_cfg.get("nkeys_seed_file"):
        opts["nkeys_seed"] = nats_cfg["nkeys_seed_file"]
    if nats_cfg.get("tls_ca_file") or nats_cfg.get("tls_cert_file"):
        ctx = ssl.create_default_context(cafile=nats_cfg.get("tls_ca_file"))
        if nats_cfg.get("tls_cert_file"):
            ctx.load_cert_chain(nats_cfg["tls_cert_file"], nats_cfg.get("tls_key_file"))
        opts["tls"] = ctx
    if nats_cfg.get("tls_hostname"):
        opts["tls_hostname"] = nats_cfg["tls_hostname"]
    return opts


async def ensure_stream(js, nats_cfg: dict) -> None:
    """The stream, created when absent (an existing one is used as it is)."""
    from nats.js import api
    from nats.js.errors import NotFoundError

    name = nats_cfg["stream"]
    try:
        await js.stream_info(name)
        return
    except NotFoundError:
        pass
    cfg = api.StreamConfig(name=name, subjects=list(STREAM_SUBJECTS),
                           storage=api.StorageType.FILE,
                           num_replicas=int(nats_cfg.get("replicas") or 1),
                           max_age=float(nats_cfg.get("max_age") or 0) or None,
                           max_bytes=int(nats_cfg.get("max_bytes") or 0) or None,
                           duplicate_window=float(nats_cfg.get("duplicate_window") or 120))
    try:
        await js.add_stream(cfg)
        log.info("created stream %s (subjects %s, %d replicas)", name, STREAM_SUBJECTS,
                 cfg.num_replicas)
    except Exception:
        await js.stream_info(name)  # made meanwhile by another sensor: fine; else raise


class Publisher:
    """Drains ``spool`` into the stream until ``stop`` is set (see module docstring)."""

    def __init__(self, spool: Spool, nats_cfg: dict, sensor_id: str, stop: threading.Event):
        self.spool = spool
        self.nats_cfg = nats_cfg
        self.sensor_id = sensor_id
        self.stop = stop
        self.connected = False
        self.server: str | None = None
        self.published = 0          # messages acknowledged
        self.published_events = 0
        self.last_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def wake(self) -> None:
        """Something was appended (any thread)."""
        loop, ev = self._loop, self._wake
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    def run(self) -> None:
        """The thread's body."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        backoff = 0.2
        while not self.stop.is_set():
            try:
                nc = await asyncio.wait_for(
                    nats.connect(**connect_options(self.nats_cfg),
                                 disconnected_cb=self._on_disconnect,
                                 reconnected_cb=self._on_reconnect, error_cb=self._on_error),
                    CONNECT_TIMEOUT)
            except Exception as exc:
                self._error(f"cannot connect to {', '.join(self.nats_cfg['url'])}: {exc!r}")
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 0.2
            self.connected = True
            self.server = nc.connected_url.netloc if nc.connected_url else None
            log.info("connected to %s", self.server)
            try:
                await self._drain(nc)
            finally:
                self.connected = False
                try:
                    await asyncio.wait_for(nc.close(), 2)
                except Exception:
                    pass

    async def _on_disconnect(self) -> None:
        self.connected = False
        log.warning("disconnected from NATS: spooling")

    async def _on_reconnect(self) -> None:
        self.connected = True
        log.info("reconnected to NATS")

    async def _on_error(self, exc: Exception) -> None:
        self._error(f"NATS: {exc!r}")

    def _error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("%s", text)
        self.last_error = text

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def _drain(self, nc) -> None:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT)
        stream_ok = False
        backoff = 0.1
        next_status = 0.0
        rec = None  # kept across retries: the spool may drop its segment meanwhile
        status_acked = -1
        while not self.stop.is_set() and not nc.is_closed:
            try:
                if not stream_ok:
                    await ensure_stream(js, self.nats_cfg)
                    stream_ok = True
                now = time.monotonic()
                if now >= next_status or (self.spool.acked != status_acked and
                                          now >= next_status - STATUS_EVERY + STATUS_MIN):
                    status_acked = self.spool.acked
                    await self._status(js)
                    next_status = now + STATUS_EVERY
                if self.spool.lost_pending:
                    pending, total = self.spool.lost_pending, self.spool.lost_total
                    mid, payload = messages.lost_record(self.sensor_id, pending, total)
                    await js.publish(subject(self.sensor_id, "lost"), payload,
                                     headers={"Nats-Msg-Id": mid, "C8-Events": "0"})
                    self.spool.lost_sent(pending)
                    continue
                if rec is None:
                    rec = self.spool.peek()
                if rec is None:
                    await self._sleep(0.5)
                    continue
                await js.publish(subject(self.sensor_id, rec.suffix), rec.payload,
                                 headers={"Nats-Msg-Id": rec.msg_id, "C8-Events": str(rec.events)})
                self.spool.ack(rec)
                self.published += 1
                self.published_events += rec.events
                rec = None
                backoff = 0.1
            except Exception as exc:  # away, electing a leader, timed out: retry the same record
                self._error(f"publish to stream {self.nats_cfg['stream']} failed: {exc!r}")
                stream_ok = False  # look again (and make it if it was deleted meanwhile)
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        if self.stop.is_set() and not nc.is_closed:
            try:  # the last counters, for c8ctl fleet sensors
                await asyncio.wait_for(self._status(js), 2)
            except Exception:
                pass

    async def _status(self, js) -> None:
        st = self.spool.stats()
        body = {"sensor_id": self.sensor_id, "hostname": socket.gethostname(),
                "time": time.time(), "exported_events": st["exported_events"], "lost": st["lost"],
                "spool_bytes": st["spool_bytes"]}
        await js.publish(subject(self.sensor_id, "status"), orjson.dumps(body))
