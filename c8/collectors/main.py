"""A collector process: plan in, perf rings read, batches out, for one CPU or several.

    broker plan (SUB) -> open/close/filter perf events -> ring -> walk -> decode
    -> samples / lost / stats (PUSH, never blocking) -> broker ingest
    -> tick (PUSH, conflated: only the newest waits)  -> broker ticks

All events of a CPU write into one ring, owned by a disabled dummy software
event so the ring outlives any source. A :class:`Collector` is one CPU's
events, ring and queue to the broker; a process runs one per CPU it reads
(several on a host with more CPUs than ``max_collectors``: c8.protocol.cpus)
in one loop (:func:`serve`), which takes each plan once and applies it to
cpu0's first (it owns the eBPF programs and probes the others use). An error
in one source is logged with its name and reported in stats; the collector
carries on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from c8.collectors import perf, ring, ringbuf, tracefs
from c8.collectors.decode import Decoder
from c8.protocol import batch, heartbeat, paths
from c8.protocol.cpus import collector_name

# Ring reads at least this often while collecting: the latency floor at low rates (the
# broker releases a window once every CPU has read past it). Measured: 4 ms gave p99
# 10 ms at 10k events/s, 3 ms gives 8 ms for 1.3 points more of a core collecting
# quietly (tree 5.5% -> 6.8%), 2 ms 6 ms for 4 points more.
POLL_MS = 3
IDLE_POLL_MS = 250  # no perf event open: wake only for stats
STATS_PERIOD = 1.0
PERF_COUNT_SW_DUMMY = 9
BPF_OUTPUT = "bpf-output"


def exec_text(arr: np.ndarray) -> np.ndarray:
    """exec records carry argv NUL-separated: make it the command line here, per CPU."""
    from c8.collectors.bpf.records import argv_text

    arr = arr.copy()
    arr["argv"] = argv_text(arr["argv"])
    return arr


def log(msg: str) -> None:
    print(f"c8-collector[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


@dataclass
class Source:
    """One open perf event writing into this CPU's ring."""

    name: str
    fd: int
    sample_id: int
    filter: str | None = None
    filter_error: str | None = None
    enabled: bool = False
    lost: int = 0  # the kernel's count of this event's lost samples, as last told


@dataclass
class State:
    generation: int = -1
    enabled: bool = False
    received: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    collector_lost: int = 0      # dropped because the broker was not reading
    unsent_collector_lost: int = 0
    unsent_lost: dict[tuple[str, int], int] = field(default_factory=dict)  # (source, cpu) -> n
    decoder_reported: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    bpf: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)
    watermark: int = 0


class Collector:
    """Owns the perf events and ring of one CPU, and its queue to the broker."""

    def __init__(self, config: dict, cpu: int, ctx: zmq.Context | None = None):
        self.cpu = cpu
        self.run_dir = paths.run_dir(config["run_dir"])
        self.pages = perf.ring_pages(config["ring_pages"])
        self.config_bpf_output = config["bpf_output"]
        self.decoder = Decoder(int(config["string_width"]))
        self.tracefs = tracefs.find_tracefs()
        self.sources: dict[str, Source] = {}
        self.state = State()
        self.watermark_bytes = max(perf.PAGE_SIZE, self.pages * perf.PAGE_SIZE // 4)
        # The ring exists only while something is collected: an idle sensor holds
        # no perf event and no ring memory.
        self.ring_fd: int | None = None
        self.ring: ring.Ring | None = None
        self.ctx = ctx or zmq.Context.instance()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 1000)
        self.push.connect(paths.ipc(paths.ingest(self.run_dir)))
        # Ticks travel apart, conflated: a broker that stalls finds one waiting per CPU,
        # not a queue of them taking the room batches need (a tick every read filled
        # the 1,000-message queue in 4 s of an idle host, and the next events were lost).
        self.ticks = self.ctx.socket(zmq.PUSH)
        self.ticks.setsockopt(zmq.LINGER, 0)
        self.ticks.setsockopt(zmq.CONFLATE, 1)
        self.ticks.connect(paths.ipc(paths.ticks(self.run_dir)))
        self.pid = os.getpid()
        self.sent = 0  # messages the ingest queue took: each carries its number ("seq")
        self.bpf_mgr = None
        self.bpf_output = None  # the manager's Output: where this CPU's ring is plugged
        self.bpf_ring: ringbuf.RingBuffer | None = None  # this CPU's BPF ring buffer
        self.bpf_ring_plugged = False
        self.bpf_owner: int | None = None
        self.probe_defs: dict[str, str] | None = None
        # the other CPUs this process reads: cpu0's collector readies their eBPF
        # outputs before it loads programs, and reads their rings while it does
        self.peers: list[Collector] = []
        self._closed_ids: list[int] = []
        try:  # registers the eBPF record layouts with the decoder; optional
            import c8.collectors.bpf.records  # noqa: F401
        except Exception as exc:
            log(f"bpf records unavailable: {type(exc).__name__}: {exc}")

    # ---- ring ------------------------------------------------------------
    def _ensure_ring(self) -> None:
        if self.ring_fd is None:
            attr = perf.make_attr(perf.PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY,
                                  wakeup_watermark=self.watermark_bytes)
            fd = perf.perf_event_open(attr, -1, self.cpu, f"ring owner cpu{self.cpu}")
            try:
                self.ring = ring.Ring(perf.mmap_ring(fd, self.pages, f"ring cpu{self.cpu}"))
            except Exception:
                os.close(fd)
                raise
            self.ring_fd = fd

    def _release_ring(self) -> None:
        if self.ring_fd is not None and not self.sources:
            try:
                self.drain()
            except Exception as exc:
                log(f"ring: {type(exc).__name__}: {exc}")
            self.ring.close()
            os.close(self.ring_fd)
            self.ring_fd, self.ring = None, None

    # ---- plan ------------------------------------------------------------
    def apply_plan(self, plan: dict) -> None:
        """Make the open events match the plan (never raises for one source)."""
        self.state.generation = int(plan.get("generation", -1))
        self.state.enabled = bool(plan.get("enabled", True))
        probes = plan.get("probes") or {}
        wanted: dict[str, str | None] = {}
        for name, spec in (plan.get("tracepoints") or {}).items():
            wanted[name] = (spec or {}).get("filter")
        # close first: a probe with an open perf event cannot be removed (EBUSY)
        for name in list(self.sources):
            if name != BPF_OUTPUT and name not in wanted and name not in probes:
                self._close(name)
        if self.cpu == 0:
            self._ensure_probes(probes)
        # cpu0's collector in this process has made its probes already: no wait for them
        wait = 0.0 if any(peer.cpu == 0 for peer in self.peers) else 2.0
        for name, spec in probes.items():
            if self._probe_ready(name, wait):  # created by cpu0
                wanted[name] = (spec or {}).get("filter")
        if wanted or plan.get("bpf"):
            self._ensure_ring()
        for name, flt in wanted.items():
            old = self.sources.get(name)
            if old is not None and old.filter == flt:
                continue
            new = self._open(name, flt)
            if new is None:
                continue  # the error is reported; a running source keeps running
            if old is not None:
                self._hand_over(old, new)  # the kernel sets a filter once: a new event replaces it
            self.sources[name] = new
        self._follow_bpf_owner(plan.get("bpf_owner"))
        self._apply_bpf(plan.get("bpf") or {}, plan)
        for src in self.sources.values():
            self._set_enabled(src, self.state.enabled)
        if self.bpf_ring is not None:
            self._plug_ring(self.state.enabled)
        self._release_ring()

    def _follow_bpf_owner(self, owner: int | None) -> None:
        if self.cpu != 0 and owner != self.bpf_owner:
            # cpu0's collector restarted with new maps: plug this ring into them
            if BPF_OUTPUT in self.sources:
                self._close(BPF_OUTPUT)
            self._close_bpf_ring()
            self._close_bpf_output()
            self.bpf_owner = owner

    def plug_before_load(self, plan: dict) -> None:
        """This CPU's ring and eBPF output ready for ``plan``'s programs, before
        cpu0's collector in the same process loads them (collectors in processes
        of their own do this at the same time as cpu0's)."""
        try:
            self.state.enabled = bool(plan.get("enabled", True))
            self._follow_bpf_owner(plan.get("bpf_owner"))
            self._ensure_ring()
            self._plug_bpf_output()
        except Exception as exc:  # its own plan tries again; the loss is counted
            self._error("bpf", f"{type(exc).__name__}: {exc}")

    def _open(self, name: str, flt: str | None) -> Source | None:
        """A new (disabled) perf event of tracepoint ``name`` in the ring, or None on error."""
        try:
            fmt = tracefs.read_format(name, self.tracefs)
            fd = perf.open_tracepoint(fmt.id, self.cpu, name, wakeup_watermark=self.watermark_bytes)
        except (OSError, ValueError) as exc:
            self._error(name, str(exc))
            return None
        try:
            perf.set_output(fd, self.ring_fd, name)
            sid = perf.event_id(fd, name)
        except OSError as exc:
            os.close(fd)
            self._error(name, str(exc))
            return None
        src = Source(name, fd, sid, flt)
        if flt:
            try:
                perf.set_filter(fd, flt, name)
            except OSError as exc:  # runs unfiltered; the broker filters anyway
                src.filter_error = exc.strerror or str(exc)
                log(f"{name}: kernel refused filter {flt!r}: {exc}; running unfiltered")
        self.decoder.add_tracepoint(sid, fmt, name)
        self.state.errors.pop(name, None)
        return src

    def _hand_over(self, old: Source, new: Source) -> None:
        """Replace a running event without a gap: the new one starts before the old
        one stops, and each sample time is read from exactly one of them."""
        if self.state.enabled and old.enabled:
            self._set_enabled(new, True)
            switch = perf.monotonic_ns()  # new records everything from here on
            self.decoder.limit(old.sample_id, until=switch)
            self.decoder.limit(new.sample_id, since=switch)
        self._close_source(old)

    def _close(self, name: str) -> None:
        self._close_source(self.sources.pop(name))

    def _close_source(self, src: Source) -> None:
        name = src.name
        try:
            perf.disable(src.fd, name)
        except OSError as exc:
            log(f"{name}: {exc}")
        n = self._kernel_lost([src])  # its last count, told with the next stats
        if n:
            self.state.lost += n
            key = ("kernel", self.cpu)
            self.state.unsent_lost[key] = self.state.unsent_lost.get(key, 0) + n
        os.close(src.fd)
        # Records already in the ring still decode; the id is dropped after the next read.
        self._closed_ids.append(src.sample_id)

    def _set_enabled(self, src: Source, on: bool) -> None:
        if src.enabled == on:
            return
        try:
            (perf.enable if on else perf.disable)(src.fd, src.name)
            src.enabled = on
        except OSError as exc:
            self._error(src.name, str(exc))

    def _error(self, name: str, msg: str) -> None:
        if self.state.errors.get(name) != msg:
            log(f"{name}: {msg}")
        self.state.errors[name] = msg

    def _probe_ready(self, name: str, wait: float = 2.0) -> bool:
        """True once cpu0 has created probe ``name`` (its format file readable).

        Collectors apply a plan at the same time: a short wait lets the others
        open a new probe in this plan rather than a second later.
        """
        fmt = os.path.join(tracefs.event_dir(name, self.tracefs), "format")
        deadline = time.monotonic() + (0 if name in self.sources else wait)
        while not os.path.exists(fmt):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _ensure_probes(self, probes: dict) -> None:
        # plan keys are sources (c8probes:NAME); tracefs.ensure wants the bare names
        defs = {n.partition(":")[2] or n: (s or {}).get("definition", "") for n, s in probes.items()}
        if defs == self.probe_defs:
            return
        self.probe_defs = defs
        try:
            from c8.probes.tracefs import ensure
        except Exception as exc:  # optional package
            if defs:
                self._error("probes", f"c8.probes unavailable: {exc}")
            return
        try:
            self.state.probes = ensure(defs)
            if any(self.state.probes.values()):
                self.probe_defs = None  # e.g. EBUSY while another CPU still held it: retry
        except Exception as exc:
            self._error("probes", f"ensure failed: {exc}")
            self.probe_defs = None  # retry on the next plan

    def _apply_bpf(self, programs: dict, plan: dict) -> None:
        # Order matters: a program that runs while this CPU's slot is empty, or holds
        # a disabled event, loses its record (counted, lost source ebpf:<family>).
        # So the ring is plugged and enabled before cpu0 loads programs, and
        # unplugged only after cpu0 has unloaded them.
        try:
            if self.cpu == 0 and programs and self.bpf_mgr is None:
                from c8.collectors.bpf.manager import BpfManager
                kind = self.config_bpf_output
                self.bpf_mgr = BpfManager(self.run_dir, output=None if kind == "auto" else kind,
                                          ring_size=self.pages * perf.PAGE_SIZE)
                self.bpf_mgr.serve()
            if programs:
                self._plug_bpf_output()
            if self.cpu == 0 and self.bpf_mgr is not None:
                for peer in self.peers if programs else ():
                    peer.plug_before_load(plan)
                self.state.bpf = self.bpf_mgr.apply(programs, progress=self._read_while_busy)
                if not programs:  # unloaded: failures meanwhile were while nobody collected
                    self.bpf_mgr.losses()
            if not programs and BPF_OUTPUT in self.sources:
                self._close(BPF_OUTPUT)
                if self.bpf_output is not None:
                    from c8.collectors.bpf.maps import output_clear
                    output_clear(self.bpf_output.fd, self.cpu)
            if not programs:
                self._close_bpf_ring()
            self.state.errors.pop("bpf", None)
        except Exception as exc:  # the eBPF layer is optional: tracepoints go on
            self._error("bpf", f"{type(exc).__name__}: {exc}")

    def _read_while_busy(self) -> None:
        """Between eBPF programs loaded or unloaded (seconds in all, the verifier and
        detaching are slow): read the rings of this process, so their events and
        ticks keep coming and the broker need not release other CPUs' events
        without them."""
        for col in [self, *self.peers]:
            try:
                col.drain()
            except Exception as exc:  # a decode bug must not stop the plan
                log(f"ring cpu{col.cpu}: {type(exc).__name__}: {exc}")

    def _plug_bpf_output(self) -> None:
        """This CPU's output for the eBPF programs, ready before they run: its BPF
        ring buffer in the manager's ring array, or (older kernels) its BPF-output
        event writing into the perf ring, enabled, in the PERF_EVENT_ARRAY slot of
        this CPU (enabled first: a disabled event in the slot fails every
        program's output on this CPU)."""
        from c8.collectors.bpf import manager, maps
        if self.bpf_output is None:
            if self.bpf_mgr is not None:
                self.bpf_output = self.bpf_mgr.output_for(self.cpu)
            else:
                self.bpf_output = manager.fetch_output(self.run_dir, self.cpu)
        if self.bpf_output.kind == manager.RINGBUF:
            if self.bpf_ring is None:  # it takes the ring's fd (the reader closes it)
                self.bpf_ring = ringbuf.RingBuffer(self.bpf_output.ring, self.bpf_output.ring_size)
                self.bpf_output = dataclasses.replace(self.bpf_output, ring=-1)
            self._plug_ring(self.state.enabled)
            return
        if BPF_OUTPUT in self.sources:
            return
        fd = perf.open_bpf_output(self.cpu, wakeup_watermark=self.watermark_bytes)
        src = None
        try:
            perf.set_output(fd, self.ring_fd, BPF_OUTPUT)
            src = Source(BPF_OUTPUT, fd, perf.event_id(fd, BPF_OUTPUT))
            self.decoder.add_bpf_output(src.sample_id)
            self._set_enabled(src, self.state.enabled)
            maps.output_set(self.bpf_output.fd, self.cpu, fd)
        except Exception:
            if src is not None:
                self.decoder.remove(src.sample_id)
            os.close(fd)
            raise
        self.sources[BPF_OUTPUT] = src

    def _plug_ring(self, on: bool) -> None:
        """This CPU's ring buffer in the ring array while collecting, out of it while
        paused (the programs' records are then counted, not written)."""
        if on == self.bpf_ring_plugged or self.bpf_output is None:
            return
        from c8.collectors.bpf import maps
        try:
            if on:
                maps.output_set(self.bpf_output.fd, self.cpu, self.bpf_ring.fd)
            else:
                maps.output_clear(self.bpf_output.fd, self.cpu)
            self.bpf_ring_plugged = on
        except OSError as exc:
            self._error("bpf", f"ring buffer cpu{self.cpu}: {exc}")

    def _close_bpf_output(self) -> None:
        if self.bpf_output is not None:
            for fd in (self.bpf_output.fd, self.bpf_output.ring):
                if fd >= 0:
                    os.close(fd)
            self.bpf_output = None

    def _close_bpf_ring(self) -> None:
        """Unplug this CPU's ring buffer, ship what it holds, free it (and the output
        map's fd)."""
        if self.bpf_ring is None:
            return
        self._plug_ring(False)
        try:
            self.drain()
        except Exception as exc:
            log(f"ring buffer cpu{self.cpu}: {type(exc).__name__}: {exc}")
        self.bpf_ring.close()
        self.bpf_ring, self.bpf_ring_plugged = None, False
        self._close_bpf_output()  # the next plug asks for the ring again

    # ---- data ------------------------------------------------------------
    def _send(self, header: dict, arr: np.ndarray | None = None) -> bool:
        """One message to the broker's ingest, numbered; False (and the events
        counted lost) when its queue is full."""
        header = dict(header, pid=self.pid, seq=self.sent + 1)
        frames = [msgpack.packb(header)] if arr is None else batch.pack(header, arr)
        try:
            # Not copied: a batch is a fresh array no one writes again, and copying one of
            # 300 KB cost 140 us (fresh pages for each message) where handing it over
            # costs 50 (pyzmq copies frames under its copy_threshold, 64 KB, anyway).
            self.push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            n = 0 if arr is None else len(arr)
            self.state.collector_lost += n
            self.state.unsent_collector_lost += n
            return False
        self.sent += 1
        return True

    def _send_header(self, header: dict) -> bool:
        return self._send(header)

    def drain(self) -> int:
        """Read and ship everything in this CPU's rings; returns events decoded."""
        self.state.watermark = perf.monotonic_ns()  # before either read: see _tick
        if self.ring is None and self.bpf_ring is None:
            return 0
        total = self._drain_perf() if self.ring is not None else 0
        if self.bpf_ring is not None:
            buf, starts, lengths = self.bpf_ring.read()
            if len(starts):
                for source, arr in self.decoder.decode_ringbuf(buf, starts, lengths, self.cpu):
                    total += self._ship(source, arr)
        if self.state.unsent_collector_lost and self._send_header(
                {"kind": "lost", "cpu": self.cpu, "count": self.state.unsent_collector_lost,
                 "source": "collector", "time": self.state.watermark}):
            self.state.unsent_collector_lost = 0
        self._forget_closed()
        self._tick()
        return total

    def _ship(self, source: str, arr: np.ndarray) -> int:
        if source == "bpf:exec":
            arr = exec_text(arr)
        n = len(arr)
        self.state.received[source] = self.state.received.get(source, 0) + n
        self._send({"kind": "samples", "cpu": self.cpu, "source": source}, arr)
        return n

    def _drain_perf(self) -> int:
        buf = self.ring.read()
        if not len(buf):
            return 0
        recs = ring.walk(buf)
        total = 0
        if recs.lost:  # told where it happened; the count is the kernel's counters' where known
            n = self._kernel_lost()
            n = recs.lost if n is None else n
            self.state.lost += n
            if n and not self._send_header({"kind": "lost", "cpu": self.cpu, "count": n,
                                            "source": "kernel", "time": self.state.watermark}):
                key = ("kernel", self.cpu)  # the broker hears of it with the next stats period
                self.state.unsent_lost[key] = self.state.unsent_lost.get(key, 0) + n
        for source, arr in self.decoder.decode(buf, recs.samples):
            total += self._ship(source, arr)
        return total

    def _tick(self) -> None:
        """After a drain's batches: this CPU's events stamped before the read are all
        sent. The broker releases a window once every CPU's tick has passed it; a
        tick names the last message it covers (``seq``), and the broker holds it
        until that message is in. A tick the queue cannot take is superseded."""
        try:
            self.ticks.send(msgpack.packb({"kind": "tick", "cpu": self.cpu, "pid": self.pid, "seq": self.sent,
                                           "watermark": self.state.watermark}), zmq.NOBLOCK)
        except zmq.Again:  # no broker connected: the next read ticks again
            pass

    def _forget_closed(self) -> None:
        """After a ring read: records of closed events are all read, and so are
        the overlapping ones of a hand-over (both events ran before it)."""
        while self._closed_ids:
            sid = self._closed_ids.pop()
            if sid not in {s.sample_id for s in self.sources.values()}:
                self.decoder.remove(sid)
        self.decoder.clear_limits()

    def stats(self) -> dict:
        return {"kind": "stats", "cpu": self.cpu, "pid": self.pid,
                "received": dict(self.state.received), "lost": self.state.lost,
                "collector_lost": self.state.collector_lost,
                "watermark": self.state.watermark,
                "filters": {s.name: {"filter": s.filter, "error": s.filter_error}
                            for s in self.sources.values() if s.filter},
                "errors": dict(self.state.errors), "bpf": self.state.bpf,
                "probes": self.state.probes, "generation": self.state.generation,
                "unknown_samples": self.decoder.unknown, "unknown_bpf": self.decoder.unknown_bpf,
                "bpf_output": self.bpf_output.kind if self.bpf_output is not None else None,
                "ebpf_lost": self.bpf_mgr.loss_totals if self.bpf_mgr is not None else {}}

    def _kernel_lost(self, sources: list[Source] | None = None) -> int | None:
        """Samples the kernel could not write to this ring since last asked, from each
        event's own counter (perf.read_lost); None when the kernel keeps none."""
        total = 0
        for src in self.sources.values() if sources is None else sources:
            try:
                count = perf.read_lost(src.fd)
            except OSError as exc:
                self._error(src.name, f"reading its lost count: {exc}")
                continue
            if count is None:
                return None
            total += count - src.lost
            src.lost = count
        return total

    def _report_losses(self) -> None:
        """Once per stats period, as ``lost`` headers: what only counters know of.
        Samples the kernel could not write that no PERF_RECORD_LOST told yet (one is
        written only before the next record that fits: after a burst that filled the
        ring, maybe never); the eBPF programs' failures counted in the kernel (cpu0
        owns the map; source ``ebpf:<family>``) and samples the decoder could not
        attribute. A count that could not be sent waits for the next period."""
        late = self.state.unsent_lost
        kernel = self._kernel_lost() if self.ring is not None else None
        if kernel:
            self.state.lost += kernel
            late[("kernel", self.cpu)] = late.get(("kernel", self.cpu), 0) + kernel
        if self.bpf_mgr is not None:
            try:
                found = self.bpf_mgr.losses()  # read even when dropped: the next read starts here
                # dormant (event limiter): the outputs are off on purpose, as subscribers were told
                for cpu, family, _cause, n in found if self.state.enabled else ():
                    key = (f"ebpf:{family}", self.cpu if cpu is None else cpu)
                    late[key] = late.get(key, 0) + n
            except Exception as exc:
                self._error("bpf losses", f"{type(exc).__name__}: {exc}")
        for source, total in (("unknown_sample", self.decoder.unknown),
                              ("bpf_unknown_tag", self.decoder.unknown_bpf)):
            n = total - self.state.decoder_reported.get(source, 0)
            if n > 0:
                self.state.decoder_reported[source] = total
                late[(source, self.cpu)] = late.get((source, self.cpu), 0) + n
        for (source, cpu), n in list(late.items()):
            if self._send_header({"kind": "lost", "cpu": cpu, "count": n, "source": source,
                                  "time": self.state.watermark}):
                del late[(source, cpu)]

    def close(self) -> None:
        """Disable and close every event, then the ring and sockets."""
        for name in list(self.sources):
            try:
                self._close(name)
            except Exception as exc:
                log(f"{name}: close: {exc}")
        if self.bpf_mgr is not None:
            try:
                self.bpf_mgr.apply({})
            except Exception as exc:
                log(f"bpf: {exc}")
        self._close_bpf_ring()
        self._close_bpf_output()
        self._release_ring()
        self.push.close(0)
        self.ticks.close(0)


def serve(collectors: list[Collector], stop: list[bool]) -> None:
    """The loop of a collector process: each plan taken once and applied to every
    collector, cpu0's first; every ring read; stats each period; until ``stop[0]``."""
    ctx = collectors[0].ctx
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(paths.ipc(paths.plan(collectors[0].run_dir)))
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    polled: dict[int, int | None] = {c.cpu: None for c in collectors}  # cpu -> ring fd polled
    next_stats = time.monotonic()
    try:
        while not stop[0]:
            # No ring: nothing to drain, only plans (which wake the poll) and stats.
            rings = any(c.ring is not None or c.bpf_ring is not None for c in collectors)
            # A ring buffer wakes nobody (c8.collectors.bpf.programs): one that holds a
            # quarter of its size after a read is read again at once, as a perf ring's
            # wakeup watermark would have it.
            behind = any(c.bpf_ring is not None and c.bpf_ring.pending() > c.bpf_ring.size // 4
                         for c in collectors)
            events = dict(poller.poll(0 if behind else POLL_MS if rings else IDLE_POLL_MS))
            if sub in events:
                plan = None
                while True:  # only the newest plan matters
                    try:
                        plan = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                plan = msgpack.unpackb(plan, raw=False, strict_map_key=False)
                for col in collectors:
                    before = col.state.generation
                    try:
                        col.apply_plan(plan)
                    except Exception as exc:
                        log(f"plan (cpu{col.cpu}): {type(exc).__name__}: {exc}")
                    if col.state.generation != before:
                        next_stats = 0.0  # tell the broker at once: subscribers wait on it
                for col in collectors:
                    if polled[col.cpu] != col.ring_fd:
                        if polled[col.cpu] is not None:
                            poller.unregister(polled[col.cpu])
                        if col.ring_fd is not None:
                            poller.register(col.ring_fd, zmq.POLLIN)
                        polled[col.cpu] = col.ring_fd
            for col in collectors:
                try:
                    col.drain()
                except Exception as exc:  # a decode bug must not stop collection
                    log(f"ring cpu{col.cpu}: {type(exc).__name__}: {exc}")
            now = time.monotonic()
            heartbeat.beat()  # the supervisor restarts a loop that stops turning
            if now >= next_stats:
                for col in collectors:
                    col._report_losses()
                    col._send_header(col.stats())
                next_stats = now + STATS_PERIOD
    finally:
        sub.close(0)


# The scheduler slice a collector asks for (EEVDF, Linux 6.12: sched_attr.sched_runtime
# of a SCHED_OTHER thread). A shorter slice gives an earlier deadline, so a collector
# woken to read its rings runs sooner on a busy CPU, with the same fair share of it.
# Measured here, file opens at 800k/s on a loaded 2-core host: the default slice
# lost 36k records to full ring buffers in 10 s (the collector waited 3.1 s on the
# run queue), 300 us lost none.
COLLECTOR_SLICE_NS = 300_000
_NR_SCHED_SETATTR = 314  # x86_64
_SCHED_ATTR = struct.Struct("<IIQiIQQQII")  # struct sched_attr, SCHED_ATTR_SIZE_VER1


def ask_short_slice(ns: int = COLLECTOR_SLICE_NS) -> bool:
    """Ask for a ``ns`` scheduler slice for this thread; False where the kernel says no
    (an older kernel ignores it: the default slice then, as before)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, 0, 0, os.getpriority(
        os.PRIO_PROCESS, 0), 0, ns, 0, 0, 0, 0), _SCHED_ATTR.size)
    return libc.syscall(_NR_SCHED_SETATTR, 0, attr, 0) == 0


def run(config: dict, cpus: int | list[int]) -> None:
    """Entry point of a collector process reading ``cpus`` (one CPU, or several);
    returns on SIGTERM."""
    cpus = sorted([cpus] if isinstance(cpus, int) else cpus)  # cpu0, if ours, first
    try:
        from setproctitle import setproctitle
        setproctitle(collector_name(cpus))
    except ImportError:
        pass
    if not ask_short_slice():
        log("scheduler slice: the kernel refused a short one; the default applies")
    ctx = zmq.Context.instance()
    collectors = [Collector(config, cpu, ctx) for cpu in cpus]
    for col in collectors:
        col.peers = [other for other in collectors if other is not col]
    stop = [False]

    def on_signal(signum, frame):  # only flag: the loop acts
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve(collectors, stop)
    finally:
        for col in collectors:  # cpu0's first: programs unloaded before the others unplug
            col.close()


__all__ = ["run", "serve", "Collector"]
