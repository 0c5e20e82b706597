"""The per-process descriptor table (c8.broker.fdtable) and the release stage that
resolves relative and fd-only names from it (c8.broker.paths.FromStream).

Synthetic windows: the processes are not real, so ``proc`` points at an empty
directory and names are cleaned as text, as for a process that has exited
(the kernel tests in tests/integration/test_paths_from_stream.py use real ones).
"""

import os

import numpy as np
import pytest

from c8 import schema
from c8.broker import paths
from c8.broker.fdtable import AT_FDCWD, FdTable

O_DIRECTORY = os.O_DIRECTORY


# -- the table ---------------------------------------------------------------------
def test_learn_get_and_unknown():
    t = FdTable()
    t.learn(10, [(3, b"/etc", False), (4, b"", False)])
    assert t.get(10, 3) == b"/etc" and t.get(10, 4) == b"" and t.get(10, 5) is None and t.get(11, 3) is None
    assert t.stats()["entries"] == 2


def test_fork_copies_exec_drops_cloexec_exit_drops():
    t = FdTable()
    t.learn(10, [(3, b"/etc", False), (4, b"/tmp/x", True)])
    t.chdir(10, b"/var")
    t.fork(10, 20)
    assert t.get(20, 4) == b"/tmp/x" and t.get(20, AT_FDCWD) == b"/var"
    t.exec(20)
    assert t.get(20, 4) is None and t.get(20, 3) == b"/etc" and t.get(20, AT_FDCWD) == b"/var"
    assert t.get(10, 4) == b"/tmp/x"  # the parent keeps its own
    t.exit(10)
    assert t.get(10, 3) is None and t.stats() == {"processes": 1, "entries": 2, "evicted": 0,
                                                   "max_per_process": 512, "max_total": 65536}


def test_close_dup_fchdir():
    t = FdTable()
    t.learn(1, [(3, b"/etc", False)])
    t.dup(1, 3, 7)
    t.fchdir(1, 7)
    t.close(1, 3)
    assert t.get(1, 3) is None and t.get(1, 7) == b"/etc" and t.get(1, AT_FDCWD) == b"/etc"
    t.dup(1, 9, 7)  # an fd the table never saw: 7 is now unknown, not /etc
    assert t.get(1, 7) == b""


def test_bounds_per_process_and_total_count_evictions():
    t = FdTable(max_per_process=4, max_total=6)
    t.learn(1, [(fd, b"/a%d" % fd, False) for fd in range(10)])
    assert sorted(t.procs[1]) == [6, 7, 8, 9] and t.evicted == 6  # the newest kept
    t.learn(1, [(6, b"/again", False)])  # re-learnt: now the newest
    t.learn(1, [(11, b"/b", False)])
    assert sorted(t.procs[1]) == [6, 8, 9, 11]
    t.learn(2, [(3, b"/c", False), (4, b"/d", False), (5, b"/e", False)])
    assert t.total == 6 and len(t.procs[2]) == 3 and t.evicted == 6 + 1 + 1  # pid 1, learnt first, gave way
    t.fork(2, 3)
    assert t.total == 6 and 1 not in t.procs and t.get(3, 5) == b"/e"
    assert sum(len(v) for v in t.procs.values()) == t.total


def test_bad_bounds():
    with pytest.raises(ValueError, match="positive"):
        FdTable(0, 10)


# -- the stage -----------------------------------------------------------------------
def files(*rows):
    """File events (time-sorted): (t, pid, kind, filename, dirfd, ret, flags[, syscall])."""
    out = schema.empty("file", len(rows))
    for i, r in enumerate(rows):
        t, pid, kind, name, dirfd, ret, flags, *nr = r
        out[i]["sensor_monotime_nanos"] = t
        out[i]["process_pid"] = pid
        out[i]["kind"] = schema.kind_code("file", kind)
        out[i]["filename"] = name
        out[i]["dirfd"] = dirfd
        out[i]["ret"] = ret
        out[i]["open_flags"] = flags
        out[i]["syscall"] = nr[0] if nr else 257
        # as the batch arrived: absolute names resolved, the rest unknown (process gone)
        out[i]["path"] = paths.pathcanon.lexical(name) if name.startswith(b"/") else b""
    out["path_status"] = paths.status(out["dirfd"], out["filename"], out["path"])
    return out


def procs(*rows):
    """Process events: (t, pid, kind, child)."""
    out = schema.empty("process", len(rows))
    for i, (t, pid, kind, child) in enumerate(rows):
        out[i]["sensor_monotime_nanos"] = t
        out[i]["process_pid"] = pid
        out[i]["kind"] = schema.kind_code("process", kind)
        out[i]["fork_child_pid"] = child
    return out


@pytest.fixture
def stage(tmp_path):
    return paths.FromStream(FdTable(), proc=str(tmp_path))


def test_dirfd_opened_in_the_same_window(stage):
    fb = files((1, 50, "OPEN", b"/usr/bin", AT_FDCWD, 3, O_DIRECTORY),
               (2, 50, "OPEN", b"sh", 3, 4, 0),
               (3, 51, "OPEN", b"sh", 3, 4, 0))  # another process's fd 3: not known
    stage.apply({"file": fb})
    assert fb["path"].tolist() == [b"/usr/bin", b"/usr/bin/sh", b""]
    assert fb["path_status"].tolist() == [b"absolute", b"stream", b"unknown"]


def test_dirfd_from_an_earlier_window_and_reused_fd(stage):
    stage.apply({"file": files((1, 50, "OPEN", b"/etc", AT_FDCWD, 3, O_DIRECTORY))})
    fb = files((5, 50, "OPEN", b"cron.d/x", 3, 4, 0),
               (6, 50, "OPEN", b"/var/spool", AT_FDCWD, 3, O_DIRECTORY),  # fd 3 now names another dir
               (7, 50, "OPEN", b"../tmp/y", 3, 5, 0))
    stage.apply({"file": fb})
    assert fb["path"].tolist() == [b"/etc/cron.d/x", b"/var/spool", b"/var/tmp/y"]


def test_fd_only_call_after_close(stage):
    """sed -i: open the temp file, fchmod it, close it, rename it: the fd is gone before publish."""
    fb = files((1, 60, "OPEN", b"/etc/sedAbc", AT_FDCWD, 4, os.O_CREAT | os.O_RDWR),
               (2, 60, "ATTRIBUTE_CHANGE", b"", 4, 0, 0, 91))
    stage.apply({"file": fb})
    assert fb["path"][1] == b"/etc/sedAbc" and fb["path_status"][1] == b"stream"
    unreadable = files((3, 60, "ATTRIBUTE_CHANGE", b"", AT_FDCWD, 0, 0, 90))
    stage.apply({"file": unreadable})
    assert unreadable["path"][0] == b"" and unreadable["path_status"][0] == b"unreadable"


def test_chain_of_relative_opens(stage):
    fb = files((1, 70, "OPEN", b"/", AT_FDCWD, 3, O_DIRECTORY),
               (2, 70, "OPEN", b"etc", 3, 4, O_DIRECTORY),
               (3, 70, "OPEN", b"cron.d", 4, 5, O_DIRECTORY),
               (4, 70, "OPEN", b"./evil", 5, 6, 0))
    stage.apply({"file": fb})
    assert fb["path"].tolist() == [b"/", b"/etc", b"/etc/cron.d", b"/etc/cron.d/evil"]
    assert stage.table.get(70, 6) == b"/etc/cron.d/evil"


def test_child_uses_an_inherited_dirfd_in_the_same_and_a_later_window(stage):
    fb = files((1, 80, "OPEN", b"/etc", AT_FDCWD, 3, O_DIRECTORY),
               (3, 81, "OPEN", b"passwd", 3, 4, 0),
               (5, 82, "OPEN", b"shadow", 3, 4, 0))
    pb = procs((2, 80, "FORK", 81), (4, 81, "FORK", 82))  # a grandchild too
    stage.apply({"file": fb, "process": pb})
    assert fb["path"].tolist() == [b"/etc", b"/etc/passwd", b"/etc/shadow"]
    later = files((9, 82, "ATTRIBUTE_CHANGE", b"", 3, 0, 0, 93))
    stage.apply({"file": later})
    assert later["path"][0] == b"/etc"


def test_fork_before_the_parent_opens_inherits_nothing(stage):
    fb = files((2, 90, "OPEN", b"/etc", AT_FDCWD, 3, O_DIRECTORY),
               (3, 91, "OPEN", b"x", 3, 4, 0))
    stage.apply({"file": fb, "process": procs((1, 90, "FORK", 91))})
    assert fb["path"][1] == b"" and fb["path_status"][1] == b"unknown"


def test_exec_drops_cloexec_and_exit_drops_all(stage):
    stage.apply({"file": files((1, 95, "OPEN", b"/etc", AT_FDCWD, 3, O_DIRECTORY | os.O_CLOEXEC),
                               (2, 95, "OPEN", b"/var", AT_FDCWD, 4, O_DIRECTORY))})
    stage.apply({"process": procs((3, 95, "EXEC", 0))})
    assert stage.table.get(95, 3) is None and stage.table.get(95, 4) == b"/var"
    stage.apply({"process": procs((4, 95, "EXIT", 0))})
    assert stage.table.get(95, 4) is None and stage.table.total == 0


def test_rename_oldpath_and_symlink_target(stage):
    stage.apply({"file": files((1, 99, "OPEN", b"/var/spool/cron", AT_FDCWD, 3, O_DIRECTORY))})
    fb = files((2, 99, "RENAME", b"crontabs/root", 3, 0, 0, 264),
               (3, 99, "SYMLINK", b"link", 3, 0, 0, 266))
    fb["olddirfd"][0] = 3
    fb["oldname"] = [b"crontabs/tmp.X", b"../target"]
    stage.apply({"file": fb})
    assert fb["path"].tolist() == [b"/var/spool/cron/crontabs/root", b"/var/spool/cron/link"]
    assert fb["oldpath"].tolist() == [b"/var/spool/cron/crontabs/tmp.X", b"/var/spool/target"]


def test_a_batch_holding_narrow_names_is_widened_before_paths_are_written(stage):
    # as catalog.file_base builds them: each name only as wide as the build saw
    stage.apply({"file": files((1, 50, "OPEN", b"/usr/lib/x86_64-linux-gnu", AT_FDCWD, 3, O_DIRECTORY))})
    full = files((2, 50, "OPEN", b"libc.so.6", 3, 4, 0),
                 (3, 50, "RENAME", b"b", 3, 0, 0, 264))
    full["olddirfd"][1] = 3
    full["oldname"][1] = b"a"
    narrow = schema.empty("file", 2, {n: 16 for n in ("filename", "path", "oldname", "oldpath", "newname")})
    for n in full.dtype.names:
        narrow[n] = full[n]
    window = {"file": narrow}
    stage.apply(window)
    fb = window["file"]
    assert fb["path"].tolist() == [b"/usr/lib/x86_64-linux-gnu/libc.so.6", b"/usr/lib/x86_64-linux-gnu/b"]
    assert fb["oldpath"][1] == b"/usr/lib/x86_64-linux-gnu/a"
    assert fb.dtype["path"] == fb.dtype["oldpath"] == schema.dtype("file")["path"]


def test_a_relative_symlink_target_held_narrow_resolves_whole(stage):
    """symlinkat("x", dirfd, "link"): the target's name is held 8 bytes wide in the
    batch; its path, from the link's directory, is longer and arrives whole."""
    stage.apply({"file": files((1, 51, "OPEN", b"/var/spool/cron", AT_FDCWD, 3, O_DIRECTORY))})
    full = files((2, 51, "SYMLINK", b"link", 3, 0, 0, 266))
    full["oldname"] = b"x"
    narrow = schema.empty("file", 1, {n: 8 for n in ("filename", "path", "oldname", "oldpath", "newname")})
    for n in full.dtype.names:
        narrow[n] = full[n]
    window = {"file": narrow}
    stage.apply(window)
    assert window["file"]["path"][0] == b"/var/spool/cron/link"
    assert window["file"]["oldpath"][0] == b"/var/spool/cron/x"


def test_a_storm_reopening_one_fd_learns_it_once(stage):
    n = 50_000
    fb = files(*[(i, 7, "OPEN", b"/tmp/a%d" % (i % 3), AT_FDCWD, 3, 0) for i in range(1, 4)])
    fb = np.resize(fb, n)
    fb["sensor_monotime_nanos"] = np.arange(n)
    stage.apply({"file": fb})
    assert stage.table.get(7, 3) == fb["path"][-1] and stage.table.total == 1


def cwd_rows(*rows):
    """chdir/fchdir as catalog.build_cwd makes them: (t, pid, name, dirfd, nr)."""
    out = files(*[(t, pid, "OPEN", name, dirfd, AT_FDCWD, 0, nr) for t, pid, name, dirfd, nr in rows])
    return out


def test_cd_then_relative_open_then_cd_elsewhere(stage):
    """cd /etc; echo x > cron.d/evil; cd /: the open resolves against /etc."""
    fb = files((2, 40, "OPEN", b"cron.d/evil", AT_FDCWD, 3, os.O_CREAT | os.O_WRONLY),
               (4, 40, "OPEN", b"x", AT_FDCWD, 3, 0))
    window = {"file": fb}
    stage.apply(window, cwd_rows((1, 40, b"/etc", AT_FDCWD, 80), (3, 40, b"/", AT_FDCWD, 80)))
    assert window["file"]["path"].tolist() == [b"/etc/cron.d/evil", b"/x"]  # the cwd rows are gone
    assert window["file"]["path_status"].tolist() == [b"stream", b"stream"]
    assert stage.table.get(40, AT_FDCWD) == b"/"


def test_relative_chdir_fchdir_and_a_child_after_fork(stage):
    stage.apply({}, cwd_rows((1, 41, b"/var", AT_FDCWD, 80)))
    stage.apply({"file": files((2, 41, "OPEN", b"/usr", AT_FDCWD, 5, O_DIRECTORY))},
                cwd_rows((3, 41, b"spool/../lib", AT_FDCWD, 80)))
    assert stage.table.get(41, AT_FDCWD) == b"/var/lib"
    fb = files((6, 42, "OPEN", b"bin/sh", AT_FDCWD, 3, 0))
    window = {"file": fb, "process": procs((5, 41, "FORK", 42))}
    stage.apply(window, cwd_rows((4, 41, b"", 5, 81)))  # fchdir(5): /usr, then fork
    assert window["file"]["path"].tolist() == [b"/usr/bin/sh"]


@pytest.mark.parametrize(("flt", "cwd"), [
    (None, True),                                        # every name: relative ones need the cwd
    ('path like "/etc/*"', True),                        # path is not pushed down: every name
    ('filename like "cron*"', True),                     # relative names pass the kernel's filter
    ('filename like "/etc/*"', False),                   # only absolute names are collected
    ('kind == "OPEN" and filename == "/etc/shadow"', False),
])
def test_cwd_changes_are_collected_when_relative_names_can_be(flt, cwd):
    from c8.broker.plan import compute_plan
    from c8.broker.subscriptions import parse_spec

    plan = compute_plan([parse_spec({"events": {"file": {"filter": flt} if flt else {}}}, b"peer")])
    assert ("cwd" in plan["bpf"]) is cwd
    assert ("syscalls:sys_enter_dup2" in plan["tracepoints"]) is ("syscalls:sys_enter_dup3" in plan["tracepoints"]) is cwd
    assert "cwd" not in compute_plan([parse_spec({"events": {"process": {}}}, b"peer")])["bpf"]


def test_dup2_and_dup3_copy_a_descriptor(stage):
    """exec 3</etc in a shell: open, dup2 to 3, close the original; dup3 with O_CLOEXEC."""
    fb = files((3, 43, "OPEN", b"passwd", 3, 4, 0))
    dups = files((1, 43, "OPEN", b"/etc", AT_FDCWD, 10, O_DIRECTORY),
                 (2, 43, "OPEN", b"", 10, 3, 0, 33),                   # dup2(10, 3)
                 (4, 43, "OPEN", b"", 99, 5, 0, 33),                   # dup2 of an fd never seen
                 (5, 43, "OPEN", b"", 3, 6, os.O_CLOEXEC, 292))        # dup3(3, 6, O_CLOEXEC)
    window = {"file": fb}
    stage.apply(window, dups[1:])
    assert window["file"]["path"].tolist() == [b""]  # fd 10 was opened in no window seen
    stage = paths.FromStream(FdTable(), proc=stage.proc)
    window = {"file": files((3, 43, "OPEN", b"passwd", 3, 4, 0))}
    stage.apply(window, rows_concat(dups[:1], dups[1:]))
    assert window["file"]["path"].tolist() == [b"/etc/passwd"]
    assert stage.table.get(43, 5) == b"" and stage.table.get(43, 6) == b"/etc"
    stage.apply({"process": procs((6, 43, "EXEC", 0))})
    assert stage.table.get(43, 6) is None and stage.table.get(43, 3) == b"/etc"


def rows_concat(a, b):
    from c8.schema import rows
    return rows.concat([a, b])


def test_a_failure_keeps_the_window_and_is_counted(stage, monkeypatch, caplog):
    def broken(*_a):
        raise RuntimeError("boom")
    monkeypatch.setattr(stage, "_resolve", broken)  # stands for a bug on some odd window
    fb = files((1, 44, "OPEN", b"/etc", AT_FDCWD, 3, O_DIRECTORY), (2, 44, "OPEN", b"x", 3, 4, 0))
    stage.apply({"file": fb})
    assert fb["path"].tolist() == [b"/etc", b""] and stage.stats()["failures"] == 1
    assert stage.table.get(44, 3) == b"/etc" and "resolving the paths" in caplog.text
