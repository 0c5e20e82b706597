"""Detections on by default: a fresh c8-supervisor with the shipped configuration.

The sensor reads conf/capsule8-sensor.yaml as shipped (every key at its
default), plus run_dir, the sensor id file and detections.alerts_file moved
into the test's directory. It must run c8-detector with the packaged default
rules, write every alert as a JSON line to the alert file (0640, sensor_user's,
in a directory the supervisor made) and to its configured output (stdout, in
the supervisor's log), and `c8ctl rules list` must show the rules with their
file and their match and alert counts.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys

import pytest
import yaml

from c8.detections.rules import default_rules_path
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULE = "Read sensitive file"
ATTEMPTS = 3


def alerts_in(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def c8ctl(run_dir: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE8_")}
    return subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir, *args],
                          capture_output=True, text=True, timeout=30, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    d = tmp_path_factory.mktemp("fresh")
    s = Sensor(d)
    alerts_file = str(d / "log" / "alerts.json")
    shipped = open(os.path.join(REPO, "conf", "capsule8-sensor.yaml")).read()
    with open(s.config_path, "w") as f:  # the shipped file, then only the paths a test must move
        f.write(shipped + "\n" + yaml.safe_dump({"run_dir": s.run_dir, "sensor_id_file": str(d / "sensor_id"),
                                                 "detections": {"alerts_file": alerts_file}}))
    s.alerts_file = alerts_file
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_fresh_sensor_runs_the_default_rules_into_the_alert_file(fresh):
    wait_for(lambda: any(c["name"] == "c8-detector" and c["state"] == "RUNNING" for c in fresh.children()),
             30, 0.2, "c8-detector running")
    wait_for(lambda: fresh.status()["subscriptions"], 30, 0.2, "the detector's subscription")
    for attempt in range(ATTEMPTS):
        benign = subprocess.Popen(["/bin/cat", "/etc/hostname"], stdout=subprocess.DEVNULL)
        benign.wait()
        p = subprocess.Popen(["/bin/cat", "/etc/shadow"], stdout=subprocess.DEVNULL)
        assert p.wait() == 0

        def mine(p=p):
            return [a for a in alerts_in(fresh.alerts_file)
                    if a.get("rule") == RULE and a["process"]["pid"] == p.pid]
        try:
            [alert] = wait_for(mine, 30, 0.2, "the alert in the alert file")
            break
        except AssertionError:
            if attempt == ATTEMPTS - 1:
                raise
    assert alert["event"]["path"] == "/etc/shadow" and alert["count"] == 1
    assert alert["process"]["exec_filename"] == "/bin/cat"
    assert not [a for a in alerts_in(fresh.alerts_file) if a["process"]["pid"] == benign.pid]
    # opened safely: 0640, sensor_user's, in a 0750 directory the supervisor made for it
    user = pwd.getpwnam("capsule8")
    st, dst = os.lstat(fresh.alerts_file), os.stat(os.path.dirname(fresh.alerts_file))
    assert (st.st_mode & 0o777, st.st_uid) == (0o640, user.pw_uid)
    assert (dst.st_mode & 0o777, dst.st_uid) == (0o750, user.pw_uid)
    # ... and the configured output too (stdout, into the supervisor's log)
    wait_for(lambda: f'"pid": {p.pid}, ' in fresh.output(), 10, 0.2, "the alert on the detector's stdout")

    # c8ctl rules list: the packaged rules, their file, the match and the alert counted
    def listed():
        res = c8ctl(fresh.run_dir, "rules", "list", "--json")
        assert res.returncode == 0, res.stderr
        table = {r["rule"]: r for r in json.loads(res.stdout)}
        return table if table[RULE]["alerts"] >= 1 else None
    table = wait_for(listed, 10, 0.5, "the alert counted in c8ctl rules list")
    assert table[RULE]["matches"] >= 1 and table[RULE]["enabled"]
    assert all(r["files"] == [os.path.join(default_rules_path(), "default.yaml")] for r in table.values())
    assert len(table) >= 30
    res = c8ctl(fresh.run_dir, "rules", "list")
    assert res.returncode == 0 and RULE in res.stdout and "rules enabled of" in res.stdout
