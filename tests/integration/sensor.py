"""A private sensor for integration tests: the real supervisor tree in a temp run_dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from c8.clients.client import Client, SensorUnavailable


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing awaited may not exist yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class Sensor:
    """c8-supervisor started as a subprocess with its own config and run_dir."""

    def __init__(self, tmp_path, **overrides):
        self.dir = tmp_path
        self.run_dir = str(tmp_path / "run")
        self.config_path = str(tmp_path / "capsule8-sensor.yaml")
        # Detections run by default (with /var/log/capsule8/alerts.json); a test sensor
        # runs them only when its test asks (detections={"enabled": True, ...}: the
        # detector's subscription and CPU would change what other tests measure), and
        # its alert file stays in the test's directory. Section maps given are merged.
        config = {"run_dir": self.run_dir, "sensor_id_file": str(tmp_path / "sensor_id"),
                  "detections": {"enabled": False, "alerts_file": str(tmp_path / "log" / "alerts.json")}}
        for key, value in overrides.items():
            config[key] = ({**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict)
                           else value)
        self.alerts_file = config["detections"].get("alerts_file")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = str(tmp_path / "sensor.log")
        self.proc: subprocess.Popen | None = None

    def start(self, ready: bool = True) -> Sensor:
        env = dict(os.environ, CAPSULE8_CONFIG=self.config_path)
        env.pop("CAPSULE8_RUN_DIR", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "c8.supervisor.main"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if ready:
            self.wait_ready()
        return self

    @property
    def client(self) -> Client:
        return Client(self.run_dir, timeout=5.0)

    def status(self) -> dict:
        return Client(self.run_dir, timeout=1.0).status()

    def wait_ready(self, timeout: float = 30.0) -> dict:
        ncpu = len(os.sched_getaffinity(0))

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.output()}")
            try:
                st = self.status()
            except SensorUnavailable:
                return None
            return st if len(st.get("collectors", {})) >= ncpu else None
        return wait_for(ready, timeout, 0.2, "the sensor to be ready")

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-8000:]
        except OSError:
            return ""

    def children(self) -> list[dict]:
        import json
        with open(os.path.join(self.run_dir, "supervisor.json")) as f:
            return json.load(f)["children"]

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"supervisor did not stop on SIGTERM:\n{self.output()}") from None
        finally:
            self.log.close()
