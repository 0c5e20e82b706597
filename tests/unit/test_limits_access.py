"""Roles and counts of c8.broker.access: real credentials over a real ipc:// socket,
and the checks on real parsed subscriptions (no broker process needed)."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from c8.broker import access
from c8.broker.subscriptions import FilterLimits, parse_spec
from c8.probes.definition import ProbeDefinition
from c8.protocol import errors
from c8.supervisor.config import child_config


def test_unix_credentials_are_the_connecting_process(tmp_path):
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{tmp_path}/s.sock")
        dealer.connect(f"ipc://{tmp_path}/s.sock")
        dealer.send(b"hello")
        assert router.poll(5000)
        frames = router.recv_multipart(copy=False)
        assert access.unix_credentials(frames[-1]) == (os.getpid(), os.geteuid(), os.getegid())
        peer = access.Access(child_config(), own_uid=os.geteuid()).unix_peer(frames[-1], frames[0].bytes)
        assert (peer.role, peer.principal, peer.may_probe) == (access.ADMIN, f"uid {os.geteuid()}", True)
        stranger = access.Access(child_config(), own_uid=-5)
        if os.geteuid() != 0:
            assert stranger.unix_peer(frames[-1], frames[0].bytes).role == access.SUBSCRIBER
    finally:
        router.close(0)
        dealer.close(0)


def peer(uid: int, gid: int = 5000) -> access.Peer:
    a = access.Access(child_config(allow_probes=["4242"]), own_uid=999)

    class Frame:  # what libzmq's Peer-Address property says of an ipc peer
        def get(self, name):
            assert name == "Peer-Address"
            return f"localhost:{uid}:{gid}:123"

    return a.unix_peer(Frame(), b"r")


def test_roles_from_uids():
    assert peer(0).role == access.ADMIN and peer(999).role == access.ADMIN  # root, the sensor's user
    p = peer(1001)
    assert (p.role, p.may_probe, p.principal, p.pid) == (access.SUBSCRIBER, False, "uid 1001", 123)
    assert peer(4242).may_probe and peer(4242).role == access.SUBSCRIBER


def sub_of(spec: dict, sid: str | None = None):
    s = parse_spec(spec, b"peer", None)
    if sid:
        s.sub_id = sid
    return s


def test_subscribers_may_not_ask_for_probes_and_the_refusal_names_them():
    a = access.Access(child_config(), own_uid=999)
    spec = {"events": {"user_call": [{"executable": "/lib/libcrypt.so.1", "symbol": "crypt_r",
                                      "fetchargs": "pw=+0(%di):string"}],
                       "kernel_call": [{"symbol": "tcp_connect", "fetchargs": "a=%di"}]}}
    with pytest.raises(errors.ProtocolError) as err:
        a.check_subscribe(peer(1001), spec, {})
    assert err.value.code == errors.FORBIDDEN
    assert err.value.reason == ("uid 1001 (subscriber) may not place probes: kernel_call 'tcp_connect', "
                                "user_call 'crypt_r' in /lib/libcrypt.so.1 reading memory; admins may, "
                                "and whom allow_probes names")
    a.check_subscribe(peer(0), spec, {})
    a.check_subscribe(peer(4242), spec, {})  # granted (allow_probes, in peer())


def test_counts_per_peer_and_in_total():
    a = access.Access(child_config(limits={"subscriptions_per_peer": 2, "subscriptions": 3}), own_uid=999)
    live = {}
    for i, who in enumerate((peer(1001), peer(1001), peer(1002))):
        a.check_subscribe(who, {"events": {"process": {}}}, live)
        live[f"s{i}"] = sub_of({"events": {"process": {}}}, f"s{i}")
        a.record(f"s{i}", who)
    with pytest.raises(errors.ProtocolError) as err:
        a.check_subscribe(peer(1002), {"events": {"process": {}}}, live)
    assert (err.value.code, err.value.reason) == (
        errors.LIMIT_EXCEEDED, "the sensor has 3 subscriptions: at most 3 (limits.subscriptions)")
    del live["s2"]
    a.forget("s2")
    with pytest.raises(errors.ProtocolError) as err:
        a.check_subscribe(peer(1001), {"events": {"process": {}}}, live)
    assert err.value.reason == "uid 1001 has 2 subscriptions: at most 2 (limits.subscriptions_per_peer)"
    a.check_subscribe(peer(1002), {"events": {"process": {}}}, live)
    a.check_subscribe(peer(0), {"events": {"process": {}}}, live)  # admins: the total only


def test_ownership_and_visibility():
    a = access.Access(child_config(), own_uid=999)
    subs = {"s1": sub_of({"events": {"process": {}}}, "s1"), "s2": sub_of({"events": {"file": {}}}, "s2")}
    a.record("s1", peer(1001))
    a.record("s2", peer(1002))
    assert [s.sub_id for s in a.visible(peer(1001), subs)] == ["s1"]
    assert [s.sub_id for s in a.visible(peer(0), subs)] == ["s1", "s2"]
    a.check_unsubscribe(peer(1001), "s1")
    with pytest.raises(errors.ProtocolError) as err:
        a.check_unsubscribe(peer(1001), "s2")
    assert err.value.code == errors.FORBIDDEN
    assert err.value.reason == "subscription s2 belongs to another client; uid 1001 (subscriber) may end only its own"


def test_distinct_probes_in_total_are_bounded():
    a = access.Access(child_config(limits={"probes": 2}), own_uid=999)

    def probe_sub(*names: str):
        s = sub_of({"events": {"process": {}}})
        s.categories["user_call"] = []
        for n in names:
            cf = type(s.categories["process"][0])("user_call", None)
            cf.probe = {"spec": {}, "definition": ProbeDefinition("uprobe", n, f"p:c8probes/{n} /bin/true:0x1", "main", "/bin/true", ())}
            s.categories["user_call"].append(cf)
        return s

    live = {"s1": probe_sub("p1", "p2")}
    a.check_probes(probe_sub("p1"), live)  # already placed: no new probe
    with pytest.raises(errors.ProtocolError) as err:
        a.check_probes(probe_sub("p3"), live)
    assert (err.value.code, err.value.reason) == (errors.LIMIT_EXCEEDED, "3 probes: at most 2 (limits.probes)")


def test_default_limits_refuse_the_measured_16000_term_filter_at_once():
    flt = " or ".join(f'filename like "/a{i:06d}*"' for i in range(16_000))
    t0 = time.monotonic()
    with pytest.raises(errors.ProtocolError) as err:
        parse_spec({"events": {"file": {"filter": flt}}}, b"p", None, FilterLimits())
    assert time.monotonic() - t0 < 0.1
    assert err.value.code == errors.BAD_FILTER
    assert err.value.reason == f"file filter of {len(flt)} bytes: at most 65536 (limits.filter_bytes)"
    short = " or ".join(["uid == 1"] * 1001)
    with pytest.raises(errors.ProtocolError) as err:
        parse_spec({"events": {"file": {"filter": short}}}, b"p", None, FilterLimits())
    assert err.value.reason.endswith("more than 1000 terms (comparisons, like, in, is null) (limits.filter_terms)")


def test_probe_and_container_lists_are_bounded_before_any_lookup():
    a = access.Access(child_config(limits={"probes": 3}), own_uid=999)
    spec = {"events": {"user_call": [{"executable": "/bin/true", "symbol": f"f{i}"} for i in range(4)]}}
    with pytest.raises(errors.ProtocolError) as err:
        a.check_subscribe(peer(0), spec, {})
    assert (err.value.code, err.value.reason) == (
        errors.LIMIT_EXCEEDED, "4 probes in one subscription: at most 3 (limits.probes)")
    with pytest.raises(errors.ProtocolError) as err:
        parse_spec({"events": {"process": {}}, "containers": {"ids": ["a"] * 6, "names": ["b"] * 5}}, b"p", None,
                   FilterLimits(terms=10))
    assert (err.value.code, err.value.reason) == (
        errors.BAD_SPEC, "containers: 11 ids and names: at most 10 (limits.filter_terms)")
