"""Where the sensor's sockets and files live under run_dir."""

import os

DEFAULT_RUN_DIR = "/var/run/capsule8"


def run_dir(configured: str | None = None) -> str:
    """run_dir from the argument, else CAPSULE8_RUN_DIR, else the default."""
    return configured or os.environ.get("CAPSULE8_RUN_DIR") or DEFAULT_RUN_DIR


def control(rd: str) -> str:
    return os.path.join(rd, "sensor.sock")


def ingest(rd: str) -> str:
    return os.path.join(rd, "ingest.sock")


def ticks(rd: str) -> str:
    return os.path.join(rd, "ticks.sock")


def plan(rd: str) -> str:
    return os.path.join(rd, "plan.sock")


def bpf(rd: str) -> str:
    return os.path.join(rd, "bpf.sock")


def supervisor_status(rd: str) -> str:
    return os.path.join(rd, "supervisor.json")


def ipc(path: str) -> str:
    return "ipc://" + path


# Reload (docs/operations.md): the supervisor writes the configuration it accepted;
# the broker re-reads limits.* from config.json, the detector rules and outputs from
# reload.json (on SIGHUP) and answers in detector.json, with its alert counts.
def accepted_config(rd: str) -> str:
    return os.path.join(rd, "config.json")


def detector_reload(rd: str) -> str:
    return os.path.join(rd, "reload.json")


def detector_stats(rd: str) -> str:
    return os.path.join(rd, "detector.json")
