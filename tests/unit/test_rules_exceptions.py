"""Falco-style rule exceptions (c8/detections/rules.py): shape, appends, errors, effect on masks."""

from __future__ import annotations

import numpy as np

from c8 import schema
from c8.detections.engine import Engine
from c8.detections.rules import load_rules, load_rules_text

RULE = """
- list: trusted
  items: [/usr/bin/ansible, /usr/bin/salt]
- rule: Etc write
  priority: error
  events: {file: [OPEN]}
  condition: path like "/etc/*"
  output: "write {path}"
  exceptions:
    - name: known_writers
      fields: [process_exec_filename, path]
      comps: [=, like]
      values:
        - [/usr/sbin/sshd, "/etc/ssh/*"]
        - [/usr/bin/vi, /etc/motd]
    - name: trusted_programs
      fields: process_exec_filename
      values: [trusted]
    - name: by_uid
      fields: [uid, path]
      comps: [in, "="]
      values: []
"""


def file_batch(rows):
    b = schema.empty("file", len(rows))
    b["kind"] = schema.kind_code("file", "OPEN")
    for i, (exe, path, uid) in enumerate(rows):
        b["process_exec_filename"][i] = exe.encode()
        b["path"][i] = path.encode()
        b["uid"][i] = uid
    return b


def test_exceptions_keep_their_rows_out():
    rules, errors = load_rules_text(RULE)
    assert errors == [] and [e["name"] for e in rules[0].exceptions] == ["known_writers", "trusted_programs", "by_uid"]
    assert "not ((process_exec_filename == \"/usr/sbin/sshd\" and path like \"/etc/ssh/*\")" in rules[0].expanded
    engine = Engine(rules, track_execs=False)
    rows = [("/usr/sbin/sshd", "/etc/ssh/sshd_config", 0),  # excepted
            ("/usr/sbin/sshd", "/etc/passwd", 0),           # same program, another file: alerts
            ("/usr/bin/vi", "/etc/motd", 0),                # excepted
            ("/usr/bin/vi", "/etc/motd2", 0),
            ("/usr/bin/salt", "/etc/anything", 0),          # a list's item, by the list's name
            ("/tmp/salt", "/etc/anything", 0)]
    alerts = engine.evaluate("file", file_batch(rows), {})
    assert [a.event["path"] for a in alerts] == ["/etc/passwd", "/etc/motd2", "/etc/anything"]
    assert alerts[-1].process is not None and engine.matches["Etc write"] == 3


def test_append_adds_values_by_name_and_new_exceptions(tmp_path):
    base = tmp_path / "a.yaml"
    base.write_text(RULE)
    local = tmp_path / "b.yaml"
    local.write_text("""
- rule: Etc write
  append: true
  exceptions:
    - name: known_writers
      values: [[/tmp/salt, /etc/anything]]
    - name: by_uid
      values: [[[1000, 1001], /etc/motd2]]
""")
    rules, errors = load_rules([str(base), str(local)])
    assert errors == []
    [rule] = rules
    assert rule.files == [str(base), str(local)]
    rows = [("/tmp/salt", "/etc/anything", 0), ("/usr/bin/vi", "/etc/motd2", 1001),
            ("/usr/bin/vi", "/etc/motd2", 0)]
    alerts = Engine(rules, track_execs=False).evaluate("file", file_batch(rows), {})
    assert [(a.event["path"], a.event["uid"]) for a in alerts] == [("/etc/motd2", 0)]


def errors_of(text):
    return [str(e) for e in load_rules_text(text, "r.yaml")[1]]


BASE = """
- rule: R
  priority: error
  events: {file: [OPEN]}
  condition: path like "/etc/*"
  output: x
"""


def test_bad_exceptions_name_the_rule_the_exception_and_the_problem():
    assert errors_of(BASE + "  exceptions: {name: x}\n") == [
        "r.yaml: rule 'R': exceptions must be a list of {name, fields, comps, values} maps"]
    assert errors_of(BASE + "  exceptions: [{name: x, values: [a]}]\n") == [
        "r.yaml: rule 'R': exception 'x': missing fields"]
    assert errors_of(BASE + "  exceptions: [{name: x, fields: [path, uid], values: [[a]]}]\n") == [
        "r.yaml: rule 'R': exception 'x': each value must be a list of 2 (one per field: path, uid), got ['a']"]
    assert errors_of(BASE + "  exceptions: [{name: x, fields: [path], comps: [contains], values: [[a]]}]\n") == [
        "r.yaml: rule 'R': exception 'x': unknown comparison(s) contains (known: =, ==, !=, <, <=, >, >=, like, in)"]
    [err] = errors_of(BASE + "  exceptions: [{name: x, fields: [no_field], values: [[a]]}]\n")
    assert err.startswith("r.yaml: rule 'R': exception 'x': ") and "unknown field 'no_field'" in err
    assert errors_of(BASE + "  exceptions: [{name: x, fields: [path], values: [[a]], extra: 1}]\n") == [
        "r.yaml: rule 'R': exception 'x': unknown key(s) extra (known: comps, fields, name, values)"]
    assert errors_of(BASE + "- rule: R\n  append: true\n  exceptions: [{name: nope, values: [[a]]}]\n") == [
        "r.yaml: rule 'R': exception 'nope': values appended to no exception of that name (known: none)"]
    assert errors_of("- rule: Off\n  priority: error\n  events: [file]\n  condition: uid == 0\n  output: x\n") == [
        "r.yaml: rule 'False': the rule name must be a string (quote it), got False"]


def test_every_default_rule_has_description_priority_mitre_tags_and_exceptions():
    from c8.detections.rules import default_rules_path

    rules, errors = load_rules([default_rules_path()])
    assert errors == []
    assert len(rules) >= 30
    for r in rules:
        assert r.description and r.priority, r.name
        assert any(t.startswith("mitre_") for t in r.tags) and any(t[:1] == "T" and t[1:5].isdigit() for t in r.tags), r.name
        assert r.exceptions, f"{r.name}: no exceptions"
    assert np.unique([r.name for r in rules]).size == len(rules)
