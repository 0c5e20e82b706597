"""Release stages 4-6: each subscription's selection, encoded, sent; none slows another.

    cut (merge.py) -> identity (identity.py) -> number (sequence.py)
    -> select (select.py) -> encode (encode.py) -> send (this)

Each subscription gets one message per window holding a columnar batch per
category it wants. Sends never block: a subscriber whose queue is full loses
that message (counted, and told with a ``lost`` batch before its next one);
a subscriber that has gone away ends its subscription.
"""

from __future__ import annotations

import errno
import logging
import time

import msgpack
import numpy as np
import zmq

from c8.broker import catalog
from c8.broker.encode import encode
from c8.broker.select import select
from c8.protocol.batch import Tables

log = logging.getLogger("c8.broker.publish")


class Publisher:
    def __init__(self, broker):
        self.broker = broker
        self._lineage_by_category: dict = {}  # category -> its batch's lineage table

    def send(self, envelope: list[bytes], payload: bytes) -> bool:
        """Non-blocking send to one peer; False when it could not take it.

        A peer is the tag of the socket it came from (Broker.listeners) and its
        routing id; an untagged peer is on the unix control socket.
        """
        peer = envelope[0]
        listeners = getattr(self.broker, "listeners", None)
        sock = listeners.get(peer[:1]) if listeners else None
        if sock is None:
            sock = self.broker.control
        else:
            peer = peer[1:]
        try:
            # Copied, never zero-copy: a zero-copy frame costs a wake-up of pyzmq's
            # garbage-collector thread (and the GIL) per send, more than the memcpy.
            sock.send_multipart([peer, *envelope[1:], payload], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self._gone(envelope[0])
            return False

    def _gone(self, peer: bytes) -> None:
        for sid in [s.sub_id for s in self.broker.subscriptions.values() if s.peer == peer]:
            self.broker.end_subscription(sid, "client disconnected")

    def publish(self, window: dict[str, np.ndarray]) -> None:
        now = time.monotonic()
        # one container and lineage table per batch, shared by every subscription's filters
        tables = {key: Tables(self.broker.containers.table(_distinct(batch["container"])),
                              self.broker.identity.lineage(batch))
                  for key, batch in window.items() if "container" in batch.dtype.names}
        self._lineage_by_category = {key.partition(":")[0]: t.processes for key, t in tables.items()}
        for sub in list(self.broker.subscriptions.values()):
            batches = []
            selected = 0  # events, not lost/limiter notices: caps and loss counts are in events
            try:
                for key, batch in window.items():
                    category, _, probe = key.partition(":")
                    for part in select(sub, category, probe, batch, tables.get(key, {})):
                        batches.append((category, part))
                        if category not in ("lost", "limiter"):
                            selected += len(part)
            except Exception as exc:  # one subscription's filter must not stop the others
                log.exception("filter of subscription %s failed", sub.sub_id)
                self.broker.end_subscription(sub.sub_id, f"filter failed: {type(exc).__name__}: {exc}",
                                             notify=True)
                continue
            if not batches:
                continue
            admitted = sub.admit(selected, now)
            if admitted < selected:
                if sub.rate is not None:  # events past a total cap are not losses: the end is
                    sub.lose("rate_cap", selected - admitted)
                batches = _truncate(batches, admitted)
            self._deliver(sub, batches)
            if sub.finished:
                self.broker.end_subscription(sub.sub_id, f"limit of {sub.limit} events reached", notify=True)

    def _deliver(self, sub, batches: list[tuple[str, np.ndarray]]) -> None:
        msgs = []
        if sub.lost_pending:
            for source, count in sub.lost_pending.items():
                msgs.append(("lost", catalog.lost_event(source, count)))
        msgs.extend(batches)
        payload = encode(sub.sub_id, self.broker.sensor_id, msgs, self.broker.containers,
                         self._lineage_by_category)
        n = sum(len(b) for c, b in batches if c != "lost")
        if self.send([sub.peer], payload):
            sub.lost_pending.clear()
            sub.sent += n
        elif sub.sub_id in self.broker.subscriptions:
            sub.lose("subscriber", n)

    def tick(self) -> None:
        """A heartbeat to every subscriber: keeps idle ones alive, finds gone ones.

        A subscription with losses not yet reported gets them now (a subscriber
        that stopped reading learns what it lost even when nothing follows).
        """
        seen = set()
        for sub in list(self.broker.subscriptions.values()):
            if sub.lost_pending:
                self._deliver(sub, [])
            if sub.peer not in seen:
                seen.add(sub.peer)
                self.send([sub.peer], msgpack.packb({"type": "tick"}))

    def end_all(self, reason: str) -> None:
        for sub in list(self.broker.subscriptions.values()):
            self.broker.end_subscription(sub.sub_id, reason, notify=True)


def _truncate(batches, admitted: int):
    out = []
    left = admitted
    for category, b in batches:
        if category in ("lost", "limiter"):
            out.append((category, b))
            continue
        if left <= 0:
            continue
        out.append((category, b[:left]))
        left -= min(left, len(b))
    return out


def _distinct(col: np.ndarray) -> np.ndarray:
    """The distinct values of a column; no sort when there is one (a storm)."""
    return col[:1] if len(col) and (col == col[0]).all() else np.unique(col)
