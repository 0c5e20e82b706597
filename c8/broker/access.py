"""Who may do what at the broker's control sockets (docs/security.md "Roles").

Every request is made by a ``Peer``: on the unix socket the kernel's
credentials of the connecting process (SO_PEERCRED, read by libzmq when the
connection is accepted), on the TCP listener the CURVE key the ZAP handler
accepted. Roles:

- admin: uid 0, the sensor's own uid (its detector; it already is the
  broker), or a key of ``curve_admin_keys_dir``. May do everything.
- subscriber: any other peer the socket lets in (the unix socket is mode 0660,
  group of sensor_user), or a key of ``curve_authorized_keys_dir``. May
  subscribe to event families; may place kernel_call/user_call probes (and
  memory-reading fetchargs) only when ``allow_probes`` names its uid, user or
  group; sees, lists and ends only its own subscriptions.

A peer is its principal (a uid or a key), not its connection: a client's
subscriptions are its own from any of its connections. The checks raise
ProtocolError FORBIDDEN, or LIMIT_EXCEEDED for the subscription and probe
counts (limits.*).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import socket
import struct
from dataclasses import dataclass

import zmq

from c8.protocol import errors

log = logging.getLogger("c8.broker.access")

ADMIN, SUBSCRIBER = "admin", "subscriber"
PROBE_CATEGORIES = ("kernel_call", "user_call")
# A fetch that reads memory: a dereference +OFFS(...) / -OFFS(...) / +uOFFS(...), or @ADDR/@SYM.
_MEMORY_FETCH = re.compile(r"[+-]u?(?:0[xX][0-9a-fA-F]+|[0-9]+)\(|@")
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """Who made a request: ``principal`` names it in replies and logs."""

    principal: str
    role: str
    may_probe: bool
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None

    @property
    def admin(self) -> bool:
        return self.role == ADMIN


def unix_credentials(frame: zmq.Frame | None) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of an ipc:// connection.

    libzmq appends ``:uid:gid:pid`` from SO_PEERCRED to the connection's
    Peer-Address property when it accepts it, so the answer belongs to this
    connection even if the client has gone since. Otherwise the socket's fd
    (ZMQ_SRCFD) is asked directly. None when neither answers.
    """
    if frame is None:
        return None
    try:
        address = frame.get("Peer-Address")
        *_, uid, gid, pid = address.rsplit(":", 3)
        return int(pid), int(uid), int(gid)
    except (zmq.ZMQError, ValueError, TypeError, AttributeError):
        pass
    try:
        fd = frame.get(zmq.SRCFD)
        s = socket.socket(fileno=os.dup(fd))
        try:
            pid, uid, gid = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        finally:
            s.close()
        return pid, uid, gid
    except (zmq.ZMQError, OSError, ValueError, TypeError):
        return None


def _resolve_grants(entries) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """allow_probes entries -> (uids, gids, uids of those groups' listed members).

    Resolved once at start (the configuration checked the names exist): the
    broker never waits on a name service while answering a request.
    """
    uids, gids, members = set(), set(), set()
    for entry in entries or ():
        text = str(entry)
        try:
            if text.startswith("group:"):
                g = grp.getgrnam(text[6:])
                gids.add(g.gr_gid)
                for name in g.gr_mem:
                    try:
                        members.add(pwd.getpwnam(name).pw_uid)
                    except KeyError:
                        pass
            elif text.isdigit():
                uids.add(int(text))
            else:
                uids.add(pwd.getpwnam(text).pw_uid)
        except KeyError:
            log.warning("allow_probes: %r does not exist (any more): ignored", text)
    return frozenset(uids), frozenset(gids), frozenset(members)


@dataclass(frozen=True)
class CountLimits:
    """limits.subscriptions_per_peer, limits.subscriptions, limits.probes."""

    subscriptions_per_peer: int = 16
    subscriptions: int = 256
    probes: int = 64

    @classmethod
    def from_config(cls, limits: dict | None) -> CountLimits:
        limits = limits or {}
        return cls(int(limits.get("subscriptions_per_peer", cls.subscriptions_per_peer)),
                   int(limits.get("subscriptions", cls.subscriptions)), int(limits.get("probes", cls.probes)))


class Access:
    """Roles of peers and the checks of their requests; owns who owns which subscription."""

    def __init__(self, config: dict, own_uid: int | None = None):
        self.admin_uids = frozenset({0, os.geteuid() if own_uid is None else own_uid})
        self.probe_uids, self.probe_gids, self.probe_members = _resolve_grants(config["allow_probes"])
        self.limits = CountLimits.from_config(config["limits"])
        self.owners: dict[str, Peer] = {}  # subscription id -> who made it

    # -- who ----------------------------------------------------------------------
    def unix_peer(self, frame: zmq.Frame | None, routing_id: bytes) -> Peer:
        cred = unix_credentials(frame)
        if cred is None:  # cannot happen on Linux; the least role, alone with its connection
            log.warning("no credentials for a unix peer %s: subscriber role", routing_id.hex())
            return Peer(f"unknown peer {routing_id.hex()}", SUBSCRIBER, False)
        pid, uid, gid = cred
        admin = uid in self.admin_uids
        may_probe = admin or uid in self.probe_uids or uid in self.probe_members or gid in self.probe_gids
        return Peer(f"uid {uid}", ADMIN if admin else SUBSCRIBER, may_probe, uid, gid, pid)

    def tcp_peer(self, frame: zmq.Frame, keys) -> Peer:
        """The CURVE client's role now (``keys``: remote.AuthorizedKeys); FORBIDDEN once revoked."""
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:
            key = ""
        role = keys.role_of(key) if key else None
        if role is None:
            raise errors.ProtocolError(errors.FORBIDDEN, "this CURVE key is not authorized (any more)")
        return Peer(f"curve key {key}", role, role == ADMIN)

    # -- checks ---------------------------------------------------------------------
    def check_subscribe(self, peer: Peer, spec, live: dict) -> None:
        """Before a spec is even parsed: probes allowed, counts below their limits."""
        events = spec.get("events") if isinstance(spec, dict) else None
        if isinstance(events, dict) and not peer.may_probe:
            asked = [c for c in PROBE_CATEGORIES if c in events]
            if asked:
                raise errors.ProtocolError(errors.FORBIDDEN, f"{peer.principal} ({peer.role}) may not place "
                                           f"probes: {_describe_probes(events, asked)}; admins may, and "
                                           "whom allow_probes names")
        if isinstance(events, dict):  # each probe costs an ELF or kallsyms look-up while parsing: count first
            asked_probes = sum(len(events[c]) for c in PROBE_CATEGORIES if isinstance(events.get(c), list))
            if asked_probes > self.limits.probes:
                raise errors.ProtocolError(errors.LIMIT_EXCEEDED, f"{asked_probes} probes in one subscription: "
                                           f"at most {self.limits.probes} (limits.probes)")
        if len(live) >= self.limits.subscriptions:
            raise errors.ProtocolError(errors.LIMIT_EXCEEDED, f"the sensor has {len(live)} subscriptions: "
                                       f"at most {self.limits.subscriptions} (limits.subscriptions)")
        if not peer.admin:
            mine = sum(1 for sid in live if self.owns(peer, sid))
            if mine >= self.limits.subscriptions_per_peer:
                raise errors.ProtocolError(errors.LIMIT_EXCEEDED, f"{peer.principal} has {mine} subscriptions: "
                                           f"at most {self.limits.subscriptions_per_peer} "
                                           "(limits.subscriptions_per_peer)")

    def check_probes(self, sub, live: dict) -> None:
        """After parsing: the distinct probes of every subscription, this one's added, within limits.probes."""
        def sources(s) -> set[str]:
            return {cf.probe["definition"].source for filters in s.categories.values() for cf in filters
                    if cf.probe is not None and cf.probe.get("definition") is not None}

        new = sources(sub)
        if not new:
            return
        placed = set().union(*(sources(s) for s in live.values()))
        if len(placed | new) > self.limits.probes:
            raise errors.ProtocolError(errors.LIMIT_EXCEEDED, f"{len(placed | new)} probes: at most "
                                       f"{self.limits.probes} (limits.probes)")

    def check_unsubscribe(self, peer: Peer, sid: str) -> None:
        if not self.owns(peer, sid):
            raise errors.ProtocolError(errors.FORBIDDEN, f"subscription {sid} belongs to another client; "
                                       f"{peer.principal} ({peer.role}) may end only its own")

    # -- ownership --------------------------------------------------------------------
    def record(self, sid: str, peer: Peer) -> None:
        self.owners[sid] = peer

    def forget(self, sid: str) -> None:
        self.owners.pop(sid, None)

    def owns(self, peer: Peer, sid: str) -> bool:
        """May ``peer`` see and end subscription ``sid``: an admin, or whoever made it."""
        owner = self.owners.get(sid)
        return peer.admin or (owner is not None and owner.principal == peer.principal)

    def visible(self, peer: Peer, subscriptions: dict) -> list:
        return [s for sid, s in subscriptions.items() if self.owns(peer, sid)]


def _describe_probes(events: dict, categories: list[str]) -> str:
    parts = []
    for category in categories:
        probes = events.get(category)
        for probe in probes if isinstance(probes, list) else [probes]:
            if not isinstance(probe, dict):
                parts.append(category)
                continue
            where = f" in {probe['executable']}" if isinstance(probe.get("executable"), str) else ""
            fetch = probe.get("fetchargs")
            memory = " reading memory" if isinstance(fetch, str) and _MEMORY_FETCH.search(fetch) else ""
            parts.append(f"{category} {str(probe.get('symbol'))[:64]!r}{where[:200]}{memory}")
    return ", ".join(parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")
