"""Reload against a real supervised sensor: SIGHUP and `c8ctl reload` swap rules
without restarting the detector, refuse an invalid rule file or configuration
whole (the old rules keep alerting, `c8ctl status` shows the refusal), report
keys that need a restart, and apply limits.* to new subscriptions."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from c8.clients.client import Client, SensorError
from tests.integration.sensor import Sensor, wait_for

RULE = """- rule: {name}
  priority: warning
  events: {{process: [EXEC]}}
  condition: exec_filename like "*/{binary}"
  output: "{name} ran {{exec_filename}}"
"""


@pytest.fixture(scope="module")
def rsensor(tmp_path_factory):
    d = tmp_path_factory.mktemp("reload")
    for name in ("c8reload-a", "c8reload-b"):
        shutil.copy("/bin/true", d / name)
        os.chmod(d / name, 0o755)
    (d / "rules.yaml").write_text(RULE.format(name="Rule A", binary="c8reload-a"))
    s = Sensor(d, **{"detections": {"enabled": True, "rules": [str(d / "rules.yaml")]},
                     "alert_output": {"outputs": [{"type": "file",
                                                   "path": str(d / "out" / "alerts.json")}]}})
    s.start()
    wait_for(lambda: "subscribed to the broker" in s.output(), 60, 0.2, "the detector's subscription")
    yield s
    s.stop()


def alerts(s: Sensor, rule: str) -> list[dict]:
    try:
        with open(os.path.join(s.dir, "out", "alerts.json")) as f:
            return [a for a in map(json.loads, f) if a.get("rule") == rule]
    except FileNotFoundError:
        return []


def exec_and_pid(s: Sensor, name: str) -> int:
    p = subprocess.Popen([str(s.dir / name)])
    p.wait()
    return p.pid


def output_alerts(s: Sensor) -> int:
    """Alerts the file output's limiter passed on (run_dir/detector.json, every second)."""
    with open(os.path.join(s.run_dir, "detector.json")) as f:
        return json.load(f)["outputs"]["0:file"]["alerts"]


def detector_pid(s: Sensor) -> int:
    return next(c["pid"] for c in s.children() if c["name"] == "c8-detector")


def supervisor_reload(s: Sensor) -> dict:
    with open(os.path.join(s.run_dir, "supervisor.json")) as f:
        return json.load(f).get("reload") or {}


def wait_verdict(s: Sensor, after: int) -> dict:
    return wait_for(lambda: (r := supervisor_reload(s)).get("generation", 0) > after
                    and r.get("state") != "pending" and r, 30, 0.1, "the reload verdict")


def c8ctl(s: Sensor, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", s.run_dir, *args],
                          capture_output=True, text=True, timeout=60)


def write_config(s: Sensor, **changes) -> None:
    with open(s.config_path) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    with open(s.config_path, "w") as f:
        yaml.safe_dump(cfg, f)


def test_sighup_swaps_a_rule_without_restarting_the_detector(rsensor):
    s = rsensor
    pid = detector_pid(s)
    a_pid = exec_and_pid(s, "c8reload-a")
    wait_for(lambda: any(a["process"]["pid"] == a_pid for a in alerts(s, "Rule A")), 30, 0.1,
             "Rule A's alert before the reload")
    delivered = wait_for(lambda: output_alerts(s), 10, 0.2, "the file output's count")
    before = supervisor_reload(s).get("generation", 0)
    (s.dir / "rules.yaml").write_text(RULE.format(name="Rule B", binary="c8reload-b"))
    s.proc.send_signal(signal.SIGHUP)
    verdict = wait_verdict(s, before)
    assert verdict["state"] == "accepted", verdict
    # what the detector reads may hold webhook secrets: its user's alone
    st = os.stat(os.path.join(s.run_dir, "reload.json"))
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, pwd.getpwnam("capsule8").pw_uid)
    a_pid = exec_and_pid(s, "c8reload-a")
    b_pid = exec_and_pid(s, "c8reload-b")
    wait_for(lambda: any(a["process"]["pid"] == b_pid for a in alerts(s, "Rule B")), 30, 0.1,
             "the new rule's alert")
    # a ran before b and the detector evaluates in sequence order: Rule A is gone
    assert not [a for a in alerts(s, "Rule A") if a["process"]["pid"] == a_pid]
    assert detector_pid(s) == pid
    assert "c8-detector" in [c["name"] for c in s.children() if c["restarts"] == 0]
    # the output's alert limiter is the same one: its count goes on
    wait_for(lambda: output_alerts(s) >= delivered + 1, 10, 0.2, "the count to go on")


def test_invalid_rule_file_is_refused_and_the_old_rules_keep_alerting(rsensor):
    s = rsensor
    (s.dir / "rules.yaml").write_text(RULE.format(name="Rule B", binary="c8reload-b"))
    assert c8ctl(s, "reload").returncode == 0  # a known state: Rule B runs
    pid = detector_pid(s)
    (s.dir / "rules.yaml").write_text(
        RULE.format(name="Rule A", binary="c8reload-a")
        + "- rule: Broken\n  priority: warning\n  events: {process: [EXEC]}\n"
          "  condition: exec_filename likes 3\n  output: x\n")
    r = c8ctl(s, "reload")
    assert r.returncode == 1, r.stdout + r.stderr
    verdict = json.loads(r.stdout)
    assert verdict["state"] == "refused"
    assert "rules.yaml" in verdict["error"] and "Broken" in verdict["error"]
    status = c8ctl(s, "status")
    assert status.returncode == 0, status.stderr
    assert f"reload {verdict['generation']}: refused" in status.stdout
    assert "Broken" in status.stdout
    # the old rule set (Rule B only) still runs; the good rule of the refused file does not
    a_pid = exec_and_pid(s, "c8reload-a")
    b_pid = exec_and_pid(s, "c8reload-b")
    wait_for(lambda: any(a["process"]["pid"] == b_pid for a in alerts(s, "Rule B")), 30, 0.1,
             "the old rule's alert after the refusal")
    assert not [a for a in alerts(s, "Rule A") if a["process"]["pid"] == a_pid]
    assert detector_pid(s) == pid


def test_invalid_configuration_is_refused_whole(rsensor):
    s = rsensor
    (s.dir / "rules.yaml").write_text(RULE.format(name="Rule B", binary="c8reload-b"))
    write_config(s, limits={"filter_bytes": 100}, ring_pages=3)  # 3: not a power of two
    try:
        r = c8ctl(s, "reload")
        assert r.returncode == 1
        verdict = json.loads(r.stdout)
        assert verdict["state"] == "refused" and "ring_pages" in verdict["error"], verdict
        # limits.filter_bytes of the refused file did not apply
        long_filter = " or ".join(f'exec_filename == "/nonexistent/{i}"' for i in range(10))
        with Client(s.run_dir, timeout=5).subscribe({"events": {"process": {"filter": long_filter}}}):
            pass
    finally:
        write_config(s, limits={}, ring_pages=256)
        assert c8ctl(s, "reload").returncode == 0


def test_restart_only_keys_are_reported_and_limits_apply_to_new_subscriptions(rsensor):
    s = rsensor
    pid = detector_pid(s)
    write_config(s, ring_pages=128, limits={"filter_bytes": 100})
    try:
        r = c8ctl(s, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        verdict = json.loads(r.stdout)
        assert verdict["state"] == "accepted"
        assert verdict["restart_needed"] == ["ring_pages"]
        assert verdict["changed"] == ["limits.filter_bytes"]
        assert "restart needed for ring_pages" in c8ctl(s, "status").stdout
        long_filter = " or ".join(f'exec_filename == "/nonexistent/{i}"' for i in range(10))

        def refused() -> str | None:
            try:
                with Client(s.run_dir, timeout=5).subscribe({"events": {"process": {"filter": long_filter}}}):
                    return None
            except SensorError as exc:
                return str(exc)
        # the broker reads the accepted limits within a second
        assert "limits.filter_bytes" in wait_for(refused, 10, 0.5, "the new filter_bytes limit")
        assert detector_pid(s) == pid
    finally:
        write_config(s, ring_pages=256, limits={})
        assert c8ctl(s, "reload").returncode == 0
