"""A real in-process Broker whose sockets are recorders, for unit tests that
drive its control handling and release pipeline without zmq I/O."""

from __future__ import annotations

import pytest

from c8.broker.main import Broker
from c8.supervisor.config import child_config


class RecordingSocket:
    """Stands in for the ROUTER and PUB sockets: keeps what is sent."""

    def __init__(self):
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames, flags=0):
        self.sent.append([bytes(f) for f in frames])

    def send(self, data, flags=0):
        self.sent.append([bytes(data)])


@pytest.fixture
def broker(tmp_path):
    b = Broker(child_config(run_dir=str(tmp_path / "run"), sensor_id_file=str(tmp_path / "sensor_id")))
    b.control = RecordingSocket()
    b.plan_pub = RecordingSocket()
    b.listeners = {b"u": b.control}
    return b
