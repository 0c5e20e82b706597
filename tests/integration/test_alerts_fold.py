"""One action, one alert: alert folding against a real sensor, in every output.

A sensor with the packaged default rules and the default fold period (1 s)
sends alerts to a webhook, a UDP syslog receiver and a file. Two processes
each make a useradd-like burst below /etc (a lock, a temporary and a backup
file, each opened for writing ten times: 30 matches of "Write below system
directory" in a few milliseconds). Each process gets exactly one alert with
count 30 and the first and last files' names, in the webhook, syslog and file
outputs alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from c8.detections.rules import default_rules_path
from tests.integration.sensor import Sensor, wait_for
from tests.integration.test_detections_e2e import detector_ready

pytestmark = pytest.mark.root

RULE = "Write below system directory"
ATTEMPTS = 3          # lossy by design: a dropped event makes a count of 29; try again
ATTEMPT_TIMEOUT = 20.0

# the shadow utilities' pattern: lock, temporary copy, backup, over and over
BURST = """
import os, sys
names = [sys.argv[1] + s for s in (".lock", "+", "-")]
for _ in range(10):
    for n in names:
        os.close(os.open(n, os.O_WRONLY | os.O_CREAT, 0o600))
"""


@pytest.fixture(scope="module")
def fold_sensor(tmp_path_factory, rx, workdir):
    d = tmp_path_factory.mktemp("fold")
    s = Sensor(d, detections={"enabled": True, "rules": [default_rules_path()]},
               alert_output={"outputs": [
                   {"type": "webhook", "url": rx.url, "insecure": True},
                   {"type": "syslog", "address": rx.syslog_address, "protocol": "udp"},
                   {"type": "file", "path": str(d / "out" / "alerts.json")}]}).start()
    s.alerts_out = d / "out" / "alerts.json"
    try:
        detector_ready(s, rx, workdir)
        yield s
    finally:
        s.stop()


def file_alerts(path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [a for a in map(json.loads, text.splitlines()) if a.get("type") == "alert" and a["rule"] == RULE]


def test_a_burst_is_one_alert_per_process_with_count_first_and_last(fold_sensor, rx, workdir):
    made: list[str] = []
    try:
        for attempt in range(ATTEMPTS):
            bases = [f"/etc/c8-fold-{uuid.uuid4().hex[:8]}" for _ in range(2)]
            for b in bases:
                for s in (".lock", "+", "-"):
                    made.append(b + s)
                    open(b + s, "w").close()   # made by the test: the burst only opens them
            procs = [subprocess.Popen([sys.executable, "-c", BURST, b]) for b in bases]
            pids = {p.pid: b for p, b in zip(procs, bases, strict=True)}
            assert all(p.wait() == 0 for p in procs)

            def mine(pids=pids):
                return [a for a in rx.alerts(RULE) if a["process"]["pid"] in pids
                        and a["first_name"].startswith(pids[a["process"]["pid"]])]
            try:
                wait_for(lambda mine=mine: len(mine()) >= 2, ATTEMPT_TIMEOUT, 0.1, "an alert per burst")
            except AssertionError:
                if attempt == ATTEMPTS - 1:
                    raise
                continue
            detector_ready(fold_sensor, rx, workdir)  # a barrier: later events have been seen
            alerts = mine()
            if sorted(a["count"] for a in alerts) == [30, 30] or attempt == ATTEMPTS - 1:
                break
        assert len(alerts) == 2, [(a["count"], a["first_name"]) for a in alerts]
        for a in alerts:
            base = pids[a["process"]["pid"]]
            assert (a["count"], a["first_name"], a["last_name"]) == (30, base + ".lock", base + "-")
            assert 0 < a["last_time_nanos"] - a["time_nanos"] < 200_000_000  # 30 matches in < 0.2 s
            assert a["event"]["path"] == base + ".lock" and a["event"]["kind"] == "OPEN"
            assert a["output"].endswith(f"first {base}.lock, last {base}-)") and "30 events in" in a["output"]
            # the same alert, once, in syslog and in the file
            twins = [s for s in rx.syslog_alerts(RULE) if s["sd"].get("pid") == str(a["process"]["pid"])]
            assert len(twins) == 1 and twins[0]["msg"] == a["output"]
            assert (twins[0]["sd"]["count"], twins[0]["sd"]["first"], twins[0]["sd"]["last"]) == (
                "30", base + ".lock", base + "-")
            in_file = [x for x in file_alerts(fold_sensor.alerts_out) if x["process"]["pid"] == a["process"]["pid"]]
            assert [(x["count"], x["first_name"], x["last_name"]) for x in in_file] == [
                (30, base + ".lock", base + "-")]
    finally:
        for p in made:
            if os.path.exists(p):
                os.unlink(p)
