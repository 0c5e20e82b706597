"""The exporter's spool, message building and alert following, on files in a temp dir."""

from __future__ import annotations

import json
import os

import msgpack
import numpy as np

from c8 import schema
from c8.export import messages
from c8.export.alerts import AlertFollower
from c8.export.spool import Spool
from c8.protocol import batch as wire


def fill(spool: Spool, first: int, count: int, size: int = 1000, events: int = 10) -> None:
    for i in range(first, first + count):
        spool.append("process", f"id-{i}", events, i.to_bytes(4, "little") * (size // 4))


def drain(spool: Spool) -> list[str]:
    out = []
    while (rec := spool.peek()) is not None:
        out.append(rec.msg_id)
        spool.ack(rec)
    return out


def test_records_come_out_in_order_once_acknowledged(tmp_path):
    sp = Spool(str(tmp_path), 4 << 20)
    fill(sp, 0, 5)
    rec = sp.peek()
    assert rec.msg_id == "id-0" and rec.events == 10 and rec.payload[:4] == (0).to_bytes(4, "little")
    assert sp.peek().msg_id == "id-0"          # not acknowledged: still first
    assert drain(sp) == [f"id-{i}" for i in range(5)]
    assert sp.peek() is None
    assert sp.stats()["exported_events"] == 50 and sp.stats()["spool_bytes"] == 0


def test_a_new_spool_on_the_same_directory_resumes_after_the_last_acknowledged(tmp_path):
    sp = Spool(str(tmp_path), 4 << 20)
    fill(sp, 0, 6)
    for _ in range(2):
        sp.ack(sp.peek())
    inflight = sp.peek()                      # sent, not acknowledged when the exporter died
    sp.close()
    again = Spool(str(tmp_path), 4 << 20)
    assert again.peek().msg_id == inflight.msg_id == "id-2"
    assert drain(again) == ["id-2", "id-3", "id-4", "id-5"]
    assert again.stats()["exported_events"] == 60


def test_a_record_half_written_by_a_dead_exporter_is_cut(tmp_path):
    sp = Spool(str(tmp_path), 4 << 20)
    fill(sp, 0, 3)
    sp.close()
    seg = [f for f in os.listdir(tmp_path) if f.endswith(".seg")][0]
    with open(tmp_path / seg, "ab") as f:
        f.write(b"\x50\x00\x00\x00\x01\x02")   # a header and two bytes of a body
    again = Spool(str(tmp_path), 4 << 20)
    assert drain(again) == ["id-0", "id-1", "id-2"]
    fill(again, 3, 1)
    assert drain(again) == ["id-3"]


def test_full_spool_drops_the_oldest_and_counts_their_events_lost(tmp_path):
    sp = Spool(str(tmp_path), 1 << 20)        # segments of 128 KiB
    fill(sp, 0, 3000, size=1000, events=7)    # ~3 MB, nothing acknowledged
    st = sp.stats()
    assert st["spool_bytes"] <= 1 << 20
    got = drain(sp)
    first = int(got[0].split("-")[1])
    assert got == [f"id-{i}" for i in range(first, 3000)]     # the newest, in order, no gap
    assert first > 0
    assert st["lost"] == st["lost_pending"] == first * 7     # exactly the dropped records' events
    sp.lost_sent(st["lost_pending"])
    assert sp.stats()["lost_pending"] == 0 and sp.stats()["lost"] == first * 7
    again = Spool(str(tmp_path), 1 << 20)                     # the counters persist
    assert again.stats()["lost"] == first * 7 and again.stats()["lost_pending"] == 0


def test_acknowledged_segments_are_removed(tmp_path):
    sp = Spool(str(tmp_path), 1 << 20)
    fill(sp, 0, 600, size=1000)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".seg")]) > 2
    drain(sp)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".seg")]) == 1


def _broker_message(n: int, first_seq: int, width_used: int = 8) -> dict:
    arr = schema.empty("process", n)
    arr["sensor_sequence_number"] = np.arange(first_seq, first_seq + n)
    arr["sensor_monotime_nanos"] = 1000 + np.arange(n)
    arr["exec_command_line"] = b"x" * width_used
    b = wire.columns("process", arr, containers={})
    msg = {"type": "batches", "sensor_id": "s", "batches": [b, wire.columns("file", schema.empty("file", 0))]}
    return msgpack.unpackb(msgpack.packb(msg), raw=False, strict_map_key=False)


def test_broker_batches_become_messages_with_sequence_ids():
    out = list(messages.from_broker(_broker_message(5, 41), "sens"))
    assert len(out) == 1                                      # the empty file batch is skipped
    suffix, mid, n, payload = out[0]
    assert (suffix, mid, n) == ("process", "sens-41-1000", 5)
    b = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert b["sensor_id"] == "sens"
    arr = wire.decode_columns(b)
    assert arr["sensor_sequence_number"].tolist() == [41, 42, 43, 44, 45]


def test_a_batch_past_the_size_limit_is_split_without_losing_a_row():
    msg = _broker_message(3000, 1, width_used=200)
    out = list(messages.from_broker(msg, "s", max_payload=100_000))
    assert len(out) > 4 and all(len(p) <= 100_000 for *_, p in out)
    seqs = np.concatenate([wire.decode_columns(msgpack.unpackb(p, raw=False, strict_map_key=False))
                           ["sensor_sequence_number"] for *_, p in out])
    assert seqs.tolist() == list(range(1, 3001))
    assert len({mid for _, mid, _, _ in out}) == len(out)    # distinct ids per part
    assert sum(n for _, _, n, _ in out) == 3000


def test_lost_record_is_a_lost_batch_from_source_export():
    mid, payload = messages.lost_record("s", 12, 30)
    arr = wire.decode_columns(msgpack.unpackb(payload, raw=False, strict_map_key=False))
    assert mid == "s-lost-export-30"
    assert arr["source"].tolist() == [b"export"] and arr["count"].tolist() == [12]


def test_alert_follower_reads_complete_lines_follows_rotation_and_resumes(tmp_path):
    path = tmp_path / "alerts.jsonl"
    sp = Spool(str(tmp_path / "spool"), 4 << 20)
    fo = AlertFollower(str(path), sp, "s", str(tmp_path / "alerts.pos"))
    assert fo.poll() == 0                                    # no file yet
    with open(path, "a") as f:
        f.write(json.dumps({"rule": "a"}) + "\n" + '{"rule": "b"')   # the second half-written
    assert fo.poll() == 1
    with open(path, "a") as f:
        f.write("}\n")
    assert fo.poll() == 1
    os.replace(path, str(path) + ".1")                       # the detector's rotation
    with open(str(path) + ".1", "a") as f:
        f.write(json.dumps({"rule": "c"}) + "\n")            # written just before it rotated
    with open(path, "a") as f:
        f.write(json.dumps({"rule": "d"}) + "\n")
    assert fo.poll() == 2
    fo.close()
    again = AlertFollower(str(path), sp, "s", str(tmp_path / "alerts.pos"))
    assert again.poll() == 0                                 # nothing twice after a restart
    rules = []
    while (rec := sp.peek()) is not None:
        assert rec.suffix == "alerts"
        rules += [a["rule"] for a in msgpack.unpackb(rec.payload, raw=False)["alerts"]]
        sp.ack(rec)
    assert rules == ["a", "b", "c", "d"]
