"""c8.host.files and c8.host.typed: hostile files read safely, wrong types read as absent.

Real files, FIFOs, symlinks and devices under tmp_path; no root needed.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from c8.host import files, typed

pytestmark = pytest.mark.timeout(20)  # a reader that blocked on a FIFO would hang here


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def test_regular_file_read_whole(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")
    assert files.read_bytes(str(tmp_path / "f")) == b"hello"
    assert files.read_text(str(tmp_path / "f")) == "hello"


def test_fifo_is_refused_without_blocking(fifo):
    # no writer: a plain open() would wait forever
    with pytest.raises(files.NotRegular):
        files.read_bytes(fifo)
    assert files.read_json(fifo) is None


def test_symlink_last_component_refused_unless_followed(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero")
    with pytest.raises(OSError) as info:
        files.read_bytes(str(tmp_path / "zero"))
    assert info.value.errno == errno.ELOOP
    with pytest.raises(files.NotRegular):  # followed: a character device, refused before reading
        files.read_bytes(str(tmp_path / "zero"), follow=True)
    assert files.read_json(str(tmp_path / "zero"), follow=True) is None


def test_directory_and_socket_refused(tmp_path):
    import socket
    with pytest.raises(files.NotRegular):
        files.read_bytes(str(tmp_path))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(OSError):  # ENXIO: a socket cannot be opened
            files.read_bytes(str(tmp_path / "sock"))


def test_size_cap(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 1000)
    assert files.read_bytes(str(tmp_path / "big"), 1000) == b"x" * 1000
    with pytest.raises(files.TooLarge):
        files.read_bytes(str(tmp_path / "big"), 999)
    assert files.read_json(str(tmp_path / "big"), 10) is None
    assert files.read_head(str(tmp_path / "big"), 10) == b"x" * 10  # cut, not refused


def test_procfs_files_have_no_size_but_are_read():
    assert files.read_bytes("/proc/self/stat", 4096).startswith(str(os.getpid()).encode())


def test_read_beneath_follows_no_symlink_below_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "id").mkdir(parents=True)
    (root / "id" / "state.json").write_text('{"a": 1}')
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "state.json").write_text('{"secret": 1}')
    os.symlink(secret, root / "link")
    os.symlink(secret / "state.json", root / "id" / "other.json")
    assert files.read_json_beneath(str(root), "id/state.json") == {"a": 1}
    for rel in ("link/state.json", "id/other.json", "../elsewhere/state.json", "id/../id/state.json", ""):
        with pytest.raises(OSError):
            files.read_beneath(str(root), rel)
        assert files.read_json_beneath(str(root), rel) is None
    # the root itself may be a symlink (/var/run -> /run): it is trusted
    os.symlink(root, tmp_path / "rootlink")
    assert files.read_json_beneath(str(tmp_path / "rootlink"), "id/state.json") == {"a": 1}


def test_read_beneath_owner(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    me = os.getuid()
    assert files.read_json_beneath(str(tmp_path), "config.json", owner=me) == {}
    with pytest.raises(PermissionError):
        files.read_beneath(str(tmp_path), "config.json", owner=me + 1)


def test_fifo_below_root_refused(tmp_path, fifo):
    (tmp_path / "id").mkdir()
    os.mkfifo(tmp_path / "id" / "state.json")
    assert files.read_json_beneath(str(tmp_path), "id/state.json") is None


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b"[" * 100000, b""])
def test_malformed_json_is_none(tmp_path, data):
    (tmp_path / "j").write_bytes(data)
    assert files.read_json(str(tmp_path / "j")) is None


def test_typed_access_wrong_types_read_as_absent():
    doc = json.loads('{"config": {"labels": [1, "a=b", null, ["x"]]}, "Name": 7, "Config": [],'
                     ' "annotations": {"k": 1, "n": "v"}, "list": {"not": "a list"}}')
    assert typed.texts(doc, "config", "labels") == ["a=b"]
    assert typed.text(doc, "Name") == "" and typed.text(doc, "Name", default="?") == "?"
    assert typed.text(doc, "Config", "Image") == ""  # a list where a map was expected
    assert typed.mapping(doc, "Config") == {}
    assert typed.string_map(doc["annotations"]) == {"n": "v"}
    assert typed.texts(doc, "list") == []
    assert typed.records([1, {"id": "x"}, "y"]) == [{"id": "x"}]
    assert typed.records({"id": "x"}) == []
    assert typed.text([1, 2], "a") == "" and typed.mapping("str") == {}
    assert len(typed.text({"a": "x" * 10**6}, "a")) == typed.MAX_TEXT
