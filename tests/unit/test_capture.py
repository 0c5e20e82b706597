"""Captures: broker batches -> Parquet -> the same batches, events, lineage and alerts.

Batches travel the real wire encoding first (the test_c8ctl_format helpers);
no sensor runs here (tests/integration/test_capture.py records a real one).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c8 import schema
from c8.clients import capture, jsonlines
from c8.detections.engine import Engine
from c8.detections.rules import load_rules_text
from c8.protocol import batch as wire
from tests.unit.test_c8ctl_format import SENSOR, TEXTS, batch, over_the_wire

CATEGORIES = [c for c in schema.CATEGORIES if c not in ("kernel_call", "user_call")]

PROCESSES = {  # process_id -> [pid, exec_filename, command_line, parent process_id]
    "p" * 16: [10, "/usr/bin/bash", "bash -c x", "q" * 16],
    "q" * 16: [1, "/sbin/init", "init", ""],
}


def with_lineage(category, arr, table):
    arr = arr.copy()
    arr["process_id"][::2] = b"p" * 16  # half the events have a known lineage of two
    return category, arr, wire.Tables(table, PROCESSES)


def comparable(events):
    for ev in events:
        ev.pop("container")  # a batch-local index: renumbered on read
    return events


def write(path, windows, **kw):
    with capture.CaptureWriter(str(path), SENSOR, {"note": "unit"}, **kw) as w:
        for window in windows:
            w.write_window(window)
    return w


@pytest.mark.parametrize("category", CATEGORIES)
def test_round_trip_gives_the_same_events(tmp_path, category):
    src = with_lineage(*over_the_wire(category, batch(category, 200, 7)))
    write(tmp_path / "c.parquet", [[src]])
    got = list(capture.read_batches(str(tmp_path / "c.parquet")))
    assert [c for c, _, _ in got] == [category]
    _, arr, tables = got[0]
    assert arr.dtype.names == schema.dtype(category).names  # string columns only as wide as used
    declared = schema.dtype(category)
    assert all(arr.dtype[n].itemsize <= declared[n].itemsize for n in declared.names)
    full, _ = capture.rows_to_batch(category, pq.read_table(tmp_path / "c.parquet"), narrow=False)
    assert full.dtype == declared
    assert full.tolist() == arr.astype(declared).tolist()
    want = comparable(jsonlines.dicts(*src, SENSOR))
    assert comparable(jsonlines.dicts(category, arr, tables, SENSOR)) == want
    assert any(ev["process_lineage"] for ev in want)


def test_file_columns_named_as_fields_and_one_row_group_per_flush(tmp_path):
    windows = [[over_the_wire("process", batch("process", 50, s)), over_the_wire("file", batch("file", 30, s))]
               for s in range(4)]
    w = write(tmp_path / "c.parquet", windows, row_group_rows=100)
    pf = pq.ParquetFile(tmp_path / "c.parquet")
    assert pf.metadata.num_rows == w.rows == 320
    # 80 rows per window, flushed once past 100: two row groups of two windows each
    assert pf.num_row_groups == w.row_groups == 2
    assert [pf.metadata.row_group(i).num_rows for i in range(2)] == [160, 160]
    names = set(pf.schema_arrow.names)
    for category in ("process", "file"):
        assert {f.name for f in schema.fields(category) if f.dtype != "O" and "." not in f.name
                and f.name not in ("container", "id")} <= names
    meta = pf.schema_arrow.metadata
    assert meta[b"c8.capture"] == b"1" and meta[b"c8.sensor_id"] == SENSOR.encode()
    table = pq.read_table(tmp_path / "c.parquet")
    assert set(table.column("type").to_pylist()) == {"process", "file"}
    assert table.column("filename").null_count == 200  # process rows have no file name
    # a window's rows in sensor sequence order
    seq = table.column("sensor_sequence_number").to_numpy()
    first = seq[:80]
    assert (np.diff(first.astype(np.int64)) > 0).all()


def test_strings_invalid_utf8_are_replaced_not_lost():
    col = np.array(TEXTS, "S300")
    arr = capture.strings_to_arrow(col)
    assert arr.to_pylist() == [t.decode("utf-8", "replace") for t in TEXTS]
    back = capture.strings_from_arrow(arr.slice(1), 8)
    assert back.tolist() == [t.decode("utf-8", "replace").encode()[:8].rstrip(b"\0") for t in TEXTS[1:]]


def test_cut_window_keeps_the_first_n_in_sequence_order():
    p = schema.empty("process", 3)
    p["sensor_sequence_number"] = [1, 4, 6]
    f = schema.empty("file", 3)
    f["sensor_sequence_number"] = [2, 3, 5]
    lost = schema.empty("lost", 1)
    window, n = capture.cut_window([("lost", lost, {}), ("process", p, {}), ("file", f, {})], 3, {"process", "file"})
    assert n == 3
    assert {c: a["sensor_sequence_number"].tolist() for c, a, _ in window} == {
        "lost": [0], "process": [1], "file": [2, 3]}


RULE = """
- rule: Shell child of init
  priority: warning
  events: {process: [EXEC]}
  condition: exec_filename like "*/sh" and parent.exec_filename == "/sbin/init"
  output: "sh {exec_command_line} by {process_pid}"
"""


def test_replay_raises_the_alerts_the_live_batches_raise(tmp_path):
    arr = schema.empty("process", 4)
    arr["sensor_sequence_number"] = [1, 2, 3, 4]
    arr["kind"] = schema.kind_code("process", "EXEC")
    arr["exec_filename"] = [b"/bin/sh", b"/bin/sh", b"/bin/ls", b"/bin/sh"]
    arr["exec_command_line"] = [b"sh -c a", b"sh -c b", b"ls", b"sh -c d"]
    arr["process_id"] = [b"p" * 16, b"x" * 16, b"p" * 16, b"p" * 16]
    arr["process_pid"] = [11, 12, 13, 14]
    src = ("process", arr, wire.Tables({}, PROCESSES))
    rules, errors = load_rules_text(RULE)
    assert not errors
    live = [a.output for a in Engine(rules).evaluate(*src)]
    assert live == ["sh sh -c a by 11", "sh sh -c d by 14"]
    write(tmp_path / "c.parquet", [[src]])
    replayed = [a.output for _, _, alerts in capture.replay(str(tmp_path / "c.parquet"), Engine(rules))
                for a in alerts]
    assert replayed == live


def test_duckdb_counts_events_by_type(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    windows = [[over_the_wire("process", batch("process", 40, 1)), over_the_wire("file", batch("file", 25, 2))]]
    write(tmp_path / "c.parquet", windows)
    rows = duckdb.sql(f"SELECT type, count(*) FROM '{tmp_path / 'c.parquet'}' GROUP BY type ORDER BY type").fetchall()
    assert rows == [("file", 25), ("process", 40)]


def test_not_a_capture_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"nope")
    with pytest.raises(capture.CaptureError, match="not a Parquet file"):
        list(capture.read_batches(str(tmp_path / "x.parquet")))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "y.parquet")
    with pytest.raises(capture.CaptureError, match="not a c8 capture"):
        list(capture.read_batches(str(tmp_path / "y.parquet")))


def test_every_query_in_the_docs_runs(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "captures.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", doc, re.S)
    assert len(blocks) >= 8
    proc, files = batch("process", 60, 3), batch("file", 40, 4)
    for arr in (proc, files):  # CLOCK_MONOTONIC values a host has (days, not centuries)
        arr["sensor_monotime_nanos"] = arr["sensor_sequence_number"] * 1000
    windows = [[with_lineage(*over_the_wire("process", proc)), over_the_wire("file", files)]]
    path = tmp_path / "capture.parquet"
    with capture.CaptureWriter(str(path), SENSOR, {"c8.wall_minus_monotime_nanos": "1700000000000000000"}) as w:
        for window in windows:
            w.write_window(window)
    con = duckdb.connect()
    for block in blocks:
        for query in filter(str.strip, block.split(";")):
            con.sql(query.replace("'capture.parquet'", f"'{path}'")).fetchall()


def test_probe_argument_columns_are_named_as_not_stored(tmp_path):
    src = over_the_wire("kernel_call", batch("kernel_call", 10, 1, [("arg_fd", "<i4"), ("arg_name", "S32")]))
    w = write(tmp_path / "k.parquet", [[src]])
    assert w.rows == 10 and w.not_stored == {"arg_fd", "arg_name"}
    (category, arr, _), = capture.read_batches(str(tmp_path / "k.parquet"))
    assert category == "kernel_call"
    assert jsonlines.strings(arr["symbol"]) == jsonlines.strings(src[1]["symbol"])
