"""The supervisor's life: prepare the host, run the children, clean up on the way out.

Signal handlers only queue the signal; the main loop reaps, restarts, writes
supervisor.json and logs metrics. SIGTERM/SIGINT stop the tree; a child that
exits with EXIT_LIMITER, or goes FATAL, stops the tree with exit status 1.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import select
import signal
import time

from setproctitle import setproctitle

from c8.supervisor import cleanup, privileges, rundir, status
from c8.supervisor.cgroups import CgroupError, SensorCgroup
from c8.supervisor.children import EXIT_LIMITER, Children, ChildSpec, ProcessOS, State
from c8.supervisor.config import Config
from c8.supervisor.spawn import ForkOS

log = logging.getLogger("c8.supervisor")

ENTRY_POINTS = {
    "broker": "c8.broker.main:run",
    "collector": "c8.collectors.main:run",
    "detector": "c8.detections.main:run",
}
# Test-only hook: a JSON map overriding ENTRY_POINTS by role, e.g.
# {"broker": "test_supervisor:sleeper"}. Read only from the environment, never
# from the configuration file, so a deployed sensor cannot be pointed at other code.
TEST_ENTRY_POINTS_ENV = "C8_SUPERVISOR_TEST_ENTRY_POINTS"
STOP_TIMEOUT = 5.0
LOOP_INTERVAL = 0.2


class StartupError(Exception):
    """The host cannot be prepared; the message says what and why."""


def online_cpus(text: str | None = None) -> list[int]:
    """CPU numbers from /sys/devices/system/cpu/online ('0-3,5')."""
    if text is None:
        try:
            with open("/sys/devices/system/cpu/online") as f:
                text = f.read()
        except OSError:
            return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def entry_points(environ=os.environ) -> dict[str, str]:
    """ENTRY_POINTS with the test-only overrides applied."""
    eps = dict(ENTRY_POINTS)
    raw = environ.get(TEST_ENTRY_POINTS_ENV)
    if raw:
        override = json.loads(raw)
        unknown = set(override) - set(eps)
        if unknown:
            raise StartupError(f"{TEST_ENTRY_POINTS_ENV}: unknown roles {sorted(unknown)}")
        eps.update(override)
    return eps


def child_specs(cfg: Config, cpus: list[int], eps: dict[str, str]) -> list[ChildSpec]:
    """The tree: broker, one collector per online CPU, the detector when enabled.

    Collector cpu0 owns the eBPF programs and probes (its own role); the broker
    and the collectors heartbeat from their main loops."""
    specs = [ChildSpec("c8-broker", eps["broker"], role="broker", heartbeat=True)]
    specs += [ChildSpec(f"c8-collector cpu{n}", eps["collector"], (n,),
                        role="collector0" if n == 0 else "collector", heartbeat=True)
              for n in cpus]
    if cfg.detections.enabled:
        specs.append(ChildSpec("c8-detector", eps["detector"], role="detector"))
    return specs


class Supervisor:
    """One run of the supervisor for a loaded Config."""

    def __init__(self, cfg: Config, osx: ProcessOS | None = None):
        self.cfg = cfg
        self.osx = osx
        self.cgroup: SensorCgroup | None = None
        self.children: Children | None = None
        self.tracefs: str | None = None
        self.status_path = os.path.join(cfg.run_dir, "supervisor.json")
        self.gid: int | None = None  # sensor_user's group: may read supervisor.json
        self._signals: list[int] = []
        self._wake_r = self._wake_w = -1
        self._last_status: list[dict] | None = None
        self.started = time.time()

    # -- start-up
    def prepare(self) -> tuple[int, int]:
        """Everything before the first fork; returns sensor_user's (uid, gid)."""
        cfg = self.cfg
        if os.geteuid() != 0:
            raise StartupError("c8-supervisor must run as root")
        try:
            uid, gid = privileges.ensure_user(cfg.sensor_user)
        except privileges.PrivilegeError as e:
            raise StartupError(str(e)) from None
        try:
            rundir.prepare(cfg.run_dir, uid, gid)
        except rundir.UnsafeRunDir as e:
            raise StartupError(str(e)) from None
        self.gid = gid
        written = [cfg.sensor_id_file]
        if cfg.detections.enabled:
            written += [o["path"] for o in cfg.alert_output.outputs
                        if o.get("type") == "file" and o.get("enabled", True) and o.get("path")]
        for d in rundir.make_missing_dirs(written, uid, gid):
            log.info("made %s for the children's files (%s, 0750)", d, cfg.sensor_user)
        other = status.running_supervisor(self.status_path)
        if other:
            raise StartupError(f"another c8-supervisor (pid {other}) uses {cfg.run_dir}")
        removed = cleanup.remove_files(cfg.run_dir, cleanup.SOCKETS + ("supervisor.json",))
        if removed:
            log.info("removed stale files: %s", ", ".join(removed))
        self.tracefs = cleanup.ensure_tracefs()
        cleanup.remove_probes(self.tracefs)  # left by a sensor that died
        if cfg.resource_limits_active:
            try:
                self.cgroup = SensorCgroup(cfg.cpu_limit, cfg.memory_limit)
                if any(os.path.isdir(d) for d in self.cgroup.dirs()):
                    self.cgroup.remove()  # stale, from a supervisor that died
                self.cgroup.create()
            except (CgroupError, OSError) as e:
                raise StartupError(f"cgroup {self.cgroup.name if self.cgroup else ''}: {e}") \
                    from None
        elif cfg.use_resource_limits:
            log.warning("use_resource_limits is set but use_supervisor is false: no cgroup")
        return uid, gid

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signals.append(signum)  # only queue: the loop acts

    # -- status
    def write_status(self, force: bool = False) -> None:
        """supervisor.json, when anything in it changed."""
        children = self.children.status() if self.children else []
        if not force and children == self._last_status:
            return
        self._last_status = children
        sup = {"pid": os.getpid(),
               "started": datetime.datetime.fromtimestamp(self.started, datetime.UTC).isoformat(),
               "started_unix": self.started,
               "config": self.cfg.config_path,
               "cgroup": self.cgroup.name if self.cgroup else None}
        try:
            status.write(self.status_path, sup, children, self.gid)
        except OSError as e:  # e.g. a directory planted at its name: keep supervising
            log.warning("cannot write %s: %s", self.status_path, e)

    def log_metrics(self) -> None:
        if self.cgroup is None:
            return
        try:
            m = self.cgroup.metrics()
        except (OSError, ValueError) as e:
            log.warning("cgroup metrics unavailable: %s", e)
            return
        log.info("cgroup %s metrics: %s", self.cgroup.name,
                 " ".join(f"{k}={v}" for k, v in m.items()))

    # -- the loop
    def run(self) -> int:
        """Prepare, start the tree, supervise until told to stop; the exit status."""
        uid, gid = self.prepare()
        rc = 0
        try:
            setproctitle("c8-supervisor")
            self._install_signals()
            eps = entry_points()
            osx = self.osx or ForkOS(self.cfg.as_dict(), uid, gid, self.cgroup)
            self.children = Children(child_specs(self.cfg, online_cpus(), eps), osx,
                                     self.cfg.heartbeat_timeout)
            log.info("starting %d children as %s (uid %d, gid %d)%s",
                     len(self.children.children), self.cfg.sensor_user, uid, gid,
                     f" in cgroup {self.cgroup.name}" if self.cgroup else "")
            self.children.start_all()
            self.write_status(force=True)
            rc = self._loop()
        finally:
            self.shutdown()
        return rc

    def _loop(self) -> int:
        metrics_every = self.cfg.cgroup_metrics_interval
        next_metrics = time.monotonic() + metrics_every
        assert self.children is not None
        while True:
            try:
                select.select([self._wake_r], [], [], LOOP_INTERVAL)
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            signals, self._signals = self._signals, []
            for sig in signals:
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: stopping", signal.Signals(sig).name)
                    return 0
            self.children.reap()
            failed = self.children.failed()
            if failed is not None:
                if failed.state is State.EXITED:
                    log.error("%s exited with status %d (event limiter gave up): stopping the "
                              "sensor", failed.name, EXIT_LIMITER)
                else:
                    log.error("%s is FATAL (%s): stopping the sensor", failed.name,
                              failed.last_exit_reason)
                self.write_status()
                return 1
            self.children.tick()
            self.write_status()
            if self.cfg.log_cgroup_metrics and time.monotonic() >= next_metrics:
                self.log_metrics()
                next_metrics = time.monotonic() + metrics_every

    def shutdown(self) -> None:
        """Stop the children, then remove probes, cgroup, sockets and supervisor.json."""
        if self.children is not None:
            self.children.stop_all(STOP_TIMEOUT)
        cleanup.remove_probes(self.tracefs)
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except CgroupError as e:
                log.error("%s", e)
        cleanup.remove_files(self.cfg.run_dir, cleanup.SOCKETS + ("supervisor.json",))
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        log.info("stopped")
