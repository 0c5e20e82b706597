"""TCP listeners for remote clients, guarded by ZeroMQ CURVE.

A ROUTER socket has one security mechanism, so the TCP listener is a second
ROUTER beside the unix control socket (which stays NULL: file permissions
guard it). The broker polls both and answers each peer on the socket it came
from (``Broker.listeners``). Clients must present a CURVE key found in
``curve_authorized_keys_dir``; a ZAP handler (pyzmq's ThreadAuthenticator)
refuses every other key, and a client without CURVE never completes the
handshake. Neither reaches the broker's loop.

Key files: the server's secret key file is a ZeroMQ certificate
(``zmq.auth.create_certificates``' ``.key_secret``) or a bare z85 key (40
characters). A key directory holds one client public key per file, as a
certificate (``public-key = "..."``) or a bare z85 key; it is re-read when it
changes, so keys are added and revoked without a restart.

Roles (docs/security.md): keys in ``curve_authorized_keys_dir`` are
subscribers, keys in ``curve_admin_keys_dir`` admins; a key in both counts as
a subscriber (the lesser role). The ZAP handler names the client by its z85
key (the messages' User-Id); the broker asks ``AuthorizedKeys.role_of`` on
every request, so a revoked key's open connection is refused at once.

Trust: a key file or directory that someone other than root or the sensor's
user could change would let them grant themselves a role, so the secret key
file and the key directories are refused (the listener does not start) when
group- or world-writable or owned by anyone else, and so is each key file
(skipped, with a warning).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("c8.broker.remote")

ZAP_DOMAIN = "c8"
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_CERT_LINE = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]{40})"', re.M)


ADMIN, SUBSCRIBER = "admin", "subscriber"


class UnsafeKeyPath(ValueError):
    """A key file or directory others could change; names the path and why."""


def check_private(path: str, st: os.stat_result | None = None) -> None:
    """Raise UnsafeKeyPath unless ``path`` is owned by root or this process's user
    and is neither group- nor world-writable."""
    st = st if st is not None else os.stat(path)
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeKeyPath(f"{path}: owned by uid {st.st_uid} (must be root or uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeKeyPath(f"{path}: group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})")


def read_key(path: str, which: str = "public") -> bytes:
    """The z85 key in a file: a certificate's ``<which>-key`` line or a bare key.

    The file must be a regular file that passes ``check_private`` (checked on
    the open file, so a rename in between cannot swap it).
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeKeyPath(f"{path}: not a regular file")
        check_private(path, st)
        text = f.read(64 * 1024)
    for kind, key in _CERT_LINE.findall(text):
        if kind.decode() == which:
            return key
    bare = text.strip()
    if _Z85_KEY.fullmatch(bare):
        return bare
    raise ValueError(f"{path}: no z85 {which} key (a 40-character key or a ZeroMQ certificate)")


class KeyDirectory:
    """The client keys of one directory, re-read when the directory changes.

    A directory that fails ``check_private`` yields no key at all (logged).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset()
        self._stamp: tuple | None = None
        self._refused: str | None = None  # why every key is refused now (logged once)
        self.reload()

    def _current_stamp(self) -> tuple:
        st = os.stat(self.directory)
        entries = [("", st.st_mtime_ns, st.st_mode, st.st_uid)]
        with os.scandir(self.directory) as it:
            for e in it:
                try:
                    est = e.stat()
                except OSError:
                    continue
                entries.append((e.name, est.st_mtime_ns, est.st_size, est.st_mode, est.st_uid))
        return tuple(sorted(entries))

    def reload(self) -> None:
        try:
            check_private(self.directory)
            stamp = self._current_stamp()
        except (OSError, ValueError) as exc:
            if str(exc) != self._refused:
                log.error("refusing every key of %s: %s", self.directory, exc)
            self.keys, self._stamp, self._refused = frozenset(), None, str(exc)
            return
        self._refused = None
        if stamp == self._stamp:
            return
        keys = set()
        for name, *_ in stamp:
            path = os.path.join(self.directory, name)
            if not name or name.startswith(".") or not os.path.isfile(path):
                continue
            try:
                keys.add(read_key(path, "public"))
            except (OSError, ValueError) as exc:
                log.warning("ignoring key file: %s", exc)
        self.keys, self._stamp = frozenset(keys), stamp
        log.info("%d CURVE client keys in %s", len(keys), self.directory)


class AuthorizedKeys:
    """Client keys by role: subscribers' directory and, optionally, admins'.

    ``callback`` is the ZAP credentials provider: it runs in the
    authenticator's thread and answers whether a z85 client key may connect;
    ``role_of`` runs in the broker's loop. Both re-read changed directories.
    """

    def __init__(self, directory: str, admin_directory: str | None = None):
        self._lock = threading.Lock()
        self.subscribers = KeyDirectory(directory)
        self.admins = KeyDirectory(admin_directory) if admin_directory else None

    @property
    def keys(self) -> frozenset[bytes]:
        return self.subscribers.keys | (self.admins.keys if self.admins else frozenset())

    def reload(self) -> None:
        with self._lock:
            self.subscribers.reload()
            if self.admins is not None:
                self.admins.reload()

    def role_of(self, key: bytes | str) -> str | None:
        """ADMIN, SUBSCRIBER or None (not authorized now) for a z85 client key."""
        key = key.encode() if isinstance(key, str) else key
        self.reload()
        if key in self.subscribers.keys:
            return SUBSCRIBER  # also an admin key: the lesser role
        if self.admins is not None and key in self.admins.keys:
            return ADMIN
        return None

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.role_of(key) is not None
        if not allowed:
            log.warning("refused a TCP client with CURVE key %s", key.decode(errors="replace"))
        return allowed


class TcpListener:
    """A CURVE ROUTER socket bound to ``listen_tcp`` and its ZAP authenticator."""

    def __init__(self, socket: zmq.Socket, auth: ThreadAuthenticator, keys: AuthorizedKeys, endpoint: str):
        self.socket = socket
        self.auth = auth
        self.keys = keys
        self.endpoint = endpoint

    def close(self) -> None:
        self.socket.close(0)
        self.auth.stop()


def tcp_endpoint(host_port: str) -> str:
    """``host:port`` (host empty or ``*`` for every interface) as a zmq endpoint."""
    host, _, port = host_port.rpartition(":")
    return f"tcp://{host if host not in ('', '0.0.0.0') else '*'}:{port}"


def bind_tcp(broker, config: dict) -> TcpListener:
    """Bind the CURVE-protected TCP control socket described by ``config``.

    ``broker`` provides the zmq context and the control socket's options
    (``broker.ctx``, ``broker.control``). Raises OSError/ValueError/ZMQError
    when a key file or the address is unusable: a sensor configured to listen
    must not start silently without its listener.
    """
    secret = read_key(config["curve_server_secret_key_file"], "secret")
    for directory in (config["curve_authorized_keys_dir"], config["curve_admin_keys_dir"]):
        if directory:
            check_private(directory)  # refused at start: the sensor must not listen unguarded
    keys = AuthorizedKeys(config["curve_authorized_keys_dir"], config["curve_admin_keys_dir"])
    auth = ThreadAuthenticator(broker.ctx, log=logging.getLogger("c8.broker.zap"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, keys)
    sock = broker.ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, broker.control.getsockopt(zmq.SNDHWM))
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.zap_domain = ZAP_DOMAIN.encode()
        endpoint = tcp_endpoint(config["listen_tcp"])
        sock.bind(endpoint)
    except Exception:
        sock.close(0)
        auth.stop()
        raise
    log.info("listening on %s (CURVE)", endpoint)
    return TcpListener(sock, auth, keys, endpoint)
