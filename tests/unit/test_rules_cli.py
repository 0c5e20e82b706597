"""`c8ctl rules test|list`, the detector's rule table, and the default alert file output."""

from __future__ import annotations

import json
import os

import pytest

from c8.clients import c8ctl
from c8.detections.main import Detector
from c8.detections.rules import default_rules_path
from c8.supervisor import config

GOOD = """
- rule: Tmp exec
  priority: warning
  events: {process: [EXEC]}
  condition: exec_filename like "/tmp/*"
  output: "exec {exec_filename}"
"""

BAD = GOOD + """
- rule: Bad field
  priority: warning
  events: {process: [EXEC]}
  condition: no_such_field == 1
  output: "x"
- rule: Bad priority
  priority: loud
  events: {process: [EXEC]}
  condition: exec_filename == "/bin/x"
  output: "x"
- rule: Needs a default macro
  priority: warning
  events: {process: [EXEC]}
  condition: shell_exec
  output: "x"
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_rules_test_names_each_bad_rule_and_exits_1(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", BAD)
    assert c8ctl.main(["rules", "test", path]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert f"{path}: rule 'Bad field': condition on process events: at column 1: unknown field 'no_such_field'" in lines[0]
    assert lines[1].startswith(f"{path}: rule 'Bad priority': unknown priority 'loud'")
    assert lines[2] == f"{path}: rule 'Needs a default macro': unknown macro 'shell_exec'"
    assert out == "1 rules enabled of 1 loaded, 3 errors\n"


def test_rules_test_with_defaults_resolves_their_macros(tmp_path, capsys):
    path = write(tmp_path, "mine.yaml", GOOD + """
- rule: Shell anywhere
  priority: notice
  events: {process: [EXEC]}
  condition: shell_exec
  output: "shell {exec_filename}"
""")
    assert c8ctl.main(["rules", "test", "--with-defaults", path]) == 0
    out = capsys.readouterr().out
    assert out.endswith(" errors\n") and ", 0 errors" in out


def test_rules_test_good_file_and_missing_file(tmp_path, capsys):
    assert c8ctl.main(["rules", "test", write(tmp_path, "ok.yaml", GOOD)]) == 0
    assert capsys.readouterr().out == "1 rules enabled of 1 loaded, 0 errors\n"
    assert c8ctl.main(["rules", "test", str(tmp_path / "nope.yaml")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert c8ctl.main(["rules", "test", write(tmp_path, "y.yaml", "- rule: [unclosed\n")]) == 1
    assert "YAML error at line" in capsys.readouterr().err


def test_the_packaged_rules_test_clean(capsys):
    assert c8ctl.main(["rules", "test", default_rules_path() + "/default.yaml"]) == 0


def test_rules_list_reads_the_detectors_table(tmp_path, capsys):
    rules = write(tmp_path, "r.yaml", GOOD + "- rule: Switched off\n  priority: debug\n  events: [process]\n"
                                              "  condition: uid == 0\n  output: x\n  enabled: false\n")
    det = Detector({"run_dir": str(tmp_path), "detections": {"rules": [rules]},
                    "alert_output": {"outputs": []}}, client_factory=object)
    det.engine.matches["Tmp exec"] = 7
    det.alerts_by_rule["Tmp exec"] = 2
    det.write_stats()
    assert c8ctl.main(["--run-dir", str(tmp_path), "rules", "list", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table == [{"rule": "Tmp exec", "priority": "warning", "enabled": True, "files": [rules],
                      "matches": 7, "alerts": 2},
                     {"rule": "Switched off", "priority": "debug", "enabled": False, "files": [rules],
                      "matches": 0, "alerts": 0}]
    assert c8ctl.main(["--run-dir", str(tmp_path), "rules", "list"]) == 0
    text = capsys.readouterr().out
    assert "Tmp exec" in text and "1 rules enabled of 2 loaded" in text
    os.unlink(tmp_path / "detector.json")
    assert c8ctl.main(["--run-dir", str(tmp_path), "rules", "list"]) == 1
    assert "is the sensor running with detections.enabled?" in capsys.readouterr().err


def test_detections_default_on_with_the_alert_file(tmp_path):
    c = config.load(None, environ={})
    assert c.detections.enabled and c.detections.fold_period == 1.0
    outputs = c.as_dict()["alert_output"]["outputs"]
    assert outputs[-1] == {"type": "file", "enabled": True, "name": "alerts_file",
                           "path": "/var/log/capsule8/alerts.json", "max_bytes": 100 << 20, "backups": 5}
    assert c.alert_output.outputs == ({"type": "stdout", "enabled": True},)  # the key's own value
    # empty: no alert file; detections off: none either; already an output: not twice
    for env in ({"CAPSULE8_DETECTIONS_ALERTS_FILE": ""}, {"CAPSULE8_DETECTIONS_ENABLED": "false"},
                {"CAPSULE8_ALERT_OUTPUT_OUTPUTS": "[{type: file, path: /var/log/capsule8/alerts.json}]"}):
        c = config.load(None, environ=env)
        files = [o for o in c.as_dict()["alert_output"]["outputs"] if o["type"] == "file"]
        assert len(files) == (1 if "CAPSULE8_ALERT_OUTPUT_OUTPUTS" in env else 0), env


@pytest.mark.parametrize("value", ["/x/a.json", "relative.json"])
def test_alert_file_key_from_the_environment(value):
    c = config.load(None, environ={"CAPSULE8_DETECTIONS_ALERTS_FILE": value})
    assert c.alerts_file_output["path"] == value
