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
characters). The authorized directory holds one client public key per file,
as a certificate (``public-key = "..."``) or a bare z85 key; it is re-read
when it changes, so keys are added and revoked without a restart.
"""

from __future__ import annotations

import logging
import os
import re

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("c8.broker.remote")

ZAP_DOMAIN = "c8"
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_CERT_LINE = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]{40})"', re.M)


def read_key(path: str, which: str = "public") -> bytes:
    """The z85 key in a file: a certificate's ``<which>-key`` line or a bare key."""
    with open(path, "rb") as f:
        text = f.read(64 * 1024)
    for kind, key in _CERT_LINE.findall(text):
        if kind.decode() == which:
            return key
    bare = text.strip()
    if _Z85_KEY.fullmatch(bare):
        return bare
    raise ValueError(f"{path}: no z85 {which} key (a 40-character key or a ZeroMQ certificate)")


class AuthorizedKeys:
    """The client keys of a directory, re-read when the directory changes.

    ``callback`` is the ZAP credentials provider: it runs in the
    authenticator's thread and answers whether a z85 client key may connect.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset()
        self._stamp: tuple | None = None
        self.reload()

    def _current_stamp(self) -> tuple:
        entries = []
        with os.scandir(self.directory) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(entries))

    def reload(self) -> None:
        try:
            stamp = self._current_stamp()
        except OSError as exc:
            log.error("cannot read authorized keys in %s: %s", self.directory, exc)
            self.keys, self._stamp = frozenset(), None
            return
        if stamp == self._stamp:
            return
        keys = set()
        for name, _, _ in stamp:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path) or name.startswith("."):
                continue
            try:
                keys.add(read_key(path, "public"))
            except (OSError, ValueError) as exc:
                log.warning("ignoring authorized key file: %s", exc)
        self.keys, self._stamp = frozenset(keys), stamp
        log.info("%d authorized CURVE client keys in %s", len(keys), self.directory)

    def callback(self, domain: str, key: bytes) -> bool:
        self.reload()
        allowed = key in self.keys
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
    keys = AuthorizedKeys(config["curve_authorized_keys_dir"])
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
