"""Many subscribers through the real sensor: shared collection, exact delivery,
time order, rate and total caps, a slow subscriber, the control socket's
guard, and CURVE-protected TCP clients."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import subprocess
import threading
import time
import uuid

import msgpack
import pytest
import zmq
import zmq.auth

from c8.clients.client import Client, SensorUnavailable, to_dicts
from c8.protocol import batch as wire
from c8.protocol import control, errors, paths
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

N_SUBS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Server, authorized client (a certificate and a bare z85 key) and a rogue client."""
    d = tmp_path_factory.mktemp("curve")
    made = {}
    for name in ("server", "client", "bare", "rogue"):
        pub, sec = zmq.auth.create_certificates(str(d), name)
        made[name] = zmq.auth.load_certificate(sec)
    authorized = d / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_text((d / "client.key").read_text())
    (authorized / "bare").write_bytes(made["bare"][0] + b"\n")
    return {"dir": d, "authorized": str(authorized), "server_secret": str(d / "server.key_secret"), **made}


@pytest.fixture(scope="module")
def scale_sensor(tmp_path_factory, keys):
    port = free_port()
    s = Sensor(tmp_path_factory.mktemp("scale"), listen_tcp=f"127.0.0.1:{port}",
               curve_server_secret_key_file=keys["server_secret"],
               curve_authorized_keys_dir=keys["authorized"],
               subscriber_queue=4, merge_holdback="200ms").start()
    s.port = port
    yield s
    s.stop()


def token() -> str:
    return "m" + uuid.uuid4().hex[:10]


def run_true(*args: str, cpu: int | None = None) -> int:
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    p = subprocess.Popen(["/bin/true", *args], preexec_fn=pre)
    p.wait()
    return p.pid


def perf_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            pass
    return n


def collectors(sensor) -> dict[str, int]:
    return {c["name"]: c["pid"] for c in sensor.children() if c["name"].startswith("c8-collector")}


class Fanin:
    """Reads many subscriptions at once (one poller): events and lost counts per subscription."""

    def __init__(self, subs):
        self.subs = list(subs)
        self.events: list[list[dict]] = [[] for _ in self.subs]
        self.lost: list[dict[str, int]] = [{} for _ in self.subs]
        self.ended: list[str | None] = [None for _ in self.subs]
        self.poller = zmq.Poller()
        self.index = {}
        for i, sub in enumerate(self.subs):
            self.poller.register(sub.sock, zmq.POLLIN)
            self.index[sub.sock] = i

    def pump(self, done, timeout: float, settle: float = 0.0) -> None:
        """Read until done(self) (then ``settle`` seconds more, to catch extras) or timeout."""
        deadline = time.monotonic() + timeout
        stop_at = None
        while time.monotonic() < (stop_at or deadline):
            for sock, _ in self.poller.poll(50):
                self._read(self.index[sock], sock)
            if stop_at is None and done(self):
                stop_at = time.monotonic() + settle

    def _read(self, i: int, sock) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if msg.get("type") == "end":
                self.ended[i] = msg.get("reason")
            if msg.get("type") != "batches":
                continue
            for b in msg["batches"]:
                arr = wire.decode_columns(b)
                if b["category"] == "lost":
                    for src, n in zip(arr["source"].tolist(), arr["count"].tolist(), strict=True):
                        self.lost[i][src.decode()] = self.lost[i].get(src.decode(), 0) + int(n)
                    continue
                table = {int(k): tuple(v) for k, v in (b.get("containers") or {}).items()}
                events = to_dicts(b["category"], arr, table)
                if b["category"] == "syscall":
                    # the client's event "id" shadows the syscall number: keep it apart
                    for ev, nr in zip(events, arr["id"].tolist(), strict=True):
                        ev["syscall_id"] = nr
                self.events[i].extend(events)


# -- 50 subscriptions, one collection ----------------------------------------------------
def test_fifty_subscriptions_share_one_collection(scale_sensor, tmp_path):
    tok = token()
    me = threading.get_native_id()
    client = scale_sensor.client
    syscall_ids = [124, 121, 100, 63, 204]  # getsid, getpgid, times, uname, sched_getaffinity
    specs = []
    for i in range(N_SUBS):
        if i % 10 == 8:
            specs.append({"events": {"file": {"filter": f'filename like "{tmp_path}/f{i}-*"'}}})
        elif i % 10 == 9:
            nr = syscall_ids[i // 10]
            specs.append({"events": {"syscall": {"kinds": ["ENTER"],
                                                 "filter": f"id == {nr} and process_tid == {me}"}}})
        else:
            specs.append({"events": {"process": {"filter": f'kind == "EXEC" and exec_command_line like "*{tok}-{i}z*"'}}})
    # the first subscription alone already needs every source the 50 need
    first = {"events": {**specs[0]["events"], **specs[8]["events"], **specs[9]["events"]}}
    subs = [client.subscribe(first, queue=1000)]
    try:
        pids = collectors(scale_sensor)
        wait_for(lambda: all(perf_fds(p) > 0 for p in pids.values()), 10, what="collectors' perf events")
        fds_one = {name: perf_fds(pid) for name, pid in pids.items()}
        plan_one = scale_sensor.status()["plan"]
        subs += [client.subscribe(spec, queue=1000) for spec in specs[1:]]
        status = scale_sensor.status()
        plan = status["plan"]
        assert len(status["subscriptions"]) >= N_SUBS
        assert set(plan["tracepoints"]) == set(plan_one["tracepoints"])
        assert set(plan["bpf"]) == set(plan_one["bpf"]) >= {"open", "exec", "exit"}
        # the syscall subscriptions' filters are ORed into one kernel filter on one event
        enter = plan["tracepoints"]["raw_syscalls:sys_enter"]["filter"]
        assert all(f"id == {nr}" in enter for nr in syscall_ids), enter
        assert {name: perf_fds(pid) for name, pid in pids.items()} == fds_one

        # the workload: each subscription's own events, some twice
        want: dict[int, int] = {}
        for i, spec in enumerate(specs):
            reps = 1 + i % 2
            want[i] = reps
            for _ in range(reps):
                if "process" in spec["events"]:
                    run_true(f"{tok}-{i}z")
                elif "file" in spec["events"]:
                    os.close(os.open(f"{tmp_path}/f{i}-x", os.O_CREAT | os.O_WRONLY, 0o600))
                else:
                    {124: lambda: os.getsid(0), 121: lambda: os.getpgid(0), 100: os.times, 63: os.uname,
                     204: lambda: os.sched_getaffinity(0)}[syscall_ids[i // 10]]()
        # the first subscription also asked for f8 files and the first syscall id
        want[0] += want[8] + want[9]
        fan = Fanin(subs)
        fan.pump(lambda f: all(len(f.events[i]) >= want[i] for i in want), timeout=30, settle=1.0)
        for i, events in enumerate(fan.events):
            assert len(events) == want[i], (i, specs[i], events[:3])
            assert fan.lost[i] == {}, (i, fan.lost[i])
            for ev in events:
                if ev["type"] == "process":
                    assert ev["exec_command_line"] == f"/bin/true {tok}-{i}z" or i == 0
                elif ev["type"] == "file":
                    assert ev["filename"] == f"{tmp_path}/f{8 if i == 0 else i}-x"
                else:
                    assert ev["process_tid"] == me and ev["syscall_id"] in syscall_ids
    finally:
        for sub in subs:
            sub.close()


# -- time order across CPUs ----------------------------------------------------------------
def test_time_order_across_cpus(scale_sensor):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.fail("this test needs two CPUs")
    tok = token()
    n = 60
    spec = {"events": {"process": {"filter": f'exec_command_line like "*{tok}*"'}}}
    with scale_sensor.client.subscribe(spec, queue=1000) as a, scale_sensor.client.subscribe(spec, queue=1000) as b:
        loops = [subprocess.Popen(["taskset", "-c", str(c), "/bin/sh", "-c",
                                   f"for i in $(seq {n}); do /bin/true {tok}; done"]) for c in cpus]
        for p in loops:
            p.wait()
        fan = Fanin([a, b])
        fan.pump(lambda f: all(sum(e["exec_command_line"] == f"/bin/true {tok}" for e in evs) >= 2 * n
                               for evs in f.events), timeout=30)
    for events in fan.events:
        execs = [e for e in events if e["exec_command_line"] == f"/bin/true {tok}"]
        assert len(execs) == 2 * n
        assert {e["cpu"] for e in execs} == set(cpus)
        seqs = [e["sensor_sequence_number"] for e in events]
        times = [e["sensor_monotime_nanos"] for e in events]
        assert all(x < y for x, y in zip(seqs, seqs[1:], strict=False)), "sequence numbers go back"
        assert all(x <= y for x, y in zip(times, times[1:], strict=False)), "time goes back"


# -- modifiers ------------------------------------------------------------------------------
def test_rate_cap_delivers_rate_and_reports_the_rest(scale_sensor):
    tok, rate, n = token(), 20, 400
    spec = {"events": {"process": {"filter": f'exec_command_line == "/bin/true {tok}"'}},
            "modifiers": {"rate": rate}}
    start = time.monotonic()
    with scale_sensor.client.subscribe(spec, queue=1000) as sub:
        storm = subprocess.Popen(["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/true {tok}; done"])
        fan = Fanin([sub])
        arrivals = []

        def done(f):
            if len(f.events[0]) > len(arrivals):
                arrivals.extend([time.monotonic()] * (len(f.events[0]) - len(arrivals)))
            return storm.poll() is not None and len(f.events[0]) + f.lost[0].get("rate_cap", 0) >= n
        fan.pump(done, timeout=60)
        storm.wait()
    delivered = len(fan.events[0])
    elapsed = arrivals[-1] - start
    assert delivered + fan.lost[0].get("rate_cap", 0) == n, (delivered, fan.lost[0])
    assert set(fan.lost[0]) == {"rate_cap"}
    assert rate <= delivered <= rate * elapsed + rate, (delivered, elapsed)


def test_total_cap_sends_exactly_n_then_ends(scale_sensor):
    tok = token()
    spec = {"events": {"process": {"filter": f'exec_command_line == "/bin/true {tok}"'}},
            "modifiers": {"limit": 7}}
    with scale_sensor.client.subscribe(spec) as sub:
        for _ in range(20):
            run_true(tok)
        fan = Fanin([sub])
        fan.pump(lambda f: f.ended[0] is not None, timeout=20)
    assert len(fan.events[0]) == 7
    assert "limit of 7" in fan.ended[0]
    assert fan.lost[0] == {}


# -- a slow subscriber loses only its own excess -----------------------------------------------
def test_slow_subscriber_is_told_exactly_what_it_lost(scale_sensor):
    tok, n = token(), 1500
    spec = {"events": {"process": {"filter": f'exec_command_line == "/bin/true {tok}"'}}}
    client = scale_sensor.client
    with client.subscribe(spec, queue=1) as sleeper, client.subscribe(spec, queue=100000) as reader:
        got: list[dict] = []

        def read():
            for ev in reader.events(timeout=30):
                got.append(ev)
                if len(got) >= n:
                    return
        t = threading.Thread(target=read)
        t.start()
        subprocess.run(["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/true {tok}; done"], check=True)
        t.join(60)
        assert len(got) == n and reader.lost == {}
        # the sleeper wakes: what it gets plus what it is told it lost is the workload
        fan = Fanin([sleeper])
        fan.pump(lambda f: len(f.events[0]) + f.lost[0].get("subscriber", 0) >= n, timeout=20)
    assert fan.lost[0].get("subscriber", 0) > 0
    assert len(fan.events[0]) + fan.lost[0]["subscriber"] == n, (len(fan.events[0]), fan.lost[0])
    assert set(fan.lost[0]) == {"subscriber"}
    assert len({e["process_pid"] for e in got}) == n


# -- the control socket -------------------------------------------------------------------------
def test_control_socket_mode_and_group(scale_sensor):
    st = os.stat(paths.control(scale_sensor.run_dir))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    user = pwd.getpwnam("capsule8")
    assert st.st_gid == user.pw_gid, grp.getgrgid(st.st_gid).gr_name


def raw_request(sensor, frames: list[bytes], timeout: float = 5.0) -> dict | None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.ipc(paths.control(sensor.run_dir)))
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout * 1000)):
            return None
        return control.parse_reply(sock.recv())
    finally:
        sock.close()


GARBAGE = [
    (b"\xc1\xc1garbage", errors.BAD_MESSAGE),
    (b"", errors.BAD_MESSAGE),
    (msgpack.packb([1, 2, 3]), errors.BAD_MESSAGE),
    (msgpack.packb({"command": 5}), errors.BAD_MESSAGE),
    (msgpack.packb({"command": "format_disk"}), errors.UNKNOWN_COMMAND),
    (msgpack.packb({"command": "status", "properties": "x"}), errors.BAD_MESSAGE),
    (msgpack.packb({"command": "subscribe", "properties": {"events": {"process": {"filter": 5}}}}), errors.BAD_FILTER),
    (msgpack.packb({"command": "subscribe", "properties": {"events": {"process": {"filter": "((("}}}}),
     errors.BAD_FILTER),
    (msgpack.packb({"command": "subscribe", "properties": {"events": {"nope": {}}}}), errors.BAD_SPEC),
    (msgpack.packb({"command": "subscribe", "properties": {"events": {"process": {}},
                                                          "modifiers": {"rate": float("nan")}}}), errors.BAD_SPEC),
    (msgpack.packb({"command": "subscribe", "properties": {"events": {"process": {}},
                                                          "modifiers": {"limit": float("inf")}}}), errors.BAD_SPEC),
    (msgpack.packb({"command": "unsubscribe", "properties": {"subscription": [1]}}), errors.NO_SUCH_SUBSCRIPTION),
    (msgpack.packb({"id": {"a": [1, None]}, "command": "list"}), None),
    (b"\x00" * (2 << 20), errors.BAD_MESSAGE),  # 2 MiB: over the request limit
]


@pytest.mark.parametrize("payload,code", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_bad_requests_get_error_replies(scale_sensor, payload, code):
    reply = raw_request(scale_sensor, [payload])
    assert reply is not None, "no reply"
    if code is None:
        assert reply["status"] == "ok"
    else:
        assert reply["status"] == "error" and reply["code"] == code, reply


def test_sensor_survives_hostile_clients(scale_sensor):
    before = {c["name"]: c["pid"] for c in scale_sensor.children()}
    # two frames, and a message far over the socket's size limit (the peer is dropped)
    assert raw_request(scale_sensor, [b"a", b"b"])["code"] == errors.BAD_MESSAGE
    assert raw_request(scale_sensor, [b"\x01" * (8 << 20)], timeout=1.0) is None
    # a REQ client with garbage gets its error through the REQ envelope
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.ipc(paths.control(scale_sensor.run_dir)))
    sock.send(b"\x92\x01")
    assert sock.poll(5000)
    assert control.parse_reply(sock.recv())["status"] == "error"
    sock.close()
    # a flood of random bytes: one error reply each
    flood = zmq.Context.instance().socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(paths.ipc(paths.control(scale_sensor.run_dir)))
    replies = []
    for i in range(200):  # one at a time: a client that does not read loses its replies
        flood.send(os.urandom(i % 37))
        if flood.poll(5000):
            replies.append(control.parse_reply(flood.recv()))
    flood.close()
    # every one answered, with an error: a reply the socket could not take at once (its
    # flow control lags the reader, more so on a loaded host) is sent again, not dropped
    assert len(replies) == 200 and all(r["status"] == "error" for r in replies)
    # still serving: the same children, and a subscription works
    tok = token()
    with scale_sensor.client.subscribe({"events": {"process": {"filter": f'exec_command_line like "*{tok}*"'}}}) as sub:
        pid = run_true(tok)
        assert any(e["process_pid"] == pid for e in sub.events(timeout=10) if e["kind"] == "EXEC")
    assert {c["name"]: c["pid"] for c in scale_sensor.children()} == before


# -- TCP with CURVE -------------------------------------------------------------------------------
def tcp_client(sensor, keys, who: str | None, timeout: float = 5.0) -> Client:
    curve = None
    if who is not None:
        pub, sec = keys[who]
        curve = {"server_public": keys["server"][0], "public": pub, "secret": sec}
    return Client(sensor.run_dir, endpoint=f"tcp://127.0.0.1:{sensor.port}", timeout=timeout, curve=curve)


@pytest.mark.parametrize("who", ["client", "bare"])
def test_authorized_tcp_client_gets_events(scale_sensor, keys, who):
    tok = token()
    spec = {"events": {"process": {"filter": f'exec_command_line == "/bin/true {tok}"'}}}
    with tcp_client(scale_sensor, keys, who).subscribe(spec) as sub:
        pids = {run_true(tok) for _ in range(5)}
        seen = set()
        for ev in sub.events(timeout=10):
            seen.add(ev["process_pid"])
            if seen >= pids:
                break
    assert seen == pids


@pytest.mark.parametrize("who", ["rogue", None])
def test_unauthorized_tcp_clients_get_nothing(scale_sensor, keys, who):
    before = {c["name"]: c["pid"] for c in scale_sensor.children()}
    known = {s["subscription"] for s in scale_sensor.status()["subscriptions"]}
    with pytest.raises(SensorUnavailable):
        tcp_client(scale_sensor, keys, who, timeout=2.0).subscribe({"events": {"process": {}}})
    with pytest.raises(SensorUnavailable):
        tcp_client(scale_sensor, keys, who, timeout=1.0).status()
    # nothing reached the broker, and the sensor serves on both sockets
    assert {s["subscription"] for s in scale_sensor.status()["subscriptions"]} <= known
    assert tcp_client(scale_sensor, keys, "client").status()["sensor_id"]
    assert {c["name"]: c["pid"] for c in scale_sensor.children()} == before


def test_closing_a_subscription_ends_it_at_once(scale_sensor):
    """close() unsubscribes: the broker stops collecting for it straight away,
    not at its next send to the closed connection (up to a second later)."""
    sub = scale_sensor.client.subscribe({"events": {"file": {"filter": 'filename like "/c8-close-test/*"'}}})
    assert any(s["subscription"] == sub.id for s in scale_sensor.client.subscriptions())
    sub.close()
    t0 = time.monotonic()
    wait_for(lambda: all(s["subscription"] != sub.id for s in scale_sensor.client.subscriptions()), 0.5,
             what="the closed subscription to end")
    assert time.monotonic() - t0 < 0.5
