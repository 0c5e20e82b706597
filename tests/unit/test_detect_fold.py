"""Alert folding (c8/detections/fold.py): one action, one alert, in every output."""

from __future__ import annotations

import json
import time

import numpy as np

from c8 import schema
from c8.detections.alerts import Alert
from c8.detections.fold import Folder
from c8.detections.limiter import AlertLimiter
from c8.detections.main import Detector
from c8.detections.outputs.base import Output
from c8.detections.outputs.syslog import SyslogOutput

MS = 1_000_000


def alert(rule="R", pid=1, pid_id="p1", t_ms=0, path="/etc/x") -> Alert:
    ev = {"type": "file", "kind": "OPEN", "path": path, "filename": path}
    return Alert(rule=rule, priority="warning", output=f"open {path}", time_nanos=t_ms * MS, time="t",
                 event=ev, process={"pid": pid, "process_id": pid_id}, container={},
                 first_name=path, last_name=path, last_time_nanos=t_ms * MS, last_time="t")


class Clock:
    def __init__(self, now_ms=0):
        self.now = now_ms * MS

    def __call__(self):
        return self.now


def test_a_burst_folds_into_one_alert_with_count_first_and_last():
    clock = Clock()
    f = Folder(1.0, clock=clock)
    names = [f"/etc/passwd.lock.{i}" for i in range(30)]
    ready = f.add([alert(t_ms=i * 7, path=n) for i, n in enumerate(names)])  # 30 in 0.2 s
    assert ready == [] and len(f.pending) == 1
    clock.now = 1_400 * MS   # period (1 s from the first) plus grace (0.5 s) not yet past
    assert f.due() == []
    clock.now = 1_600 * MS
    [a] = f.due()
    assert (a.count, a.first_name, a.last_name) == (30, names[0], names[-1])
    assert a.last_time_nanos == 29 * 7 * MS
    assert a.output == f"open {names[0]} (30 events in 0.203s: first {names[0]}, last {names[-1]})"
    assert a.to_dict()["count"] == 30 and f.folded == 29 and not f.pending


def test_folds_are_per_rule_and_per_process():
    f = Folder(1.0, clock=Clock())
    f.add([alert(pid=1, pid_id="a", t_ms=0), alert(pid=2, pid_id="b", t_ms=1),
           alert(rule="S", pid=1, pid_id="a", t_ms=2), alert(pid=1, pid_id="a", t_ms=3)])
    out = f.drain()
    assert [(a.rule, a.process["process_id"], a.count) for a in out] == [("R", "a", 2), ("R", "b", 1), ("S", "a", 1)]
    assert out[1].output == "open /etc/x"   # a single alert's message is unchanged


def test_a_later_event_of_the_stream_closes_the_period():
    f = Folder(1.0, clock=Clock())
    assert f.add([alert(t_ms=0)]) == []
    f.observe(999 * MS)
    assert f.due() == []
    f.observe(1000 * MS)
    assert [a.count for a in f.due()] == [1]


def test_a_match_after_the_period_starts_a_new_alert():
    f = Folder(1.0, clock=Clock())
    ready = f.add([alert(t_ms=0, path="/a"), alert(t_ms=500, path="/b"), alert(t_ms=1000, path="/c")])
    assert [(a.count, a.first_name, a.last_name) for a in ready] == [(2, "/a", "/b")]
    assert [(a.count, a.first_name) for a in f.drain()] == [(1, "/c")]


def test_zero_period_passes_every_alert_and_pending_is_bounded():
    f = Folder(0)
    assert len(f.add([alert(t_ms=i) for i in range(3)])) == 3 and not f.pending
    f = Folder(1.0, max_pending=2, clock=Clock())
    ready = f.add([alert(pid=i, pid_id=str(i), t_ms=i) for i in range(3)])
    assert [a.process["pid"] for a in ready] == [0] and len(f.pending) == 2


class Recorder(Output):
    type = "rec"

    def __init__(self):
        super().__init__()
        self.sent = []

    def send(self, alert):
        self.sent.append(alert)

    def notice(self, text, details=None):
        self.sent.append(text)


def test_the_alert_limiter_counts_a_folded_alert_once():
    f = Folder(1.0, clock=Clock())
    f.add([alert(t_ms=i) for i in range(30)])
    rec = Recorder()
    lim = AlertLimiter(rec, limit_per_period=1, limit_period=60, clock=lambda: 0.0)
    for a in f.drain():
        lim.send(a)
    assert len(rec.sent) == 1 and rec.sent[0].count == 30 and lim.suppressed_total == 0


def test_syslog_carries_count_first_and_last():
    out = SyslogOutput(address="127.0.0.1:9", protocol="udp")
    try:
        sent = []
        out._transmit = sent.append  # the wire is tested in test_outputs; the message here
        f = Folder(1.0, clock=Clock())
        f.add([alert(t_ms=0, path="/etc/a"), alert(t_ms=5, path="/etc/b")])
        [a] = f.drain()
        out.deliver("alert", a.to_dict())
        assert 'count="2" first="/etc/a" last="/etc/b"' in sent[0]
        assert sent[0].endswith("open /etc/a (2 events in 0.005s: first /etc/a, last /etc/b)")
    finally:
        out.close()


RULES = """
- rule: Etc write
  priority: error
  events: {file: [OPEN]}
  condition: path like "/etc/*"
  output: "write {path} pid {process_pid}"
"""


def file_batch(pids, paths, t0_ms=0):
    """File OPENs stamped from now (the detector's clock closes folds a period after them)."""
    b = schema.empty("file", len(paths))
    b["kind"] = schema.kind_code("file", "OPEN")
    b["process_pid"] = pids
    b["process_id"] = [f"id-{p}".encode() for p in pids]
    b["path"] = [p.encode() for p in paths]
    b["filename"] = b["path"]
    b["sensor_monotime_nanos"] = time.monotonic_ns() + (t0_ms + np.arange(len(paths)) * 5) * MS
    return b


def test_detector_folds_before_its_outputs(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    out = tmp_path / "alerts.json"
    config = {"run_dir": str(tmp_path), "detections": {"rules": [str(rules)], "fold_period": "1s"},
              "alert_output": {"outputs": [{"type": "file", "path": str(out), "limit_per_period": 10,
                                            "limit_period": "60s"}]}}
    det = Detector(config, client_factory=object)
    names = [f"/etc/f{i}" for i in range(30)]
    assert det.handle("file", file_batch([7] * 20, names[:20]), {}) == 0
    assert det.handle("file", file_batch([7] * 10 + [8], names[20:] + ["/etc/other"], 100), {}) == 0
    det.folder.observe(time.monotonic_ns() + 2_000 * MS)   # the stream has moved past the period
    assert det.send_due() == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(a["process"]["pid"], a["count"], a["first_name"], a["last_name"]) for a in lines] == [
        (7, 30, "/etc/f0", "/etc/f29"), (8, 1, "/etc/other", "/etc/other")]
    assert det.engine.matches["Etc write"] == 31 and det.alerts_by_rule == {"Etc write": 2}
    assert det.outputs[0].delivered_total == 2
    det.close()


def test_detector_sends_open_folds_when_it_stops(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    out = tmp_path / "alerts.json"
    det = Detector({"run_dir": str(tmp_path), "detections": {"rules": [str(rules)], "fold_period": 5},
                    "alert_output": {"outputs": [{"type": "file", "path": str(out)}]}},
                   client_factory=object)
    det.handle("file", file_batch([7, 7], ["/etc/a", "/etc/b"]), {})
    assert not out.exists() or out.read_text() == ""
    det.close()
    [a] = [json.loads(x) for x in out.read_text().splitlines()]
    assert a["count"] == 2 and a["last_name"] == "/etc/b"
