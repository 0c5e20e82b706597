"""c8.host.proc on fake /proc trees (hostile or malformed files) and on the real one."""

from __future__ import annotations

import os
import time

import pytest

from c8.host import proc

pytestmark = pytest.mark.timeout(20)


def test_real_process():
    me = os.getpid()
    st = proc.stat(me)
    assert st is not None and st.ppid == os.getppid() and st.start_ticks > 0
    assert proc.credentials(me)["uid"] == os.getuid()
    assert proc.argv(me) and proc.cwd(me) == os.getcwd()
    assert me in proc.pids() and me in proc.tasks(me)
    assert proc.exe(me) == os.path.realpath(proc.exe(me)) != ""
    assert proc.cgroup_lines(me)
    assert len(proc.boot_id()) == 36


def test_gone_process_reads_as_unknown():
    gone = 2**22 + 1  # above pid_max's ceiling: never a live pid
    assert proc.stat(gone) is None and proc.ppid(gone) is None
    assert proc.credentials(gone) == {} and proc.argv(gone) == [] and proc.command_line(gone) == b""
    assert proc.cgroup_lines(gone) is None and proc.cwd(gone) == "" and proc.fd_path(gone, 0) == ""
    assert proc.exe_stat(gone) is None and proc.advertiser(gone) == ([], None, False)


def test_hostile_fake_proc(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/7")
    os.mkfifo(f"{root}/7/cmdline")  # would block a plain open
    os.symlink("/dev/zero", f"{root}/7/status")  # would grow without end
    with open(f"{root}/7/stat", "w") as f:
        f.write("7 (x) S notanumber")
    with open(f"{root}/7/cgroup", "w") as f:
        f.write("0::/" + "a" * (proc.SMALL_LIMIT + 1))
    start = time.monotonic()
    assert proc.argv(7, root) == [] and proc.command_line(7, root) == b""
    assert proc.credentials(7, root) == {}
    assert proc.stat(7, root) is None
    assert proc.cgroup_lines(7, root) is None  # oversize: refused
    assert proc.advertiser(7, root) == ([], None, False)
    assert time.monotonic() - start < 5


def test_long_command_line_is_cut_not_refused(tmp_path):
    os.makedirs(f"{tmp_path}/8")
    with open(f"{tmp_path}/8/cmdline", "wb") as f:
        f.write(b"runc\0" + b"x" * (proc.CMDLINE_LIMIT * 2) + b"\0")
    args = proc.argv(8, str(tmp_path))
    assert args[0] == "runc" and len(args[1]) == proc.CMDLINE_LIMIT - 5


def test_setuid_like_credentials_are_not_root(tmp_path):
    os.makedirs(f"{tmp_path}/9")
    with open(f"{tmp_path}/9/cmdline", "wb") as f:
        f.write(b"runc\0--root\0/x\0")
    with open(f"{tmp_path}/9/status", "w") as f:
        f.write("Name:\trunc\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    assert proc.advertiser(9, str(tmp_path)) == (["runc", "--root", "/x"], 1000, False)
    with open(f"{tmp_path}/9/status", "w") as f:
        f.write("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    # root's uids, but no exe to check (a fake tree): not trusted
    assert proc.advertiser(9, str(tmp_path)) == (["runc", "--root", "/x"], 0, False)
