"""Reload without a kernel: which keys apply live, the detector's all-or-nothing
swap (alert limiters of unchanged outputs keep their counts), and /healthz's
reasons. The whole flow against a real sensor is tests/integration/test_reload.py."""

from __future__ import annotations

import json

import pytest
import yaml

from c8 import schema
from c8.detections.main import Detector, ReloadRefused
from c8.supervisor import config, reload
from c8.supervisor.metrics import Snapshot, health, parse_listen

RULE = """- rule: {name}
  priority: warning
  events: {{process: [EXEC]}}
  condition: exec_filename == "{path}"
  output: "{name} {{exec_filename}}"
"""


def exec_batch(path: str, seq: int = 1):
    b = schema.empty("process", 1)
    b["kind"] = schema.kind_code("process", "EXEC")
    b["exec_filename"] = path.encode()
    b["sensor_sequence_number"] = seq
    b["process_id"] = b"p1"
    return b


def detector_config(tmp_path, outputs=None) -> dict:
    return {"run_dir": str(tmp_path), "detections": {"rules": [str(tmp_path / "rules.yaml")]},
            "alert_output": {"outputs": outputs or [
                {"type": "file", "path": str(tmp_path / "a.json"), "limit_per_period": 1,
                 "limit_period": "1h"}]}}


def test_live_and_restart_only_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ring_pages": 64}))
    running = config.load(str(path), environ={})
    path.write_text(yaml.safe_dump({"ring_pages": 128, "limits": {"probes": 3},
                                    "detections": {"rules": ["/x"]}, "run_dir": "/tmp/other"}))
    plan = reload.plan_reload(running)
    assert plan.changed == ["detections.rules", "limits.probes"]
    assert sorted(plan.restart_needed) == ["ring_pages", "run_dir"]
    assert plan.merged.limits.probes == 3 and plan.merged.detections.rules == ("/x",)
    assert plan.merged.ring_pages == 64 and plan.merged.run_dir == running.run_dir  # kept
    path.write_text("ring_pages: 3\n")
    with pytest.raises(config.ConfigError, match="ring_pages: 3"):
        reload.plan_reload(running)


def test_reload_keeps_the_alert_limiter_of_an_unchanged_output(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULE.format(name="A", path="/a"))
    cfg = detector_config(tmp_path)
    det = Detector(cfg, client_factory=object)
    assert det.handle("process", exec_batch("/a", 1), {}) == 1
    assert det.handle("process", exec_batch("/a", 2), {}) == 1  # raised, suppressed by the limiter
    limiter = det.outputs[0]
    assert limiter.stats()["alerts"] == 1 and limiter.stats()["suppressed"] == 1

    (tmp_path / "rules.yaml").write_text(RULE.format(name="B", path="/b"))
    (tmp_path / "reload.json").write_text(json.dumps({"generation": 1, "config": cfg}))
    engine = det.reload()
    assert engine is not None and [r.name for r in engine.rules] == ["B"]
    assert det.outputs[0] is limiter  # same entry: same limiter, same period
    assert det.handle("process", exec_batch("/a", 3), {}) == 0
    assert det.handle("process", exec_batch("/b", 4), {}) == 1
    assert limiter.stats()["suppressed"] == 2  # still within its period's limit of 1
    det.write_stats()  # the ticker's, every second
    stats = json.loads((tmp_path / "detector.json").read_text())
    assert stats["reload"]["state"] == "accepted" and stats["reload"]["generation"] == 1
    assert stats["alerts_by_rule"] == {"A": 2, "B": 1}


def test_reload_with_a_bad_rule_or_output_is_refused_whole(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULE.format(name="A", path="/a"))
    cfg = detector_config(tmp_path)
    det = Detector(cfg, client_factory=object)
    (tmp_path / "rules.yaml").write_text(RULE.format(name="B", path="/b")
                                         + "- rule: C\n  condition: nope ==\n")
    (tmp_path / "reload.json").write_text(json.dumps({"generation": 2, "config": cfg}))
    assert det.reload() is None
    assert [r.name for r in det.engine.rules] == ["A"]  # the good rule B is not half-applied
    assert det.reload_state["state"] == "refused" and "rule 'C'" in det.reload_state["error"]

    (tmp_path / "rules.yaml").write_text(RULE.format(name="B", path="/b"))
    bad = dict(cfg, alert_output={"outputs": [{"type": "stdout"}, {"type": "carrier-pigeon"}]})
    (tmp_path / "reload.json").write_text(json.dumps({"generation": 3, "config": bad}))
    with pytest.raises(ReloadRefused, match="carrier-pigeon"):
        det.prepare_reload(bad)
    assert det.reload() is None and [r.name for r in det.engine.rules] == ["A"]
    assert "alert_output.outputs[1]" in det.reload_state["error"]


def test_reload_skips_events_the_old_subscription_delivered(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULE.format(name="A", path="/a"))
    det = Detector(detector_config(tmp_path, [{"type": "file", "path": str(tmp_path / "a.json")}]),
                   client_factory=object)
    det.skip_through = 10
    assert det.handle("process", exec_batch("/a", 10), {}) == 0
    assert det.handle("process", exec_batch("/a", 11), {}) == 1


def test_health_reasons():
    children = [{"name": "c8-broker", "state": "RUNNING"},
                {"name": "c8-collector cpu0", "state": "RUNNING"},
                {"name": "c8-collector cpu1", "state": "RUNNING"},
                {"name": "c8-detector", "state": "BACKOFF", "last_exit_reason": "exit status 1"}]
    broker = {"collectors": {"0": {"seen_ago": 0.4}, "1": {"seen_ago": 7.25}}}
    assert health(children, broker, None) == [
        "c8-detector is BACKOFF (exit status 1)",
        "c8-collector cpu1 has not reported for 7.2s (it reports every 1s)"]
    assert health(children[:2], None, "no status reply within 1.0s") == [
        "the broker does not answer: no status reply within 1.0s"]
    assert health(children[:3], {"collectors": {"0": {"seen_ago": 0.1}}}, None) == [
        "c8-collector cpu1 has not reported to the broker"]
    assert health(children[:3], {"collectors": {"0": {"seen_ago": 0.1}, "1": {"seen_ago": 1}}}, None) == []


def test_restarts_by_reason_and_listen_parsing():
    snap = Snapshot()
    snap.update([{"name": "c8-broker", "restarts": 0}])
    snap.update([{"name": "c8-broker", "restarts": 1, "last_exit_reason": "hung"}])
    snap.update([{"name": "c8-broker", "restarts": 1, "last_exit_reason": "hung"}])
    snap.update([{"name": "c8-broker", "restarts": 3, "last_exit_reason": "killed by SIGKILL"}])
    assert snap.read()[1] == {("c8-broker", "hung"): 1, ("c8-broker", "killed by SIGKILL"): 2}
    assert parse_listen("127.0.0.1:9464")[1:] == ("127.0.0.1", 9464)
    assert parse_listen(":9464")[1:] == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464")[1:] == ("::1", 9464)
