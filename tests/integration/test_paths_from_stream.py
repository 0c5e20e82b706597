"""Paths from the event stream: relative and fd-only names resolve against the
descriptors the broker saw opened (c8.broker.fdtable), not against /proc when
the event is published, by which time the descriptor is closed and its number
taken by another file.

Each workload closes the descriptor right after use and opens another
directory under the same number, and stays alive: /proc/<pid>/fd/<n> then
names the wrong directory, so a path read there is wrong, not just empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

pytestmark = pytest.mark.root

WORKLOAD = textwrap.dedent(r"""
    import json, os, sys
    D = sys.argv[1]
    O_DIR = os.O_RDONLY | os.O_DIRECTORY
    done = {}
    # cp's pattern: openat(dirfd, "sh"); the dirfd closed, its number reused
    dfd = os.open(D + "/bin", O_DIR)
    fd = os.open("sh", os.O_RDONLY, dir_fd=dfd)
    os.close(fd)
    os.close(dfd)
    assert os.open(D + "/other", O_DIR) == dfd
    done["dirfd"] = dfd
    # sed -i's pattern: temp file, fchmod, fchown on its fd, close, rename over the target
    fd = os.open(D + "/sedAbc", os.O_CREAT | os.O_RDWR, 0o600)
    os.fchmod(fd, 0o644)
    os.fchown(fd, 0, 0)
    os.close(fd)
    os.rename(D + "/sedAbc", D + "/conf")
    assert os.open(D + "/other", O_DIR) == fd
    done["fd"] = fd
    # a shell's exec 40<dir: open, dup2 to a fixed number, close the original; then 40
    # is made to name other/ (dup2 again) before the broker could read /proc
    dfd = os.open(D + "/bin", O_DIR)
    os.dup2(dfd, 40)
    os.close(dfd)
    os.close(os.open("via-dup2", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=40))
    other = os.open(D + "/other", O_DIR)
    os.dup2(other, 40)
    os.close(other)
    # crontab's pattern: a temporary file renamed over the target, both relative to a dirfd
    dfd = os.open(D + "/bin", O_DIR)
    os.close(os.open("tmp.X", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd))
    os.rename("tmp.X", "root", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.close(dfd)
    os.open(D + "/other", O_DIR)
    # a child after fork uses the dirfd it inherited
    dfd = os.open(D + "/bin", O_DIR)
    child = os.fork()
    if child == 0:
        fd = os.open("child-file", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd)
        os.fchmod(fd, 0o640)
        os.close(fd)
        os.close(dfd)
        os.open(D + "/other", O_DIR)
        while os.read(0, 1):  # alive until the test is done
            pass
        os._exit(0)
    os.close(dfd)
    os.open(D + "/other", O_DIR)
    done["child"] = child
    print(json.dumps(done), flush=True)
    sys.stdin.read()
    os.waitpid(child, 0)
""")


def collect(sub, until, timeout=30.0):
    """Events until ``until(events)``, or ``timeout`` seconds."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(events):
        for ev in sub.events(timeout=1.0, idle=1.0):
            if ev["type"] != "lost":
                events.append(ev)
            if until(events) or time.monotonic() > deadline:
                break
    return events


def test_relative_and_fd_only_names_resolve_from_the_stream(shared_sensor):
    where = os.path.realpath(tempfile.mkdtemp(prefix="c8fs-"))
    for d in ("bin", "other"):
        os.mkdir(os.path.join(where, d))
    open(os.path.join(where, "bin", "sh"), "w").close()
    # path is not pushed down to the kernel: every open is collected, the dirfds' too
    spec = {"events": {"file": {"filter": f'path like "{where}/*"'}}}
    with shared_sensor.client.subscribe(spec) as sub:
        p = subprocess.Popen([sys.executable, "-c", WORKLOAD, where], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        try:
            done = json.loads(p.stdout.readline())
            pids = {p.pid, done["child"]}
            want = {("OPEN", "sh"), ("ATTRIBUTE_CHANGE", 91), ("ATTRIBUTE_CHANGE", 93), ("OPEN", "via-dup2"), ("RENAME", "root"),
                    ("OPEN", "child-file"), ("CHILD_FCHMOD",)}

            def seen(evs):
                got = set()
                for e in evs:
                    if e["process_pid"] not in pids or e["type"] != "file":
                        continue
                    if e["kind"] in ("OPEN", "RENAME"):
                        got.add((e["kind"], e["filename"]))
                    elif e["kind"] == "ATTRIBUTE_CHANGE":
                        got.add(("CHILD_FCHMOD",) if e["process_pid"] == done["child"] else
                                ("ATTRIBUTE_CHANGE", e["syscall"]))
                return want <= got
            events = collect(sub, seen)
        finally:
            p.stdin.close()
            p.wait(timeout=10)
    mine = [e for e in events if e["process_pid"] in pids and e["type"] == "file"]
    assert seen(events), mine

    def one(pid, kind, **match):
        hits = [e for e in mine if e["process_pid"] == pid and e["kind"] == kind
                and all(e[k] == v for k, v in match.items())]
        assert len(hits) == 1, (kind, match, mine)
        return hits[0]

    sh = one(p.pid, "OPEN", filename="sh")
    assert (sh["path"], sh["path_status"], sh["dirfd"]) == (f"{where}/bin/sh", "stream", done["dirfd"])
    for nr in (91, 93):  # fchmod, fchown: the temp file, though its fd now names other/
        ch = one(p.pid, "ATTRIBUTE_CHANGE", syscall=nr)
        assert (ch["filename"], ch["path"], ch["path_status"], ch["dirfd"]) == (
            "", f"{where}/sedAbc", "stream", done["fd"]), ch
    rename = one(p.pid, "RENAME", filename=f"{where}/conf")
    assert (rename["path"], rename["oldpath"]) == (f"{where}/conf", f"{where}/sedAbc")
    cron = one(p.pid, "RENAME", filename="root")
    assert (cron["path"], cron["oldpath"], cron["path_status"]) == (f"{where}/bin/root", f"{where}/bin/tmp.X", "stream")
    dup = one(p.pid, "OPEN", filename="via-dup2")
    assert (dup["path"], dup["path_status"], dup["dirfd"]) == (f"{where}/bin/via-dup2", "stream", 40)
    kid = one(done["child"], "OPEN", filename="child-file")
    assert (kid["path"], kid["path_status"], kid["ret"] >= 0) == (f"{where}/bin/child-file", "stream", True)
    kid_chmod = one(done["child"], "ATTRIBUTE_CHANGE")
    assert (kid_chmod["path"], kid_chmod["open_mode"]) == (f"{where}/bin/child-file", 0o640)
    # the directories themselves were opened by absolute name
    assert all(e["path_status"] == "absolute" for e in mine if e["filename"].startswith("/"))
    st = shared_sensor.client.status()
    assert st["fd_table"]["resolved"] >= 5 and st["fd_table"]["failures"] == 0
    assert st["fd_table"]["entries"] <= st["fd_table"]["max_total"]


def test_relative_names_resolve_against_the_cwd_of_their_moment(shared_sensor):
    """cd D/etc; echo x > cron.d/evil; cd / — by bash, and by Python with a second
    open after the cd: each name against the cwd it was opened in, though the
    process's cwd is / by the time the broker sees the events."""
    where = os.path.realpath(tempfile.mkdtemp(prefix="c8cwd-"))
    os.makedirs(os.path.join(where, "etc", "cron.d"))
    spec = {"events": {"file": {"filter": f'filename like "*evil*" or path like "{where}/*"'}}}
    code = (f"import os; os.chdir({where + '/etc'!r}); os.close(os.open('cron.d/evil2', os.O_CREAT | os.O_WRONLY)); "
            "os.chdir('..'); os.close(os.open('etc/cron.d/evil3', os.O_CREAT | os.O_WRONLY)); os.chdir('/'); "
            "os.close(os.open('tmp', os.O_RDONLY)); input()")
    with shared_sensor.client.subscribe(spec) as sub:
        sh = subprocess.Popen(["/bin/bash", "-c", f"cd {where}/etc; echo x > cron.d/evil; cd /; read x"],
                              stdin=subprocess.PIPE)
        py = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        try:
            names = {"cron.d/evil", "cron.d/evil2", "etc/cron.d/evil3"}
            events = collect(sub, lambda evs: names <= {e["filename"] for e in evs
                                                        if e["process_pid"] in (sh.pid, py.pid)})
        finally:
            for p in (sh, py):
                p.stdin.close()
                p.wait(timeout=10)
    got = {e["filename"]: e for e in events if e["process_pid"] in (sh.pid, py.pid) and e["type"] == "file"
           and e["kind"] == "OPEN"}
    assert {n: (got[n]["path"], got[n]["path_status"]) for n in names if n in got} == {
        "cron.d/evil": (f"{where}/etc/cron.d/evil", "stream"),
        "cron.d/evil2": (f"{where}/etc/cron.d/evil2", "stream"),
        "etc/cron.d/evil3": (f"{where}/etc/cron.d/evil3", "stream")}, got
    assert all(e["process_pid"] == sh.pid for e in got.values() if e["filename"] == "cron.d/evil")
