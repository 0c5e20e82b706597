"""c8-detector: the detections process (supervisor -> broker -> *detector*).

An ordinary client of the broker: it loads the rules, subscribes to what they
need, evaluates every batch, and sends each alert through every configured
output (each behind its own alert limiter). It follows the event limiter:
on TRIPPED it empties its caches and goes dormant, on RESUMED it evaluates
again. When the broker goes away (no message, not even a tick, for
BROKER_SILENCE_S) or ends the subscription, it subscribes again, with backoff.

Reload (SIGHUP from the supervisor, docs/operations.md): the supervisor writes
the accepted configuration to run_dir/reload.json; the detector loads its rule
files and outputs from it, all or nothing. Unchanged outputs keep their alert
limiters (counts, period); a changed subscription spec is subscribed before
the old one is closed, and events the old one already delivered are skipped
by sequence number. The verdict goes to run_dir/detector.json with the alert
counts (by rule, by output, suppressed), which the supervisor and the metrics
read.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

from c8 import schema
from c8.detections.engine import Engine
from c8.detections.fold import Folder
from c8.detections.outputs import build_output, build_outputs
from c8.detections.rules import default_rules_path, load_rules
from c8.protocol import files, paths

log = logging.getLogger("c8.detections")

BROKER_SILENCE_S = 5.0      # the broker ticks every second
POLL_S = 1.0                # how often the loop looks at the stop flag
SILENCE_POLL_S = 2.0        # no message at all this long: a second of silence counted
MAX_BACKOFF_S = 30.0
MAX_RELOAD_BYTES = 1 << 20
SWITCH_DRAIN_S = 2.0             # how long the old subscription is read after the new one runs


class ReloadRefused(Exception):
    """A new configuration or rule set the detector will not run; the old one stays."""


def fold_period(config: dict) -> float:
    """detections.fold_period in seconds (0: no folding; absent from a partial config: 0)."""
    from c8.detections.limiter import parse_duration

    return float(parse_duration((config.get("detections") or {}).get("fold_period") or 0))


def rule_paths(config: dict) -> list[str]:
    """detections.rules from the config, else the packaged default rules."""
    paths = (config.get("detections") or {}).get("rules")
    return list(paths) if paths else [default_rules_path()]


class Detector:
    """Rules, outputs and the dormancy state; ``handle`` takes one batch.

    ``client_factory(run_dir=...)`` makes the broker client (the real
    c8.clients.client.Client unless a test supplies another source).
    """

    def __init__(self, config: dict, client_factory=None):
        self.config = config
        paths = rule_paths(config)
        # a configured directory that does not exist (e.g. /etc/capsule8/rules) is no error
        existing = [p for p in paths if os.path.exists(p)]
        rules, errors = load_rules(existing)
        for err in errors:
            log.error("rule not loaded: %s", err)
        self.engine = Engine(rules)
        self.folder = Folder(fold_period(config))
        log.info("%d rules enabled of %d loaded (%d errors) from %s",
                 len(self.engine.rules), len(rules), len(errors), ", ".join(existing))
        self.outputs = build_outputs(config)
        # the entry each output was built from: an unchanged entry keeps its limiter on reload
        self.output_entries = [json.dumps(e, sort_keys=True, default=str) for e in _entries(config)
                               if isinstance(e, dict) and e.get("enabled", True)]
        self.dormant = False
        self.alerts = 0
        self.alerts_by_rule: dict[str, int] = {}
        self.reload_requested = threading.Event()
        self.reload_state: dict = {"generation": 0, "state": "none"}
        self.skip_through = -1  # sequence numbers already evaluated through the previous subscription
        self.stats_lock = threading.Lock()  # outputs swap while the ticker thread reads them
        if client_factory is None:
            from c8.clients.client import Client as client_factory
        self.client_factory = client_factory

    # -- one batch -----------------------------------------------------------------
    def handle(self, category: str, batch: np.ndarray, containers: dict) -> int:
        """Evaluate one batch (or act on limiter events); returns alerts sent."""
        if category == "limiter":
            self._on_limiter(batch)
            return self.send(self.folder.drain())
        if self.dormant or category == "lost" or not len(batch):
            return 0
        if self.skip_through >= 0 and "sensor_sequence_number" in batch.dtype.names:
            batch = batch[batch["sensor_sequence_number"] > self.skip_through]
            if not len(batch):
                return 0
        try:
            alerts = self.engine.evaluate(category, batch, containers)
        except Exception:  # a batch the rules cannot read must not stop the detector
            log.exception("evaluating a %s batch of %d events failed", category, len(batch))
            return 0
        if "sensor_monotime_nanos" in batch.dtype.names:
            self.folder.observe(int(batch["sensor_monotime_nanos"].max()))
        return self.send(self.folder.add(alerts))

    def send_due(self) -> int:
        """Send the folded alerts whose period is over (called between windows)."""
        return self.send(self.folder.due())

    def send(self, alerts: list) -> int:
        """Send alerts (folded or not) through every output; returns how many."""
        for alert in alerts:
            self.alerts_by_rule[alert.rule] = self.alerts_by_rule.get(alert.rule, 0) + 1
            for out in self.outputs:
                try:
                    out.send(alert)
                except Exception:  # one failing output must not silence the others
                    log.exception("output %s failed", out.name)
        self.alerts += len(alerts)
        return len(alerts)

    # -- reload ----------------------------------------------------------------------------
    def prepare_reload(self, config: dict) -> tuple[Engine, list, list[str]]:
        """The engine and outputs of ``config``; raises ReloadRefused naming every problem.

        Any rule error refuses the whole set (unlike start-up, which loads the good
        rules): a reload must never silently run fewer rules than the operator wrote.
        """
        existing = [p for p in rule_paths(config) if os.path.exists(p)]
        rules, errors = load_rules(existing)
        if errors:
            raise ReloadRefused("; ".join(str(e) for e in errors[:10])
                                + (f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""))
        try:
            engine = Engine(rules)
        except Exception as exc:  # a rule the compiler refuses
            raise ReloadRefused(f"rules: {exc}") from None
        keys, outputs, built = [], [], []
        try:
            for i, entry in enumerate(_entries(config)):
                key = json.dumps(entry, sort_keys=True, default=str)
                if isinstance(entry, dict) and not entry.get("enabled", True):
                    build_output(entry, i)  # still validated
                    continue
                if key in self.output_entries and key not in keys:
                    out = self.outputs[self.output_entries.index(key)]
                else:
                    out = build_output(entry, i)
                    built.append(out)
                keys.append(key)
                outputs.append(out)
        except Exception as exc:  # OutputConfigError, or a file that cannot be opened
            for out in built:
                _close(out)
            raise ReloadRefused(str(exc)) from None
        return engine, outputs, keys

    def apply_reload(self, config: dict, engine: Engine, outputs: list, keys: list[str]) -> None:
        """Swap in what prepare_reload made; outputs no longer configured are closed."""
        with self.stats_lock:
            old = [o for o in self.outputs if not any(o is n for n in outputs)]
            self.config, self.engine, self.outputs, self.output_entries = config, engine, outputs, keys
        for out in old:
            _close(out)
        log.info("reloaded: %d rules enabled, %d outputs", len(engine.rules), len(outputs))

    def read_reload(self) -> tuple[int, dict]:
        """(generation, config) from run_dir/reload.json."""
        path = paths.detector_reload(self.config.get("run_dir") or "")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                raw = f.read(MAX_RELOAD_BYTES + 1)
            data = json.loads(raw) if len(raw) <= MAX_RELOAD_BYTES else None
            return int(data["generation"]), dict(data["config"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ReloadRefused(f"cannot read {path}: {exc}") from None

    def reload(self) -> Engine | None:
        """Act on a SIGHUP; returns the new engine when it was accepted."""
        generation = self.reload_state.get("generation", 0)
        try:
            generation, config = self.read_reload()
            engine, outputs, keys = self.prepare_reload(config)
        except ReloadRefused as exc:
            log.error("reload %d refused, the previous rules and outputs keep running: %s",
                      generation, exc)
            self.reload_state = {"generation": generation, "state": "refused", "error": str(exc),
                                 "time": time.time()}
            self.write_stats()
            return None
        self.apply_reload(config, engine, outputs, keys)
        self.reload_state = {"generation": generation, "state": "accepted", "time": time.time(),
                             "rules": len(engine.rules)}
        self.write_stats()
        return engine

    def stats(self) -> dict:
        """What detector.json holds: alerts by rule and by output, the last reload."""
        with self.stats_lock:
            outputs = {f"{i}:{o.name}": o.stats() for i, o in enumerate(self.outputs)}
        return {"pid": os.getpid(), "alerts": self.alerts, "alerts_by_rule": dict(self.alerts_by_rule),
                "outputs": outputs, "dormant": self.dormant, "rules": len(self.engine.rules),
                "reload": self.reload_state, "rule_table": self.rule_table()}

    def rule_table(self) -> list[dict]:
        """Every loaded rule with its files, matching events and alerts sent (c8ctl rules list)."""
        engine = self.engine
        return [{"rule": r.name, "priority": r.priority, "enabled": r.enabled and r.node is not None,
                 "files": list(r.files), "matches": engine.matches.get(r.name, 0),
                 "alerts": self.alerts_by_rule.get(r.name, 0)} for r in engine.loaded]

    def write_stats(self) -> None:
        run_dir = self.config.get("run_dir")
        if not run_dir:
            return
        try:
            files.write_atomic(paths.detector_stats(run_dir),
                               json.dumps(self.stats(), default=str).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", paths.detector_stats(run_dir), exc)

    def _on_limiter(self, batch: np.ndarray) -> None:
        for kind, dormancy, trips in zip(batch["kind"].tolist(), batch["dormancy_nanos"].tolist(),
                                         batch["trips"].tolist(), strict=True):
            name = schema.kind_name("limiter", kind)
            if name == "TRIPPED":
                self.engine.flush()
                self.dormant = True
                log.warning("event limiter tripped (trip %d): caches flushed, detections dormant "
                            "for %.0fs", trips, dormancy / 1e9)
            elif name == "RESUMED":
                self.dormant = False
                log.warning("event limiter: collection resumed, detections active")
            elif name == "EXITING":
                log.error("event limiter: retries spent, the sensor is stopping")

    def tick(self) -> None:
        """Let every alert limiter roll its period (emitting suppression summaries)."""
        with self.stats_lock:
            outputs = list(self.outputs)
        for out in outputs:
            out.tick()
        self.write_stats()

    def close(self) -> None:
        self.send(self.folder.drain())  # folds still open go out before the outputs close
        for out in self.outputs:
            try:
                out.close()
            except Exception:
                log.exception("closing output %s", out.name)

    # -- the subscription loop -----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Subscribe and evaluate until ``stop`` is set, resubscribing as needed."""
        backoff = 1.0
        while not stop.is_set():
            if self.reload_requested.is_set():  # no subscription to keep: just swap
                self.reload_requested.clear()
                self.reload()
            spec = self.engine.subscription_spec()
            try:
                client = self.client_factory(run_dir=self.config.get("run_dir"))
                sub = client.subscribe(spec)
            except Exception as exc:  # broker down or restarting: try again later
                log.warning("cannot subscribe to the broker (%s); retrying in %.0fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            self.skip_through = -1
            log.info("subscribed to the broker")
            holder = [sub]
            try:
                reason = self._consume(holder, stop)
            finally:
                holder[0].close()
            if not stop.is_set():
                log.warning("subscription ended (%s); subscribing again", reason)

    def _switch(self, holder: list, spec: dict) -> None:
        """Make before break: subscribe ``spec``, read what the old subscription
        already holds (bounded), close it, and skip in the new one every event
        the old one delivered (sensor sequence numbers are global and gap-free)."""
        old = holder[0]
        client = self.client_factory(run_dir=self.config.get("run_dir"))
        new = client.subscribe(spec)
        last = -1
        deadline = time.monotonic() + SWITCH_DRAIN_S
        for window in old.windows(timeout=SWITCH_DRAIN_S, idle=SWITCH_DRAIN_S / 2):
            for category, batch, containers in window:
                if len(batch) and "sensor_sequence_number" in batch.dtype.names:
                    last = max(last, int(batch["sensor_sequence_number"].max()))
                self.handle(category, batch, containers)
            if time.monotonic() > deadline:
                break
        old.close()
        holder[0] = new
        self.skip_through = last
        log.info("subscription switched for the reloaded rules (old one read through sequence %d)",
                 last)

    def _consume(self, holder: list, stop: threading.Event) -> str:
        quiet = 0.0
        while not stop.is_set():
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                before = self.engine.subscription_spec()
                engine = self.reload()
                if engine is not None and engine.subscription_spec() != before:
                    try:
                        self._switch(holder, engine.subscription_spec())
                    except Exception as exc:  # the broker refused or is away: start over
                        return f"cannot subscribe for the reloaded rules: {exc}"
            sub = holder[0]
            last = time.monotonic()
            # Whole windows: leaving between two of them loses nothing. The iteration
            # ends on a tick after POLL_S without events (to look at the flags), or
            # after SILENCE_POLL_S without any message: a return that long after the
            # last window counts as silence (under the client library's own
            # BROKER_SILENCE, so it never subscribes again on the same socket)
            for window in _windows(sub):
                last = time.monotonic()
                quiet = 0.0
                for category, batch, containers in window:
                    self.handle(category, batch, containers)
                self.send_due()
                if stop.is_set() or self.reload_requested.is_set():
                    break
            self.send_due()
            if getattr(sub, "ended", None):
                return f"ended by the broker: {sub.ended}"
            waited = time.monotonic() - last
            quiet = quiet + waited if waited >= SILENCE_POLL_S else 0.0
            if quiet >= BROKER_SILENCE_S:
                return f"no message from the broker for {BROKER_SILENCE_S:.0f}s"
        return "stopping"


def _windows(sub):
    """Windows of a subscription; a source offering only batches (a replay) gives
    each batch as a window of its own."""
    if hasattr(sub, "windows"):
        return sub.windows(timeout=SILENCE_POLL_S, idle=POLL_S)
    return ([b] for b in sub.batches(timeout=SILENCE_POLL_S))


def _entries(config: dict) -> list:
    entries = (config.get("alert_output") or {}).get("outputs")
    return [{"type": "stdout"}] if entries is None else list(entries)


def _close(out) -> None:
    try:
        out.close()
    except Exception:
        log.exception("closing output %s", out.name)


def _ticker(detector: Detector, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            detector.tick()
        except Exception:
            log.exception("alert limiter tick")


def run(config: dict) -> None:
    """Entry point of the c8-detector child (``c8.detections.main:run``)."""
    from setproctitle import setproctitle

    setproctitle("c8-detector")
    level = str(config.get("log_level") or "info").upper()
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s c8-detector %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):  # only queue: the loop acts within POLL_S
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP: the supervisor accepted a new configuration (run_dir/reload.json); caught
    # before the rules load, so an early one queues instead of ending the process
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
    detector = Detector(config)
    detector.reload_requested = reload_requested
    detector.write_stats()
    ticker = threading.Thread(target=_ticker, args=(detector, stop), name="alert-limiter-tick",
                              daemon=True)
    ticker.start()
    try:
        detector.run(stop)
    finally:
        stop.set()
        detector.close()
        log.info("stopped after %d alerts", detector.alerts)
