"""metrics.listen against a real sensor: Debian's Prometheus server scrapes it
on loopback and the series come back through its HTTP API; /healthz answers
200 on a healthy tree and 503 with the reason while a collector is stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.integration.sensor import Sensor, wait_for

RULE = """- rule: Metrics probe ran
  priority: notice
  events: {process: [EXEC]}
  condition: exec_filename like "*/c8metrics-probe"
  output: "probe {exec_filename}"
"""
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def msensor(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    shutil.copy("/bin/true", d / "c8metrics-probe")
    os.chmod(d / "c8metrics-probe", 0o755)
    (d / "rules.yaml").write_text(RULE)
    port = free_port()
    s = Sensor(d, **{"metrics": {"listen": f"127.0.0.1:{port}"},
                     # the test stops a collector for longer than a scrape: not "hung" yet
                     "heartbeat_timeout": "120s",
                     "detections": {"enabled": True, "rules": [str(d / "rules.yaml")]},
                     "alert_output": {"outputs": [{"type": "file", "path": str(d / "out" / "alerts.json")}]}})
    s.start()
    s.metrics_url = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(s.metrics_url + "/healthz")[0] == 200, 60, 0.2, "/healthz 200")
    yield s
    s.stop()


def run_probe(s: Sensor) -> int:
    p = subprocess.Popen([str(s.dir / "c8metrics-probe")])
    p.wait()
    return p.pid


def samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric in the exposition format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


def test_prometheus_scrapes_the_sensor(msensor, tmp_path):
    assert PROMETHEUS, "no prometheus binary: scripts/install-test-deps.sh installs Debian's package"
    s = msensor
    run_probe(s)
    wait_for(lambda: os.path.exists(s.dir / "out" / "alerts.json"), 30, 0.1, "the probe's alert")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{"job_name": "c8", "static_configs": [
            {"targets": [s.metrics_url.removeprefix("http://")]}]}]}))
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            code, body = get(url)
            assert code == 200, body
            data = json.loads(body)
            assert data["status"] == "success", data
            return data["data"]["result"]

        received = wait_for(lambda: query("sum(c8_events_received_total) > 0"), 60, 0.5,
                            "Prometheus to scrape events received")
        assert float(received[0]["value"][1]) > 0
        up = wait_for(lambda: query('up{job="c8"} == 1'), 10, 0.5, "the target up")
        assert up[0]["metric"]["instance"] == s.metrics_url.removeprefix("http://")
        alerts = wait_for(lambda: query('c8_alerts_total{rule="Metrics probe ran"} >= 1'), 30, 0.5,
                          "the rule's alert count")
        assert alerts[0]["metric"]["rule"] == "Metrics probe ran"
        children = {r["metric"]["child"]: r["value"][1] for r in query("c8_child_up")}
        assert children["c8-broker"] == "1" and children["c8-detector"] == "1"
        assert {k for k in children if k.startswith("c8-collector cpu")} == {
            f"c8-collector cpu{n}" for n in range(len(os.sched_getaffinity(0)))}
        assert query("c8_tree_memory_bytes > 1e6")
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()


def test_metrics_count_events_subscriptions_and_alerts(msensor):
    s = msensor
    before = samples(get(s.metrics_url + "/metrics")[1], "c8_alerts_total").get('{rule="Metrics probe ran"}', 0)
    run_probe(s)
    run_probe(s)

    def after():
        text = get(s.metrics_url + "/metrics")[1]
        n = samples(text, "c8_alerts_total").get('{rule="Metrics probe ran"}', 0)
        return text if n >= before + 2 else None
    text = wait_for(after, 30, 0.2, "two more alerts counted")
    assert samples(text, "c8_alert_output_alerts_total")['{output="0:file"}'] >= before + 2
    assert samples(text, "c8_alert_output_suppressed_total")['{output="0:file"}'] == 0
    received = samples(text, "c8_events_received_total")
    assert any("sched:sched_process_exec" in k for k in received), received
    assert sum(received.values()) > 0
    sent = samples(text, "c8_subscription_events_sent_total")
    assert sent and max(sent.values()) >= 2, sent  # the detector's subscription
    assert samples(text, "c8_broker_up")[""] == 1
    assert samples(text, "c8_limiter_dormant")[""] == 0
    assert samples(text, "c8_tree_cpu_seconds_total")[""] > 0
    assert not samples(text, "c8_child_restarts_total")  # nothing restarted yet


def test_healthz_503_names_a_stopped_collector(msensor):
    s = msensor
    code, body = get(s.metrics_url + "/healthz")
    assert (code, body) == (200, "ok\n")
    collector = next(c for c in s.children() if c["name"] == "c8-collector cpu0")
    os.kill(collector["pid"], signal.SIGSTOP)
    try:
        code, body = wait_for(lambda: (r := get(s.metrics_url + "/healthz"))[0] == 503 and r,
                              20, 0.2, "/healthz 503")
        assert body.startswith("c8-collector cpu0 has not reported for "), body
        assert "(it reports every 1s)" in body
    finally:
        os.kill(collector["pid"], signal.SIGCONT)
    wait_for(lambda: get(s.metrics_url + "/healthz") == (200, "ok\n"), 20, 0.2, "/healthz 200 again")
    assert next(c for c in s.children() if c["name"] == "c8-collector cpu0")["pid"] == collector["pid"]


def test_restarts_are_counted_by_child_and_reason(msensor):
    s = msensor
    detector = next(c for c in s.children() if c["name"] == "c8-detector")
    os.kill(detector["pid"], signal.SIGKILL)

    def restarted():
        got = samples(get(s.metrics_url + "/metrics")[1], "c8_child_restarts_total")
        return got or None
    got = wait_for(restarted, 30, 0.2, "the detector's restart counted")
    assert got == {'{child="c8-detector",reason="killed by SIGKILL"}': 1.0}, got
    wait_for(lambda: get(s.metrics_url + "/healthz") == (200, "ok\n"), 60, 0.2, "/healthz 200 again")


def test_metrics_listen_in_use_stops_start_up_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = Sensor(tmp_path, **{"metrics": {"listen": f"127.0.0.1:{port}"}})
        s.start(ready=False)
        try:
            assert s.proc.wait(60) == 1
        finally:
            s.stop()
        assert f"cannot start: metrics.listen 127.0.0.1:{port}: Address already in use" in s.output()
