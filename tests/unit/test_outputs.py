"""Alert outputs for real: local HTTP and syslog receivers started by the tests."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import socket
import threading
import time

import pytest

from c8.detections.outputs import OutputConfigError, build_outputs
from c8.detections.outputs.file import FileOutput
from c8.detections.outputs.stdout import StdoutOutput
from c8.detections.outputs.syslog import SyslogOutput, facility_code, format_message
from c8.detections.outputs.webhook import WebhookOutput

ALERT = {"rule": "Read sensitive file", "priority": "warning",
         "output": "sensitive file /etc/shadow opened by pid 42",
         "process": {"pid": 42, "process_id": "abcd"}, "container": {"container_id": ""}}

RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z) (?P<host>\S+) "
    r"(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|\[.*?(?<!\\)\]) (?P<msg>.*)$", re.S)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ---- stdout and file ---------------------------------------------------------------

def test_stdout_writes_json_lines():
    buf = io.StringIO()
    out = StdoutOutput(stream=buf)
    out.send(ALERT)
    out.notice("3 alerts suppressed by stdout in the last 60s")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines[0]["rule"] == "Read sensitive file"
    assert lines[1] == {"type": "notice", "message": "3 alerts suppressed by stdout in the last 60s"}


def test_file_appends_json_lines_flushed_per_alert(tmp_path):
    path = tmp_path / "alerts" / "alerts.json"
    out = FileOutput(str(path))
    out.send(ALERT)
    # flushed: visible to another reader before close
    assert json.loads(path.read_text().splitlines()[0])["output"] == ALERT["output"]
    out.close()


def test_file_rotates_by_size_keeping_backups(tmp_path):
    path = str(tmp_path / "alerts.json")
    line_len = len(json.dumps({**ALERT, "n": 0}) + "\n")
    out = FileOutput(path, max_bytes=line_len * 3, backups=2)
    for n in range(10):
        out.send({**ALERT, "n": n})
    out.close()

    def ns(p):
        return [json.loads(x)["n"] for x in open(p).read().splitlines()]

    assert ns(path) == [9]
    assert ns(path + ".1") == [6, 7, 8]
    assert ns(path + ".2") == [3, 4, 5]
    assert not os.path.exists(path + ".3")
    assert all(os.path.getsize(p) <= line_len * 3 for p in (path, path + ".1", path + ".2"))
    assert out.rotations == 3


def test_file_without_backups_truncates(tmp_path):
    path = str(tmp_path / "alerts.json")
    out = FileOutput(path, max_bytes=200, backups=0)
    for n in range(20):
        out.send({"n": n})
    out.close()
    assert os.path.getsize(path) <= 200
    assert not os.path.exists(path + ".1")
    assert json.loads(open(path).read().splitlines()[-1]) == {"n": 19}


# ---- webhook -----------------------------------------------------------------------

class Receiver(http.server.ThreadingHTTPServer):
    """An HTTP server that records POSTed JSON; fails the first `failures` requests."""

    def __init__(self, failures=0):
        self.failures = failures
        self.requests = 0
        self.bodies = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    fail = receiver.requests <= receiver.failures
                    if not fail:
                        receiver.bodies.append(json.loads(body))
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def receiver_factory():
    made = []

    def make(failures=0):
        r = Receiver(failures)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def test_webhook_posts_json(receiver_factory):
    rx = receiver_factory()
    out = WebhookOutput(rx.url, timeout=2, insecure=True)
    out.send(ALERT)
    out.notice("1 alerts suppressed by webhook in the last 60s")
    assert wait_for(lambda: len(rx.bodies) == 2)
    assert rx.bodies[0]["rule"] == ALERT["rule"]
    assert rx.bodies[1]["type"] == "notice"
    out.close()
    assert out.stats()["delivered"] == 2


def test_webhook_retries_with_backoff_until_success(receiver_factory):
    rx = receiver_factory(failures=2)
    out = WebhookOutput(rx.url, timeout=2, retries=3, backoff_s=0.05, insecure=True)
    t0 = time.monotonic()
    out.send(ALERT)
    assert wait_for(lambda: len(rx.bodies) == 1)
    elapsed = time.monotonic() - t0
    assert rx.requests == 3
    assert elapsed >= 0.05 + 0.10          # two backoffs: 0.05 then doubled
    out.close()
    assert out.failed == 0 and out.attempts == 3


def test_webhook_gives_up_after_retries(receiver_factory):
    rx = receiver_factory(failures=100)
    out = WebhookOutput(rx.url, timeout=2, retries=2, backoff_s=0.01, insecure=True)
    out.send(ALERT)
    assert wait_for(lambda: out.failed == 1)
    assert rx.requests == 3 and rx.bodies == []
    out.close()


def test_webhook_bounded_queue_counts_drops():
    # a server that accepts connections but never answers keeps the worker busy
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        out = WebhookOutput(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=1.0,
                            queue_size=2, retries=0, insecure=True)
        for _ in range(10):
            out.send(ALERT)
        # the worker holds at most one, the queue two: at least 7 dropped
        assert out.dropped >= 7
        out.close(timeout=3)
    finally:
        srv.close()


# ---- syslog ------------------------------------------------------------------------

def parse_5424(text):
    m = RFC5424.match(text)
    assert m, f"not RFC 5424: {text!r}"
    return m.groupdict()


def test_format_message_fields():
    msg = format_message(facility_code("local3"), 4, "hello world", app_name="c8",
                         hostname="host1", procid=7, msgid="alert",
                         sd={"rule": 'a "quoted" ]rule', "pid": 7})
    d = parse_5424(msg)
    assert int(d["pri"]) == 19 * 8 + 4
    assert (d["host"], d["app"], d["procid"], d["msgid"]) == ("host1", "c8", "7", "alert")
    assert d["sd"] == '[c8@32473 rule="a \\"quoted\\" \\]rule" pid="7"]'
    assert d["msg"] == "hello world"


def test_facility_names_and_errors():
    assert facility_code("auth") == 4 and facility_code(17) == 17
    with pytest.raises(ValueError, match="facility"):
        facility_code("nope")


def test_syslog_udp():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    try:
        out = SyslogOutput(f"127.0.0.1:{rx.getsockname()[1]}", protocol="udp", facility="local0")
        out.send(ALERT)
        d = parse_5424(rx.recv(65536).decode())
        assert int(d["pri"]) == 16 * 8 + 4          # local0.warning
        assert d["msg"] == ALERT["output"]
        assert 'rule="Read sensitive file"' in d["sd"]
        out.notice("2 alerts suppressed by syslog in the last 60s")
        d = parse_5424(rx.recv(65536).decode())
        assert d["msgid"] == "notice" and d["msg"].startswith("2 alerts suppressed")
        out.close()
    finally:
        rx.close()


def read_octet_counted(conn, count):
    buf, msgs = b"", []
    while len(msgs) < count:
        chunk = conn.recv(65536)
        assert chunk, "connection closed early"
        buf += chunk
        while b" " in buf:
            length, _, rest = buf.partition(b" ")
            n = int(length)
            if len(rest) < n:
                break
            msgs.append(rest[:n].decode())
            buf = rest[n:]
    return msgs


def test_syslog_tcp_octet_counting():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(5)
    try:
        out = SyslogOutput(f"127.0.0.1:{srv.getsockname()[1]}", protocol="tcp", facility="auth")
        out.send(ALERT)
        out.send({**ALERT, "priority": "critical", "output": "second\nline"})
        conn, _ = srv.accept()
        conn.settimeout(5)
        first, second = (parse_5424(m) for m in read_octet_counted(conn, 2))
        assert int(first["pri"]) == 4 * 8 + 4
        assert int(second["pri"]) == 4 * 8 + 2
        assert second["msg"] == "second\\nline"     # escaped: one message is one line
        conn.close()
        out.close()
    finally:
        srv.close()


def test_syslog_unix_datagram(tmp_path):
    path = str(tmp_path / "log.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(5)
    try:
        out = SyslogOutput(path, protocol="unix", facility="daemon", app_name="c8-test")
        out.send(ALERT)
        d = parse_5424(rx.recv(65536).decode())
        assert int(d["pri"]) == 3 * 8 + 4 and d["app"] == "c8-test"
        out.close()
    finally:
        rx.close()


def test_syslog_unix_stream(tmp_path):
    path = str(tmp_path / "log.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(5)
    try:
        out = SyslogOutput(path, protocol="unix")
        out.send(ALERT)
        conn, _ = srv.accept()
        conn.settimeout(5)
        [m] = read_octet_counted(conn, 1)
        assert parse_5424(m)["msg"] == ALERT["output"]
        conn.close()
        out.close()
    finally:
        srv.close()


# ---- configuration -----------------------------------------------------------------

def test_build_outputs_from_config(tmp_path):
    outs = build_outputs({"alert_output": {"outputs": [
        {"type": "stdout", "enabled": True, "limit_per_period": 5, "limit_period": "60s"},
        {"type": "file", "path": str(tmp_path / "a.json"), "max_bytes": "1M", "backups": 3},
        {"type": "syslog", "enabled": False},
    ]}})
    assert [o.name for o in outs] == ["stdout", "file"]
    assert outs[0].limit == 5 and outs[0].period == 60
    assert outs[1].limit is None and outs[1].output.max_bytes == 1 << 20
    for o in outs:
        o.close()


def test_default_output_is_stdout():
    [out] = build_outputs({})
    assert out.name == "stdout"


@pytest.mark.parametrize("entry,words", [
    ({"type": "carrier-pigeon"}, "carrier-pigeon"),
    ({"type": "file"}, "missing path"),
    ({"type": "stdout", "colour": "red"}, "colour"),
    ({"type": "syslog", "protocol": "sctp"}, "sctp"),
    ({"type": "stdout", "limit_per_period": 5}, "limit_period"),
    ({"type": "stdout", "limit_per_period": 5, "limit_period": "soon"}, "soon"),
])
def test_bad_output_config_names_the_problem(entry, words):
    with pytest.raises(OutputConfigError, match=re.escape(words)) as exc:
        build_outputs({"alert_output": {"outputs": [entry]}})
    assert "alert_output.outputs[0]" in str(exc.value)


# ---- hostile input and stalled receivers ---------------------------------------------

HOSTILE = 'evil\nFAKE 1 line\r\x1b[2J\x07\x7f\u2028\udcff\udcfe ]"\\ end'


@pytest.mark.parametrize("raw,escaped", [
    ("plain text é", "plain text é"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("nul\x00 del\x7f c1\x85", "nul\\x00 del\\x7f c1\\x85"),
    ("ls\u2028sep \u202eevil", "ls\\u2028sep \\u202eevil"),
    (b"bad \xff\xfe utf8", "bad \\xff\\xfe utf8"),
    ("surrogate \udcff", "surrogate \\xff"),
    ('back\\slash ]"', 'back\\\\slash ]"'),
])
def test_escape(raw, escaped):
    from c8.detections.outputs.syslog import escape

    assert escape(raw) == escaped


def test_hostile_alert_is_one_escaped_syslog_message():
    """argv with newline, CR, ESC, BEL, DEL, U+2028, invalid UTF-8 and ]"\\ in both the
    message and a structured-data value: one datagram, one line, parsed back exactly."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    try:
        out = SyslogOutput(f"127.0.0.1:{rx.getsockname()[1]}", protocol="udp")
        out.send({**ALERT, "output": f"exec {HOSTILE}",
                  "process": {"pid": 42, "exec_filename": HOSTILE}})
        data = rx.recv(65536)
        out.close()
    finally:
        rx.close()
    text = data.decode("utf-8")                 # valid UTF-8
    assert not any(c in text for c in "\n\r\x1b\x07\x7f\u2028")
    assert len(text.splitlines()) == 1
    d = parse_5424(text)
    expected = 'evil\\nFAKE 1 line\\r\\x1b[2J\\x07\\x7f\\u2028\\xff\\xfe ]"\\\\ end'
    assert d["msg"] == f"exec {expected}"
    # structured data: our escapes, then RFC 5424's (\\ \" \])
    sd_value = expected.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    assert f'exe="{sd_value}"' in d["sd"]


def test_hostile_alert_is_valid_json_in_the_file(tmp_path):
    path = tmp_path / "alerts.json"
    out = FileOutput(str(path))
    out.send({**ALERT, "output": HOSTILE.encode("utf-8", "surrogateescape").decode("utf-8", "replace")})
    out.close()
    [line] = path.read_bytes().split(b"\n")[:-1]
    assert json.loads(line.decode("ascii"))["output"].startswith("evil\nFAKE")


def blackhole_tcp():
    """A TCP receiver that never accepts, its backlog already full: connects to it hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    while True:  # fill the accept queue until a connect times out
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(srv.getsockname())
        except (TimeoutError, OSError):
            c.close()
            break
        fillers.append(c)
        assert len(fillers) < 10, "the accept queue does not fill"
    return srv, fillers


def test_blackholed_tcp_syslog_never_blocks_and_counts_drops(caplog):
    srv, fillers = blackhole_tcp()
    try:
        out = SyslogOutput(f"127.0.0.1:{srv.getsockname()[1]}", protocol="tcp", timeout=0.5,
                           queue_size=5)
        t0 = time.monotonic()
        for _ in range(100):
            out.send(ALERT)
        assert time.monotonic() - t0 < 0.5     # enqueued, never sent by the caller (blocking: 50 s)
        # the worker holds one, the queue five: the rest are dropped and counted
        assert out.stats()["dropped"] >= 94
        out.tick()
        assert re.search(r"(9[4-9]) alerts dropped by syslog: its queue of 5 was full", caplog.text)
        assert wait_for(lambda: out.stats()["failed"] >= 1, 5)  # each message ends at its deadline
        out.close(timeout=0.5)
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_tcp_syslog_peer_that_never_reads_costs_one_deadline_per_message():
    """Accepted but never read, tiny receive buffer: big messages fill the path, sends time out."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        out = SyslogOutput(f"127.0.0.1:{srv.getsockname()[1]}", protocol="tcp", timeout=0.3,
                           queue_size=1000)
        big = {**ALERT, "output": "x" * (1 << 20)}   # 1 MiB each: more than any socket buffers
        t0 = time.monotonic()
        for _ in range(20):
            out.send(big)
        assert time.monotonic() - t0 < 0.5
        conn, _ = srv.accept()                       # accepted, never read
        assert wait_for(lambda: out.stats()["failed"] >= 2, 10)
        out.close(timeout=0.5)
        conn.close()
    finally:
        srv.close()


def test_webhook_refuses_plain_http():
    with pytest.raises(ValueError, match="insecure: true"):
        WebhookOutput("http://127.0.0.1:9/x?token=s3cr3t-token")
    with pytest.raises(OutputConfigError) as exc:
        build_outputs({"alert_output": {"outputs": [
            {"type": "stdout"},
            {"type": "webhook", "name": "siem", "url": "http://u:pw@127.0.0.1:9/hooks/s3cr3t?token=t0k3n"}]}})
    msg = str(exc.value)
    assert "alert_output.outputs[1] 'siem' (webhook)" in msg and "url" in msg and "insecure" in msg
    assert "s3cr3t" not in msg and "t0k3n" not in msg and "pw" not in msg
    assert "http://***@127.0.0.1:9/hooks/***?token=***" in msg
    # allowed when the output says so
    [lim] = build_outputs({"alert_output": {"outputs": [
        {"type": "webhook", "url": "http://127.0.0.1:9/x", "insecure": True}]}})
    lim.close()


@pytest.mark.parametrize("url", ["ftp://h/x", "file:///etc/passwd", "https:///nohost", "nonsense"])
def test_webhook_refuses_other_schemes(url):
    with pytest.raises(ValueError, match="https://"):
        WebhookOutput(url, insecure=True)


def test_supervisor_config_refuses_plain_http_webhook_without_leaking_the_token():
    from c8.supervisor import converters as cv

    with pytest.raises(cv.ConvertError) as exc:
        cv.alert_outputs([{"type": "webhook", "url": "http://u:pw@h:8080/x/s3cr3t?token=t0k3n"}])
    assert "outputs[0].url is plain http" in exc.value.reason and "insecure: true" in exc.value.reason
    assert "s3cr3t" not in str(exc.value) and "t0k3n" not in str(exc.value)
    assert exc.value.value == "http://***@h:8080/***"
    with pytest.raises(cv.ConvertError) as exc:
        cv.alert_outputs([{"type": "webhook", "url": "https://h/x?token=t0k3n", "limit_period": "1m"}])
    assert "t0k3n" not in str(exc.value)
    [out] = cv.alert_outputs([{"type": "webhook", "url": "http://h/x", "insecure": "true"}])
    assert out["insecure"] is True


class Redirector(http.server.ThreadingHTTPServer):
    """Answers every POST with 307 to `location` (a receiver that would take the alerts)."""

    def __init__(self, location):
        self.requests = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                srv.requests.append((self.path, dict(self.headers)))
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_webhook_follows_no_redirect_and_logs_no_secret(receiver_factory, caplog):
    caplog.set_level("DEBUG")
    target = receiver_factory()
    redirector = Redirector(target.url + "?stolen=T4RG3T")
    try:
        port = redirector.server_address[1]
        url = f"http://alice:pa55w0rd@127.0.0.1:{port}/hooks/T0K3NPATH?token=QU3RYT0K3N"
        out = WebhookOutput(url, timeout=2, retries=3, backoff_s=0.01, insecure=True)
        out.send(ALERT)
        assert wait_for(lambda: out.stats()["failed"] == 1)
        out.close()
        assert len(redirector.requests) == 1            # a redirect is not retried either
        time.sleep(0.2)                                  # time for a wrong follow to arrive
        assert target.requests == 0 and out.stats()["redirects"] == 1
        path, headers = redirector.requests[0]
        assert path == "/hooks/T0K3NPATH?token=QU3RYT0K3N"
        assert headers["Authorization"] == "Basic YWxpY2U6cGE1NXcwcmQ="   # user info -> header
        assert "redirects are not followed" in caplog.text
        for secret in ("alice", "pa55w0rd", "T0K3NPATH", "QU3RYT0K3N", "T4RG3T", "YWxpY2U6"):
            assert secret not in caplog.text, secret
        assert f"http://***@127.0.0.1:{port}/hooks/***?token=***" in caplog.text
    finally:
        redirector.shutdown()
        redirector.server_close()


def test_webhook_error_logs_carry_no_secret(caplog):
    # a port nobody listens on: connection refused, logged after the retries
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = WebhookOutput(f"http://bob:hunter22@127.0.0.1:{port}/a/SECRETPATH?k=SECRETQ", timeout=1,
                        retries=1, backoff_s=0.01, insecure=True,
                        headers={"Authorization": "Bearer SECRETBEARER"})
    out.send(ALERT)
    assert wait_for(lambda: out.stats()["failed"] == 1)
    out.close()
    assert "giving up after 2 attempts" in caplog.text
    for secret in ("hunter22", "SECRETPATH", "SECRETQ", "SECRETBEARER"):
        assert secret not in caplog.text
        assert secret not in repr(out.stats())


def test_webhook_deadline_bounds_a_trickling_receiver():
    """A receiver that answers one byte every 0.2 s: the POST ends at its deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.2):
                    return
                try:
                    conn.send(bytes([b]))
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        out = WebhookOutput(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=1.0, retries=0,
                            insecure=True)
        t0 = time.monotonic()
        out.send(ALERT)
        assert wait_for(lambda: out.stats()["failed"] == 1, 5)
        assert time.monotonic() - t0 < 2.0            # 1 s deadline, not 200 s of trickle
        out.close()
    finally:
        stop.set()
        srv.close()
