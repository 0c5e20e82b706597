"""Network events end to end: sockaddrs read in the kernel, decoded in the broker.

A child process makes a known set of calls (TCP over 127.0.0.1 and ::1, UDP,
unix stream and datagram sockets) and prints what it did; the test asserts
that the subscription delivers exactly those calls, with their addresses,
ports, fds and results, for that pid.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.root

CONNECTS = 20

WORKLOAD = textwrap.dedent(r"""
    import json, os, socket, sys
    T, N = sys.argv[1], int(sys.argv[2])
    ports = {socket.AF_INET: int(sys.argv[3]), socket.AF_INET6: int(sys.argv[4])}
    uport = int(sys.argv[5])
    calls = []
    def note(op, fd, ret, family=0, address="", port=0, **kw):
        calls.append(dict(op=op, fd=fd, ret=ret, family=family, address=address, port=port, **kw))
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(fam, socket.SOCK_STREAM)
        port = ports[fam]
        srv.bind((host, port))
        note("BIND", srv.fileno(), 0, fam, host, port)
        srv.listen(N + 5)
        note("LISTEN", srv.fileno(), 0, backlog=N + 5)
        clients = []
        for _ in range(N):
            c = socket.socket(fam, socket.SOCK_STREAM)
            c.connect((host, port))
            note("CONNECT", c.fileno(), 0, fam, host, port)
            clients.append(c)
        for c in clients:
            a, peer = srv.accept()
            note("ACCEPT", srv.fileno(), a.fileno(), fam, host, peer[1], attempt_address="")
            a.close()
        for c in clients:
            c.close()
        srv.close()
    # UDP: three datagrams to a known port, received with their source
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", uport))
    note("BIND", rx.fileno(), 0, socket.AF_INET, "127.0.0.1", uport)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(3):
        data = b"x" * (10 + i)
        n = tx.sendto(data, ("127.0.0.1", uport))
        note("SENDTO", tx.fileno(), n, socket.AF_INET, "127.0.0.1", uport)
    src_port = tx.getsockname()[1]
    for i in range(3):
        data, src = rx.recvfrom(100)
        note("RECVFROM", rx.fileno(), len(data), socket.AF_INET, "127.0.0.1", src_port, attempt_address="")
    # unix stream: bind, listen, connect, accept (an unbound peer: no path)
    path = os.path.join(T, "stream.sock")
    us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    us.bind(path)
    note("BIND", us.fileno(), 0, socket.AF_UNIX, path)
    us.listen(3)
    note("LISTEN", us.fileno(), 0, backlog=3)
    uc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uc.connect(path)
    note("CONNECT", uc.fileno(), 0, socket.AF_UNIX, path)
    ua, _ = us.accept()
    note("ACCEPT", us.fileno(), ua.fileno(), socket.AF_UNIX, "", attempt_address="")
    # unix datagram to a path
    dpath = os.path.join(T, "dgram.sock")
    ud = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ud.bind(dpath)
    note("BIND", ud.fileno(), 0, socket.AF_UNIX, dpath)
    us2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n = us2.sendto(b"hello", dpath)
    note("SENDTO", us2.fileno(), n, socket.AF_UNIX, dpath)
    print(json.dumps(calls), flush=True)
    sys.stdin.read()
""")


def free_port(family, kind, host):
    """A port nobody listens on now: the workload binds it (a known port)."""
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def collect(sub, pid, n, timeout=30.0):
    events = []
    deadline = time.monotonic() + timeout
    for ev in sub.events(timeout=3.0, idle=min(10.0, timeout)):
        if ev["type"] == "network" and ev["process_pid"] == pid:
            events.append(ev)
        if len(events) >= n or time.monotonic() > deadline:
            break
    return events


def expected(calls):
    """(kind, fd, family, address, port, ret, backlog) of each event the calls make.

    An ATTEMPT carries the address the process passed: none for accept and
    recvfrom, whose address is an output (their RESULT carries the peer).
    """
    out = []
    for c in calls:
        backlog = c.get("backlog", 0)
        passed = c["op"] in ("BIND", "CONNECT", "SENDTO")
        attempt = (c["family"], c["address"], c["port"]) if passed else (0, "", 0)
        out.append((c["op"] + "_ATTEMPT", c["fd"], *attempt, 0, backlog))
        out.append((c["op"] + "_RESULT", c["fd"], c["family"], c["address"], c["port"], c["ret"], backlog))
    return sorted(out)


def test_network_calls_exactly(shared_sensor, tmp_path):
    with shared_sensor.client.subscribe({"events": {"network": {}}}, queue=1000) as sub:
        ports = [free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                 free_port(socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                 free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")]
        proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(tmp_path), str(CONNECTS), *map(str, ports)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            calls = json.loads(proc.stdout.readline())
            want = expected(calls)
            events = collect(sub, proc.pid, len(want))
        finally:
            proc.stdin.close()
            proc.wait()
    got = sorted((e["kind"], e["fd"], e["family"], e["address"], e["port"],
                  e["ret"] if e["kind"].endswith("_RESULT") else 0, e["backlog"]) for e in events)
    assert got == want
    assert {(e["address"], e["port"]) for e in events if e["kind"] == "CONNECT_ATTEMPT"
            and e["family"] != socket.AF_UNIX} == {("127.0.0.1", ports[0]), ("::1", ports[1])}
    assert {e["port"] for e in events if e["kind"] == "SENDTO_ATTEMPT" and e["family"] == socket.AF_INET} \
        == {ports[2]}
    assert sum(1 for c in calls if c["op"] == "CONNECT" and c["family"] == socket.AF_INET) == CONNECTS
    assert sum(1 for c in calls if c["op"] == "CONNECT" and c["family"] == socket.AF_INET6) == CONNECTS
    for e in events:
        # the raw port is the network-order value as stored in the sockaddr
        assert e["port_raw"] == socket.htons(e["port"])
        assert e["syscall"] > 0 and e["process_id"] != ""
        assert e["process_exec_filename"] == sys.executable
    # every RESULT has its ATTEMPT just before it
    attempts = {(e["kind"].rsplit("_", 1)[0], e["fd"], e["sensor_monotime_nanos"]): e
                for e in events if e["kind"].endswith("_ATTEMPT")}
    for e in events:
        if e["kind"].endswith("_RESULT"):
            att = attempts[(e["kind"].rsplit("_", 1)[0], e["fd"], e["sensor_monotime_nanos"] - 1)]
            assert att["sensor_sequence_number"] < e["sensor_sequence_number"]
