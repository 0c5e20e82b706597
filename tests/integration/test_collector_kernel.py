"""The collector against the real kernel: perf events, ring, decode, main.run."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time

import msgpack
import numpy as np
import pytest
import zmq

from c8.collectors import decode, perf, ring, tracefs
from c8.protocol import batch, paths
from c8.supervisor.config import child_config

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for perf and tracefs")]

CPU = 1 if os.cpu_count() and os.cpu_count() > 1 else 0


def run_pinned(argv: list[str], n: int) -> list[int]:
    """Run argv n times pinned to CPU; returns the children's pids."""
    pids = []
    for _ in range(n):
        p = subprocess.Popen(argv, preexec_fn=lambda: os.sched_setaffinity(0, {CPU}))
        p.wait()
        pids.append(p.pid)
    return pids


class Opened:
    """Tracepoints opened on CPU into one ring, with a decoder."""

    def __init__(self, names_filters: dict[str, str | None], pages: int = 64):
        self.fds = []
        self.ring_fd = None
        self.dec = decode.Decoder()
        for name, flt in names_filters.items():
            fmt = tracefs.read_format(name)
            fd = perf.open_tracepoint(fmt.id, CPU, name)
            if self.ring_fd is None:
                self.ring_fd = fd
                self.ring = ring.Ring(perf.mmap_ring(fd, pages))
            else:
                perf.set_output(fd, self.ring_fd, name)
            if flt:
                perf.set_filter(fd, flt, name)
            self.dec.add_tracepoint(perf.event_id(fd, name), fmt)
            self.fds.append(fd)

    def __enter__(self):
        for fd in self.fds:
            perf.enable(fd)
        return self

    def read(self) -> dict[str, np.ndarray]:
        buf = self.ring.read()
        recs = ring.walk(buf)
        assert recs.lost == 0
        out: dict[str, list] = {}
        for src, arr in self.dec.decode(buf, recs.samples):
            out.setdefault(src, []).append(arr)
        return {k: np.concatenate(v) for k, v in out.items()}

    def __exit__(self, *exc):
        for fd in self.fds:
            perf.disable(fd)
        self.ring.close()
        for fd in self.fds:
            os.close(fd)


def test_exec_samples_exact_and_syscalls_seen():
    n = 5
    with Opened({"sched:sched_process_exec": None, "raw_syscalls:sys_enter": None}) as o:
        pids = run_pinned(["/bin/true"], n)
        out = o.read()
    ex = out["sched:sched_process_exec"]
    mine = ex[np.isin(ex["pid"], pids)]
    assert len(mine) == n
    assert (mine["filename"] == b"/bin/true").all()
    assert sorted(mine["tp_pid"].tolist()) == sorted(pids)
    assert (mine["cpu"] == CPU).all()
    now = perf.monotonic_ns()
    assert (mine["time"] < now).all() and (mine["time"] > now - 60 * 10**9).all()  # CLOCK_MONOTONIC
    enters = out["raw_syscalls:sys_enter"]
    assert np.isin(pids, enters["pid"]).all()
    assert (np.diff(enters["time"].astype(np.int64)) >= 0).all()


def test_kernel_filter_drops_the_rest():
    with Opened({"raw_syscalls:sys_enter": "id == 39"}) as o:
        run_pinned([os.sys.executable, "-c", "import os\nfor _ in range(100): os.getpid()"], 1)
        enters = o.read()["raw_syscalls:sys_enter"]
    assert len(enters) >= 100
    assert (enters["id"] == 39).all()


def test_refused_filter_raises_naming_the_event():
    fd = perf.open_tracepoint(tracefs.event_id("raw_syscalls:sys_enter"), CPU, "raw_syscalls:sys_enter")
    try:
        with pytest.raises(perf.PerfError, match="raw_syscalls:sys_enter"):
            perf.set_filter(fd, "no_such_field == 1", "raw_syscalls:sys_enter")
    finally:
        os.close(fd)


def _collector(run_dir: str, cpu: int) -> None:
    from c8.collectors import main
    main.run(child_config(run_dir=run_dir, ring_pages=64), cpu)


def test_main_run_follows_the_plan(tmp_path):
    run_dir = str(tmp_path)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(paths.ipc(paths.plan(run_dir)))
    pull = ctx.socket(zmq.PULL)
    pull.bind(paths.ipc(paths.ingest(run_dir)))
    proc = multiprocessing.get_context("fork").Process(target=_collector, args=(run_dir, CPU))
    proc.start()
    gen = 0

    def publish(tracepoints: dict) -> None:
        pub.send(msgpack.packb({"generation": gen, "enabled": True, "tracepoints": tracepoints,
                                "probes": {}, "bpf": {}}))

    def wait_for(pred, timeout=10.0, plan=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if plan is not None:
                publish(plan)
            if pull.poll(200):
                header, arr = batch.unpack(pull.recv_multipart())
                if pred(header, arr):
                    return header, arr
        raise AssertionError("timed out")

    try:
        plan = {"sched:sched_process_exec": {"filter": None}}
        wait_for(lambda h, a: h["kind"] == "stats" and "sched:sched_process_exec" not in h["errors"]
                 and h["generation"] == gen, plan=plan)
        pids = run_pinned(["/bin/true"], 3)
        got: list[int] = []

        def exec_batch(h, a):
            if h["kind"] == "samples" and h["source"] == "sched:sched_process_exec":
                got.extend(a["pid"][np.isin(a["pid"], pids)].tolist())
            return sorted(got) == sorted(pids)

        wait_for(exec_batch)
        # eBPF programs asked for: loaded, or refused with a reason; tracepoints go on
        gen = 1
        bpf_plan = {"generation": gen, "enabled": True, "probes": {},
                    "tracepoints": plan, "bpf": {"no_such_program": {}}}
        pub.send(msgpack.packb(bpf_plan))
        h, _ = wait_for(lambda h, a: h["kind"] == "stats" and h["generation"] == 1)
        assert "bpf" in h["errors"] or "no_such_program" in h["bpf"]
        got.clear()
        pids = run_pinned(["/bin/true"], 2)
        wait_for(exec_batch)
        gen = 2
        wait_for(lambda h, a: h["kind"] == "stats" and h["generation"] == 2, plan={})
        late = run_pinned(["/bin/true"], 2)
        deadline = time.monotonic() + 1.5  # stats every second: two stats without exec samples
        stats_seen = 0
        while stats_seen < 2 and time.monotonic() < deadline + 3:
            if pull.poll(200):
                h, a = batch.unpack(pull.recv_multipart())
                assert not (h["kind"] == "samples" and np.isin(a["pid"], late).any())
                stats_seen += h["kind"] == "stats"
        assert stats_seen == 2
        proc.terminate()
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        pub.close(0)
        pull.close(0)
        ctx.term()
