"""Prometheus /metrics and /healthz, served by the supervisor on metrics.listen.

    MetricsServer(cfg, snapshot, cgroup).start()   # threads; stop() at shutdown

Where it lives, and why: the supervisor already knows the children (states,
restarts and why) and the cgroup; the broker knows collection (its ``status``
reply: collectors, losses, subscriptions, limiter); the detector writes its
alert counts to run_dir/detector.json every second. A scrape asks the broker
for ``status`` over its control socket like c8ctl does, with a deadline
(BROKER_DEADLINE_S), from an HTTP thread of the supervisor: the broker answers
between two turns of its loop as it does for any client and never waits on
the outside world, and the supervisor's own loop only publishes a snapshot of
its children (``Snapshot.update``) and never waits on HTTP. A broker that does
not answer makes /healthz 503, and /metrics shows ``c8_broker_up 0``.

The server is plain HTTP and read-only (GET only): bind it to loopback or a
management network. It uses its own ZeroMQ context, never the children's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgpack
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from c8.protocol import control, cpus, paths
from c8.supervisor.reload import read_detector_stats

log = logging.getLogger("c8.supervisor.metrics")

BROKER_DEADLINE_S = 1.0     # a scrape never waits longer on the broker
COLLECTOR_PERIOD_S = 1.0    # collectors send stats every second
HEALTH_SILENCE_S = 3.0      # a collector silent this long is unhealthy (3 periods)


class MetricsError(Exception):
    """metrics.listen cannot be served (bad address, port taken)."""


class Snapshot:
    """What the supervisor's loop publishes for the HTTP threads: the children's
    status and restarts counted by reason (a child's restart count grows by one
    each time it exits and comes back; the reason is its last exit's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.children: list[dict] = []
        self.restarts: dict[tuple[str, str], int] = {}
        self._seen: dict[str, int] = {}
        self.reload: dict | None = None

    def update(self, children: list[dict], reload: dict | None = None) -> None:
        with self._lock:
            for c in children:
                before = self._seen.get(c["name"], 0)
                if c.get("restarts", 0) > before:
                    key = (c["name"], str(c.get("last_exit_reason") or "unknown"))
                    self.restarts[key] = self.restarts.get(key, 0) + c["restarts"] - before
                self._seen[c["name"]] = c.get("restarts", 0)
            self.children = [dict(c) for c in children]
            self.reload = dict(reload) if reload else None

    def read(self) -> tuple[list[dict], dict[tuple[str, str], int], dict | None]:
        with self._lock:
            return list(self.children), dict(self.restarts), self.reload


def parse_listen(listen: str) -> tuple[socket.AddressFamily, str, int]:
    """'host:port' (host empty or '*': every IPv4 address; '[::1]': IPv6) -> bind args."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, ("0.0.0.0" if host in ("", "*") else host), int(port)


class BrokerStatus:
    """The broker's ``status`` reply, asked over the control socket with a deadline."""

    def __init__(self, run_dir: str):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()  # its own: never the one a forked child would inherit
        self.endpoint = paths.ipc(paths.control(run_dir))
        self._ids = 0
        self._lock = threading.Lock()

    def get(self) -> dict:
        """The reply; raises TimeoutError or OSError when the broker does not answer."""
        zmq = self.zmq
        with self._lock:
            self._ids += 1
            rid = f"metrics-{self._ids}"
        sock = self.ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            sock.send(control.request("status", None, rid))
            deadline = time.monotonic() + BROKER_DEADLINE_S
            while (left := deadline - time.monotonic()) > 0:
                if not sock.poll(int(left * 1000) + 1):
                    break
                msg = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
                if isinstance(msg, dict) and msg.get("id") == rid:
                    if msg.get("status") != "ok":
                        raise OSError(f"status refused: {msg.get('reason')}")
                    return msg
            raise TimeoutError(f"no status reply within {BROKER_DEADLINE_S}s")
        finally:
            sock.close()

    def close(self) -> None:
        self.ctx.term()


def _num(v) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def health(children: list[dict], broker: dict | None, broker_error: str | None) -> list[str]:
    """Why the sensor is unhealthy ([] when healthy): a child not RUNNING, the
    broker not answering, a collector without stats for HEALTH_SILENCE_S."""
    reasons = [f"{c['name']} is {c.get('state')}" + (f" ({c['last_exit_reason']})"
                                                     if c.get("last_exit_reason") else "")
               for c in children if c.get("state") != "RUNNING"]
    if broker is None:
        reasons.append(f"the broker does not answer: {broker_error}")
        return reasons
    collectors = broker.get("collectors") or {}
    for c in children:
        name = c["name"]
        read = cpus.of_collector(name) or []  # one collector may read several CPUs
        for cpu in read:
            who = name if len(read) == 1 else f"{name} (cpu{cpu})"
            st = collectors.get(str(cpu))
            if st is None:
                reasons.append(f"{who} has not reported to the broker")
            elif _num(st.get("seen_ago")) > HEALTH_SILENCE_S:
                reasons.append(f"{who} has not reported for {_num(st['seen_ago']):.1f}s "
                               f"(it reports every {COLLECTOR_PERIOD_S:.0f}s)")
    return reasons


def proc_usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) summed over live pids from /proc (no cgroup)."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
            rss += int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


class SensorCollector:
    """A prometheus_client collector: every scrape reads the facts afresh."""

    def __init__(self, run_dir: str, snapshot: Snapshot, cgroup=None, broker: BrokerStatus | None = None):
        self.run_dir = run_dir
        self.snapshot = snapshot
        self.cgroup = cgroup
        self.broker = broker or BrokerStatus(run_dir)

    def broker_status(self) -> tuple[dict | None, str | None]:
        try:
            return self.broker.get(), None
        except Exception as exc:  # whatever happened, the scrape answers
            return None, str(exc) or type(exc).__name__

    def describe(self) -> list:
        return []  # families vary with the sensor's state: no registration-time check

    def collect(self) -> Iterator:
        children, restarts, reload = self.snapshot.read()
        broker, _err = self.broker_status()
        yield from self._children(children, restarts, reload)
        yield from self._tree(children)
        up = GaugeMetricFamily("c8_broker_up", "1 when the broker answered this scrape's status request")
        up.add_metric([], 1 if broker is not None else 0)
        yield up
        if broker is not None:
            yield from self._broker(broker)
        det = read_detector_stats(self.run_dir)
        if det is not None:
            yield from self._detector(det)

    def _children(self, children, restarts, reload) -> Iterator:
        running = GaugeMetricFamily("c8_child_up", "1 when the child is RUNNING", labels=["child"])
        for c in children:
            running.add_metric([c["name"]], 1 if c.get("state") == "RUNNING" else 0)
        yield running
        rs = CounterMetricFamily("c8_child_restarts", "child restarts by child and reason of the exit",
                                 labels=["child", "reason"])
        for (name, reason), n in sorted(restarts.items()):
            rs.add_metric([name, reason], n)
        yield rs
        if reload:
            g = GaugeMetricFamily("c8_reload_generation", "configuration reloads asked so far")
            g.add_metric([], _num(reload.get("generation")))
            yield g
            ok = GaugeMetricFamily("c8_reload_refused", "1 when the last reload was refused")
            ok.add_metric([], 1 if reload.get("state") == "refused" else 0)
            yield ok

    def _tree(self, children) -> Iterator:
        cpu = CounterMetricFamily("c8_tree_cpu_seconds", "CPU time of the sensor's processes")
        mem = GaugeMetricFamily("c8_tree_memory_bytes", "memory of the sensor's processes "
                                "(the cgroup's usage when resource limits are on, else the sum of RSS)")
        if self.cgroup is not None:
            try:
                m = self.cgroup.metrics()
            except (OSError, ValueError) as exc:
                log.warning("cgroup metrics unavailable: %s", exc)
                return
            cpu.add_metric([], m.get("cpu_usage_ns", 0) / 1e9)
            mem.add_metric([], m.get("memory_usage_bytes", 0))
            thr = CounterMetricFamily("c8_tree_cpu_throttled_seconds", "time the cgroup's CPU quota throttled it")
            thr.add_metric([], m.get("throttled_ns", 0) / 1e9)
            oom = CounterMetricFamily("c8_tree_oom_kills", "OOM kills in the sensor's cgroup")
            oom.add_metric([], m.get("oom_kill", 0))
            yield from (cpu, mem, thr, oom)
            return
        pids = [os.getpid()] + [int(c["pid"]) for c in children if c.get("pid")]
        used, rss = proc_usage(pids)
        cpu.add_metric([], used)
        mem.add_metric([], rss)
        yield from (cpu, mem)

    def _broker(self, st: dict) -> Iterator:
        rec = CounterMetricFamily("c8_events_received", "events collected, by CPU and source",
                                  labels=["cpu", "source"])
        clost = CounterMetricFamily("c8_collector_lost", "records a collector lost, by CPU", labels=["cpu"])
        seen = GaugeMetricFamily("c8_collector_seen_seconds", "seconds since the collector's last stats",
                                 labels=["cpu"])
        for cpu, c in sorted((st.get("collectors") or {}).items()):
            for source, n in sorted((c.get("received") or {}).items()):
                rec.add_metric([str(cpu), str(source)], _num(n))
            clost.add_metric([str(cpu)], _num(c.get("lost")))
            seen.add_metric([str(cpu)], _num(c.get("seen_ago")))
        yield from (rec, clost, seen)
        counts = st.get("counts") or {}
        lost = CounterMetricFamily("c8_events_lost", "events lost before any subscriber, by source",
                                   labels=["source"])
        for key, n in sorted(counts.items()):
            if key.startswith("lost_"):
                lost.add_metric([key[5:]], _num(n))
        yield lost
        for key, help_ in (("received", "events the broker received"),
                           ("published", "events the broker sent to subscribers"),
                           ("late", "events released after the merge gave up waiting")):
            f = CounterMetricFamily(f"c8_broker_events_{key}", help_)
            f.add_metric([], _num(counts.get(key)))
            yield f
        sent = CounterMetricFamily("c8_subscription_events_sent", "events sent, per subscription",
                                   labels=["subscription"])
        slost = CounterMetricFamily("c8_subscription_events_lost", "events lost, per subscription and cause",
                                    labels=["subscription", "source"])
        for s in st.get("subscriptions") or []:
            sid = str(s.get("subscription"))
            sent.add_metric([sid], _num(s.get("sent")))
            for source, n in sorted((s.get("lost") or {}).items()):
                slost.add_metric([sid, str(source)], _num(n))
        yield from (sent, slost)
        lim = st.get("limiter") or {}
        dormant = GaugeMetricFamily("c8_limiter_dormant", "1 while the event limiter holds collection dormant")
        dormant.add_metric([], 1 if st.get("dormant") else 0)
        trips = CounterMetricFamily("c8_limiter_trips", "event limiter trips")
        trips.add_metric([], _num(lim.get("trips")))
        yield from (dormant, trips)

    def _detector(self, det: dict) -> Iterator:
        by_rule = CounterMetricFamily("c8_alerts", "alerts raised, by rule", labels=["rule"])
        for rule, n in sorted((det.get("alerts_by_rule") or {}).items()):
            by_rule.add_metric([str(rule)], _num(n))
        yield by_rule
        sent = CounterMetricFamily("c8_alert_output_alerts", "alerts passed to each output", labels=["output"])
        supp = CounterMetricFamily("c8_alert_output_suppressed",
                                   "alerts the output's alert limiter suppressed", labels=["output"])
        other = CounterMetricFamily("c8_alert_output_events", "an output's own counts (delivered, dropped, "
                                    "failed, ...)", labels=["output", "outcome"])
        for name, s in sorted((det.get("outputs") or {}).items()):
            sent.add_metric([name], _num(s.get("alerts")))
            supp.add_metric([name], _num(s.get("suppressed")))
            for k, v in sorted(s.items()):
                if k not in ("alerts", "suppressed") and isinstance(v, int | float) and not isinstance(v, bool):
                    other.add_metric([name, k], v)
        yield from (sent, supp, other)


class _Handler(BaseHTTPRequestHandler):
    server_version = "c8-metrics"
    sensor: SensorCollector
    registry: CollectorRegistry

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            children, _, _ = self.sensor.snapshot.read()
            broker, err = self.sensor.broker_status()
            reasons = health(children, broker, err)
            body = ("ok\n" if not reasons else "".join(r + "\n" for r in reasons)).encode()
            self._send(503 if reasons else 200, body, "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: /metrics and /healthz only\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args) -> None:  # scrapes every few seconds: debug only
        log.debug("%s %s", self.address_string(), fmt % args)


class MetricsServer:
    """The HTTP listener on metrics.listen, serving from daemon threads."""

    def __init__(self, listen: str, run_dir: str, snapshot: Snapshot, cgroup=None):
        self.listen = listen
        self.sensor = SensorCollector(run_dir, snapshot, cgroup)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.sensor)
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        family, host, port = parse_listen(self.listen)
        handler = type("Handler", (_Handler,), {"sensor": self.sensor, "registry": self.registry})
        server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family,
                                                             "daemon_threads": True})
        try:
            self.httpd = server_cls((host, port), handler)
        except OSError as exc:
            raise MetricsError(f"metrics.listen {self.listen}: {exc.strerror or exc}") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http",
                                       daemon=True)
        self.thread.start()
        log.info("serving /metrics and /healthz on %s", self.listen)
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        self.sensor.broker.close()
