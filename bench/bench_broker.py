"""Broker throughput next to the collectors' input rate.

The broker pipeline runs in this process: synthetic raw_syscalls:sys_enter
arrays (the collectors' raw layout) go through the real builder, merger,
process-table fill, filter masks and publisher, onto a real ROUTER socket; 1,
10 and 50 real zmq DEALER subscribers in a child process read and count
everything (events delivered plus lost counts). Each subscriber has its own
filter, ``id == k`` keeping a tenth of the events, so every event is
evaluated once per subscriber. The same with 10 subscribers whose filters
also name the lineage (``parent.exec_filename == ...``, ``ancestor.exec_filename
== ...``), each event's process five levels below init, gives their cost.

The anchor is what feeds the broker: the collectors' decode rate on one CPU
(bench_decode's method: a real ring filled by a syscall storm, walked and
decoded) and, with perf, how fast the kernel produces raw_syscalls:sys_enter
events. Ratios > 1 mean the broker keeps up with that input.

Usage: python bench/bench_broker.py [--quick]   (root for the kernel anchors)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time

import msgpack
import numpy as np
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from c8.broker.main import Broker  # noqa: E402
from c8.protocol import batch as wire  # noqa: E402
from c8.protocol import control, paths  # noqa: E402
from c8.supervisor.config import child_config  # noqa: E402

BATCH = 4096          # raw events per collector batch
RAW = np.dtype([("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4"),
                ("id", "<i8"), ("args", "<u8", (6,))])


def raw_batch(rng: np.random.Generator, t0: int, n: int) -> np.ndarray:
    raw = np.zeros(n, RAW)
    raw["time"] = t0 + np.arange(n, dtype=np.uint64)
    raw["cpu"] = rng.integers(0, 2, n)
    raw["pid"] = raw["tid"] = rng.integers(1000, 1100, n)
    raw["id"] = rng.integers(0, 10, n)
    raw["args"] = rng.integers(0, 1 << 32, (n, 6))
    return raw


class NullSocket:
    """The plan PUB: nobody collects in this bench."""

    def send(self, *a, **k):
        pass


FILTERS = {
    "id": "id == {k}",
    "parent": 'id == {k} and parent.exec_filename == "/usr/sbin/sshd-5"',
    "ancestor": 'id == {k} and ancestor.exec_filename == "/usr/sbin/sshd-1"',
}
ANCESTORS = 5  # each event's process has this many ancestors below init, all known


def subscribers(endpoint: str, n: int, ready, totals, flt: str = FILTERS["id"]) -> None:
    """Child: n DEALERs subscribe (filter ``flt`` with k = i % 10), then count until told to stop."""
    ctx = zmq.Context()
    socks = []
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.RCVHWM, 100000)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send(control.request("subscribe", {"events": {"syscall": {"filter": flt.format(k=i % 10)}}}, i))
        socks.append(s)
    for s in socks:
        msgpack.unpackb(s.recv())
    ready.set()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    got = lost = 0
    idle_since = None
    while True:
        ev = poller.poll(200)
        if not ev:
            if totals.value and got + lost >= totals.value:
                break
            idle_since = idle_since or time.monotonic()
            if totals.value and time.monotonic() - idle_since > 3:
                break
            continue
        idle_since = None
        for s, _ in ev:
            while True:
                try:
                    msg = msgpack.unpackb(s.recv(zmq.NOBLOCK), raw=False, strict_map_key=False)
                except zmq.Again:
                    break
                for b in msg.get("batches", ()):
                    if b["category"] == "lost":
                        lost += int(wire.decode_columns(b)["count"].sum())
                    else:
                        got += b["n"]
    totals.value = -1  # done
    print(f"    ({n} subscribers: delivered {got}, lost {lost})", flush=True)


def seed_lineage(broker: Broker) -> None:
    """Processes 1000-1099 (the events' pids), each below a chain of ANCESTORS
    programs /usr/sbin/sshd-1 .. -5 under init: what lineage filters walk."""
    parent = 1
    for level in range(1, ANCESTORS + 1):
        pid = 900 + level
        broker.processes.on_fork(parent, pid, False)
        broker.processes.on_exec(pid, f"/usr/sbin/sshd-{level}", f"sshd-{level}")
        parent = pid
    for pid in range(1000, 1100):
        broker.processes.on_fork(parent, pid, False)
        broker.processes.on_exec(pid, "/bin/work", "work")


def broker_rate(n_subs: int, total: int, flt: str = FILTERS["id"]) -> float:
    """Events/s through build -> merge -> fill -> filter -> publish to n_subs subscribers."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(child_config(run_dir=tmp, sensor_id_file=os.path.join(tmp, "id"), subscriber_queue=100000))
        broker.control = broker.ctx.socket(zmq.ROUTER)
        broker.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        broker.control.setsockopt(zmq.SNDHWM, 100000)
        endpoint = paths.ipc(os.path.join(tmp, "sensor.sock"))
        broker.control.bind(endpoint)
        broker.listeners = {b"u": broker.control}
        broker.plan_pub = NullSocket()
        ready = mp.Event()
        totals = mp.Value("q", 0)
        seed_lineage(broker)
        child = mp.get_context("fork").Process(target=subscribers, args=(endpoint, n_subs, ready, totals, flt))
        child.start()
        while len(broker.subscriptions) < n_subs:
            if broker.control.poll(100):
                broker._drain_control(broker.control)
        for envelope, reply, _, _ in broker.pending_replies:
            broker.publisher.send(envelope, reply)
        broker.pending_replies.clear()
        ready.wait(10)
        rng = np.random.default_rng(1)
        batches = [raw_batch(rng, 0, BATCH) for _ in range(8)]
        expected = sum(int(np.count_nonzero(b["id"] == i % 10)) for b in batches for i in range(n_subs))
        rounds = max(1, total // (BATCH * len(batches)))
        t = 1
        start = time.perf_counter()
        for _ in range(rounds):
            for raw in batches:
                raw["time"] = np.arange(t, t + len(raw), dtype=np.uint64)
                t += len(raw)
                broker._build("raw_syscalls:sys_enter", raw)
                broker._release(0, flush=True)  # one window per collector batch
        elapsed = time.perf_counter() - start
        totals.value = expected * rounds
        child.join(60)
        broker.control.close(0)
        return rounds * len(batches) * BATCH / elapsed


def collector_rates(quick: bool) -> dict[str, float]:
    """bench_decode's anchors: decode rate of a real ring, kernel production rate."""
    if os.geteuid() != 0:
        return {}
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_decode as bd

    from c8.collectors import ring
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        loop = bd.build_loop(tmp)
        content, dec, sample_rate = bd.fill_ring(loop)
        t, n = bd.time_decode(content, dec, ring.walk, 5 if quick else 20)
        out["collector decode, one CPU"] = n / t
        out["kernel sampling into a ring"] = sample_rate
        try:
            out["kernel produces (perf stat)"] = bd.kernel_rate(loop, 1_000_000 if quick else 5_000_000)
        except Exception as exc:  # perf may be missing
            print(f"perf stat unavailable: {exc}")
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    total = 100_000 if quick else 400_000
    anchors = collector_rates(quick)
    rows = []
    for n in (1, 10, 50):
        rows.append((n, broker_rate(n, total)))
    print()
    print(f"{'subscribers':>11} | {'broker events/s':>15} | " + " | ".join(f"{k:>28}" for k in anchors))
    print("-" * (32 + 31 * len(anchors)))
    for n, rate in rows:
        ratios = " | ".join(f"{rate / v:27.2f}x" for v in anchors.values())
        print(f"{n:>11} | {rate:15,.0f} | {ratios}")
    for k, v in anchors.items():
        print(f"  anchor {k}: {v:,.0f} events/s")
    print("  (ratio = broker rate / anchor; each subscriber's filter keeps 1/10 of the events)")
    base = dict(rows)[10]
    print()
    print(f"lineage filters, 10 subscribers ({ANCESTORS} ancestors per process), vs `id == k` ({base:,.0f}/s):")
    for name in ("parent", "ancestor"):
        rate = broker_rate(10, total, FILTERS[name])
        print(f"  {FILTERS[name].format(k='k'):60} {rate:12,.0f} events/s  ratio {rate / base:.2f}")


if __name__ == "__main__":
    main()
