"""c8ctl top under a pseudo-terminal against a private sensor: it draws the rates a
workload makes, and q or Ctrl-C end it with exit code 0."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root

ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")


class Terminal:
    """A command on a 160x60 pseudo-terminal; ``screen()`` is its output without escapes."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the pty (sized first) as its terminal
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 160, 0, 0))
            # pytest exports COLUMNS/LINES (80x24), which rich prefers to the terminal's size
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            try:
                os.execve(argv[0], argv, dict(env, TERM="xterm-256color"))
            finally:
                os._exit(127)  # never back into the test process's code
        self.out = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO once the child side closes
                return
            if not data:
                return
            self.out += data

    def screen(self) -> str:
        return ANSI.sub(b"", bytes(self.out)).decode(errors="replace")

    def press(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"c8ctl top did not exit within {timeout}s:\n{self.screen()[-3000:]}")


def top(run_dir: str) -> Terminal:
    return Terminal([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", run_dir, "top"])


def rate_row(screen: str, name: str) -> list[float]:
    """Every rate drawn in the first column after ``name`` in a table row."""
    return [float(m.replace(",", "")) for m in re.findall(rf"│ {re.escape(name)}\s+│\s+([\d,]+)\s+│", screen)]


def test_top_shows_the_workload_and_quits_on_q(shared_sensor, tmp_path):
    token = secrets.token_hex(4)
    shell = tmp_path / f"sh-{token}"
    shutil.copy("/bin/sh", shell)
    flt = f'kind == "EXEC" and ancestor.exec_filename == "{shell}"'
    with shared_sensor.client.subscribe({"events": {"process": {"filter": flt}}}) as sub:
        term = top(shared_sensor.run_dir)
        stop = threading.Event()

        def workload():
            while not stop.is_set():
                subprocess.run([str(shell), "-c", "/bin/true; /bin/true; /bin/true"], timeout=10)
                time.sleep(0.02)

        worker = threading.Thread(target=workload, daemon=True)
        worker.start()
        try:
            # a process rate and this subscription's send rate above zero, drawn on the screen
            wait_for(lambda: any(r > 0 for r in rate_row(term.screen(), "process")), 30, 0.2,
                     "a process rate > 0 on the screen")
            wait_for(lambda: any(float(m.replace(",", "")) > 0 for m in re.findall(
                rf"│ {sub.id}\s+│ process\s+│\s+[\d,]+\s+│\s+([\d,]+)\s+│", term.screen())), 30, 0.2,
                f"subscription {sub.id} sending > 0/s on the screen")
        finally:
            stop.set()
            worker.join(15)
        screen = term.screen()
        for title in ("events/s by category", "losses", "subscriptions", "processes", "event limiter"):
            assert title in screen
        assert re.search(r"│ c8-broker\s+│\s+\d+\s+│ RUNNING", screen)
        term.press(b"q")
        assert term.exit_code() == 0


def test_top_ends_on_ctrl_c(shared_sensor):
    term = top(shared_sensor.run_dir)
    try:
        wait_for(lambda: "event limiter" in term.screen(), 30, 0.1, "the first view")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the screen: {bytes(term.out)[-2000:]!r}") from None
    term.press(b"\x03")  # the terminal turns it into SIGINT
    assert term.exit_code() == 0


def test_top_without_a_sensor_says_so(tmp_path):
    p = subprocess.run([sys.executable, "-m", "c8.clients.c8ctl", "--run-dir", str(tmp_path), "top", "--once"],
                       capture_output=True, timeout=30)
    assert p.returncode == 1 and b"not running" in p.stderr


def test_losses_of_any_nesting_are_listed_by_source():
    """The status's loss counters are flat or nested by cause (ebpf_lost: family ->
    cause -> count); every one is a row, and a shape top cannot draw is shown, not fatal."""
    from c8.clients import top as topmod

    st = {"collectors": {"0": {"lost": 3, "ebpf_lost": {"open": {"output": 5, "stale": 1}}, "received": {}}},
          "subscriptions": [{"subscription": "s1", "sent": 9, "lost": {"subscriber": 2}, "spec": {}}],
          "counts": {"late": 4}}
    rows = {name: total for name, total, _ in topmod._loss_rows(st, None)}
    assert rows == {"kernel ring cpu0": 3, "ebpf open output cpu0": 5, "ebpf open stale cpu0": 1,
                    "subscribers (broker)": 2, "broker late": 4}
    shown = topmod.view(topmod.Sample(0.0, {"collectors": {"x": {}}}), None)
    assert "cannot draw" in str(shown)
