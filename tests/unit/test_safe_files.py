"""c8.protocol.files and c8.supervisor.rundir: modes whatever the umask, no
symlink followed, planted FIFOs and other users' files refused, unsafe run_dirs
refused with a message."""

import errno
import json
import os
import stat
import threading

import pytest

from c8.detections.outputs.file import FileOutput
from c8.protocol import files
from c8.supervisor import rundir, status

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown to another user)")


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_umask_0_still_gives_0640(tmp_path, umask0):
    f = files.open_append(str(tmp_path / "alerts.json"))
    f.write(b"x\n")
    f.close()
    assert mode(tmp_path / "alerts.json") == 0o640
    files.write_atomic(str(tmp_path / "supervisor.json"), b"{}\n")
    assert mode(tmp_path / "supervisor.json") == 0o640
    out = FileOutput(str(tmp_path / "out" / "alerts.json"), max_bytes=10, backups=1)
    out.notice("first notice, longer than ten bytes")
    out.notice("second: rotates")
    out.close()
    assert mode(tmp_path / "out" / "alerts.json") == mode(tmp_path / "out" / "alerts.json.1") == 0o640


def test_existing_file_gets_its_mode_fixed_and_is_appended(tmp_path):
    p = tmp_path / "alerts.json"
    p.write_bytes(b"old\n")
    os.chmod(p, 0o666)
    with files.open_append(str(p)) as f:
        f.write(b"new\n")
    assert p.read_bytes() == b"old\nnew\n" and mode(p) == 0o640
    with files.open_append(str(p), truncate=True) as f:
        f.write(b"only\n")
    assert p.read_bytes() == b"only\n"


def test_symlink_at_the_name_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    os.chmod(victim, 0o600)
    link = tmp_path / "alerts.json"
    link.symlink_to(victim)
    with pytest.raises(OSError) as e:
        files.open_append(str(link))
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        FileOutput(str(link))
    assert victim.read_bytes() == b"keep\n" and mode(victim) == 0o600


def test_fifo_at_the_name_never_blocks(tmp_path):
    fifo = str(tmp_path / "alerts.json")
    os.mkfifo(fifo)
    with pytest.raises(OSError) as e:  # no reader: ENXIO at once, not a hang
        files.open_append(fifo)
    assert e.value.errno == errno.ENXIO
    # with a reader waiting, the open succeeds and fstat refuses it
    opened = threading.Event()

    def reader():
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        opened.set()
        threading.Event().wait(2)
        os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    assert opened.wait(5)
    with pytest.raises(files.UnsafeFile, match="not a regular file"):
        files.open_append(fifo)
    t.join()


@needs_root
def test_another_users_file_is_refused(tmp_path):
    p = tmp_path / "alerts.json"
    p.write_bytes(b"theirs\n")
    os.chown(p, 65534, 65534)
    # root (the supervisor's --log-file) appends to its own or root's files only
    with pytest.raises(files.UnsafeFile, match="belongs to uid 65534, not to the sensor"):
        files.open_append(str(p))
    assert p.read_bytes() == b"theirs\n"


def test_status_write_replaces_a_planted_symlink_without_following_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    path = tmp_path / "supervisor.json"
    path.symlink_to(victim)
    status.write(str(path), {"pid": 1}, [{"name": "c8-broker"}])
    assert victim.read_bytes() == b"root's file\n"
    assert not path.is_symlink() and mode(path) == 0o640
    assert json.loads(path.read_text()) == {"pid": 1, "children": [{"name": "c8-broker"}]}
    assert sorted(os.listdir(tmp_path)) == ["supervisor.json", "victim"]  # no temp file left


def test_write_atomic_into_a_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(OSError) as e:
        files.write_atomic(str(tmp_path / "run" / "supervisor.json"), b"{}")
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(real) == []


# -- run_dir ---------------------------------------------------------------------------
# rundir.check walks every directory above run_dir, which must be root's: as
# root, pytest's tmp_path is (/tmp/pytest-of-root, 0700, under sticky /tmp).

@needs_root
def test_symlinked_run_dir_is_refused_with_a_message(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(rundir.UnsafeRunDir) as e:
        rundir.check(str(tmp_path / "run"), 999)
    assert str(e.value) == (f"run_dir {tmp_path}/run is a symlink (to {real}): refused, "
                            "set run_dir to the real directory")


@needs_root
def test_parent_writable_by_others_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(rundir.UnsafeRunDir, match=r"its parent .*/open is writable by others "
                                                   r"\(mode 0777, no sticky bit\)"):
        rundir.check(str(parent / "run"), 999)
    os.chmod(parent, 0o1777)
    rundir.check(str(parent / "run"), 999)  # like /tmp: fine
    os.chmod(parent, 0o775)
    os.chown(parent, 0, 65534)
    with pytest.raises(rundir.UnsafeRunDir, match="writable by group 65534"):
        rundir.check(str(parent / "run"), 999)
    os.chown(parent, 65534, 0)
    os.chmod(parent, 0o755)
    with pytest.raises(rundir.UnsafeRunDir, match="belongs to uid 65534, not root"):
        rundir.check(str(parent / "run"), 999)


@needs_root
def test_run_dir_of_another_user_is_refused_and_ours_prepared(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, 65534, 65534)
    with pytest.raises(rundir.UnsafeRunDir, match="belongs to uid 65534, neither root nor"):
        rundir.check(str(run), 999)
    os.chown(run, 0, 0)
    os.chmod(run, 0o777)
    rundir.prepare(str(run), 999, 998)
    st = os.stat(run)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 998, 0o750)
    rundir.prepare(str(tmp_path / "new" / "run"), 999, 998)
    assert mode(tmp_path / "new" / "run") == 0o750


@needs_root
def test_missing_dirs_of_the_childrens_files_are_made_theirs(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o700)
    made = rundir.make_missing_dirs([str(tmp_path / "log" / "alerts.json"),
                                     str(tmp_path / "log" / "other.json"),
                                     str(existing / "sensor_id")], 999, 998)
    assert made == [str(tmp_path / "log")]
    st = os.stat(tmp_path / "log")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 998, 0o750)
    st = os.stat(existing)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)  # left as it is
