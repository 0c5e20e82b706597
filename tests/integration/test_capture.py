"""c8ctl record / replay against the real sensor, and the capture read by DuckDB.

A workload runs under a shell copied to a unique path; the recordings select
it with ``ancestor.exec_filename`` (evaluated in the broker), so the host's
other activity never lands in the files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.root

CATS = 8


def c8ctl(run_dir: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def started(proc: subprocess.Popen) -> dict:
    """The recorder's first stderr line: it comes once the broker runs its subscription."""
    line = proc.stderr.readline().decode()
    assert "subscription" in line, line + proc.stderr.read().decode()
    return json.loads(line)


def finished(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[str, dict]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    return out.decode(), json.loads(err.decode().strip().splitlines()[-1])


@pytest.fixture
def workload(tmp_path):
    """(shell copy, marker, run): run() makes the shell cat the marker CATS times."""
    token = secrets.token_hex(4)
    shell = tmp_path / f"sh-{token}"
    shutil.copy("/bin/sh", shell)
    marker = tmp_path / f"marker-{token}"
    marker.write_text("x\n")

    def run():
        p = subprocess.run([str(shell), "-c", f"i=0; while [ $i -lt {CATS} ]; do /bin/cat {marker} >/dev/null; i=$((i+1)); done"],
                           timeout=30)
        assert p.returncode == 0
    return str(shell), str(marker), run


def test_record_count_matches_a_live_subscriber(shared_sensor, workload, tmp_path):
    shell, marker, run = workload
    flt = f'ancestor.exec_filename == "{shell}"'
    out = tmp_path / "count.parquet"
    live = shared_sensor.client.subscribe({"events": {"process": {"filter": flt}, "file": {"filter": flt}}})
    count = 4 * CATS  # fewer than the workload makes: the recording stops at exactly this many
    rec = c8ctl(shared_sensor.run_dir, "record", "--events", "process,file", "--filter", flt,
                "--count", str(count), "-o", str(out))
    try:
        started(rec)
        run()
        _, stats = finished(rec)
        events = []
        deadline = time.monotonic() + 30
        for ev in live.events(timeout=5):
            if ev["type"] in ("process", "file"):
                events.append(ev)
            if len(events) >= count or time.monotonic() > deadline:
                break
    finally:
        live.close()
    # a kernel ring's loss on a busy host reaches both subscribers alike (lost rows in the
    # file); a loss at the broker for this reader only would make the streams differ
    assert stats["events"] == count and not stats["lost"].get("subscriber"), stats
    table = pq.read_table(out)
    rows = [r for r in table.to_pylist() if r["type"] != "lost"]
    assert len(rows) == count
    assert all(r["source"] and r["count"] > 0 for r in table.to_pylist() if r["type"] == "lost")
    first = sorted(events, key=lambda e: e["sensor_sequence_number"])[:count]
    assert len(first) == count
    keys = ("type", "kind", "sensor_sequence_number", "process_pid", "process_id", "exec_filename",
            "exec_command_line", "filename", "process_lineage", "container_id")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: e.get(k) for k in keys} for e in first]
    execs = [r for r in rows if r["kind"] == "EXEC"]
    assert execs and all(r["exec_filename"] == "/bin/cat" for r in execs)
    # every event's process is a child of the shell: the lineage names it as the parent
    assert all(r["process_lineage"] and r["process_lineage"][0]["exec_filename"] == shell for r in execs)
    assert any(r["filename"] == marker for r in rows)


def test_record_duration_then_duckdb_and_replay(shared_sensor, workload, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    shell, marker, run = workload
    out = tmp_path / "duration.parquet"
    flt = f'kind == "EXEC" and ancestor.exec_filename == "{shell}"'
    rec = c8ctl(shared_sensor.run_dir, "record", "--events", "process", "--filter", flt,
                "--duration", "4s", "-o", str(out))
    started(rec)
    run()
    _, stats = finished(rec)
    # the recording's own time (c8ctl's start-up on a loaded host is not part of it)
    assert 4 <= stats["seconds"] < 7, stats
    assert stats["events"] == CATS, stats
    # plain SQL over the file
    by_type = duckdb.sql(f"SELECT type, kind, count(*) AS n FROM '{out}' WHERE type <> 'lost' "
                         "GROUP BY ALL ORDER BY ALL").fetchall()
    assert by_type == [("process", "EXEC", CATS)]  # (a busy host's kernel ring losses are 'lost' rows)
    parents = duckdb.sql(f"SELECT DISTINCT process_lineage[1].exec_filename FROM '{out}' "
                         "WHERE type = 'process'").fetchall()
    assert parents == [(shell,)]
    # replay: a rule on the parent (a lineage field) raises one alert per cat
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
- rule: Cat under the test shell
  priority: notice
  events: {{process: [EXEC]}}
  condition: exec_filename == "/bin/cat" and parent.exec_filename == "{shell}"
  output: "cat {{exec_command_line}} (pid {{process_pid}})"
""")
    replay = c8ctl(shared_sensor.run_dir, "replay", str(out), "--rules", str(rules))
    text, summary = finished(replay)
    alerts = [json.loads(line) for line in text.splitlines()]
    assert len(alerts) == CATS and summary["alerts"] == CATS and summary["events"] == CATS
    assert {a["rule"] for a in alerts} == {"Cat under the test shell"}
    assert all(a["output"].startswith(f"cat /bin/cat {marker} (pid ") for a in alerts)
    pids = {r[0] for r in duckdb.sql(f"SELECT process_pid FROM '{out}' WHERE type = 'process'").fetchall()}
    assert {a["process"]["pid"] for a in alerts} == pids


def test_bad_arguments_are_clear_errors(shared_sensor, tmp_path):
    p = c8ctl(shared_sensor.run_dir, "record", "--events", "process", "--duration", "soon",
              "-o", str(tmp_path / "x.parquet"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "bad duration 'soon'" in err.decode()
    p = c8ctl(shared_sensor.run_dir, "record", "--events", "process", "--filter", "nosuchfield == 1",
              "--count", "5", "-o", str(tmp_path / "y.parquet"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "nosuchfield" in err.decode()
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    p = c8ctl(shared_sensor.run_dir, "replay", str(tmp_path / "z.parquet"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "not a Parquet file" in err.decode()
    assert shared_sensor.status()["broker_pid"]  # the sensor keeps running
    assert not os.path.exists(tmp_path / "y.parquet")



def test_record_until_ctrl_c_leaves_a_complete_file(shared_sensor, workload, tmp_path):
    """Without --count or --duration, Ctrl-C (SIGINT) ends the recording: exit 0, the
    footer written, the summary's rows those of the file."""
    shell, _, run = workload
    flt = f'kind == "EXEC" and ancestor.exec_filename == "{shell}"'
    out = tmp_path / "interrupted.parquet"
    with shared_sensor.client.subscribe({"events": {"process": {"filter": flt}}}) as live:
        rec = c8ctl(shared_sensor.run_dir, "record", "--events", "process", "--filter", flt, "-o", str(out))
        started(rec)
        run()
        seen = 0
        for ev in live.events(timeout=10):  # the broker has sent the workload's windows to both
            seen += ev["type"] == "process"
            if seen >= CATS:
                break
    rec.send_signal(signal.SIGINT)
    _, stats = finished(rec)
    table = pq.read_table(out)
    assert stats["rows"] == table.num_rows and stats["events"] <= CATS
    rows = [r for r in table.to_pylist() if r["type"] == "process"]
    assert all(r["kind"] == "EXEC" and r["exec_filename"] == "/bin/cat" for r in rows)
    meta = pq.ParquetFile(out).metadata.metadata  # the footer's key-value metadata
    assert json.loads(meta[b"c8.recorded"])["events"] == stats["events"]
