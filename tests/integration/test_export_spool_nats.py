"""The exporter's spool and publisher against a real nats-server (JetStream), no sensor:
a full spool while the server is away becomes a lost record (source export) once it is
back, and a new publisher on the same spool (the exporter restarted) sends what waited.
Batches are synthetic process batches in the broker's wire format."""

from __future__ import annotations

import threading

import msgpack
import numpy as np

from c8 import schema
from c8.clients.fleet import Fleet
from c8.export import messages
from c8.export.publisher import Publisher
from c8.export.spool import Spool
from c8.protocol import batch as wire
from tests.integration.sensor import wait_for
from tests.integration.test_export import NatsServer, _stop_what_the_test_started  # noqa: F401


def nats_cfg(url: str) -> dict:
    return {"url": [url], "stream": "C8", "replicas": 1, "max_age": 0, "max_bytes": 0,
            "duplicate_window": 120}


def append_batches(spool: Spool, sensor: str, first: int, count: int, per: int = 100) -> None:
    """``count`` batches of ``per`` process events numbered from ``first``."""
    for k in range(count):
        arr = schema.empty("process", per)
        arr["sensor_sequence_number"] = np.arange(first + k * per, first + (k + 1) * per)
        arr["sensor_monotime_nanos"] = arr["sensor_sequence_number"]
        arr["exec_command_line"] = b"y" * 200       # ~30 KB a batch on the wire
        msg = msgpack.unpackb(msgpack.packb({"batches": [wire.columns("process", arr, containers={})]}),
                              raw=False, strict_map_key=False)
        for rec in messages.from_broker(msg, sensor):
            spool.append(*rec)


class Running:
    def __init__(self, spool: Spool, url: str, sensor: str):
        self.stop = threading.Event()
        self.pub = Publisher(spool, nats_cfg(url), sensor, self.stop)
        spool.on_append = self.pub.wake
        self.thread = threading.Thread(target=self.pub.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.pub.wake()
        self.thread.join(15)
        assert not self.thread.is_alive()


def stream_contents(url: str, sensor: str) -> tuple[list[int], int]:
    seqs, lost = [], 0
    with Fleet(url) as fleet:
        for _sid, cat, arr, _t in fleet.batches(["process", "lost"], sensor=sensor, all=True,
                                                timeout=1.0):
            if cat == "lost":
                assert arr["source"].tolist() == [b"export"] * len(arr)
                lost += int(arr["count"].sum())
            else:
                seqs += arr["sensor_sequence_number"].tolist()
    return seqs, lost


def test_full_spool_while_away_sends_a_lost_record_and_the_rest_in_order(tmp_path):
    nats = NatsServer(tmp_path).start()
    spool = Spool(str(tmp_path / "spool"), 1 << 20)
    run = Running(spool, nats.url, "sensorL")
    try:
        append_batches(spool, "sensorL", 1, 5)
        wait_for(lambda: spool.peek() is None and run.pub.published >= 5, 20, 0.05,
                 "the first batches in the stream")
        nats.stop()
        append_batches(spool, "sensorL", 501, 100)             # ~3 MB into a 1 MB spool
        st = spool.stats()
        assert st["lost_pending"] > 0 and st["lost"] == st["lost_pending"]
        assert st["lost"] % 100 == 0                            # whole batches went
        nats.start()
        wait_for(lambda: spool.peek() is None and spool.stats()["lost_pending"] == 0, 30, 0.1,
                 "the spool drained after the server came back")
        seqs, lost = stream_contents(nats.url, "sensorL")
        assert lost == st["lost"]
        # every event once, in order; the lost ones are exactly those missing, all among the
        # oldest of the outage (the batch in flight when the server went may have arrived)
        assert seqs == sorted(set(seqs))
        missing = sorted(set(range(1, 10501)) - set(seqs))
        assert len(missing) == lost
        assert missing[0] >= 501 and missing[-1] < 10501 - 2000
    finally:
        run.close()
        nats.stop()


def test_a_restarted_exporter_sends_what_waited_in_the_spool(tmp_path):
    nats = NatsServer(tmp_path).start()
    spool = Spool(str(tmp_path / "spool"), 64 << 20)
    run = Running(spool, nats.url, "sensorR")
    try:
        append_batches(spool, "sensorR", 1, 3)
        wait_for(lambda: spool.peek() is None, 20, 0.05, "the first batches in the stream")
        nats.stop()
        append_batches(spool, "sensorR", 301, 20)
        run.close()                                             # the exporter stops meanwhile
        spool.close()
        nats.start()
        spool2 = Spool(str(tmp_path / "spool"), 64 << 20)      # the exporter started again
        run = Running(spool2, nats.url, "sensorR")
        wait_for(lambda: spool2.peek() is None, 30, 0.1, "the spool sent after the restart")
        seqs, lost = stream_contents(nats.url, "sensorR")
        assert lost == 0
        assert seqs == list(range(1, 2301))                    # each event once, in order
    finally:
        run.close()
        nats.stop()


def test_a_deleted_stream_is_made_again(tmp_path):
    import asyncio

    import nats as natspy

    nats = NatsServer(tmp_path).start()
    spool = Spool(str(tmp_path / "spool"), 64 << 20)
    run = Running(spool, nats.url, "sensorD")
    try:
        append_batches(spool, "sensorD", 1, 2)
        wait_for(lambda: spool.peek() is None, 20, 0.05, "the first batches in the stream")

        async def delete():
            nc = await natspy.connect(nats.url)
            try:
                await nc.jetstream().delete_stream("C8")
            finally:
                await nc.close()
        asyncio.run(delete())
        append_batches(spool, "sensorD", 201, 2)
        wait_for(lambda: spool.peek() is None, 30, 0.1, "the batches after the deletion sent")
        seqs, lost = stream_contents(nats.url, "sensorD")
        assert seqs == list(range(201, 401)) and lost == 0
    finally:
        run.close()
        nats.stop()
