"""Path canonicalisation: text clean-up, and the kernel's resolution inside a root.

A scratch directory stands for a process's root (Root.of_dir): the resolver
treats it as '/', so symlinks, loops and escapes are built for real there,
and openat2(RESOLVE_IN_ROOT) resolves them. No root needed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from c8.broker import pathcanon, paths
from c8.broker.pathcanon import Root, lexical, own_root, split_last, strip_view


@pytest.mark.parametrize("raw, want", [
    (b"/etc/shadow", b"/etc/shadow"),
    (b"/etc/../etc/../etc/shadow", b"/etc/shadow"),
    (b"//etc///./shadow", b"/etc/shadow"),
    (b"/../../../etc/shadow", b"/etc/shadow"),      # '..' at the root stays there
    (b"/etc/ssh/..", b"/etc"),
    (b"/", b"/"),
    (b"/..", b"/"),
    (b"/a/b/c/../../d/./", b"/a/d"),
])
def test_lexical(raw, want):
    assert lexical(raw) == want


def test_own_root_magic_links():
    assert own_root(b"/proc/self/root/etc/shadow", 7) == b"/etc/shadow"
    assert own_root(b"/proc/thread-self/root", 7) == b"/"
    assert own_root(b"//proc/7/root/etc/shadow", 7) == b"/etc/shadow"
    assert own_root(b"/proc/8/root/etc/shadow", 7) == b"/proc/8/root/etc/shadow"  # another process's root
    assert own_root(b"/proc/self/rootfs/x", 7) == b"/proc/self/rootfs/x"


def test_split_last():
    assert split_last(b"/etc/shadow") == (b"/etc", b"shadow")
    assert split_last(b"/shadow") == (b"/", b"shadow")
    assert split_last(b"/etc/..") == (b"/etc/..", b"")
    assert split_last(b"/etc/") == (b"/etc/", b"")


def test_strip_view():
    assert strip_view(b"/srv/jail/etc", b"/srv/jail") == b"/etc"
    assert strip_view(b"/srv/jail", b"/srv/jail") == b"/"
    assert strip_view(b"/srv/jailbreak/etc", b"/srv/jail") is None
    assert strip_view(b"/etc", b"/") == b"/etc"
    assert strip_view(b"/tmp/x (deleted)", b"/") is None
    assert strip_view(b"pipe:[123]", b"/") is None


@pytest.fixture(autouse=True)
def patient_slow_lookups(monkeypatch):
    """Symlinks made by a test have an atime due, so their first follow takes the
    slow path; a loaded test host must not make its 10 ms deadline a flake."""
    monkeypatch.setattr(paths, "SLOW", pathcanon.SlowLookups(deadline=5.0, budget=60.0))


@pytest.fixture
def tree(tmp_path):
    """A root: /etc/shadow, /usr/bin, /bin -> usr/bin, /lnk -> /etc/ssh (absolute, in
    the root), /up -> ../../../etc (climbs past the root), /loop1 <-> /loop2,
    /etc/ssh/key -> ../shadow, /esc -> <the real tmp_path's parent> (outside)."""
    r = tmp_path / "root"
    (r / "etc" / "ssh").mkdir(parents=True)
    (r / "etc" / "shadow").write_text("x")
    (r / "usr" / "bin").mkdir(parents=True)
    os.symlink("usr/bin", r / "bin")
    os.symlink("/etc/ssh", r / "lnk")
    os.symlink("../../../etc", r / "up")
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    os.symlink("../shadow", r / "etc" / "ssh" / "key")
    (tmp_path / "outside").mkdir()
    os.symlink(str(tmp_path / "outside"), r / "esc")
    # symlinks just made have an atime due: the cached lookup refuses their first
    # follow, the slow path (a thread, with a deadline) does it
    root = Root.of_dir(str(r), pathcanon.SlowLookups(deadline=5.0, budget=60.0))
    assert root is not None
    yield root
    root.close()


@pytest.mark.parametrize("raw, follow, want", [
    (b"/etc/shadow", False, b"/etc/shadow"),
    (b"/etc/../etc/../etc/shadow", False, b"/etc/shadow"),
    (b"/bin/ls", False, b"/usr/bin/ls"),                     # symlinked directory, file absent
    (b"/lnk/../shadow", False, b"/etc/shadow"),              # '..' from the symlink's target
    (b"/up/shadow", False, b"/etc/shadow"),                  # '..' past the root stays in it
    (b"/../../etc/shadow", False, b"/etc/shadow"),
    (b"/etc/ssh/key", True, b"/etc/shadow"),                 # last component followed
    (b"/etc/ssh/key", False, b"/etc/ssh/key"),               # ... or not (unlink, lchown)
    (b"/lnk/key", True, b"/etc/shadow"),
    (b"/etc", False, b"/etc"),
    (b"/lnk/", False, b"/etc/ssh"),
    (b"/", False, b"/"),
])
def test_resolve_in_root(tree, raw, follow, want):
    assert tree.resolve(raw, follow) == want


def test_a_followed_file_keeps_the_name_it_was_opened_by(tree, monkeypatch):
    """Following the last component is for symlinks: a regular file's path is its
    directory's plus the name the call used, never its name read back from the
    kernel (a rename between the event and the look-up would name the new file:
    an OPEN of xfoo-0 reported as xfoo-0.moved)."""
    read_back = []
    real = pathcanon._resolve_at
    monkeypatch.setattr(pathcanon, "_resolve_at",
                        lambda fd, path, directory, resolve=0: read_back.append((path, directory))
                        or real(fd, path, directory, resolve))
    assert tree.resolve(b"/etc/shadow", True) == b"/etc/shadow"
    assert read_back == [(b"/etc", True)]  # the directory only
    read_back.clear()
    assert tree.resolve(b"/etc/ssh/key", True) == b"/etc/shadow"  # a symlink is followed
    assert (b"/etc/ssh/key", False) in read_back


def test_symlink_loop_falls_back_to_text(tree):
    # the kernel fails such a call with ELOOP; the path is the name cleaned as text
    assert tree.resolve(b"/loop1/x/../shadow", False) == b"/loop1/shadow"
    assert tree.resolve(b"/loop1", True) == b"/loop1"


def test_symlink_out_of_the_root_is_never_followed(tree, tmp_path):
    # /esc names a directory outside the root by an absolute path: inside the
    # root that path does not exist, so resolution fails and the text is kept
    outside = os.fsencode(str(tmp_path / "outside"))
    got = tree.resolve(b"/esc/file", False)
    assert got == b"/esc/file"
    assert not got.startswith(outside) and not got.startswith(os.fsencode(str(tmp_path)))


def test_resolve_batch_of_live_process(tmp_path, monkeypatch):
    """paths.resolve on this very process: cwd, a dirfd, fd-only, dedup, width."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    os.symlink(str(d), tmp_path / "ln")
    monkeypatch.chdir(d)
    dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    ffd = os.open(str(d / "f"), os.O_RDONLY)
    try:
        me = os.getpid()
        names = np.array([b"f", b"./f", b"../d/f", b"ln/f", b"", b"", b"f", b"/etc/../etc//passwd"], "S256")
        dirfds = np.array([-100, -100, -100, dfd, ffd, -100, -100, -100])
        got = paths.resolve(np.full(len(names), me), dirfds, names)
        real = os.fsencode(os.path.realpath(d))
        assert got.dtype == np.dtype(f"S{len(real) + 2}")  # as wide as the longest path, not the names
        assert got.tolist() == [real + b"/f", real + b"/f", real + b"/f", real + b"/f", real + b"/f",
                                b"", real + b"/f", b"/etc/passwd"]
    finally:
        os.close(dfd)
        os.close(ffd)


def test_a_name_held_narrow_resolves_to_a_longer_path(tmp_path, monkeypatch):
    """A collector sends a short name narrow (8 bytes here); its path, relative to a
    long cwd, is longer than that and arrives whole."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    got = paths.resolve(np.array([os.getpid()]), np.array([-100]), np.array([b"f"], "S8"))
    assert got.tolist() == [os.fsencode(os.path.realpath(deep)) + b"/f"]


def test_resolve_exited_process():
    """Nothing can be asked of a gone pid: absolute names as text, relative ones unknown."""
    gone = 2 ** 22 + 12345  # above pid_max's default: never a live pid here
    names = np.array([b"/etc/../etc/shadow", b"shadow", b"", b"/proc/self/root/etc/shadow"], "S32")
    got = paths.resolve(np.full(4, gone), np.array([-100, -100, 5, -100]), names)
    assert got.tolist() == [b"/etc/shadow", b"", b"", b"/etc/shadow"]


def test_resolve_work_is_bounded(tmp_path):
    """Past max_resolve kernel resolutions in one call, names are cleaned as text."""
    os.symlink("/etc", tmp_path / "e")
    names = np.array([os.fsencode(f"{tmp_path}/e/x{i}") for i in range(4)], "S256")
    got = paths.resolve(np.full(4, os.getpid()), np.full(4, -100), names, max_resolve=2)
    real = os.fsencode(os.path.realpath("/etc"))
    assert sum(g.startswith(real + b"/x") for g in got.tolist()) == 2
    assert sum(g.startswith(os.fsencode(str(tmp_path)) + b"/e/x") for g in got.tolist()) == 2


def test_symlink_targets_from_the_link_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    me = os.getpid()
    base = os.fsencode(os.path.realpath(tmp_path))
    links = np.array([base + b"/etc/a", base + b"/etc/b", b"", base + b"/c"], "S256")
    targets = np.array([b"../etc/../etc/shadow", b"/etc/../etc/shadow", b"shadow", b"etc"], "S256")
    got = paths.symlink_targets(np.full(4, me), links, targets)
    assert got.tolist() == [base + b"/etc/shadow", b"/etc/shadow", b"", base + b"/etc"]


def test_no_openat2_falls_back_to_text(tree, monkeypatch):
    """A kernel without openat2 (before 5.6): every name is cleaned as text."""
    monkeypatch.setattr(pathcanon, "_resolve_at", lambda *a: (None, 38))
    assert tree.resolve(b"/bin/../etc//shadow", True) == b"/etc/shadow"


def test_cached_lookup_needs_no_thread(tmp_path):
    """What the dentry cache holds resolves on the caller's thread (no slow path)."""
    (tmp_path / "d").mkdir()
    os.listdir(tmp_path / "d")
    root = Root.of_dir(str(tmp_path))
    try:
        assert root.slow is None and root.resolve(b"/d/../d/x") == b"/d/x"
    finally:
        root.close()


def test_a_stalled_file_system_never_stalls_the_caller(tmp_path, monkeypatch):
    """A lookup that never returns (as on a FUSE daemon that does not answer) is given
    up at the deadline; while every worker is held, no lookup waits at all. The stall
    is simulated: an unanswering FUSE daemon cannot be mounted in a unit test."""
    import threading
    import time

    release = threading.Event()
    real = pathcanon._resolve_at

    def stalled(dirfd, path, directory, resolve=0):
        if resolve & pathcanon.RESOLVE_CACHED:
            return None, 11  # EAGAIN: not in the cache
        release.wait(30)
        return real(dirfd, path, directory, resolve)
    monkeypatch.setattr(pathcanon, "_resolve_at", stalled)
    slow = pathcanon.SlowLookups(workers=2, deadline=0.05, budget=1.0)
    root = Root.of_dir(str(tmp_path), slow)
    try:
        t0 = time.monotonic()
        assert root.resolve(b"/a/../b/x") == b"/b/x"          # given up: cleaned as text
        assert root.resolve(b"/c/y") == b"/c/y"
        assert slow.busy == 2 and slow.timeouts == 2
        t1 = time.monotonic()
        assert root.resolve(b"/e/z") == b"/e/z"                # no worker left: no wait
        assert time.monotonic() - t1 < 0.04 and t1 - t0 < 1.0
    finally:
        release.set()
        root.close()
    wait = time.monotonic() + 10
    while slow.busy and time.monotonic() < wait:
        time.sleep(0.01)
    assert slow.busy == 0  # the held threads ended and closed their descriptors


def test_hash_collisions_resolve_each_name_on_its_own(monkeypatch):
    """Rows are grouped by a keyed hash; rows that share a hash but differ are still
    resolved one by one (a zero key makes every row collide)."""
    monkeypatch.setattr(paths, "_KEY", np.zeros(66, np.uint64))
    names = np.array([b"/etc/../etc/shadow", b"/tmp//x", b"/etc/../etc/shadow", b"rel"], "S256")
    got = paths.resolve(np.full(4, 2 ** 22 + 12345), np.full(4, -100), names)
    assert got.tolist() == [b"/etc/shadow", b"/tmp/x", b"/etc/shadow", b""]


def test_rows_are_told_apart_by_every_byte_up_to_the_longest_name(monkeypatch):
    """Only the words up to the batch's longest name are hashed and compared: names
    that differ in their last byte, or only in length, are still told apart, with
    every row colliding (zero key) and with a real key."""
    names = np.array([b"/tmp/abcdefgh-1", b"/tmp/abcdefgh-2", b"/tmp/abcdefgh", b"/tmp/abcdefgh-1",
                      b"/tmp/abcdefgh-1/x" * 3], "S256")
    pids, dirfds, follow = np.full(5, 7, np.int64), np.full(5, -100, np.int64), np.zeros(5, bool)
    first, inverse, odd = paths._unique_rows(pids, dirfds, follow, names)
    assert len(first) == 4 and inverse[0] == inverse[3] and not odd.any()
    monkeypatch.setattr(paths, "_KEY", np.zeros(66, np.uint64))
    first, inverse, odd = paths._unique_rows(pids, dirfds, follow, names)
    assert len(first) == 1 and odd.tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("width", [5, 21, 32, 256, 600])
@pytest.mark.parametrize("strided", [False, True])
def test_rows_group_as_their_values_do_at_any_width_and_layout(width, strided):
    """Grouping equals grouping the (pid, dirfd, follow, name) tuples, for names of odd
    widths, names longer than 64 words, and a name column read from record rows."""
    rng = np.random.default_rng(width)
    n = 400
    values = [bytes(rng.integers(97, 100, rng.integers(0, width + 1))) for _ in range(n)]
    rec = np.zeros(n, [("k", "u1"), ("name", f"S{width}"), ("pid", "<i8")])
    rec["name"] = values
    names = rec["name"] if strided else np.ascontiguousarray(rec["name"])
    pids = rng.integers(1, 3, n).astype(np.int64)
    dirfds = rng.choice([-100, 3], n).astype(np.int64)
    follow = rng.integers(0, 2, n).astype(bool)
    first, inverse, odd = paths._unique_rows(pids, dirfds, follow, names)
    keys = list(zip(pids.tolist(), dirfds.tolist(), follow.tolist(), names.tolist(), strict=True))
    assert not odd.any() and len(first) == len(set(keys))
    assert all(keys[first[inverse[i]]] == keys[i] for i in range(n))
