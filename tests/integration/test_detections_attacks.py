"""Detections that cannot be sidestepped: attacks by other names, against a real sensor.

One sensor runs the packaged default rules and sends alerts to a local HTTP
server (the webhook output). Each test makes a real attack on this host:
/etc/shadow read as /etc/../etc/../etc/shadow, by a relative name after cd,
through a directory fd and through a symlinked directory; a hardlink and
symlinks made to /etc/shadow; shred; a search for private keys; and checks
the alert and the resolved `path`/`oldpath`. A benign neighbour of each runs
first and must not alert. A real useradd/userdel raises one alert each,
while another program's write to /etc/shadow still alerts.

Processes that must be resolved against their cwd or fds stay alive until
their alert arrives (the broker asks /proc for them); short-lived ones show
what happens when they cannot be asked (docs/events.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from c8.detections.rules import default_rules_path
from tests.integration.sensor import Sensor, wait_for
from tests.integration.test_detections_e2e import Receivers, detector_ready

pytestmark = pytest.mark.root

ATTEMPTS = 3          # the sensor is lossy by design: an attempt's events may be dropped
ATTEMPT_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def sensor(tmp_path_factory, rx, workdir):
    # fold_period 0: one alert per event, so each event's resolved path is checked
    # (folding has its own test, test_alerts_fold.py)
    s = Sensor(tmp_path_factory.mktemp("att"),
               detections={"enabled": True, "rules": [default_rules_path()], "fold_period": "0s"},
               alert_output={"outputs": [{"type": "webhook", "url": rx.url, "insecure": True}]}).start()
    try:
        detector_ready(s, rx, workdir)
        yield s
    finally:
        s.stop()


def pid_of(alert: dict) -> int:
    return alert["process"]["pid"]


def in_tree(alert: dict, process_ids: set[str]) -> bool:
    """The alert's process is one of ``process_ids`` or one of their descendants (lineage)."""
    return alert["process"]["process_id"] in process_ids or any(
        a["process_id"] in process_ids for a in alert["event"].get("process_lineage") or [])


def barrier(rx: Receivers, workdir: str) -> None:
    """Every event before this call has been through the detector: the detector
    handles events in time order, so once a later canary's alert is in, so are
    the alerts of everything before it."""
    canary = os.path.join(workdir, f"canary-{uuid.uuid4().hex[:8]}")
    shutil.copy("/bin/true", canary)

    def seen():
        subprocess.run([canary], check=True)
        return [a for a in rx.alerts("Execution from temporary directory")
                if a["event"]["exec_filename"] == canary]
    wait_for(seen, 40, 1.0, "the canary's alert (barrier)")


def attempt(rx: Receivers, rule: str, act, what: str) -> dict:
    """Run act() (benign neighbour, then the attack; returns match(alert)) until the alert comes."""
    for i in range(ATTEMPTS):
        match = act()
        try:
            return wait_for(lambda match=match: next((a for a in rx.alerts(rule) if match(a)), None),
                            ATTEMPT_TIMEOUT, 0.1, f"alert {rule!r} for {what}")
        except AssertionError:
            if i == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def attempt_many(rx: Receivers, rule: str, act, count: int, what: str) -> list[dict]:
    """Like attempt, for an attack that makes ``count`` alerts: all of one attempt."""
    for i in range(ATTEMPTS):
        match = act()

        def found(match=match):
            hits = [a for a in rx.alerts(rule) if match(a)]
            return hits if len(hits) >= count else None
        try:
            return wait_for(found, ATTEMPT_TIMEOUT, 0.1, f"{count} alerts {rule!r} for {what}")
        except AssertionError:
            if i == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def run(argv, **kw) -> int:
    p = subprocess.Popen(argv, **kw)
    assert p.wait() == 0, argv
    return p.pid


class Holder:
    """A python child that runs ``code`` and then stays alive (its cwd and fds can be
    asked by the broker) until closed."""

    def __init__(self, code: str):
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) + "\nimport sys; sys.stdin.read()\n"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.pid = self.p.pid

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


def no_alert(rx: Receivers, rule: str, pids: set[int]) -> None:
    bad = [a for a in rx.alerts(rule) if pid_of(a) in pids]
    assert not bad, f"benign workload alerted {rule!r}: {[a['output'] for a in bad]}"


# ---- sensitive file reads by other names ----------------------------------------------------

def test_dotdot_read_of_shadow(sensor, rx, workdir):
    rule, benign = "Read sensitive file", set()

    def act():
        benign.add(run(["/bin/cat", "/etc/../etc/../etc/hostname"], stdout=subprocess.DEVNULL))
        pid = run(["/bin/cat", "/etc/../etc/../etc/shadow"], stdout=subprocess.DEVNULL)
        return lambda a: pid_of(a) == pid
    alert = attempt(rx, rule, act, "cat /etc/../etc/../etc/shadow")
    ev = alert["event"]
    assert ev["filename"] == "/etc/../etc/../etc/shadow" and ev["path"] == "/etc/shadow"
    assert ev["kind"] == "OPEN" and ev["ret"] >= 0
    assert "/etc/shadow" in alert["output"]
    barrier(rx, workdir)
    no_alert(rx, rule, benign)


def test_cd_etc_then_relative_read(sensor, rx, workdir):
    """`cd /etc && cat shadow`: cat is gone before the broker can read its cwd, so
    path is empty and the name's last component matches; a process that stays
    resolves to /etc/shadow exactly."""
    rule, benign = "Read sensitive file", set()

    def act():
        benign.add(run(["bash", "-c", "cd /etc && exec cat hostname"], stdout=subprocess.DEVNULL))
        pid = run(["bash", "-c", "cd /etc && exec cat shadow"], stdout=subprocess.DEVNULL)
        return lambda a: pid_of(a) == pid
    alert = attempt(rx, rule, act, "cd /etc && cat shadow")
    assert alert["event"]["filename"] == "shadow" and alert["event"]["path"] in ("/etc/shadow", "")

    holders = []

    def act_alive():
        h = Holder("import os; os.chdir('/etc'); os.close(os.open('hostname', os.O_RDONLY)); "
                   "os.close(os.open('./shadow', os.O_RDONLY))")
        holders.append(h)
        return lambda a: pid_of(a) == h.pid
    try:
        alert = attempt(rx, rule, act_alive, "chdir('/etc'); open('./shadow')")
        assert alert["event"]["filename"] == "./shadow" and alert["event"]["path"] == "/etc/shadow"
    finally:
        for h in holders:
            h.close()
    barrier(rx, workdir)
    no_alert(rx, rule, benign)
    hostname = [a for a in rx.alerts(rule) if a["event"]["filename"] == "hostname"]
    assert not hostname


def test_openat_with_dirfd_and_symlinked_directory(sensor, rx, workdir):
    rule = "Read sensitive file"
    link = os.path.join(workdir, f"etc-{uuid.uuid4().hex[:6]}")
    os.symlink("/etc", link)
    holders = []

    def act():
        h = Holder(f"""
            import os
            d = os.open('/etc', os.O_RDONLY | os.O_DIRECTORY)
            os.close(os.open('hostname', os.O_RDONLY, dir_fd=d))
            os.close(os.open('shadow', os.O_RDONLY, dir_fd=d))
            os.close(os.open({link!r} + '/../etc/gshadow', os.O_RDONLY))
        """)
        holders.append(h)
        return lambda a: pid_of(a) == h.pid
    try:
        pid = pid_of(attempt_many(rx, rule, act, 2, "openat(dirfd of /etc, 'shadow') and a symlinked dir")[0])
        barrier(rx, workdir)
        mine = [a for a in rx.alerts(rule) if pid_of(a) == pid]
        by_path = {a["event"]["path"]: a["event"]["filename"] for a in mine}
        assert by_path == {"/etc/shadow": "shadow", "/etc/gshadow": link + "/../etc/gshadow"}, by_path
        assert len(mine) == 2
    finally:
        for h in holders:
            h.close()


# ---- links to sensitive files -------------------------------------------------------------------

def test_hardlink_to_shadow_then_read_through_it(sensor, rx, workdir):
    rule = "Link to sensitive file"
    made = []

    def act():
        tag = uuid.uuid4().hex[:8]
        benign_link = os.path.join(workdir, f"hosts-{tag}")
        run(["/bin/ln", "/etc/hostname", benign_link])
        hl = os.path.join(workdir, f"hl-{tag}")
        pid = run(["/bin/ln", "/etc/shadow", hl])
        made.extend([benign_link, hl])
        run(["/bin/cat", hl], stdout=subprocess.DEVNULL)  # the read the link was made for
        return lambda a: pid_of(a) == pid and a["event"]["path"] == hl
    alert = attempt(rx, rule, act, "ln /etc/shadow <workdir>/hl")
    ev = alert["event"]
    assert ev["kind"] == "LINK" and ev["oldname"] == "/etc/shadow" and ev["oldpath"] == "/etc/shadow"
    assert alert["priority"] == "error" and "/etc/shadow" in alert["output"]
    barrier(rx, workdir)
    assert not [a for a in rx.alerts(rule) if "hosts-" in a["event"]["path"]]


def test_symlinks_to_shadow(sensor, rx, workdir):
    rule = "Link to sensitive file"
    sub = os.path.join(workdir, f"d-{uuid.uuid4().hex[:6]}")
    os.mkdir(sub)
    depth = "../" * sub.count("/")  # from the link's directory up to /

    def act():
        tag = uuid.uuid4().hex[:8]
        run(["/bin/ln", "-s", "/etc/hostname", os.path.join(sub, f"h-{tag}")])
        a = os.path.join(sub, f"abs-{tag}")
        b = os.path.join(sub, f"rel-{tag}")
        pa = run(["/bin/ln", "-s", "/etc/../etc/shadow", a])
        pb = run(["/bin/ln", "-s", f"{depth}etc/shadow", b])
        return lambda al: (pid_of(al), al["event"]["path"]) in ((pa, a), (pb, b))

    def both_ways():
        match = act()
        return wait_for(lambda: len([a for a in rx.alerts(rule) if match(a)]) == 2 and
                        [a for a in rx.alerts(rule) if match(a)], ATTEMPT_TIMEOUT, 0.1, "both symlink alerts")
    for i in range(ATTEMPTS):
        try:
            alerts = both_ways()
            break
        except AssertionError:
            if i == ATTEMPTS - 1:
                raise
    for a in alerts:
        assert a["event"]["kind"] == "SYMLINK" and a["event"]["oldpath"] == "/etc/shadow", a["event"]
    barrier(rx, workdir)
    assert not [a for a in rx.alerts(rule) if "/h-" in a["event"]["path"]]


# ---- destruction and discovery -------------------------------------------------------------------

def test_shred(sensor, rx, workdir):
    rule, benign = "Secure deletion of files", set()

    def act():
        tag = uuid.uuid4().hex[:8]
        keep, gone = os.path.join(workdir, f"keep-{tag}"), os.path.join(workdir, f"evidence-{tag}")
        for p in (keep, gone):
            with open(p, "w") as f:
                f.write("x" * 4096)
        benign.add(run(["/bin/rm", "-f", keep]))
        pid = run(["/usr/bin/shred", "-u", gone])
        assert not os.path.exists(gone)
        return lambda a: pid_of(a) == pid and gone in a["event"]["exec_command_line"]
    alert = attempt(rx, rule, act, "shred -u")
    assert alert["event"]["exec_filename"] == "/usr/bin/shred" and alert["priority"] == "warning"
    barrier(rx, workdir)
    no_alert(rx, rule, benign)


def test_private_key_search(sensor, rx, workdir):
    rule, benign = "Search for private keys or credentials", set()

    def searched(argv) -> int:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        p.wait()  # grep finds nothing (status 1): still a search
        return p.pid

    def act():
        benign.add(run(["/usr/bin/find", workdir, "-name", "*.log"], stdout=subprocess.DEVNULL))
        benign.add(searched(["/bin/grep", "-r", "TODO", workdir]))
        pids = {run(["/usr/bin/find", workdir, "-name", "id_rsa", "-o", "-name", "*.pem"],
                    stdout=subprocess.DEVNULL),
                searched(["/bin/grep", "-rl", "BEGIN OPENSSH PRIVATE KEY", workdir])}
        return lambda a: pid_of(a) in pids
    alerts = attempt_many(rx, rule, act, 2, "find -name id_rsa, grep PRIVATE KEY")
    lines = sorted(a["event"]["exec_command_line"] for a in alerts)
    assert "id_rsa" in lines[1] and "PRIVATE KEY" in lines[0], lines
    barrier(rx, workdir)
    no_alert(rx, rule, benign)


# ---- one action, one alert: the account tools ---------------------------------------------------

def test_useradd_userdel_one_alert_each_and_shadow_tamper_still_alerts(sensor, rx, workdir):
    rule = "User account management"
    for i in range(ATTEMPTS):
        user = f"c8t{uuid.uuid4().hex[:8]}"
        add = run(["/usr/sbin/useradd", user])
        delete = run(["/usr/sbin/userdel", user])
        try:
            wait_for(lambda add=add, delete=delete: {pid_of(a) for a in rx.alerts(rule)} >= {add, delete},
                     ATTEMPT_TIMEOUT, 0.1, "useradd and userdel alerts")
            break
        except AssertionError:
            if i == ATTEMPTS - 1:
                raise
    barrier(rx, workdir)
    with rx.lock:
        everything = list(rx.posts)
    for pid, cmd in ((add, f"/usr/sbin/useradd {user}"), (delete, f"/usr/sbin/userdel {user}")):
        # the command's process by its process_id (pids are reused), then its alerts and its children's
        pids = {a["process"]["process_id"] for a in rx.alerts(rule) if pid_of(a) == pid}
        mine = [a for a in everything if a.get("type") == "alert" and in_tree(a, pids)]
        assert [(a["rule"], a["event"].get("exec_command_line")) for a in mine] == [(rule, cmd)], \
            [(a["rule"], a["output"]) for a in mine]

    # another program writing /etc/shadow (opened for append, nothing written) still alerts
    def tamper():
        pid = run([sys.executable, "-c", "import os; os.close(os.open('/etc/shadow', os.O_WRONLY | os.O_APPEND))"])
        return lambda a: pid_of(a) == pid and a["event"]["path"] == "/etc/shadow"
    alert = attempt(rx, "Write below system directory", tamper, "python opening /etc/shadow for writing")
    assert alert["event"]["kind"] == "OPEN" and alert["priority"] == "error"


# ---- attribute changes through an fd ----------------------------------------------------------

def test_fchmod_setuid_resolves_path_from_the_fd(sensor, rx, workdir):
    """fchmod(fd, 04755) carries no name: path is what the fd names (the process keeps it open)."""
    rule = "Set-user-ID or set-group-ID bit set"
    holders = []

    def act():
        target = os.path.join(workdir, f"suid-{uuid.uuid4().hex[:8]}")
        shutil.copy("/bin/true", target)
        h = Holder(f"""
            import os
            fd = os.open({target!r}, os.O_RDONLY)
            os.fchmod(fd, 0o755)
            os.fchmod(fd, 0o4755)
        """)
        holders.append((h, target))
        return lambda a: pid_of(a) == h.pid
    try:
        alert = attempt(rx, rule, act, "fchmod(fd, 04755)")
        target = next(t for h, t in holders if h.pid == pid_of(alert))
        ev = alert["event"]
        assert ev["kind"] == "ATTRIBUTE_CHANGE" and ev["filename"] == "" and ev["path"] == target
        assert ev["open_mode"] == 0o4755 and target in alert["output"]
        barrier(rx, workdir)
        assert len([a for a in rx.alerts(rule) if pid_of(a) == pid_of(alert)]) == 1  # not the 0755
    finally:
        for h, _ in holders:
            h.close()


def test_chmod_of_shadow_by_name_and_fd(sensor, rx, workdir):
    """chmod of /etc/shadow to the mode it has (nothing changes) by ../ and through an fd."""
    rule = "Sensitive file permissions changed"
    mode = os.stat("/etc/shadow").st_mode & 0o7777
    holders = []

    def act():
        h = Holder(f"""
            import os
            os.chmod('/etc/../etc/shadow', {mode})
            fd = os.open('/etc/shadow', os.O_RDONLY)
            os.fchmod(fd, {mode})
        """)
        holders.append(h)
        return lambda a: pid_of(a) == h.pid
    try:
        alerts = attempt_many(rx, rule, act, 2, "chmod /etc/../etc/shadow, fchmod of its fd")
        assert sorted(a["event"]["filename"] for a in alerts) == ["", "/etc/../etc/shadow"]
        assert {a["event"]["path"] for a in alerts} == {"/etc/shadow"}
    finally:
        for h in holders:
            h.close()


# ---- persistence and covering tracks ----------------------------------------------------------

def py(code: str) -> int:
    """Run python code in a child process to its end; its pid."""
    return run([sys.executable, "-c", textwrap.dedent(code)])


def check_rule(rx: Receivers, workdir: str, rule: str, benign_act, attack, what: str) -> dict:
    """benign_act() -> pids that must not alert; attack() -> (pid, match(alert))."""
    benign: set[int] = set()

    def act():
        benign.update(benign_act())
        pid, match = attack()
        return lambda a: pid_of(a) == pid and match(a)
    alert = attempt(rx, rule, act, what)
    barrier(rx, workdir)
    no_alert(rx, rule, benign)
    return alert


def test_ld_so_preload_written(sensor, rx, workdir):
    # an empty /etc/ld.so.preload, removed at once: no program loads anything from it
    assert not os.path.exists("/etc/ld.so.preload"), "this host already has /etc/ld.so.preload"

    def benign():
        return {py("import os\ntry: os.close(os.open('/etc/ld.so.preload', os.O_RDONLY))\nexcept OSError: pass")}

    def attack():
        pid = py("""
            import os
            os.chdir('/etc')
            try:
                os.close(os.open('./ld.so.preload', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            finally:
                os.unlink('/etc/ld.so.preload')
        """)
        return pid, lambda a: a["event"]["kind"] == "OPEN"
    alert = check_rule(rx, workdir, "Dynamic linker preload modified", benign, attack, "open ld.so.preload for writing")
    assert alert["priority"] == "critical" and alert["event"]["filename"] == "./ld.so.preload"
    assert alert["event"]["path"] in ("/etc/ld.so.preload", "")


def test_authorized_keys_written(sensor, rx, workdir):
    ssh = os.path.join(workdir, "home", ".ssh")
    os.makedirs(ssh, exist_ok=True)
    keys = os.path.join(ssh, "authorized_keys")

    def benign():
        return {py(f"open({os.path.join(ssh, 'known_hosts')!r}, 'a').write('x\\n')"),
                py(f"import os\nif os.path.exists({keys!r}): open({keys!r}).read()")}

    def attack():
        pid = py(f"open({keys!r}, 'a').write('ssh-ed25519 AAAA c8-test\\n')")
        return pid, lambda a: a["event"]["path"] == keys
    alert = check_rule(rx, workdir, "SSH authorized_keys modified", benign, attack, "append to authorized_keys")
    assert alert["event"]["kind"] == "OPEN" and alert["priority"] == "error"


def test_cron_file_written(sensor, rx, workdir):
    made = []

    def benign():
        return {run(["/bin/ls", "/etc"], stdout=subprocess.DEVNULL)}

    def attack():
        path = f"/etc/cron.d/c8-test-{uuid.uuid4().hex[:8]}"
        made.append(path)
        pid = py(f"open({path!r}, 'w').write('# c8 test: no job\\n')")
        return pid, lambda a: a["event"]["path"] == path
    try:
        alert = check_rule(rx, workdir, "Cron job scheduled", benign, attack, "a file in /etc/cron.d")
        assert alert["event"]["kind"] == "OPEN"
    finally:
        for p in made:
            if os.path.exists(p):
                os.unlink(p)


def test_log_truncated_and_deleted(sensor, rx, workdir):
    rule, benign = "Log file truncated or deleted", set()
    logs = []

    def act():
        log = f"/var/log/c8-test-{uuid.uuid4().hex[:8]}.log"
        logs.append(log)
        benign.add(run(["bash", "-c", f"echo one >> {log}; echo two >> {log}"]))
        pids = {run(["bash", "-c", f": > {log}"]), run(["/bin/rm", log])}
        return lambda a, log=log: pid_of(a) in pids and a["event"]["path"] == log
    try:
        alerts = attempt_many(rx, rule, act, 2, ": > /var/log/<file>; rm it")
        assert sorted(a["event"]["kind"] for a in alerts) == ["DELETE", "OPEN"]
        barrier(rx, workdir)
        no_alert(rx, rule, benign)
    finally:
        for p in logs:
            if os.path.exists(p):
                os.unlink(p)


def test_shell_history_truncated(sensor, rx, workdir):
    hist = os.path.join(workdir, "home", ".bash_history")
    os.makedirs(os.path.dirname(hist), exist_ok=True)

    def benign():
        return {run(["bash", "-c", f"echo ls >> {hist}"])}

    def attack():
        pid = py(f"open({hist!r}, 'w').close()")
        return pid, lambda a: a["event"]["path"] == hist
    alert = check_rule(rx, workdir, "Shell history deleted or truncated", benign, attack, "truncate .bash_history")
    assert alert["event"]["kind"] == "OPEN" and alert["event"]["open_flags"] & 0x200


def test_kernel_module_load(sensor, rx, workdir):
    def benign():
        # delete_module of a module that is not there: a module call, not a load
        return {py("import ctypes; ctypes.CDLL(None).syscall(176, b'c8_none', 0)")}

    def attack():
        # finit_module(-1, "", 0): refused (EBADF; ENOSYS without module support), but asked
        pid = py("""
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall(313, -1, b"", 0) == -1 and ctypes.get_errno() in (9, 38)
        """)
        return pid, lambda a: a["event"]["id"] == 313
    alert = check_rule(rx, workdir, "Kernel module load", benign, attack, "finit_module")
    assert alert["event"]["kind"] == "ENTER"


# ---- a process in its own root ---------------------------------------------------------------

def test_chrooted_process_paths_stay_in_its_root(sensor, rx, workdir):
    """A chrooted process's names resolve inside its root and read as it sees them:
    '..' past its root stays there, an absolute symlink points inside it."""
    rule = "Read sensitive file"
    jail = tempfile.mkdtemp(prefix="c8-jail-")
    os.makedirs(os.path.join(jail, "etc"))
    os.makedirs(os.path.join(jail, "data"))
    with open(os.path.join(jail, "etc", "shadow"), "w") as f:
        f.write("root:*:1::::::\n")
    os.symlink("/etc", os.path.join(jail, "data", "cfg"))  # absolute: the jail's /etc
    holders = []

    def act():
        h = Holder(f"""
            import os
            os.chroot({jail!r})
            os.chdir('/data')
            os.close(os.open('../../../etc/shadow', os.O_RDONLY))
            os.close(os.open('cfg/shadow', os.O_RDONLY))
        """)
        holders.append(h)
        return lambda a: pid_of(a) == h.pid
    try:
        alerts = attempt_many(rx, rule, act, 2, "two opens in a chroot")
        got = {a["event"]["filename"]: a["event"]["path"] for a in alerts}
        assert got == {"../../../etc/shadow": "/etc/shadow", "cfg/shadow": "/etc/shadow"}
    finally:
        for h in holders:
            h.close()
        shutil.rmtree(jail, ignore_errors=True)


def test_cd_etc_then_relative_write(sensor, rx, workdir):
    """`cd /etc && exec 3>>passwd` (opened for append, nothing written) by a shell that
    is gone before the broker can read its cwd: the name's last component decides."""
    rule, benign = "Write below system directory", set()

    def act():
        benign.add(run(["bash", "-c", f"cd {workdir} && exec 3>>notes"]))
        pid = run(["bash", "-c", "cd /etc && exec 3>>passwd"])
        return lambda a: pid_of(a) == pid
    alert = attempt(rx, rule, act, "cd /etc && exec 3>>passwd")
    assert alert["event"]["filename"] == "passwd" and alert["event"]["path"] in ("/etc/passwd", "")
    barrier(rx, workdir)
    no_alert(rx, rule, benign)
