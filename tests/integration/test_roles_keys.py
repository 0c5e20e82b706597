"""CURVE key files and directories that others could change are refused (real files, real zmq).

Root is needed to give files to another owner; the broker's code runs here in
the test process (its checks are about files, not sockets), the TCP listener
bound for real on a free port.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest
import zmq
import zmq.auth

from c8.broker import remote

pytestmark = pytest.mark.root

OTHER_UID = 64111


@pytest.fixture
def keys(tmp_path):
    for name in ("server", "a", "b"):
        zmq.auth.create_certificates(str(tmp_path), name)
    for role in ("subscribers", "admins"):
        (tmp_path / role).mkdir(mode=0o755)
    (tmp_path / "subscribers" / "a.key").write_text((tmp_path / "a.key").read_text())
    (tmp_path / "admins" / "b.key").write_text((tmp_path / "b.key").read_text())
    os.chmod(tmp_path / "server.key_secret", 0o600)
    return tmp_path


def public(keys, name: str) -> bytes:
    return zmq.auth.load_certificate(str(keys / f"{name}.key"))[0]


class Broker:
    """What bind_tcp uses of the broker: its zmq context and control socket."""

    def __init__(self):
        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.ROUTER)

    def config(self, keys) -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return {"listen_tcp": f"127.0.0.1:{port}", "curve_server_secret_key_file": str(keys / "server.key_secret"),
                "curve_authorized_keys_dir": str(keys / "subscribers"), "curve_admin_keys_dir": str(keys / "admins")}


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.control.close(0)


def test_roles_by_directory(keys):
    ak = remote.AuthorizedKeys(str(keys / "subscribers"), str(keys / "admins"))
    assert ak.role_of(public(keys, "a")) == remote.SUBSCRIBER
    assert ak.role_of(public(keys, "b").decode()) == remote.ADMIN
    assert ak.role_of(public(keys, "server")) is None
    # a key in both directories has the lesser role
    (keys / "subscribers" / "b.key").write_text((keys / "b.key").read_text())
    assert ak.role_of(public(keys, "b")) == remote.SUBSCRIBER


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "other owner"])
def test_a_key_file_others_could_change_is_ignored(keys, how, caplog):
    path = keys / "admins" / "b.key"
    if how == "other owner":
        os.chown(path, OTHER_UID, -1)
    else:
        os.chmod(path, 0o664 if how == "group-writable" else 0o646)
    with caplog.at_level(logging.WARNING, "c8.broker.remote"):
        ak = remote.AuthorizedKeys(str(keys / "subscribers"), str(keys / "admins"))
    assert ak.role_of(public(keys, "b")) is None
    assert ak.role_of(public(keys, "a")) == remote.SUBSCRIBER  # the others still load
    why = f"owned by uid {OTHER_UID}" if how == "other owner" else "group- or world-writable"
    assert f"ignoring key file: {path}: {why}" in caplog.text


def test_a_directory_that_becomes_writable_yields_no_key(keys, caplog):
    ak = remote.AuthorizedKeys(str(keys / "subscribers"), str(keys / "admins"))
    assert ak.role_of(public(keys, "b")) == remote.ADMIN
    os.chmod(keys / "admins", 0o777)
    with caplog.at_level(logging.ERROR, "c8.broker.remote"):
        assert ak.role_of(public(keys, "b")) is None
    assert f"refusing every key of {keys / 'admins'}: {keys / 'admins'}: group- or world-writable (mode 0777)" \
        in caplog.text
    os.chmod(keys / "admins", 0o755)
    assert ak.role_of(public(keys, "b")) == remote.ADMIN


@pytest.mark.parametrize("what", ["subscribers", "admins", "server.key_secret"])
def test_the_listener_does_not_start_on_unsafe_key_paths(keys, broker, what):
    os.chmod(keys / what, 0o770 if what != "server.key_secret" else 0o620)
    with pytest.raises(remote.UnsafeKeyPath, match=f"^{keys / what}: group- or world-writable"):
        remote.bind_tcp(broker, broker.config(keys))


def test_the_listener_starts_on_safe_key_paths(keys, broker):
    listener = remote.bind_tcp(broker, broker.config(keys))
    try:
        assert listener.keys.role_of(public(keys, "b")) == remote.ADMIN
    finally:
        listener.close()
