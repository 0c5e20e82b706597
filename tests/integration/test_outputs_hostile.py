"""Alert outputs against hostile input and hostile receivers, through the real sensor.

One sensor (detector with a single rule: exec of our marker program) sends
every alert to five real local receivers on loopback:
  - a blackholed TCP syslog receiver (listening, never accepting, its accept
    queue full: every connect hangs until the output's deadline);
  - a UDP syslog receiver and an alert file (the escaping checks);
  - a webhook receiver (http with insecure: true, the URL carrying user info
    and a query token), recording when each alert arrives;
  - a webhook that answers every POST with a redirect to a second receiver.
Checks: a burst of alerts reaches the webhook and the file together while the
TCP syslog receiver stalls (with a blocking output each would wait for the
syslog deadline); the stalled output's drops are logged with counts; an argv
with newline, ESC, invalid UTF-8 and ]"\\ gives one escaped syslog line and
valid JSON in the file; the redirect is not followed; no secret of a webhook
URL reaches the sensor's log. A second sensor with an http:// webhook and no
insecure: true does not start, and says why.
"""

from __future__ import annotations

import http.server
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

SYSLOG_TIMEOUT = 2.0    # the blackholed output's deadline per message
ATTEMPTS = 3            # the sensor is lossy by design: on a busy host an attempt's events may be dropped
BURST = 20
SECRETS = ("alice", "pa55w0rd", "T0K3NPATH", "QU3RYT0K3N", "R3D1R3CT")


class Webhook(http.server.ThreadingHTTPServer):
    """Records POSTed JSON with its arrival time; or answers 307 to `redirect`."""

    def __init__(self, redirect: str | None = None):
        self.posts: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.posts.append((time.monotonic(), json.loads(body)))
                self.send_response(307 if redirect else 204)
                if redirect:
                    self.send_header("Location", redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def alerts(self, match=lambda a: True) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, p) for t, p in self.posts if p.get("type") == "alert" and match(p)]

    def close(self):
        self.shutdown()
        self.server_close()


class Blackhole:
    """A TCP listener that never accepts, its accept queue filled: connects to it hang."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(0)
        self.fillers = []
        while True:
            c = socket.socket()
            c.settimeout(0.3)
            try:
                c.connect(self.srv.getsockname())
            except OSError:  # TimeoutError: the queue is full
                c.close()
                break
            self.fillers.append(c)
            assert len(self.fillers) < 10, "the accept queue does not fill"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.srv.getsockname()[1]}"

    def close(self):
        for c in self.fillers:
            c.close()
        self.srv.close()


class UdpSyslog:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self._stop.set()
        self.sock.close()


@pytest.fixture
def workdir():
    """A scratch dir the detector (sensor_user) can reach: the marker and the alert file."""
    d = tempfile.mkdtemp(prefix="c8-hostile-")
    os.chmod(d, 0o755)
    alerts = os.path.join(d, "alerts")
    os.mkdir(alerts)
    user = pwd.getpwnam("capsule8")
    os.chown(alerts, user.pw_uid, user.pw_gid)
    shutil.copy("/bin/true", os.path.join(d, "marker"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def rules_file(workdir: str) -> str:
    path = os.path.join(workdir, "rules.yaml")
    with open(path, "w") as f:
        f.write(f"""- rule: Marker ran
  description: the test's marker program ran (its argv is the attacker's)
  priority: warning
  events: {{process: [EXEC]}}
  condition: exec_filename == "{workdir}/marker"
  output: "marker ran: {{exec_command_line}}"
""")
    return path


# argv[1:]: newline and a forged syslog header, CR, ESC sequences and BEL, invalid UTF-8, ]"\
HOSTILE_ARGV = [b"x\n<11>1 2026-01-01T00:00:00Z host forged - - - FORGED\rCR",
                b"\x1b[2J\x1b]0;owned\x07", b"bad\xff\xfeutf8", b']"\\end']


def expected_output(marker: str, tag: str) -> str:
    """The alert text of the hostile exec: argv joined by spaces, bad UTF-8 replaced."""
    return "marker ran: " + " ".join([marker, *(a.decode(errors="replace") for a in HOSTILE_ARGV), tag])


def full_log(sensor: Sensor) -> str:
    with open(sensor.log_path, "rb") as f:
        return f.read().decode(errors="replace")


def test_hostile_argv_and_stalled_receiver(tmp_path, workdir):
    marker = os.path.join(workdir, "marker")
    alert_file = os.path.join(workdir, "alerts", "alerts.json")
    hook, target = Webhook(), Webhook()
    redirector = Webhook(redirect=f"http://127.0.0.1:{target.port}/stolen?r=R3D1R3CT")
    blackhole, udp = Blackhole(), UdpSyslog()
    outputs = [
        {"type": "syslog", "name": "blackholed", "protocol": "tcp", "address": blackhole.address,
         "timeout": f"{SYSLOG_TIMEOUT}s", "queue_size": 2},
        {"type": "syslog", "name": "udp", "protocol": "udp", "address": udp.address},
        {"type": "file", "path": alert_file},
        {"type": "webhook", "name": "hook", "insecure": True,
         "url": f"http://alice:pa55w0rd@127.0.0.1:{hook.port}/hooks/T0K3NPATH?token=QU3RYT0K3N"},
        {"type": "webhook", "name": "redirector", "insecure": True, "retries": 0,
         "url": f"http://127.0.0.1:{redirector.port}/in?token=QU3RYT0K3N"},
    ]
    s = Sensor(tmp_path, detections={"enabled": True, "rules": [rules_file(workdir)]},
               alert_output={"outputs": outputs}).start()
    try:
        # the detector is subscribed and alerting (through a stalled syslog output)
        def ready():
            subprocess.run([marker, "ready"], check=True)
            return hook.alerts(lambda a: a["output"] == "marker ran: " + marker + " ready")
        wait_for(ready, 60, 1.0, "a first alert from the detector")

        # 1. hostile argv: newline + forged syslog header, CR, ESC sequence, invalid UTF-8, ]"\
        def hostile_try(n: int) -> str | None:
            """One hostile exec (tagged n); its expected alert text once the webhook has it.
            The sensor is lossy by design: a busy host may drop an attempt's events."""
            tag = f"try{n}"
            subprocess.run([marker, *HOSTILE_ARGV, tag.encode()], check=True)
            try:
                [(_, posted)] = wait_for(lambda: hook.alerts(lambda a: a["output"].endswith(tag)),
                                         10, 0.1, "the hostile alert on the webhook")
            except AssertionError:
                return None
            assert posted["output"] == expected_output(marker, tag)
            return tag
        tag = next(filter(None, (hostile_try(n) for n in range(ATTEMPTS))), None)
        assert tag, f"no hostile alert in {ATTEMPTS} attempts"
        expected_text = expected_output(marker, tag)

        # exactly one syslog message for it, on one line, escaped
        def syslog_hostile():
            return [d for d in udp.datagrams if d.endswith(tag.encode())]
        [datagram] = wait_for(syslog_hostile, 10, 0.1, "the hostile alert on syslog")
        line = datagram.decode("utf-8")                       # valid UTF-8
        assert not any(c in line for c in "\n\r\x1b\x07"), line
        assert line.endswith(" marker ran: " + marker + " x\\n<11>1 2026-01-01T00:00:00Z host "
                             "forged - - - FORGED\\rCR \\x1b[2J\\x1b]0;owned\\x07 "
                             "bad\ufffd\ufffdutf8 ]\"\\\\end " + tag), line
        assert len([d for d in udp.datagrams if b"FORGED" in d and d.endswith(tag.encode())]) == 1

        # valid JSON in the file, the text intact
        def file_alerts():
            with open(alert_file, "rb") as f:
                return [json.loads(raw.decode("utf-8")) for raw in f.read().splitlines()]
        wait_for(lambda: any(a.get("output", "").endswith(tag) for a in file_alerts()), 10, 0.1,
                 "the hostile alert in the file")
        [in_file] = [a for a in file_alerts() if a.get("output", "").endswith(tag)]
        assert in_file["output"] == expected_text

        # 2. a burst while the TCP syslog receiver stalls: every alert reaches the webhook
        # and the file together, not one per syslog deadline
        t0 = time.monotonic()
        procs = [subprocess.Popen([marker, f"burst-{i}"]) for i in range(BURST)]
        for p in procs:
            p.wait()
        spawned = time.monotonic() - t0

        def burst():
            return hook.alerts(lambda a: " burst-" in a["output"])
        # all of them, or (lossy by design: a busy host may drop some) most after 10 s
        deadline = time.monotonic() + 10
        while len(burst()) < BURST and time.monotonic() < deadline:
            time.sleep(0.05)
        got = burst()
        assert len(got) >= BURST * 3 // 4, f"only {len(got)} of {BURST} burst alerts arrived"
        arrivals = sorted(t for t, _ in got)
        spread = arrivals[-1] - arrivals[0]
        assert spread < spawned + 0.5, (spread, spawned)     # a blocking syslog: >= 19 * 2 s
        assert spread < SYSLOG_TIMEOUT
        wait_for(lambda: len([a for a in file_alerts() if " burst-" in a.get("output", "")]) == len(got),
                 10, 0.1, "the burst in the alert file")
        # the stalled output drops and says so, with counts
        wait_for(lambda: "alerts dropped by blackholed: its queue of 2 was full" in full_log(s),
                 15, 0.2, "the blackholed output's drop report")

        # 3. the redirect was not followed
        wait_for(lambda: redirector.alerts(), 10, 0.1, "the redirector's first POST")
        wait_for(lambda: "redirects are not followed" in full_log(s), 10, 0.1, "the redirect warning")
        assert target.posts == []
    finally:
        s.stop()
        for r in (hook, target, redirector):
            r.close()
        blackhole.close()
        udp.close()
    log = full_log(s)
    # closing the outputs accounts for them: the blackholed one dropped most of the burst
    [stats] = [ln for ln in log.splitlines() if "output blackholed: alerts" in ln]
    dropped = int(stats.split(" dropped ")[1].split(",")[0])
    assert dropped >= BURST - 3, stats
    for secret in SECRETS:
        assert secret not in log, secret
    assert f"http://127.0.0.1:{redirector.port}/in?token=***" in log


def test_plain_http_webhook_refused_at_start(tmp_path):
    s = Sensor(tmp_path, detections={"enabled": True},
               alert_output={"outputs": [{"type": "stdout"}, {"type": "webhook", "name": "siem",
                             "url": "http://alice:pa55w0rd@127.0.0.1:9/hooks/T0K3NPATH?token=QU3RYT0K3N"}]})
    s.start(ready=False)
    try:
        code = s.proc.wait(30)
    finally:
        s.stop()
    log = full_log(s)
    assert code != 0, log
    assert "alert_output.outputs" in log and "outputs[1].url is plain http" in log, log
    assert "insecure: true" in log, log
    for secret in SECRETS:
        assert secret not in log, secret
