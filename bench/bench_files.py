"""The broker's cost a file event, rows held narrow against rows at the schema's width.

The broker pipeline runs in this process, as bench_broker's does: bpf:open
records as the collectors send them (a name of 21 bytes in a 32-byte field, the open's
pid a real sleeping process whose root the paths stage reads) go through the
real ingest (builder, path resolution), merge, identity, paths, select and
encode, to one subscription written as the README writes it
(``kind == "OPEN" and filename like "/tmp/c8open*"``) on a socket that keeps
the bytes. Drains of 1,500 events (3 ms of 500k opens/s on one CPU), a window
every three drains, as the sensor sees a sustained open loop. The process
keeps freed heap mapped, as every sensor child does (c8/supervisor/heap.py).

The anchor is the same pipeline with every name held at the schema's 256
bytes (rows.width_for returning the declared width): the layout before file
rows were held narrow. Each is run three times, alternately; the best counts.

The subscriber's first messages are then decoded as a client does
(decode_columns: string columns as narrow as they came) against the same
messages padded back to the schema's widths, as clients got them before.

Usage: python bench/bench_files.py [--quick]
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from unittest import mock

import common as c
import msgpack
import numpy as np

from c8.broker.main import Broker
from c8.collectors.bpf import records
from c8.protocol import batch as wire
from c8.schema import rows
from c8.supervisor import heap
from c8.supervisor.config import child_config

DRAIN = 1500
SPEC = {"events": {"file": {"filter": 'kind == "OPEN" and filename like "/tmp/c8open*"'}}}


class Keep:
    """The subscriber's socket: counts messages and bytes, keeps the first ones."""

    KEPT = 20

    def __init__(self):
        self.messages = self.bytes = 0
        self.kept: list[bytes] = []

    def send_multipart(self, frames, flags=0):
        self.messages += 1
        self.bytes += len(frames[-1])
        if len(self.kept) < self.KEPT:
            self.kept.append(bytes(frames[-1]))

    def send(self, data, flags=0):
        pass


def _drains(pid: int, n: int) -> list[list[bytes]]:
    rdt = records.RECORDS["open"][1]
    # the name field as the collector sends it: as wide as the drain's longest name needs
    dt = np.dtype([("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4"),
                   *[(f, "S32" if f == "filename" else rdt.fields[f][0]) for f in rdt.names]])
    out = []
    for i in range(n):
        raw = np.zeros(DRAIN, dt)
        raw["time"] = 10**12 + (i * DRAIN + np.arange(DRAIN)) * 2000
        raw["cpu"], raw["pid"], raw["tid"] = 1, pid, pid
        raw["filename"] = b"/tmp/c8open-sustained"
        raw["name_len"] = 22
        raw["dirfd"], raw["nr"], raw["ret"] = -100, 257, -2
        out.append([bytes(f) for f in wire.pack({"kind": "samples", "cpu": 1, "source": "bpf:open"}, raw)])
    return out


def _pipeline(drains: list[list[bytes]]) -> tuple[float, Keep]:
    """ns an event through one fresh broker; the subscriber's socket."""
    run_dir = tempfile.mkdtemp(prefix="c8-bench-files-")
    b = Broker(child_config(run_dir=run_dir, sensor_id_file=run_dir + "/id"))
    b.own_pids = set()
    b.control = keep = Keep()
    b.plan_pub = Keep()
    b.listeners = {b"u": keep}
    b._handle([b"u\x00bench", msgpack.packb({"id": 1, "command": "subscribe", "properties": SPEC})])
    t0 = time.perf_counter()
    for i, frames in enumerate(drains):
        b._ingest(frames)
        if i % 3 == 2:
            b._release(0, flush=True)
    b._release(0, flush=True)
    return (time.perf_counter() - t0) / (len(drains) * DRAIN) * 1e9, keep


def _declared(used: int, declared: int) -> int:
    return declared


def _client_decode(kept: list[bytes]) -> tuple[float, float]:
    """ns a file event for a client to decode the subscriber's messages: string
    columns kept as narrow as they came (decode_columns) / padded back to the
    schema's widths, as clients got them before (best of five)."""
    batches = [b for m in kept for b in msgpack.unpackb(m, raw=False, strict_map_key=False).get("batches", [])
               if b.get("category") == "file"]
    n = sum(b["n"] for b in batches)

    def narrow():
        for b in batches:
            wire.decode_columns(b)

    def padded():  # decode_columns as it was: zeroed rows at the declared widths, cut columns filled in
        for b in batches:
            widths = b["widths"]
            dt = np.dtype([(f, f"S{widths[f]}" if f in widths else t) for f, t in b["dtypes"].items()])
            out = np.zeros(b["n"], dt)
            for f, t in b["dtypes"].items():
                col = np.frombuffer(b["columns"][f], dtype=t, count=b["n"])
                if f in widths:
                    rows.field(out, f, col.dtype)[...] = col
                else:
                    out[f] = col

    out = []
    for fn in (narrow, padded):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(best / n * 1e9)
    return out[0], out[1]


def run(quick: bool = False) -> dict:
    heap.keep_freed_memory()
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        drains = _drains(sleeper.pid, 100 if quick else 400)
        narrow, wide = [], []
        for _ in range(3):
            ns, keep_n = _pipeline(drains)
            narrow.append(ns)
            with mock.patch.object(rows, "width_for", _declared):
                ns, keep_w = _pipeline(drains)
            wide.append(ns)
    finally:
        sleeper.kill()
        sleeper.wait()
    n, w = min(narrow), min(wide)
    dec_n, dec_w = _client_decode(keep_n.kept)
    rows_out = [("broker ns a file event, OPEN: names held narrow / at the schema's width",
                 round(n), round(w), round(n / w, 2), "< 1"),
                ("client decode ns a file event: columns kept narrow / padded to the schema's width",
                 round(dec_n), round(dec_w), round(dec_n / dec_w, 2), "< 1")]
    notes = [f"{len(drains) * DRAIN:,} events in drains of {DRAIN:,}; every run {[round(x) for x in narrow]} "
             f"narrow, {[round(x) for x in wide]} wide (ns an event)",
             f"the subscriber got {keep_n.messages} messages, {keep_n.bytes:,} bytes, from the narrow "
             f"rows and {keep_w.messages}, {keep_w.bytes:,} from the wide (each broker has its own sensor id)",
             f"at this cost one core carries {1e9 / n:,.0f} opens/s through the broker "
             f"({1e9 / w:,.0f}/s at the schema's width)"]
    return {"title": "Broker: file rows held narrow vs at the schema's width", "rows": rows_out, "notes": notes}


if __name__ == "__main__":
    c.standalone(run)
