"""The supervisor's life: prepare the host, run the children, clean up on the way out.

Signal handlers only queue the signal; the main loop reaps, restarts, writes
supervisor.json and logs metrics. SIGTERM/SIGINT stop the tree; a child that
exits with EXIT_LIMITER, or goes FATAL, stops the tree with exit status 1.
SIGHUP reloads the configuration and the rule files (c8.supervisor.reload,
docs/operations.md); metrics.listen serves /metrics and /healthz
(c8.supervisor.metrics).
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

from c8.protocol import files, paths
from c8.protocol.cpus import collector_name, groups, online_cpus
from c8.supervisor import cleanup, config, privileges, rundir, status
from c8.supervisor import reload as reloading
from c8.supervisor.cgroups import CgroupError, SensorCgroup
from c8.supervisor.children import EXIT_LIMITER, Children, ChildSpec, ProcessOS, State
from c8.supervisor.config import Config
from c8.supervisor.spawn import ForkOS

log = logging.getLogger("c8.supervisor")

ENTRY_POINTS = {
    "broker": "c8.broker.main:run",
    "collector": "c8.collectors.main:run",
    "detector": "c8.detections.main:run",
    "exporter": "c8.export.main:run",
}
# Test-only hook: a JSON map overriding ENTRY_POINTS by role, e.g.
# {"broker": "test_supervisor:sleeper"}. Read only from the environment, never
# from the configuration file, so a deployed sensor cannot be pointed at other code.
TEST_ENTRY_POINTS_ENV = "C8_SUPERVISOR_TEST_ENTRY_POINTS"
STOP_TIMEOUT = 5.0
LOOP_INTERVAL = 0.2
RELOAD_TIMEOUT = 15.0  # the detector answers a reload within this (rules load in seconds)
# Files of one run (besides the sockets): removed at start, so a stale accepted config
# or reload verdict never applies to a new tree, and at the end.
RUN_FILES = ("supervisor.json", "config.json", "reload.json", "detector.json", "export.json")


class StartupError(Exception):
    """The host cannot be prepared; the message says what and why."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


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
    """The tree: broker, one collector per online CPU (at most ``max_collectors``:
    then each reads several, c8.protocol.cpus), the detector when enabled.

    The collector of cpu0 owns the eBPF programs and probes (its own role); the
    broker and the collectors heartbeat from their main loops."""
    specs = [ChildSpec("c8-broker", eps["broker"], role="broker", heartbeat=True)]
    specs += [ChildSpec(collector_name(group), eps["collector"], (group[0] if len(group) == 1 else tuple(group),),
                        role="collector0" if 0 in group else "collector", heartbeat=True)
              for group in groups(cpus, cfg.max_collectors)]
    if cfg.detections.enabled:
        specs.append(ChildSpec("c8-detector", eps["detector"], role="detector"))
    if cfg.export.enabled:
        specs.append(ChildSpec("c8-exporter", eps["exporter"], role="exporter"))
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
        self._last_status: tuple | None = None
        self.started = time.time()
        self.metrics = None  # c8.supervisor.metrics.MetricsServer when metrics.listen is set
        self.snapshot = None  # what the loop publishes for the metrics threads
        self.reload_status: dict | None = None  # the last reload, as supervisor.json shows it
        # (generation, plan, deadline, pid signalled or None) while the detector decides
        self._reload_pending: tuple[int, reloading.ReloadPlan, float, int | None] | None = None

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
            if cfg.alerts_file_output:  # detections.alerts_file (/var/log/capsule8/alerts.json)
                written.append(cfg.alerts_file_output["path"])
        if cfg.export.enabled:  # the spool, sensor_user's
            written.append(os.path.join(cfg.export.spool_dir, "cursor"))
        for d in rundir.make_missing_dirs(written, uid, gid):
            log.info("made %s for the children's files (%s, 0750)", d, cfg.sensor_user)
        other = status.running_supervisor(self.status_path)
        if other:
            raise StartupError(f"another c8-supervisor (pid {other}) uses {cfg.run_dir}")
        removed = cleanup.remove_files(cfg.run_dir, cleanup.SOCKETS + RUN_FILES)
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
        if self.snapshot is not None:
            self.snapshot.update(children, self.reload_status)
        if not force and (children, self.reload_status) == self._last_status:
            return
        self._last_status = (children, dict(self.reload_status) if self.reload_status else None)
        sup = {"pid": os.getpid(),
               "started": datetime.datetime.fromtimestamp(self.started, datetime.UTC).isoformat(),
               "started_unix": self.started,
               "config": self.cfg.config_path,
               "cgroup": self.cgroup.name if self.cgroup else None,
               "reload": self.reload_status}
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

    def start_metrics(self) -> None:
        """Serve /metrics and /healthz on metrics.listen (threads; see c8.supervisor.metrics)."""
        from c8.supervisor.metrics import MetricsError, MetricsServer, Snapshot

        self.snapshot = Snapshot()
        try:
            self.metrics = MetricsServer(self.cfg.metrics.listen, self.cfg.run_dir, self.snapshot,
                                         self.cgroup).start()
        except MetricsError as e:
            raise StartupError(str(e)) from None

    # -- reload
    def begin_reload(self) -> None:
        """SIGHUP: validate the configuration again and hand the live part to the
        children; a refusal leaves everything running as it was."""
        generation = (self.reload_status or {}).get("generation", 0) + 1
        if self._reload_pending is not None:
            log.warning("reload %d: reload %d is still waiting for the detector: superseded",
                        generation, self._reload_pending[0])
        self._reload_pending = None
        try:
            plan = reloading.plan_reload(self.cfg)
        except config.ConfigError as e:
            return self._end_reload(generation, "refused", error=f"configuration: {e}")
        if plan.restart_needed:
            log.warning("reload %d: %s changed but only a restart applies them (running values "
                        "kept)", generation, ", ".join(plan.restart_needed))
        self.reload_status = {"generation": generation, "state": "pending", "time": _now_iso(),
                              "changed": plan.changed, "restart_needed": plan.restart_needed}
        if self._detector() is None:  # none to ask (disabled, or restarting: it starts with the new)
            return self._commit_reload(generation, plan)
        new_files = [o["path"] for o in plan.merged.alert_output.outputs
                     if o.get("type") == "file" and o.get("enabled", True) and o.get("path")]
        try:
            uid = privileges.ensure_user(self.cfg.sensor_user)[0]
            rundir.make_missing_dirs(new_files, uid, self.gid)
            # the detector's alone (0600, sensor_user's): outputs carry webhook secrets,
            # and the sensor's group (who may run c8ctl status) must not read them
            path = paths.detector_reload(self.cfg.run_dir)
            files.write_atomic(path, json.dumps({"generation": generation,
                                                 "config": plan.merged.as_dict()}).encode(),
                               mode=0o600)
            os.chown(path, uid, -1, follow_symlinks=False)
        except (OSError, privileges.PrivilegeError) as e:
            return self._end_reload(generation, "refused", error=f"cannot hand it to the detector: {e}")
        self._reload_pending = (generation, plan, time.monotonic() + RELOAD_TIMEOUT, None)
        log.info("reload %d: configuration valid (live changes: %s); the detector loads the rules",
                 generation, ", ".join(plan.changed) or "none")
        self.poll_reload()

    def _detector(self):
        return next((c for c in (self.children.children if self.children else [])
                     if c.name == "c8-detector" and c.pid
                     and c.state in (State.STARTING, State.RUNNING)), None)

    def poll_reload(self) -> None:
        """Signal the detector once it is ready, then read its verdict on the
        pending reload (run_dir/detector.json)."""
        if self._reload_pending is None:
            return
        generation, plan, deadline, signalled = self._reload_pending
        stats = reloading.read_detector_stats(self.cfg.run_dir) or {}
        detector = self._detector()
        if detector is None or (signalled is not None and detector.pid != signalled):
            # it exited (or restarted) meanwhile: the next one starts with the new config
            self._reload_pending = None
            return self._commit_reload(generation, plan)
        if signalled is None:
            # SIGHUP only once it has said it handles it (its detector.json): before, the
            # signal's default action would end it
            if stats.get("pid") == detector.pid:
                os.kill(detector.pid, signal.SIGHUP)
                self._reload_pending = (generation, plan, deadline, detector.pid)
            elif time.monotonic() > deadline:
                self._reload_pending = None
                self._end_reload(generation, "refused", error="the detector did not start in time")
            return
        verdict = stats.get("reload") or {}
        if verdict.get("generation") == generation and verdict.get("state") == "accepted":
            self._reload_pending = None
            self._commit_reload(generation, plan, rules=verdict.get("rules"))
        elif verdict.get("generation") == generation:
            self._reload_pending = None
            self._end_reload(generation, "refused", error=f"rules or outputs: {verdict.get('error')}")
        elif time.monotonic() > deadline:
            self._reload_pending = None
            self._end_reload(generation, "refused", error=f"the detector did not answer within "
                                                          f"{RELOAD_TIMEOUT:.0f}s")

    def _commit_reload(self, generation: int, plan: reloading.ReloadPlan, rules=None) -> None:
        self._reload_pending = None
        try:  # the broker reads limits.* from it within a second
            files.write_atomic(paths.accepted_config(self.cfg.run_dir),
                               json.dumps({"limits": plan.merged.as_dict()["limits"]}).encode(),
                               gid=self.gid)
        except OSError as e:
            return self._end_reload(generation, "refused", error=f"cannot write config.json: {e}")
        self.cfg = plan.merged
        osx = self.children.os if self.children else None
        if osx is not None and hasattr(osx, "config"):  # children started from now on
            osx.config = plan.merged.as_dict()
        self._end_reload(generation, "accepted", rules=rules)

    def _end_reload(self, generation: int, state: str, **extra) -> None:
        prev = self.reload_status if (self.reload_status or {}).get("generation") == generation else {}
        self.reload_status = {"generation": generation, "state": state, "time": _now_iso(),
                              "changed": prev.get("changed", []),
                              "restart_needed": prev.get("restart_needed", []),
                              **{k: v for k, v in extra.items() if v is not None}}
        if state == "refused":
            log.error("reload %d refused, the running configuration and rules stay: %s", generation,
                      extra.get("error"))
        else:
            log.info("reload %d accepted%s", generation,
                     f" (restart needed for {', '.join(self.reload_status['restart_needed'])})"
                     if self.reload_status["restart_needed"] else "")
        self.write_status()

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
            if self.cfg.metrics.listen:
                self.start_metrics()
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
            if signal.SIGHUP in signals:
                log.info("SIGHUP: reloading the configuration and the rule files")
                self.begin_reload()
            self.poll_reload()
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
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.children is not None:
            self.children.stop_all(STOP_TIMEOUT)
        cleanup.remove_probes(self.tracefs)
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except CgroupError as e:
                log.error("%s", e)
        cleanup.remove_files(self.cfg.run_dir, cleanup.SOCKETS + RUN_FILES)
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        log.info("stopped")
