"""c8-detector: the detections process (supervisor -> broker -> *detector*).

An ordinary client of the broker: it loads the rules, subscribes to what they
need, evaluates every batch, and sends each alert through every configured
output (each behind its own alert limiter). It follows the event limiter:
on TRIPPED it empties its caches and goes dormant, on RESUMED it evaluates
again. When the broker goes away (no message, not even a tick, for
BROKER_SILENCE_S) or ends the subscription, it subscribes again, with backoff.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import numpy as np

from c8 import schema
from c8.detections.engine import Engine
from c8.detections.outputs import build_outputs
from c8.detections.rules import default_rules_path, load_rules

log = logging.getLogger("c8.detections")

BROKER_SILENCE_S = 5.0      # the broker ticks every second
POLL_S = 1.0                # how often the loop looks at the stop flag
MAX_BACKOFF_S = 30.0


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
        log.info("%d rules enabled of %d loaded (%d errors) from %s",
                 len(self.engine.rules), len(rules), len(errors), ", ".join(existing))
        self.outputs = build_outputs(config)
        self.dormant = False
        self.alerts = 0
        if client_factory is None:
            from c8.clients.client import Client as client_factory
        self.client_factory = client_factory

    # -- one batch -----------------------------------------------------------------
    def handle(self, category: str, batch: np.ndarray, containers: dict) -> int:
        """Evaluate one batch (or act on limiter events); returns alerts sent."""
        if category == "limiter":
            self._on_limiter(batch)
            return 0
        if self.dormant or category == "lost" or not len(batch):
            return 0
        try:
            alerts = self.engine.evaluate(category, batch, containers)
        except Exception:  # a batch the rules cannot read must not stop the detector
            log.exception("evaluating a %s batch of %d events failed", category, len(batch))
            return 0
        for alert in alerts:
            for out in self.outputs:
                try:
                    out.send(alert)
                except Exception:  # one failing output must not silence the others
                    log.exception("output %s failed", out.name)
        self.alerts += len(alerts)
        return len(alerts)

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
        for out in self.outputs:
            out.tick()

    def close(self) -> None:
        for out in self.outputs:
            try:
                out.close()
            except Exception:
                log.exception("closing output %s", out.name)

    # -- the subscription loop -----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Subscribe and evaluate until ``stop`` is set, resubscribing as needed."""
        backoff = 1.0
        spec = self.engine.subscription_spec()
        while not stop.is_set():
            try:
                client = self.client_factory(run_dir=self.config.get("run_dir"))
                sub = client.subscribe(spec)
            except Exception as exc:  # broker down or restarting: try again later
                log.warning("cannot subscribe to the broker (%s); retrying in %.0fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            log.info("subscribed to the broker")
            try:
                reason = self._consume(sub, stop)
            finally:
                sub.close()
            if not stop.is_set():
                log.warning("subscription ended (%s); subscribing again", reason)

    def _consume(self, sub, stop: threading.Event) -> str:
        quiet = 0.0
        while not stop.is_set():
            got = False
            for category, batch, containers in sub.batches(timeout=POLL_S):
                got = True
                self.handle(category, batch, containers)
                if stop.is_set():
                    break
            if getattr(sub, "ended", None):
                return f"ended by the broker: {sub.ended}"
            # batches() returns after POLL_S without any message, ticks included
            quiet = 0.0 if got else quiet + POLL_S
            if quiet >= BROKER_SILENCE_S:
                return f"no message from the broker for {BROKER_SILENCE_S:.0f}s"
        return "stopping"


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
    detector = Detector(config)
    ticker = threading.Thread(target=_ticker, args=(detector, stop), name="alert-limiter-tick",
                              daemon=True)
    ticker.start()
    try:
        detector.run(stop)
    finally:
        stop.set()
        detector.close()
        log.info("stopped after %d alerts", detector.alerts)
