"""A process that stalls every reader of its /proc/<pid>/cmdline, against a running sensor
(issue 18: the broker never waits on the outside world).

How the stall is made, for real: reading another process's ``cmdline`` takes
its mmap lock. The hostile process maps a file of a FUSE filesystem whose
daemon never answers reads (``direct_io``); one thread touches the mapping
(a FUSE read is sent, the page stays locked), another maps the file again:
mmap() holds the mmap lock for writing while fuse_file_mmap waits for that
locked page. From then on every reader of its ``cmdline`` (``ps`` too) waits
until the daemon answers or dies. An unprivileged user can do the same where
it may mount FUSE (fusermount3, or a user namespace); here root does it.
(userfaultfd cannot: the kernel reads ``cmdline`` with a remote GUP that
fails at once on a userfault, and only anonymous memory is read.)

The sensor starts while the process stalls (the broker's seed reads every
process; a broker that read it inline never answered, and was killed as hung
again and again). Then: ``c8ctl status`` answers and counts the read given up
and the thread it holds, events of other processes keep arriving, and once
the daemon dies (the stall ends: the hostile process dies of SIGBUS) its
EXIT carries the identity looked up beside the loop, the stuck thread ends,
and the broker is the same process throughout.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the hostile side: run as ``python -m tests.integration.test_hostile_proc stallfs|hold`` ----

def serve_stalling_fs(mountpoint: str) -> None:
    """A FUSE filesystem with one 64 KiB file, ``argv``, opened direct_io,
    whose reads are never answered."""
    import mfusepy as fuse

    class Stall(fuse.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            now = time.time_ns()
            times = dict(st_ctime=now, st_mtime=now, st_atime=now)
            if path == "/":
                return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, **times)
            if path == "/argv":
                return dict(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=1 << 16, **times)
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return [".", "..", "argv"]

        def open(self, path, fi):
            fi.direct_io = 1  # every mmap() of it invalidates its cached pages, waiting on locked ones
            return 0

        def read(self, path, size, offset, fh):
            threading.Event().wait()  # never answers

    fuse.FUSE(Stall(), mountpoint, foreground=True, allow_other=True, ro=True, raw_fi=True)


def hold_mmap_lock(path: str) -> None:
    """Map ``path`` (on the stalling FUSE), fault a page in from one thread, map it
    again from another: that mmap() holds this process's mmap lock for writing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.memchr.restype = ctypes.c_void_p
    libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    # a ctypes call releases the GIL, so the main thread goes on while this one waits on the page
    threading.Thread(target=libc.memchr, args=(addr, 1, 1), daemon=True).start()
    time.sleep(0.5)
    threading.Thread(target=libc.mmap, args=(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0),
                     daemon=True).start()
    time.sleep(3600)


if __name__ == "__main__":
    {"stallfs": serve_stalling_fs, "hold": hold_mmap_lock}[sys.argv[1]](sys.argv[2])
    sys.exit(0)


# -- the tests ---------------------------------------------------------------------------------

from c8.broker.processes import make_process_id  # noqa: E402
from c8.host import proc as hostproc  # noqa: E402
from tests.integration.sensor import Sensor, wait_for  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import mfusepy  # noqa: F401  (loads libfuse3)
    except (ImportError, OSError) as exc:
        return f"mfusepy/libfuse3 unavailable: {exc}"
    return None


def _holds_mmap_lock(pid: int) -> bool:
    """A thread of ``pid`` waits in mmap() on the locked FUSE page (its kernel
    stack; never its cmdline, which would stall this test too)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stack") as f:
                if "invalidate_inode_pages2" in f.read():
                    return True
        except OSError:
            pass
    return False


def _cmdline_stalls(pid: int, wait: float = 1.0) -> bool:
    """True when reading ``pid``'s cmdline takes longer than ``wait`` (the reader
    thread is left blocked until the stall ends; its wait is killable)."""
    done = threading.Event()
    threading.Thread(target=lambda: (hostproc.cmdline_raw(pid), done.set()), daemon=True).start()
    return not done.wait(wait)


@pytest.fixture
def stalled(tmp_path):
    """A root process whose cmdline cannot be read while the FUSE daemon lives;
    yields (process, release) where release() kills the daemon, ending the stall."""
    missing = _fuse_missing()
    if missing:
        pytest.skip(missing)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = subprocess.Popen([sys.executable, "-m", "tests.integration.test_hostile_proc", "stallfs", str(mnt)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = None
    try:
        wait_for(lambda: os.path.ismount(mnt), 10, what="the FUSE mount")
        holder = subprocess.Popen([sys.executable, "-m", "tests.integration.test_hostile_proc", "hold",
                                   str(mnt / "argv")], cwd=ROOT)
        wait_for(lambda: _holds_mmap_lock(holder.pid), 10, what="the hostile process holding its mmap lock")
        assert _cmdline_stalls(holder.pid), "reading the hostile process's cmdline did not stall"

        def release():
            if fs.poll() is None:
                fs.kill()  # the FUSE connection is aborted: every waiter wakes
                fs.wait()
        yield holder, release
    finally:
        release_all = [p for p in (fs, holder) if p is not None and p.poll() is None]
        for p in release_all:
            p.kill()
        for p in release_all:
            p.wait(10)
        subprocess.run(["umount", "-l", str(mnt)], stderr=subprocess.DEVNULL)


def c8ctl_status(run_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir, "status", "--json"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_process_stalling_its_cmdline_stalls_nothing_of_the_sensor(tmp_path, stalled):
    holder, release = stalled
    start = hostproc.stat(holder.pid).start_ticks
    (tmp_path / "sensor").mkdir()
    s = Sensor(tmp_path / "sensor").start()  # the broker's seed meets the stalled process
    try:
        broker = s.status()["broker_pid"]
        # the read is given up at its deadline and counted; its thread stays stuck, bounded
        counts = wait_for(lambda: (lambda c: c if c["proc_cmdline_timed_out"] >= 1 else None)(
            c8ctl_status(s.run_dir)["counts"]), 20, what="the stalled read counted")
        assert counts["proc_stuck_threads"] == 1 and counts["proc_stalling_uids"] == 1, counts
        assert counts["proc_known"] > 10  # every other process seeded, command lines and all
        assert _cmdline_stalls(holder.pid, 0.2)  # still stalling: the sensor answers all the same

        with s.client.subscribe({"events": {"process": {}}}) as sub:
            marker = f"hostile-proc-{os.getpid()}"
            seen = {}
            next_run = 0.0
            deadline = time.monotonic() + 30
            while "exec" not in seen and time.monotonic() < deadline:
                if time.monotonic() >= next_run:
                    subprocess.run(["/bin/sh", "-c", ":", marker])
                    next_run = time.monotonic() + 2
                for ev in sub.events(timeout=2, idle=1):
                    if ev.get("exec_command_line") == f"/bin/sh -c : {marker}":
                        seen["exec"] = ev
                        break
            assert "exec" in seen, "no event of another process arrived while the read stalled"
            assert seen["exec"]["process_lineage"], seen["exec"]  # its lineage from the table

            release()  # the stall ends: the hostile process dies of SIGBUS on its unanswered page
            holder.wait(10)
            exit_ev = None
            deadline = time.monotonic() + 20
            while exit_ev is None and time.monotonic() < deadline:
                for ev in sub.events(timeout=2, idle=1):
                    if ev.get("process_pid") == holder.pid and ev.get("kind") == "EXIT":
                        exit_ev = ev
                        break
            assert exit_ev is not None, "the hostile process's exit did not arrive"
            boot = hostproc.boot_id()
            assert exit_ev["process_id"] == make_process_id(boot, holder.pid, start).decode()
            assert exit_ev["uid"] == 0 and exit_ev["euid"] == 0
            assert exit_ev["exit_signal"] == holder.returncode * -1 == 7  # SIGBUS

        counts = wait_for(lambda: (lambda c: c if c["proc_stuck_threads"] == 0 else None)(
            c8ctl_status(s.run_dir)["counts"]), 20, what="the stuck thread to end")
        assert counts["proc_cmdline_timed_out"] == 1
        assert counts["proc_stalling_uids"] == 0  # the stall is over: root's command lines are read again
        assert s.status()["broker_pid"] == broker  # never restarted
        assert all(c["restarts"] == 0 for c in s.children()), s.children()
    finally:
        release()
        s.stop()


def test_the_sensor_stops_while_a_read_is_stuck(tmp_path, stalled):
    """A stuck reader waits killably (mmap_read_lock_killable): the broker's
    exit is not held by it, so SIGTERM stops the sensor as usual."""
    holder, _release = stalled
    (tmp_path / "sensor").mkdir()
    s = Sensor(tmp_path / "sensor").start()
    try:
        wait_for(lambda: c8ctl_status(s.run_dir)["counts"]["proc_stuck_threads"] == 1, 20,
                 what="the broker's stuck read")
        assert _cmdline_stalls(holder.pid, 0.2)
    finally:
        assert s.stop(timeout=20) == 0  # raises when the supervisor does not stop
    assert holder.poll() is None  # still stalling: nothing waited for it
