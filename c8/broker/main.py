"""The broker process: ingest -> build -> merge -> enrich -> filter -> publish.

It owns subscriptions, tells the collectors what to collect (the plan: the
union of what live subscriptions need), turns raw per-source arrays into
schema events, orders them across CPUs, stamps identity (process table,
container table) and publishes each subscription's events on its connection.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid

import msgpack
import numpy as np
import zmq

from c8 import schema
from c8.broker import catalog
from c8.broker.access import Access, Peer
from c8.broker.containers import ContainerTable
from c8.broker.fdtable import FdTable
from c8.broker.identity import Identity
from c8.broker.merge import Merger
from c8.broker.paths import FromStream
from c8.broker.plan import Planner
from c8.broker.processes import ProcessTable
from c8.broker.publish import Publisher
from c8.broker.sequence import Sequence
from c8.broker.subscriptions import FilterLimits, Subscription, parse_spec
from c8.broker.watermarks import Watermarks
from c8.protocol import batch as wire
from c8.protocol import control, cpus, errors, heartbeat, paths
from c8.schema import rows

log = logging.getLogger("c8.broker")

TICK_SECONDS = 0.01  # the longest between releases while events wait
MIN_RELEASE_GAP = 0.002  # a tick from every CPU releases at once, but windows are at least this far apart
INGEST_SLICE_SECONDS = 0.005  # longest the loop ingests before it may release
BIG_WINDOW = 20_000  # after a window this large (a storm), wait TICK_SECONDS: per-window costs amortise
PLAN_REPUBLISH_SECONDS = 1.0
MAX_CONTROL_MESSAGE = 4 * control.MAX_REQUEST_BYTES  # bigger ones drop the peer: bounds memory
EXIT_LIMITER = 78
# Loading eBPF families takes seconds, and on a loaded host over 10 (after unloading the
# previous plan's): a subscriber answered before they run misses events, uncounted.
SUBSCRIBE_READY_WAIT = 30.0
# A control reply the peer's queue could not take at once is sent again each loop turn
# for this long (see Broker._reply); at most so many wait per peer, and so many peers.
REPLY_RETRY_SECONDS = 5.0
MAX_UNSENT_REPLIES = 16
MAX_PEERS_WAITING = 1024


def sensor_id(path: str | None) -> str:
    """Stable per host: kept in sensor_id_file, else derived from /etc/machine-id."""
    if path:
        try:
            with open(path) as f:
                value = f.read().strip()
                if value:
                    return value
        except OSError:
            pass
    try:
        with open("/etc/machine-id") as f:
            value = hashlib.sha256(f.read().strip().encode()).hexdigest()
    except OSError:
        value = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(value + "\n")
        except OSError as exc:
            log.warning("cannot keep sensor id in %s: %s", path, exc)
    return value


class Broker:
    def __init__(self, config: dict):
        self.config = config
        self.run_dir = paths.run_dir(config["run_dir"])
        self.sensor_id = sensor_id(config["sensor_id_file"])
        self.ctx = zmq.Context.instance()
        self.processes = ProcessTable()
        self.containers = ContainerTable()
        self.merger = Merger(int(config["merge_holdback"] * 1e9))
        self.identity = Identity(self.processes, self.containers)
        fdt = config["fd_table"]
        self.fd_paths = FromStream(FdTable(fdt["max_per_process"], fdt["max_entries"]))
        self.sequence = Sequence()
        self.last_window = 0  # events in the last window released
        self.planner = Planner(config, lambda packed: self.plan_pub.send(packed))
        self.publisher = Publisher(self)
        self.subscriptions: dict[str, Subscription] = {}
        self.access = Access(config)  # roles and the count limits (docs/security.md)
        self.filter_limits = FilterLimits.from_config(config["limits"])
        self.collectors: dict[int, dict] = {}  # cpu -> latest stats
        self.watermarks = Watermarks()  # how far each collector's stream is in
        self.counts = {"received": 0, "published": 0, "lost_kernel": 0, "bad_messages": 0}
        self.own_pids: set[int] = {os.getpid(), os.getppid()}
        self.running = True
        self.exit_status = 0
        self.limiter = self._make_limiter()
        self.dormant = False
        # subscribe replies wait until every collector runs the plan that serves them
        self.pending_replies: list[tuple[list[bytes], bytes, int, float]] = []
        # every online CPU has a collector (its stats): the broker's own affinity may be narrower
        self.ncpus = len(cpus.online_cpus())
        # peer -> replies its queue could not take yet: (envelope, payload, give-up time)
        self.unsent_replies: dict[bytes, collections.deque] = {}

    # -- set-up -------------------------------------------------------------------
    def _make_limiter(self):
        lim = self.config["limiter"]
        if not lim["enabled"]:
            return None
        from c8.broker.limiter import EventLimiter
        return EventLimiter(float(lim["events_per_second"]), float(lim["duration"]),
                            int(lim["max_retries"]), float(lim["group_request_duration"]))

    def bind(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDHWM, int(self.config["subscriber_queue"]))
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
        self._bind_ipc(self.control, paths.control(self.run_dir), 0o660)
        # peers are keyed by a one-byte tag of the socket they came from + their routing id
        self.listeners: dict[bytes, zmq.Socket] = {b"u": self.control}
        self.ingest = self.ctx.socket(zmq.PULL)
        self.ingest.setsockopt(zmq.RCVHWM, 10000)
        self.ingest.setsockopt(zmq.LINGER, 0)
        self._bind_ipc(self.ingest, paths.ingest(self.run_dir), 0o600)
        self.ticks = self.ctx.socket(zmq.PULL)
        self.ticks.setsockopt(zmq.RCVHWM, 10000)
        self.ticks.setsockopt(zmq.LINGER, 0)
        self._bind_ipc(self.ticks, paths.ticks(self.run_dir), 0o600)
        self.plan_pub = self.ctx.socket(zmq.PUB)
        self.plan_pub.setsockopt(zmq.LINGER, 0)
        self._bind_ipc(self.plan_pub, paths.plan(self.run_dir), 0o600)
        self.remote = None
        if self.config["listen_tcp"]:
            from c8.broker.remote import bind_tcp
            self.remote = bind_tcp(self, self.config)
            self.remote.socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)
            self.listeners[b"t"] = self.remote.socket

    def _bind_ipc(self, sock: zmq.Socket, path: str, mode: int) -> None:
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a dead broker
        sock.bind(paths.ipc(path))
        os.chmod(path, mode)

    # -- main loop ------------------------------------------------------------------
    def run(self) -> int:
        self.bind()
        self.processes.seed()
        try:
            self.containers.scan()
        except Exception as exc:  # a runtime's odd metadata must not stop the sensor
            log.warning("container scan failed: %s", exc)
        poller = zmq.Poller()
        for listener in self.listeners.values():
            poller.register(listener, zmq.POLLIN)
        poller.register(self.ingest, zmq.POLLIN)
        poller.register(self.ticks, zmq.POLLIN)
        next_tick = next_plan = next_second = time.monotonic()
        while self.running:
            # Tick only while something waits for release or a reply; otherwise
            # sleep until the next periodic duty (sockets wake the poll).
            busy = self.merger.pending or self.pending_replies or self.unsent_replies
            wait = TICK_SECONDS if busy else max(TICK_SECONDS, min(next_plan, next_second) - time.monotonic())
            for sock, _ in poller.poll(int(wait * 1000)):
                if sock is self.ingest:
                    self._drain_ingest()
                elif sock is self.ticks:
                    self._drain_ticks()
                else:
                    self._drain_control(sock)
            now = time.monotonic()
            if self.unsent_replies:
                self._retry_replies(now)
            gap = MIN_RELEASE_GAP if self.last_window < BIG_WINDOW else TICK_SECONDS
            if self.watermarks.moved and self.merger.pending and now >= next_tick - TICK_SECONDS + gap:
                next_tick = now  # every CPU may have passed more events: release them now
            heartbeat.beat()  # the supervisor restarts a loop that stops turning
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self.watermarks.moved = False
                if self.pending_replies:
                    self._send_ready_replies(now)
                self._release(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            if now >= next_plan:
                next_plan = now + PLAN_REPUBLISH_SECONDS
                self.planner.publish()
            if now >= next_second:
                next_second = now + 1.0
                self._every_second(now)
        self._release(time.clock_gettime_ns(time.CLOCK_MONOTONIC), flush=True)
        self.planner.clear()
        self.publisher.end_all("sensor stopping")
        if self.remote is not None:
            self.remote.close()
        return self.exit_status

    def stop(self, *_args) -> None:
        self.running = False

    # -- ingest -----------------------------------------------------------------------
    def _drain_ingest(self) -> None:
        # A bounded slice, then back to the loop: under a backlog the pipeline releases
        # between slices, so windows (and the memory they hold) stay small.
        deadline = time.monotonic() + INGEST_SLICE_SECONDS
        for _ in range(1000):
            if time.monotonic() > deadline:
                return
            try:
                frames = self.ingest.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._ingest([f.buffer for f in frames])
            except Exception:
                self.counts["bad_messages"] += 1
                log.exception("bad collector message")

    def _drain_ticks(self) -> None:
        """Every tick waiting (a few per CPU at most: collectors conflate them)."""
        for _ in range(10000):
            try:
                frame = self.ticks.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.watermarks.on_tick(msgpack.unpackb(frame, raw=False))
            except Exception as exc:
                self.counts["bad_messages"] += 1
                log.warning("bad tick from a collector: %s", exc)

    def _ingest(self, frames: list) -> None:
        header, raw = wire.unpack(frames)
        kind = header.get("kind")
        self.watermarks.on_message(header)  # a tick held for this message counts now
        if kind == "samples" and raw is not None and len(raw):
            self.counts["received"] += len(raw)
            if self.dormant:
                return
            try:
                self._build(header["source"], raw)
            except Exception:  # a builder bug must not lose events silently
                log.exception("building %d events of %s failed; they are reported lost",
                              len(raw), header.get("source"))
                self._lost("broker", int(header.get("cpu", -1)), len(raw),
                           int(header.get("watermark") or time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
        elif kind == "lost":
            self._lost(str(header.get("source", "kernel")), int(header.get("cpu", -1)), int(header["count"]),
                       int(header.get("time") or time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
        elif kind == "stats":
            cpu = int(header.get("cpu", -1))
            header["_seen"] = time.monotonic()
            self.collectors[cpu] = header
            if self.planner.on_stats(header):
                self._replan()

    def _build(self, source: str, raw: np.ndarray) -> None:
        # The sensor never reports itself; dropped before numbering keeps the sequence gap-free.
        own_sorted = np.sort(np.fromiter(self.own_pids, np.int32))
        pids = raw["pid"]
        if len(own_sorted):  # membership without np.isin's per-call set-up
            own = own_sorted[np.searchsorted(own_sorted, pids).clip(max=len(own_sorted) - 1)] == pids
        else:
            own = np.zeros(len(pids), bool)
        if own.any():
            raw = rows.take(raw, ~own)
            if not len(raw):
                return
        if source == "sched:sched_process_exec" and "exec" not in self.planner.failed_bpf:
            # only a hint for execs whose name eBPF could not read (few: exec rate)
            self.identity.hint_exec_names(raw["pid"], raw["filename"])
            return
        if source in catalog.CGROUP_SOURCES:
            for category, out in self._container_cgroup(source, raw):
                self.merger.add(category, out)
            return
        src = catalog.SOURCES.get(source) or self.planner.probe_source(source)
        if src is None:
            return
        for category, out in src.build(raw):
            self.merger.add(category, out)

    def _lost(self, source: str, cpu: int, count: int, when: int) -> None:
        self.counts["lost_" + source] = self.counts.get("lost_" + source, 0) + count
        self.merger.add("lost", catalog.lost_event(source, count, cpu, when))

    # -- containers ---------------------------------------------------------------------
    def _container_cgroup(self, source: str, raw: np.ndarray):
        """Cgroup events at ingest: attaches only move pids between containers and
        are queued, applied in time order with the process events at release
        (Identity.stamp); mkdirs and rmdirs wait in the merger like any event
        (catalog.CGROUP_CHANGES) for :meth:`_cgroup_changes`."""
        if source == "cgroup:cgroup_attach_task":
            for t, pid, path in zip(raw["time"].tolist(), raw["tp_pid"].tolist(), raw["dst_path"].tolist(),
                                    strict=True):
                self.containers.queue_attach(t, pid, path.decode(errors="replace"))
            return []
        return [(catalog.CGROUP_CHANGES, catalog.cgroup_changes(raw, source == "cgroup:cgroup_mkdir"))]

    def _cgroup_changes(self, window: dict[str, np.ndarray]) -> None:
        """CREATED / DESTROYED from a window's mkdirs and rmdirs of containers' own
        cgroups, applied in time order, added to its container events."""
        changes = window.pop(catalog.CGROUP_CHANGES, None)
        if changes is None:
            return
        ct = self.containers
        hits = []
        for i, (made, path, pid) in enumerate(zip(changes["made"].tolist(), changes["path"].tolist(),
                                                   changes["process_pid"].tolist(), strict=True)):
            path = path.decode(errors="replace")
            hit = ct.on_cgroup_mkdir(path, pid, self._argv_of) if made else ct.on_cgroup_rmdir(path)
            if hit is not None:
                hits.append((i, hit))
        if not hits:
            return
        sub = changes[np.array([i for i, _ in hits])]
        out = schema.empty("container", len(hits))
        for name in ("sensor_monotime_nanos", "cpu", "process_pid", "process_tid"):
            out[name] = sub[name]
        out["kind"] = np.where(sub["made"], schema.kind_code("container", "CREATED"),
                               schema.kind_code("container", "DESTROYED"))
        out["container"] = [hit[0] for _, hit in hits]
        out["runtime"] = [hit[1].encode() for _, hit in hits]
        if "container" in window:  # none come from elsewhere before identity; kept in time order if so
            out = rows.concat([window["container"], out])
            out = rows.take(out, np.argsort(out["sensor_monotime_nanos"], kind="stable"))
        window["container"] = out

    def _argv_of(self, pid: int) -> list[str]:
        """The command line a process's exec recorded (split at spaces)."""
        p = self.processes.get(pid)
        return p.command_line.split() if p is not None and p.command_line else []

    # -- release: the per-window pipeline ----------------------------------------------
    def _release(self, now_ns: int, flush: bool = False) -> None:
        """The release pipeline, one window at a time (docs/INTERNALS.md, "Release")."""
        window = self.merger.release(now_ns, flush, upto_ns=self.watermarks.reached(now_ns))  # cut
        if not window:
            return
        follow = "cgroup:cgroup_attach_task" in self.planner.plan["tracepoints"]
        cwd = window.pop(catalog.FD_CHANGES, None)            # chdir, fchdir, dup2: for the paths stage only
        self._cgroup_changes(window)                          # CREATED, DESTROYED: in time order
        self.identity.stamp(window, follow_attaches=follow)  # who, as of each event's time
        self.fd_paths.apply(window, cwd)                      # relative and fd-only names, from the stream
        self.sequence.number(window)                          # gap-free, across categories
        events = [b for c, b in window.items() if c not in ("lost", "limiter")]
        if self.limiter is not None:
            # the batches, not just their size: a trip names the pids, uids, containers
            self.limiter.count_batches(events)
        self.last_window = sum(len(b) for b in events)
        self.counts["published"] += self.last_window
        self.publisher.publish(window)                        # select, encode, send
        self.identity.end_window()

    # -- control ----------------------------------------------------------------------------
    def _drain_control(self, sock: zmq.Socket | None = None) -> None:
        sock = self.control if sock is None else sock
        tag = next(t for t, s in self.listeners.items() if s is sock)
        for _ in range(100):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [p.bytes for p in parts]
            frames[0] = tag + frames[0]
            self._handle(frames, tag, parts[-1])

    def _peer(self, tag: bytes, frame: zmq.Frame | None, routing_id: bytes) -> Peer:
        """Who sent ``frame`` (its connection's credentials): see c8.broker.access."""
        if tag == b"t":
            return self.access.tcp_peer(frame, self.remote.keys)
        return self.access.unix_peer(frame, routing_id)

    def _handle(self, frames: list[bytes], tag: bytes = b"u", frame: zmq.Frame | None = None) -> None:
        peer = frames[0]
        # REQ clients put an empty delimiter frame before the payload; DEALERs don't.
        envelope = [peer, b""] if len(frames) >= 3 and frames[1] == b"" else [peer]
        payload = frames[len(envelope)] if len(frames) > len(envelope) else b""
        req_id = None
        try:
            if len(frames) > len(envelope) + 1:
                raise errors.ProtocolError(errors.BAD_MESSAGE, "a request is one frame")
            req = control.parse_request(payload)
            req_id = req["id"]
            who = self._peer(tag, frame, peer)
            reply = self._command(peer, req, who)
            if req["command"] == "subscribe":
                self.pending_replies.append((envelope, reply, self.planner.generation,
                                             time.monotonic() + SUBSCRIBE_READY_WAIT))
                return
        except errors.ProtocolError as exc:
            if req_id is None:  # refused unread (too big, bad fields): answer its id if it leads
                req_id = _leading_id(payload)
            reply = control.error(req_id, exc.code, exc.reason)
        except Exception as exc:
            log.exception("control request failed")
            reply = control.error(req_id, errors.INTERNAL, f"internal error: {type(exc).__name__}")
        try:
            self._reply(envelope, reply)
        except Exception:  # an unsendable reply is dropped, never a broker fault
            log.exception("cannot reply to %s", peer.hex())

    def _reply(self, envelope: list[bytes], payload: bytes) -> None:
        """Send a control reply, never blocking. ZeroMQ learns that a reader has
        emptied its queue only from credit the reader's side sends back now and
        then, so a reply may meet a queue that looks full although the client
        reads (a loaded host, a small subscriber_queue): it is then sent again
        each loop turn for REPLY_RETRY_SECONDS, in order, rather than lost to a
        client waiting for it. A client that never reads loses its older replies
        (MAX_UNSENT_REPLIES per peer)."""
        peer = envelope[0]
        waiting = self.unsent_replies.get(peer)
        if waiting is None and self.publisher.send(envelope, payload):
            return
        if waiting is None:
            if len(self.unsent_replies) >= MAX_PEERS_WAITING:
                return
            waiting = self.unsent_replies[peer] = collections.deque(maxlen=MAX_UNSENT_REPLIES)
        waiting.append((envelope, payload, time.monotonic() + REPLY_RETRY_SECONDS))

    def _retry_replies(self, now: float) -> None:
        for peer, waiting in list(self.unsent_replies.items()):
            while waiting and (now >= waiting[0][2] or self.publisher.send(*waiting[0][:2])):
                waiting.popleft()  # sent, or given up
            if not waiting:
                del self.unsent_replies[peer]

    def _command(self, peer: bytes, req: dict, who: Peer) -> bytes:
        cmd, props, rid = req["command"], req["properties"], req["id"]
        if cmd == "subscribe":
            self.access.check_subscribe(who, props, self.subscriptions)
            sub = parse_spec(props, peer, self.planner.validate_probe, self.filter_limits)
            self.access.check_probes(sub, self.subscriptions)
            self.subscriptions[sub.sub_id] = sub
            self.access.record(sub.sub_id, who)
            self._replan()
            log.info("subscription %s from %s (%s, %s): %s", sub.sub_id, who.principal, who.role, peer.hex(),
                     json.dumps(props, default=str)[:4096])
            return control.ok(rid, type="reply", subscription=sub.sub_id, sensor_id=self.sensor_id,
                              wire_version=schema.WIRE_VERSION)
        if cmd == "unsubscribe":
            sid = props.get("subscription")
            if not isinstance(sid, str) or sid not in self.subscriptions:
                raise errors.ProtocolError(errors.NO_SUCH_SUBSCRIPTION, f"no subscription {str(sid)[:64]!r}")
            self.access.check_unsubscribe(who, sid)
            self.end_subscription(sid, f"unsubscribed by {who.principal}", notify=True)
            return control.ok(rid, type="reply", subscription=sid)
        if cmd == "list":
            return control.ok(rid, type="reply",
                              subscriptions=[s.describe() for s in self.access.visible(who, self.subscriptions)])
        if cmd == "status":
            return control.ok(rid, type="reply", **self.status(who))
        if cmd == "probes":
            return control.ok(rid, type="reply", probes=self._probes_seen_by(who))
        if cmd == "heartbeat":
            return control.ok(rid, type="reply")
        raise errors.ProtocolError(errors.UNKNOWN_COMMAND, cmd)

    def _replan(self) -> None:
        """The plan for the broker's state now (compute_plan's inputs), published if it changed."""
        self.planner.update(self.subscriptions.values(), self.own_pids,
                            self.collectors.get(0, {}).get("pid"), self.dormant)

    def end_subscription(self, sid: str, reason: str, notify: bool = False) -> None:
        sub = self.subscriptions.pop(sid, None)
        self.access.forget(sid)
        if sub is None:
            return
        if notify:
            self._reply([sub.peer], msgpack.packb({"type": "end", "subscription": sid, "reason": reason}))
        log.info("subscription %s ended: %s", sid, reason)
        self._replan()

    def _probes_seen_by(self, who: Peer) -> dict:
        """Every probe for an admin; a subscriber's own probes only."""
        status = self.planner.probe_status()
        if who.admin:
            return status
        mine = {cf.probe["definition"].source for s in self.access.visible(who, self.subscriptions)
                for filters in s.categories.values() for cf in filters if cf.probe is not None}
        return {name: v for name, v in status.items() if name in mine}

    def status(self, who: Peer | None = None) -> dict:
        """The broker's state; a subscriber (``who`` not admin) sees only its own
        subscriptions, and of the plan only which sources run (not others' filters)."""
        sup = {}
        try:
            with open(paths.supervisor_status(self.run_dir)) as f:
                sup = json.load(f)
        except (OSError, ValueError):
            pass
        return {
            "sensor_id": self.sensor_id,
            "broker_pid": os.getpid(),
            "supervisor": sup,
            "subscriptions": [s.describe() for s in (self.subscriptions.values() if who is None or who.admin
                                                      else self.access.visible(who, self.subscriptions))],
            "plan": self.planner.plan if who is None or who.admin else _plan_outline(self.planner.plan),
            # seen_ago: seconds since its last stats (health: each collector reports every second)
            "collectors": {str(cpu): {**{k: v for k, v in st.items() if k not in ("kind", "_seen")},
                                      "seen_ago": round(time.monotonic() - st.get("_seen", 0), 3)}
                           for cpu, st in self.collectors.items()},
            "counts": dict(self.counts, late=self.merger.late,  # proc_*: process lookups (processes.py)
                           **{f"proc_{k}": v for k, v in self.processes.stats().items()}),
            "processes": len(self.processes.by_pid),
            "containers": self.containers.stats(),  # lookups that left names unknown, by cause
            "fd_table": self.fd_paths.stats(),  # descriptors learnt from the stream, evictions
            "dormant": self.dormant,
            "limiter": {"enabled": self.limiter is not None,
                        "trips": getattr(self.limiter, "trips", 0)},
        }

    # -- periodic -----------------------------------------------------------------------------
    def _collecting(self, generation: int, now: float) -> bool:
        """True when every live collector reports running this plan generation or later."""
        live = [st for st in self.collectors.values() if now - st.get("_seen", 0) < 3]
        return len(live) >= self.ncpus and all(
            st.get("generation", -1) >= generation for st in live)

    def _send_ready_replies(self, now: float) -> None:
        waiting = []
        for envelope, payload, generation, deadline in self.pending_replies:
            if self._collecting(generation, now):
                self._reply(envelope, payload)
            elif now >= deadline:
                log.warning("answering a subscribe after %.0fs although not every collector runs plan %d "
                            "(collector stats: %s): its first events may be missed", SUBSCRIBE_READY_WAIT,
                            generation, {c: st.get("generation") for c, st in self.collectors.items()})
                self._reply(envelope, payload)
            else:
                waiting.append((envelope, payload, generation, deadline))
        self.pending_replies = waiting

    def _every_second(self, now: float) -> None:
        self.publisher.tick()
        self._refresh_own_pids()
        self._reload_limits()
        try:
            self.containers.refresh()
        except Exception as exc:
            log.warning("container refresh failed: %s", exc)
        if self.limiter is not None:
            self._limiter_poll()

    def _reload_limits(self) -> None:
        """limits.* of a configuration the supervisor accepted on reload (run_dir/
        config.json, docs/operations.md): they apply to subscriptions made from now on."""
        path = paths.accepted_config(self.run_dir)
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime == getattr(self, "_limits_mtime", None):
                return
            self._limits_mtime = mtime
            with open(path) as f:
                limits = json.load(f).get("limits")
            self.access.limits = type(self.access.limits).from_config(limits)
            self.filter_limits = FilterLimits.from_config(limits)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot apply the reloaded limits from %s: %s", path, exc)
            return
        log.info("limits reloaded: %s", limits)

    def _refresh_own_pids(self) -> None:
        try:
            with open(paths.supervisor_status(self.run_dir)) as f:
                sup = json.load(f)
        except (OSError, ValueError):
            return
        # The current tree only: a dead child's pid may belong to anyone by now.
        pids = {int(c["pid"]) for c in sup.get("children", []) if c.get("pid")}
        pids |= {os.getpid(), os.getppid()}
        if sup.get("pid"):
            pids.add(int(sup["pid"]))
        if pids != self.own_pids:
            self.own_pids = pids
            self._replan()

    def _limiter_culprits(self, t, out) -> str:
        """Fill the limiter event's top_* fields from the transition; the log's text."""
        from c8.broker.limiter import format_top

        def container(index: int) -> str:
            return self.containers.row(index)[0][:12] or "host"

        texts = {"top_pids": format_top(t.top_pids), "top_uids": format_top(t.top_uids),
                 "top_containers": format_top(t.top_containers, container)}
        for name, text in texts.items():
            out[name] = text.encode()[:128]
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in texts.items() if v)

    def _limiter_poll(self) -> None:
        """Act on the event limiter's next transition (called every second)."""
        if self.exit_status == EXIT_LIMITER:
            # EXITING went out a second ago: stop now, its notice has left the sockets
            # (the control socket has LINGER 0, so stopping at once could drop it)
            self.running = False
            return
        t = self.limiter.poll()
        if t is None:
            return
        name = t.kind if hasattr(t, "kind") else str(t)
        dormancy = float(getattr(t, "dormancy", 0) or 0)
        out = schema.empty("limiter", 1)
        out["kind"] = schema.kind_code("limiter", name)
        out["sensor_monotime_nanos"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out["dormancy_nanos"] = int(dormancy * 1e9)
        out["trips"] = int(getattr(t, "trips", 0) or 0)
        culprits = self._limiter_culprits(t, out)
        if name == "TRIPPED":
            log.warning("event limiter tripped: collection dormant for %.0fs (%s)", dormancy, culprits)
            self.dormant = True
        elif name == "RESUMED":
            log.warning("event limiter: collection resumes")
            self.dormant = False
        elif name == "EXITING":
            log.error("event limiter tripped after max_retries dormancies: the sensor exits (%s)", culprits)
            self.exit_status = EXIT_LIMITER
            self.dormant = True  # collect nothing more; the loop stops at the next poll
        self._replan()
        self.merger.add("limiter", out)


def _leading_id(payload: bytes):
    """The ``id`` of a request map that names it first (as c8's clients do), read
    without decoding the rest: a refused 1 MiB request still gets an answer its
    client recognises. None when the map does not start with a small id."""
    try:
        u = msgpack.Unpacker(raw=False, max_str_len=256, max_bin_len=256, max_array_len=16, max_map_len=16,
                             max_ext_len=16)
        u.feed(payload)
        u.read_map_header()
        if u.unpack() != "id":
            return None
        rid = u.unpack()
    except Exception:  # garbage: msgpack raises many types
        return None
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def _plan_outline(plan: dict) -> dict:
    """The plan without filters or probe definitions: what a subscriber may see."""
    return {"generation": plan.get("generation"), "enabled": plan.get("enabled"),
            "tracepoints": {name: {} for name in plan.get("tracepoints", {})},
            "probes": {}, "bpf": {name: {} for name in plan.get("bpf", {})}}


def run(config: dict) -> None:
    """Entry point of the c8-broker child process."""
    try:
        from setproctitle import setproctitle
        setproctitle("c8-broker")
    except ImportError:
        pass
    logging.basicConfig(level=config["log_level"].upper(),
                        format="%(asctime)s c8-broker %(levelname)s %(message)s", stream=sys.stderr)
    broker = Broker(config)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    sys.exit(broker.run())
