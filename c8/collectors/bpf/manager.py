"""Load, attach, filter and unload the sensor's eBPF program families.

One :class:`BpfManager` (collector cpu0) owns the output map every program
writes through, and each family's programs and maps. ``apply(plan["bpf"])``
converges to the families listed: it loads new ones, rewrites filter maps,
and unloads those no longer listed. A family that fails (the verifier refuses
a program, BTF is missing) is reported with its error; the others keep
working.

The output map is an ARRAY_OF_MAPS of per-CPU BPF ring buffers where the kernel
has them (5.8), else a PERF_EVENT_ARRAY (:class:`Output`). The manager makes
every CPU's ring buffer (creating a map takes CAP_BPF, which only collector
cpu0 keeps). Collectors get the output map, and their CPU's ring buffer, over
``bpf.sock`` (:meth:`BpfManager.serve`, :func:`fetch_output`) and store that
ring in it (:func:`c8.collectors.bpf.maps.output_set`), or on older
kernels their CPU's BPF-output perf event (:func:`c8.collectors.bpf.maps.output_set`).

Tracepoint events for attachment come from :mod:`c8.collectors.tracefs` and
:mod:`c8.collectors.perf`: one event per tracepoint on one CPU with
PERF_EVENT_IOC_SET_BPF serves every CPU.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from c8.collectors import perf, tracefs
from c8.collectors.bpf import btf, losses, maps, programs
from c8.collectors.bpf import filters as flt
from c8.collectors.bpf import records as rec
from c8.collectors.bpf import syscalls as sc
from c8.protocol import paths

log = logging.getLogger(__name__)

CLOSE_THREADS = 32
RINGBUF, PERF = "ringbuf", "perf"


@dataclass(frozen=True)
class Output:
    """Where the programs write: ``kind`` RINGBUF (``fd`` an ARRAY_OF_MAPS cpu ->
    ring buffer of ``ring_size`` bytes; ``ring`` one CPU's ring buffer, as served
    to its collector) or PERF (``fd`` a PERF_EVENT_ARRAY)."""

    fd: int
    kind: str
    ring_size: int = 0
    ring: int = -1


class FamilyError(Exception):
    """A family could not be loaded; the message names the program and why."""


@dataclass
class _Family:
    name: str
    maps: programs.MapFds
    progs: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    ignored: set[int] = field(default_factory=set)
    config: bytes = b""
    skipped: list[str] = field(default_factory=list)  # syscalls this kernel lacks

    def close(self) -> None:
        # Closing a perf event detaches its program and waits for an RCU grace period
        # (about 30 ms each here: a second for a family of 30 programs, one after the
        # other). Closed side by side, the waits overlap.
        with ThreadPoolExecutor(min(CLOSE_THREADS, max(1, len(self.events)))) as pool:
            list(pool.map(_close, self.events))
        for fd in self.progs:
            _close(fd)
        for fd in (self.maps.pending, self.maps.scratch, self.maps.config, self.maps.ignore):
            _close(fd)
        self.events.clear()
        self.progs.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class BpfManager:
    """Owner of the eBPF programs and maps of one sensor (see the module docstring)."""

    def __init__(self, run_dir: str, attach_cpu: int = 0, n_cpus: int | None = None,
                 per_task: bool | None = None, output: str | None = None,
                 ring_size: int = perf.DEFAULT_RING_PAGES * perf.PAGE_SIZE):
        self.run_dir = run_dir
        # Records wait in task storage where the kernel lets tracepoint programs have
        # it, else in a HASH (c8.collectors.bpf.programs). None: find out at the first
        # family; True/False: that form only (tests of each).
        self.per_task = per_task
        self.attach_cpu = attach_cpu
        self.n_cpus = n_cpus or maps.possible_cpus()
        # Ring buffers where the kernel has them (output None: find out; RINGBUF or
        # PERF: that form only, for tests of each), else perf output.
        self.output = _create_output(output, self.n_cpus, ring_size)
        self._rings: list[int] = []  # cpu -> its ring buffer (RINGBUF)
        try:
            if self.output.kind == RINGBUF:
                for cpu in range(self.n_cpus):
                    self._rings.append(maps.create_ringbuf(ring_size, f"c8_ring{cpu}"))
            self._counters = maps.create_counters(losses.ENTRIES)
        except BaseException:
            for fd in [self.output.fd, *self._rings]:
                _close(fd)
            raise
        self._losses = losses.LossReader(self._counters, self.n_cpus)
        self._families: dict[str, _Family] = {}
        self._progress: Callable[[], None] | None = None
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def map_fd(self) -> int:
        """The output map (cpu -> ring buffer, or cpu -> BPF-output event)."""
        return self.output.fd

    def output_for(self, cpu: int) -> Output:
        """The output as a collector of ``cpu`` needs it (fds duplicated: the caller's
        to close)."""
        if not 0 <= cpu < self.n_cpus:
            raise ValueError(f"cpu {cpu} is not a possible CPU (0-{self.n_cpus - 1})")
        ring = os.dup(self._rings[cpu]) if self._rings else -1
        return Output(os.dup(self.output.fd), self.output.kind, self.output.ring_size, ring)

    @property
    def families(self) -> list[str]:
        """Families loaded now."""
        return list(self._families)

    def family_maps(self, family: str) -> programs.MapFds:
        """The maps of a loaded family (for tests and stats)."""
        return self._families[family].maps

    def losses(self) -> list[tuple[int | None, str, str, int]]:
        """Records the programs lost since the previous call: ``(cpu, family, cause, n)``
        (``cpu`` None: runs the kernel skipped, CPU unknown). See :mod:`losses`."""
        with self._lock:
            return self._losses.read({n: list(f.progs) for n, f in self._families.items()})

    @property
    def loss_totals(self) -> dict[str, dict[str, int]]:
        """Per family, per cause (output, update, stale, skipped): the total so far."""
        return {f: dict(c) for f, c in self._losses.totals.items()}

    # -- plan -------------------------------------------------------------------
    def apply(self, spec: dict, progress: Callable[[], None] | None = None) -> dict:
        """Converge to ``spec`` = {family: {"filter": {...}}}; returns {family: {"loaded", "error"}}.

        A family that failed is not retried until it leaves the spec and comes back.
        ``progress`` is called after each program attached and each family unloaded:
        loading and unloading take seconds, and the caller has a ring to read meanwhile.
        """
        self._progress = progress
        spec = spec or {}
        status: dict[str, dict] = {}
        with self._lock:
            for name in list(self._families):
                if name not in spec:
                    self._unload(self._families.pop(name))
                    self._tell_progress()
                    log.info("bpf family %s unloaded", name)
            for name in list(self._failed):
                if name not in spec:
                    del self._failed[name]
            for name, entry in spec.items():
                if name in self._failed:
                    status[name] = {"loaded": False, "error": self._failed[name]}
                    continue
                try:
                    fil = flt.encode((entry or {}).get("filter"))
                    fam = self._families.get(name)
                    if fam is None:
                        fam = self._load(name)
                        self._families[name] = fam
                        log.info("bpf family %s loaded (%d programs)", name, len(fam.progs))
                    self._set_filter(fam, fil)
                    status[name] = {"loaded": True, "error": None}
                except (FamilyError, sc.BpfError, btf.BtfError, tracefs.TracefsError,
                        perf.PerfError, OSError, ValueError) as exc:
                    msg = str(exc)
                    log.warning("bpf family %s failed: %s", name, msg)
                    self._failed[name] = msg
                    status[name] = {"loaded": False, "error": msg}
        self._progress = None
        return status

    def _unload(self, fam: _Family) -> None:
        self._losses.forget(fam.name, fam.progs)  # what they skipped is still reported
        fam.close()

    def _set_filter(self, fam: _Family, fil: flt.Filter) -> None:
        if fil.config != fam.config:
            maps.config_write(fam.maps.config, fil.config)
            fam.config = fil.config
        if fil.ignore_tgids != fam.ignored:
            maps.tgid_set_replace(fam.maps.ignore, fam.ignored, fil.ignore_tgids)
            fam.ignored = set(fil.ignore_tgids)

    def _load(self, name: str) -> _Family:
        if name not in rec.RECORDS:
            raise FamilyError(f"unknown bpf family {name!r}; known: {', '.join(rec.RECORDS)}")
        if name == programs.EXIT_FAMILY or self.per_task is False:
            return self._load_as(name, per_task=False)
        try:
            fam = self._load_as(name, per_task=True)
        except (FamilyError, sc.BpfError) as exc:
            if self.per_task:
                raise
            fam = self._load_as(name, per_task=False)  # what this kernel lacks, if that was all
            log.info("bpf: records wait in a HASH: per-thread storage failed (%s)", exc)
            self.per_task = False
            return fam
        self.per_task = True
        return fam

    def _load_as(self, name: str, per_task: bool) -> _Family:
        short = name[:6]
        fds: list[int] = []
        try:
            if per_task:
                fds.append(maps.create_task_records(programs.scratch_size(name), f"c8_{short}_task"))
                fds.append(-1)  # built where it waits: no scratch
            else:
                fds.append(maps.create_pending(programs.pending_size(name), f"c8_{short}_pend"))
                fds.append(maps.create_scratch(programs.scratch_size(name), f"c8_{short}_scr"))
            fds.append(maps.create_config(flt.CONFIG_SIZE, f"c8_{short}_cfg"))
            fds.append(maps.create_tgid_set(f"c8_{short}_ign"))
        except sc.BpfError:
            for fd in fds:
                _close(fd)
            raise
        fam = _Family(name, programs.MapFds(self.output.fd, *fds, counters=self._counters, per_task=per_task,
                                            ringbuf=self.output.kind == RINGBUF))
        try:
            maps.config_write(fam.maps.config, bytes(flt.CONFIG_SIZE))
            if name == programs.EXIT_FAMILY:
                self._load_sched_exit(fam)
            else:
                self._load_syscalls(fam)
        except BaseException:
            fam.close()
            raise
        return fam

    def _attach(self, fam: _Family, prog: programs.Program, tracepoint: str) -> None:
        try:
            prog_fd = sc.prog_load(prog.name, prog.assemble())
        except sc.VerifierError as exc:
            raise FamilyError(f"program {prog.name} ({tracepoint}): {exc}") from exc
        fam.progs.append(prog_fd)
        ev = perf.open_counter(tracefs.event_id(tracepoint), self.attach_cpu, tracepoint)
        fam.events.append(ev)
        perf.set_bpf(ev, prog_fd, tracepoint)
        perf.enable(ev, tracepoint)
        self._tell_progress()

    def _tell_progress(self) -> None:
        if self._progress is None:
            return
        try:
            self._progress()
        except Exception:  # the caller's trouble must not fail a family
            log.exception("bpf: progress callback failed")

    def _load_syscalls(self, fam: _Family) -> None:
        for syscall in programs.FAMILIES[fam.name]:
            enter, exit_ = (f"syscalls:sys_enter_{syscall.name}", f"syscalls:sys_exit_{syscall.name}")
            try:
                tracefs.event_id(enter)
            except tracefs.TracefsError:
                fam.skipped.append(syscall.name)  # not on this kernel/arch
                continue
            # exit first: an enter without its exit would leave entries behind
            self._attach(fam, programs.exit_program(fam.name, syscall, fam.maps), exit_)
            self._attach(fam, programs.enter_program(fam.name, syscall, fam.maps), enter)
        if not fam.events:
            raise FamilyError(f"no tracepoint of family {fam.name!r} exists on this kernel")

    def _load_sched_exit(self, fam: _Family) -> None:
        off = btf.member_offset("task_struct", "exit_code")
        fmt = tracefs.read_format(programs.EXIT_TRACEPOINT)
        gd = {f.name: f.offset for f in fmt.fields}.get("group_dead")
        if gd is None:
            raise FamilyError(f"{programs.EXIT_TRACEPOINT} has no group_dead field")
        prog = programs.sched_exit_program(fam.maps, off, group_dead_offset=gd)
        self._attach(fam, prog, programs.EXIT_TRACEPOINT)

    # -- fd passing ----------------------------------------------------------------
    def serve(self) -> str:
        """Hand the output map to every peer connecting to ``bpf.sock`` (background thread)."""
        path = paths.bpf(self.run_dir)
        if self._server is not None:
            return path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            srv.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        srv.listen(16)
        srv.settimeout(0.2)  # lets close() stop the thread
        self._server = srv
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="c8-bpf-fd", daemon=True)
        self._thread.start()
        return path

    def _serve(self) -> None:
        srv = self._server
        while srv is not None and not self._stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:  # a peer asks for its CPU: "<cpu>"
                out = None
                try:
                    conn.settimeout(2.0)
                    out = self.output_for(int(conn.recv(16).decode()))
                    msg = f"{out.kind} {out.ring_size}".encode()
                    socket.send_fds(conn, [msg], [out.fd] + ([out.ring] if out.ring >= 0 else []))
                except (OSError, ValueError) as exc:
                    log.warning("bpf.sock: sending the output failed: %s", exc)
                finally:
                    for fd in (out.fd, out.ring) if out is not None else ():
                        if fd >= 0:
                            _close(fd)

    def close(self) -> None:
        """Stop serving, unload every family, close the output map."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(paths.bpf(self.run_dir))
            except FileNotFoundError:
                pass
        with self._lock:
            for fam in self._families.values():
                fam.close()
            self._families.clear()
        if self.output.fd >= 0:
            _close(self.output.fd)
            self.output = Output(-1, self.output.kind, self.output.ring_size)
        for fd in self._rings:
            _close(fd)
        self._rings.clear()
        if self._counters >= 0:
            _close(self._counters)
            self._counters = -1

    def __enter__(self) -> BpfManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create_output(kind: str | None, n_cpus: int, ring_size: int) -> Output:
    if kind not in (None, RINGBUF, PERF):
        raise ValueError(f"bpf output must be {RINGBUF!r} or {PERF!r}, not {kind!r}")
    if kind in (None, RINGBUF):
        try:
            return Output(maps.create_ring_array(ring_size, n_cpus), RINGBUF, ring_size)
        except sc.BpfError as exc:
            if kind == RINGBUF:
                raise
            log.info("bpf: records go through perf rings: no BPF ring buffers here (%s)", exc)
    return Output(maps.create_perf_array(n_cpus), PERF)


def fetch_output(run_dir: str, cpu: int, timeout: float = 5.0) -> Output:
    """The output for ``cpu``'s collector served on ``bpf.sock``, waiting up to
    ``timeout`` for the server. Its fds are the caller's to close."""
    path = paths.bpf(run_dir)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(path)
                s.sendall(str(cpu).encode())
                msg, fds, _flags, _addr = socket.recv_fds(s, 64, 2)
            try:
                kind, size = msg.decode().split()
                if kind not in (RINGBUF, PERF) or len(fds) != (2 if kind == RINGBUF else 1):
                    raise ValueError(kind)
                return Output(fds[0], kind, int(size), fds[1] if kind == RINGBUF else -1)
            except ValueError:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"{path}: unexpected answer {msg[:40]!r} with {len(fds)} fds") from None
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no bpf map server on {path} after {timeout}s") from None
            time.sleep(0.05)  # the server is not up yet: retry until the deadline
