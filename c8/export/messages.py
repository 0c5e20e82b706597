"""What the exporter sends: the broker's batches as they came, alerts, lost records.

A broker ``batches`` message holds one columnar map per category
(c8.protocol.batch.columns); each becomes one NATS message on
c8.<sensor_id>.<category>, the map re-packed as it is (column buffers are
copied, never turned into per-event objects) with ``sensor_id`` added. Its
Nats-Msg-Id is ``<sensor_id>-<first sequence number>-<first monotime>``: the
sequence number restarts with the broker, and the time of its first event makes
the id unique across those restarts. A map past the message size limit is
split in halves (numpy slices of the decoded batch) until each part fits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import numpy as np

from c8 import schema
from c8.protocol import batch as wire

MAX_PAYLOAD = (1 << 20) - (16 << 10)  # nats-server's default max_payload (1 MiB), less headers
_OWN_KEYS = {"type", "category", "n", "columns", "dtypes", "widths"}


def _first(b: dict, column: str) -> int:
    buf = (b.get("columns") or {}).get(column)
    if not buf or not b.get("n"):
        return 0
    return int(np.frombuffer(buf, dtype=b["dtypes"][column], count=1)[0])


def msg_id(sensor_id: str, b: dict) -> str:
    """The Nats-Msg-Id of one batch map."""
    return f"{sensor_id}-{_first(b, 'sensor_sequence_number')}-" \
           f"{_first(b, 'sensor_monotime_nanos')}"


def from_broker(msg: dict, sensor_id: str,
                max_payload: int = MAX_PAYLOAD) -> Iterator[tuple[str, str, int, bytes]]:
    """(category, msg_id, events, payload) for each non-empty batch of a broker message."""
    for b in msg.get("batches") or ():
        if not b.get("n"):
            continue
        b["sensor_id"] = sensor_id
        yield from _fitted(b, sensor_id, max_payload)


def _fitted(b: dict, sensor_id: str, max_payload: int) -> Iterator[tuple[str, str, int, bytes]]:
    payload = msgpack.packb(b, use_bin_type=True)
    if len(payload) <= max_payload or b["n"] < 2:
        yield b["category"], msg_id(sensor_id, b), int(b["n"]), payload
        return
    arr = wire.decode_columns(b)
    extra = {k: v for k, v in b.items() if k not in _OWN_KEYS}
    half = len(arr) // 2
    for part in (arr[:half], arr[half:]):
        yield from _fitted(wire.columns(b["category"], part, **extra), sensor_id, max_payload)


def lost_record(sensor_id: str, count: int, total: int) -> tuple[str, bytes]:
    """A ``lost`` batch (source ``export``) for events the spool dropped; its msg id
    names the running total, so a retry of the same record is dropped as a copy."""
    arr = schema.empty("lost", 1)
    arr["kind"] = schema.kind_code("lost", "LOST")
    arr["sensor_monotime_nanos"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    arr["source"] = b"export"
    arr["count"] = count
    payload = msgpack.packb(wire.columns("lost", arr, sensor_id=sensor_id, containers={}),
                            use_bin_type=True)
    return f"{sensor_id}-lost-export-{total}", payload


def alerts_payload(sensor_id: str, alerts: list[dict]) -> bytes:
    """Alerts (the detector's JSON objects, notices included) as one message."""
    return msgpack.packb({"type": "alerts", "sensor_id": sensor_id, "alerts": alerts},
                         use_bin_type=True)
