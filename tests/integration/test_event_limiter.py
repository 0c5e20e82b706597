"""The event limiter for real: an exec storm trips the breaker of a real sensor.

limiter: 50 events/s, duration 3s, windows of 1s, max_retries 1. The storm
(fork+exec+exit of /bin/true, several hundred events a second) keeps every
window over the rate, so:
  trip 1 -> TRIPPED (dormancy 3s): the plan is disabled, the collectors stop receiving;
  after 3s -> RESUMED: collection comes back;
  trip 2 (max_retries spent) -> EXITING: the broker exits 78, the supervisor
  stops the sensor with status 1 and does not restart it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from c8.detections.rules import default_rules_path
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

LIMITER = {"enabled": True, "events_per_second": 50, "duration": "3s", "group_request_duration": "1s",
           "max_retries": 1}


class Storm:
    """Execs /bin/true in a loop from a thread until stopped."""

    def __init__(self):
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            subprocess.run(["/bin/true"])
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def received(status: dict) -> int:
    """Samples the collectors have received so far (all CPUs, all sources)."""
    return sum(sum(c.get("received", {}).values()) for c in status["collectors"].values())


def top(text: str) -> list[tuple[str, int]]:
    """"1234:500,99:20" -> [("1234", 500), ("99", 20)], checking the format."""
    pairs = [item.rpartition(":") for item in text.split(",")]
    assert text and all(k and sep and n.isdigit() for k, sep, n in pairs), text
    counts = [int(n) for _, _, n in pairs]
    assert counts == sorted(counts, reverse=True) and len(pairs) <= 5, text
    return [(k, int(n)) for k, _, n in pairs]


def next_limiter_event(events, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    for ev in events:
        if ev["type"] == "limiter":
            return ev
        if time.monotonic() > deadline:
            break
    raise AssertionError("no limiter event")


def test_trip_dormancy_resume_then_exit(tmp_path):
    s = Sensor(tmp_path, limiter=LIMITER).start()
    try:
        # a filter nothing passes: the sources run (and count) but the subscriber only
        # hears the limiter, so a storm cannot crowd its notices out of its queue
        sub = s.client.subscribe({"events": {"process": {"filter": 'exec_filename == "/nonexistent"'}}})
        events = sub.events(timeout=60)
        st = s.status()
        assert st["plan"]["enabled"] and not st["dormant"]
        with Storm() as storm:
            tripped = next_limiter_event(events)
            assert (tripped["kind"], tripped["trips"], tripped["dormancy_nanos"]) == ("TRIPPED", 1, 3 * 10**9)
            # it names the flood's source: this process forks every /bin/true of the storm
            assert top(tripped["top_pids"])[0][0] == str(os.getpid()), tripped["top_pids"]
            assert top(tripped["top_pids"])[0][1] > LIMITER["events_per_second"], tripped["top_pids"]
            assert "0" in dict(top(tripped["top_uids"])), tripped["top_uids"]       # root's storm
            assert "host" in dict(top(tripped["top_containers"])), tripped["top_containers"]
            t_trip = time.monotonic()
            st = s.status()
            assert st["dormant"] and st["plan"]["enabled"] is False
            gen = st["plan"]["generation"]
            wait_for(lambda: all(c["generation"] >= gen for c in s.status()["collectors"].values()),
                     5, 0.05, "the collectors to apply the disabled plan")
            # records already in a ring are still drained: take the baseline a moment later
            wait_for(lambda: time.monotonic() - t_trip > 0.8, 2, 0.05, "the rings to drain")
            samples = []
            while (st := s.status())["dormant"]:
                samples.append(received(st))
                time.sleep(0.1)
            assert len(samples) >= 5, samples  # watched for at least 0.5s of dormancy
            assert len(set(samples)) == 1, f"collectors kept receiving while dormant: {samples}"
            assert storm.count > 0

            resumed = next_limiter_event(events)
            assert (resumed["kind"], resumed["trips"]) == ("RESUMED", 1)
            assert time.monotonic() - t_trip >= 2.5  # the dormancy lasted ~duration
            st = s.status()
            assert st["plan"]["enabled"] and not st["dormant"]
            wait_for(lambda: received(s.status()) > samples[-1], 10, 0.1, "collection to resume")

            exiting = next_limiter_event(events)
            assert (exiting["kind"], exiting["trips"]) == ("EXITING", 2)
        assert s.proc.wait(30) == 1
    finally:
        s.stop()
    log = s.output()
    assert "event limiter tripped: collection dormant for 3s (top pids " in log
    assert "event limiter: collection resumes" in log
    assert "event limiter tripped after max_retries dormancies: the sensor exits" in log
    assert "not restarting" in log
    assert log.count("c8-broker started") == 1, log  # never restarted


def test_detector_flushes_and_goes_dormant(tmp_path):
    """The detector follows the limiter: dormant on TRIPPED, active on RESUMED."""
    s = Sensor(tmp_path, limiter=dict(LIMITER, max_retries=3, duration="2s"),
               detections={"enabled": True, "rules": [default_rules_path()]},
               alert_output={"outputs": [{"type": "stdout"}]}).start()
    try:
        with Storm():
            wait_for(lambda: "detections active" in s.output(), 40, 0.2, "the detector to resume")
        log = s.output()
        assert "caches flushed, detections dormant for 2s" in log
        assert log.index("caches flushed, detections dormant") < log.index("detections active")
        assert s.proc.poll() is None  # retries remain: the sensor runs on
    finally:
        assert s.stop() == 0
    assert os.path.exists(s.log_path)
