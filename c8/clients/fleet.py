"""Read the fleet from NATS JetStream: every sensor's exported batches and alerts.

    from c8.clients.fleet import Fleet

    with Fleet("nats://127.0.0.1:4222") as fleet:
        for sensor_id, category, arr, tables in fleet.batches(events=["process"],
                                                              filter='kind == "EXEC"'):
            ...                               # numpy structured arrays, as Subscription.batches
        for line in fleet.lines(sensor="a1b2..."):  # JSON lines as c8ctl subscribe prints
            ...

Subjects are ``c8.<sensor_id>.<category>`` and ``c8.<sensor_id>.alerts``
(c8.export); the server filters by sensor and category (one ephemeral
consumer with filter_subjects), this client evaluates the filter expression
with the numpy masks the broker uses (c8.expr.compile_mask) and the image glob
on each batch's container table. ``sensors()`` lists the sensors that report
to the stream.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator

import msgpack
import numpy as np
import orjson

from c8 import expr, schema
from c8.clients import jsonlines
from c8.expr import glob
from c8.protocol import batch as wire

ALERTS = "alerts"
FETCH_BATCH = 256
CONNECT_TIMEOUT = 10.0


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d' (or plain seconds) -> seconds; ValueError naming the text."""
    t = str(text).strip().lower()
    for suffix, mult in (("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)):
        if t.endswith(suffix):
            try:
                return float(t[: -len(suffix)]) * mult
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)") from None


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: its default prints every failed reconnect's traceback."""


class FleetUnavailable(ConnectionError):
    """No NATS server of the list could be reached."""


class Fleet:
    """A connection to the JetStream stream the sensors export to (synchronous API)."""

    def __init__(self, url: str | list[str] = "nats://127.0.0.1:4222", stream: str = "C8",
                 **connect_options):
        self.servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
        self.stream = stream
        self.connect_options = connect_options
        self._loop = asyncio.new_event_loop()
        self._nc = None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def _connect(self):
        if self._nc is None:
            import nats

            try:
                self._nc = self._run(asyncio.wait_for(
                    nats.connect(servers=self.servers, connect_timeout=2,
                                 max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                 error_cb=_quiet, **self.connect_options),
                    CONNECT_TIMEOUT))
            except Exception as exc:  # nats-py's own errors: say which servers
                raise FleetUnavailable(f"no NATS server answered at {', '.join(self.servers)}: "
                                       f"{exc!r}") from None
        return self._nc

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._run(self._nc.close())
            except Exception:
                pass
            self._nc = None
        if not self._loop.is_closed():
            self._loop.close()

    # -- reading ----------------------------------------------------------------------------
    def messages(self, events: list[str] | None = None, sensor: str | None = None,
                 since: float | None = None, all: bool = False,  # noqa: A002 (the CLI's word)
                 timeout: float | None = None) -> Iterator[tuple[str, str, dict]]:
        """(sensor_id, category or "alerts", decoded message map), in stream order.

        ``events``: categories (and "alerts"); None: every category and alerts.
        From new messages on, unless ``since`` (seconds back) or ``all``. Stops after
        ``timeout`` seconds without a message (None: follows until interrupted).
        """
        from nats.js import api

        js = self._connect().jetstream()
        cats = list(events) if events else list(schema.CATEGORIES) + [ALERTS]
        unknown = set(cats) - set(schema.CATEGORIES) - {ALERTS}
        if unknown:
            raise ValueError(f"unknown event types {sorted(unknown)}; known: "
                             f"{', '.join(schema.CATEGORIES)}, {ALERTS}")
        who = sensor or "*"
        if sensor is not None and (not sensor or any(c in sensor for c in ".*> ")):
            raise ValueError(f"not a sensor id: {sensor!r}")
        cfg = api.ConsumerConfig(filter_subjects=[f"c8.{who}.{c}" for c in cats],
                                 ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0,
                                 mem_storage=True)
        if all:
            cfg.deliver_policy = api.DeliverPolicy.ALL
        elif since is not None:
            cfg.deliver_policy = api.DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = datetime.datetime.now(datetime.UTC) - \
                datetime.timedelta(seconds=since)
        else:
            cfg.deliver_policy = api.DeliverPolicy.NEW
        sub = self._run(js.pull_subscribe("", stream=self.stream, config=cfg))
        import nats.errors

        try:
            idle = 0.0
            while timeout is None or idle < timeout:
                wait = 1.0 if timeout is None else min(1.0, max(timeout - idle, 0.05))
                try:
                    msgs = self._run(sub.fetch(FETCH_BATCH, timeout=wait))
                except (nats.errors.TimeoutError, TimeoutError):  # nothing within ``wait``
                    idle += wait
                    continue
                idle = 0.0
                for m in msgs:
                    parts = m.subject.split(".")
                    if len(parts) != 3:
                        continue
                    yield parts[1], parts[2], msgpack.unpackb(m.data, raw=False,
                                                              strict_map_key=False)
        finally:
            try:
                self._run(sub.unsubscribe())
            except Exception:
                pass

    def batches(self, events: list[str] | None = None, filter: str | None = None,  # noqa: A002
                image: str | None = None, **kw) -> Iterator[tuple[str, str, np.ndarray, dict]]:
        """(sensor_id, category, structured array, tables) per batch, the filter expression
        and the image glob applied (alerts come as (sensor_id, "alerts", None, message))."""
        masks: dict[str, object] = {}
        node = expr.parse(filter) if filter else None
        match = glob.compile(image) if image else None
        for sid, cat, msg in self.messages(events, **kw):
            if cat == ALERTS:
                if match is None or any(match((a.get("container") or {}).get("image_name", ""))
                                        for a in msg.get("alerts", [])):
                    yield sid, cat, None, msg
                continue
            if msg.get("type") != "batch":
                continue
            arr = wire.decode_columns(msg)
            tables = wire.Tables({int(k): tuple(v) for k, v in (msg.get("containers") or {}).items()},
                                 msg.get("processes"))
            keep = np.ones(len(arr), bool)
            if node is not None and cat not in ("lost", "limiter"):
                if cat not in masks:
                    expr.check(node, cat)
                    masks[cat] = expr.compile_mask(node, cat)
                keep &= masks[cat](arr, tables)
            if match is not None and cat not in ("lost", "limiter") and "container" in arr.dtype.names:
                idx = np.unique(arr["container"])
                ok = [int(i) for i in idx.tolist()
                      if int(i) in tables and match(str(tables[int(i)][3]))]
                keep &= np.isin(arr["container"], np.asarray(ok, arr["container"].dtype))
            if not keep.all():
                arr = arr[keep]
            if len(arr):
                yield sid, cat, arr, tables

    def lines(self, events: list[str] | None = None, filter: str | None = None,  # noqa: A002
              image: str | None = None, **kw) -> Iterator[bytes]:
        """JSON lines (bytes, newline-terminated) of the same shape as ``c8ctl subscribe``
        (``sensor_id`` set per sensor); alerts as their JSON objects with ``sensor_id``."""
        for sid, cat, arr, tables in self.batches(events, filter, image, **kw):
            if arr is None:
                yield b"".join(orjson.dumps(dict(a, sensor_id=sid)) + b"\n"
                               for a in tables.get("alerts", []))
            else:
                yield b"".join(jsonlines.lines(cat, arr, tables, sid))

    # -- the sensors --------------------------------------------------------------------------
    def sensors(self) -> list[dict]:
        """Every sensor with a status message in the stream: sensor_id, hostname, last_seen
        (ISO time of its latest message), exported_events, lost, messages in the stream."""
        self._connect()
        return self._run(self._sensors())

    async def _sensors(self) -> list[dict]:
        from nats.js.errors import NotFoundError

        js = self._nc.jetstream()
        info = await js.stream_info(self.stream, subjects_filter="c8.>")
        subjects = (info.state.subjects or {}) if info.state else {}
        per: dict[str, dict] = {}
        for subj, count in subjects.items():
            parts = subj.split(".")
            if len(parts) != 3:
                continue
            s = per.setdefault(parts[1], {"sensor_id": parts[1], "messages": 0, "last_seen": None})
            s["messages"] += count
        for sid, s in per.items():
            try:
                m = await js.get_last_msg(self.stream, f"c8.{sid}.status")
            except NotFoundError:
                continue
            body = orjson.loads(m.data)
            s.update({k: body.get(k) for k in ("hostname", "exported_events", "lost")})
            s["last_seen"] = m.time.isoformat() if getattr(m, "time", None) else \
                datetime.datetime.fromtimestamp(body.get("time", 0), datetime.UTC).isoformat()
        return sorted(per.values(), key=lambda s: s["sensor_id"])
