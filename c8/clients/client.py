"""The Python client library: subscribe, iterate batches or events, unsubscribe.

    with Client() as c, c.subscribe({"events": {"process": {}}}) as sub:
        for event in sub.events():
            print(event["type"], event["kind"], event["process_pid"])

Batches are numpy structured arrays straight off the wire; ``events()`` makes
one dict per event only when asked, every window's events in sensor sequence
order across categories (``windows()`` gives a window's batches together).
Closing a subscription's connection ends it in the broker.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import zmq

from c8.clients import jsonlines
from c8.protocol import batch as wire
from c8.protocol import control, paths

SUBSCRIBE_READY_WAIT = 30.0  # the broker answers once collectors run what a subscription needs


class SensorError(Exception):
    """The broker refused a request; ``code`` is from c8.protocol.errors."""

    def __init__(self, reply: dict):
        super().__init__(f"{reply.get('error', 'ERROR')}: {reply.get('reason', '')}")
        self.code = reply.get("code")
        self.reason = reply.get("reason", "")


class SensorUnavailable(Exception):
    """No broker answered on the control socket."""


class Client:
    """A connection factory for one sensor, found through run_dir."""

    def __init__(self, run_dir: str | None = None, endpoint: str | None = None, timeout: float = 5.0,
                 curve: dict | None = None):
        """``endpoint`` defaults to run_dir's control socket; a ``tcp://`` one needs
        ``curve``: ``{"server_public", "public", "secret"}`` z85 keys (str or bytes)."""
        self.run_dir = paths.run_dir(run_dir)
        self.endpoint = endpoint or paths.ipc(paths.control(self.run_dir))
        self.timeout = timeout
        self.curve = _curve_keys(curve) if curve else None
        self.ctx = zmq.Context.instance()
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _socket(self, rcvhwm: int = 1000) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if self.curve is not None:
            sock.curve_serverkey = self.curve["server_public"]
            sock.curve_publickey = self.curve["public"]
            sock.curve_secretkey = self.curve["secret"]
        sock.connect(self.endpoint)
        return sock

    def request(self, command: str, properties: dict | None = None) -> dict:
        """One control request (status, list, unsubscribe, probes); raises on error."""
        sock = self._socket()
        try:
            rid = next(self._ids)
            sock.send(control.request(command, properties, rid))
            return _await_reply(sock, rid, self.timeout)
        finally:
            sock.close()

    def status(self) -> dict:
        return self.request("status")

    def subscriptions(self) -> list[dict]:
        return self.request("list")["subscriptions"]

    def unsubscribe(self, subscription_id: str) -> dict:
        return self.request("unsubscribe", {"subscription": subscription_id})

    def subscribe(self, spec: dict, queue: int = 64) -> Subscription:
        """Start a subscription; its events flow until close() or disconnect.

        ``queue`` is how many messages this client buffers before the broker
        starts dropping (and counting) for it.
        """
        sock = self._socket(rcvhwm=queue)
        rid = next(self._ids)
        sock.send(control.request("subscribe", spec, rid))
        try:
            # the broker answers once the collectors run what this needs (up to 30 s)
            reply = _await_reply(sock, rid, self.timeout + SUBSCRIBE_READY_WAIT)
        except Exception:
            sock.close()
            raise
        return Subscription(sock, reply["subscription"], reply.get("sensor_id", ""), spec)


def _curve_keys(curve: dict) -> dict[str, bytes]:
    missing = {"server_public", "public", "secret"} - set(curve)
    if missing:
        raise ValueError(f"curve needs z85 keys {sorted(missing)}")
    return {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in curve.items()}


def _await_reply(sock: zmq.Socket, rid: Any, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            raise SensorUnavailable(f"no reply from the sensor at {sock.getsockopt(zmq.LAST_ENDPOINT).decode() or 'its socket'} within {timeout}s")
        msg = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
        if msg.get("id") != rid or "status" not in msg:
            continue
        if msg["status"] != "ok":
            raise SensorError(msg)
        return msg


UNSUBSCRIBE_LINGER_MS = 200  # how long close() lets the unsubscribe request leave
BROKER_SILENCE = 3.0  # the broker ticks every second; this much silence: busy, or restarted


class Subscription:
    """A live subscription: iterate ``batches()`` or ``events()``; ``close()`` ends it.

    If the broker restarts (the supervisor brings it back after a crash or an
    OOM kill), the subscription is made again on the same connection: events
    resume, and ``resubscribed`` counts how often that happened (events of the
    gap are not recoverable).
    """

    def __init__(self, sock: zmq.Socket, sub_id: str, sensor_id: str, spec: dict | None = None):
        self.sock = sock
        self.id = sub_id
        self.sensor_id = sensor_id
        self.spec = spec
        self.ended: str | None = None
        self.lost: dict[str, int] = {}
        self.resubscribed = 0

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the subscription at the broker now, then close the connection.

        The broker would notice a closed connection only at its next send to
        it (up to a second): meanwhile it would go on collecting for nobody.
        """
        if self.sock.closed:
            return
        if self.ended is None:
            try:
                self.sock.send(control.request("unsubscribe", {"subscription": self.id}, "close"), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.sock.close(linger=UNSUBSCRIBE_LINGER_MS)

    def messages(self, timeout: float | None = None) -> Iterator[dict]:
        """Raw decoded messages; stops at the end of the subscription or after
        ``timeout`` seconds without any message (ticks count as messages)."""
        last = asked = time.monotonic()
        while self.ended is None and not self.sock.closed:
            if not self.sock.poll(1000):
                now = time.monotonic()
                if self.spec is not None and now - max(last, asked) > BROKER_SILENCE:
                    # Busy, or restarted without us? Ask for our subscriptions: a busy
                    # broker answers late and lists this one, a new one does not.
                    asked = now
                    self.sock.send(control.request("list", {}, "alive"))
                if timeout is not None and now - last > timeout:
                    return
                continue
            last = time.monotonic()
            msg = msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)
            t = msg.get("type")
            if t == "end":
                self.ended = msg.get("reason", "ended")
                return
            if msg.get("id") == "alive" and "status" in msg:
                listed = {s.get("subscription") for s in msg.get("subscriptions") or ()}
                if msg["status"] == "ok" and self.id not in listed:  # subscribing twice would double events
                    self.sock.send(control.request("subscribe", self.spec, "resubscribe"))
                continue
            if msg.get("id") == "resubscribe" and "status" in msg:
                if msg["status"] != "ok":
                    self.ended = f"resubscribe refused: {msg.get('reason')}"
                    return
                self.id = msg["subscription"]
                self.resubscribed += 1
                continue
            yield msg

    def windows(self, timeout: float | None = None, idle: float | None = None) -> Iterator[list[tuple[str, np.ndarray, dict]]]:
        """The batches of one broker window at a time: [(category, array, tables)], tables
        being the batch's container table (a dict: index -> row) whose ``processes``
        is its lineage table (c8.protocol.batch.Tables).

        The broker numbers every category of a window in one time order and sends
        them in one message, so a window is the unit to put back in sequence order.
        ``timeout`` bounds the wait for any message; ``idle`` ends the iteration
        when no events have come for that many seconds (ticks don't count).
        """
        last = time.monotonic()
        for msg in self.messages(timeout):
            if msg.get("type") == "batches":
                window = []
                for b in msg["batches"]:
                    arr = wire.decode_columns(b)
                    if b["category"] == "lost":
                        for src, count in zip(arr["source"].tolist(), arr["count"].tolist(), strict=True):
                            key = src.decode()
                            self.lost[key] = self.lost.get(key, 0) + int(count)
                    table = wire.Tables({int(k): tuple(v) for k, v in (b.get("containers") or {}).items()},
                                        b.get("processes"))
                    window.append((b["category"], arr, table))
                if window:
                    last = time.monotonic()
                    yield window
            if idle is not None and time.monotonic() - last > idle:
                return

    def batches(self, timeout: float | None = None, idle: float | None = None) -> Iterator[tuple[str, np.ndarray, dict]]:
        """(category, structured array, container table) per batch; see ``windows``.
        The array has the category's fields and types (c8.schema), each string
        field only as wide as the batch's longest value."""
        for window in self.windows(timeout, idle):
            yield from window

    def events(self, timeout: float | None = None, idle: float | None = None,
               ordered: bool = True) -> Iterator[dict]:
        """One dict per event. ``ordered`` (the default) gives every window's events
        in sensor sequence order across categories (a container's RUNNING before the
        EXECs in it, an EXEC before the opens it makes); without it, batch by batch,
        each batch in order. A ``lost`` notice for this subscriber leads its window."""
        for window in self.windows(timeout, idle):
            if ordered:
                yield from jsonlines.window_dicts(window, self.sensor_id)
            else:
                for category, arr, table in window:
                    yield from jsonlines.dicts(category, arr, table, self.sensor_id)


def event_id(sensor_id: str, seq: int, monotime: int) -> str:
    """The event id Capsule8 used: sha256 of sensor id, sequence number and time."""
    return hashlib.sha256(f"{sensor_id}{seq}{monotime}".encode()).hexdigest()


def to_dicts(category: str, arr: np.ndarray, table: dict, sensor_id: str = "") -> list[dict]:
    """Per-event dicts for a batch: strings decoded, kinds named, containers expanded."""
    return jsonlines.dicts(category, arr, table, sensor_id)
