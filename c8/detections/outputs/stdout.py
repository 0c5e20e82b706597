"""Alerts as JSON lines on standard output."""

from __future__ import annotations

import json
import sys

from c8.detections.outputs.base import Output, alert_dict, notice_dict


class StdoutOutput(Output):
    """One JSON object per line, flushed per alert."""

    type = "stdout"

    def __init__(self, name: str | None = None, stream=None):
        super().__init__(name)
        self._stream = stream

    @property
    def stream(self):
        # looked up per write so a replaced sys.stdout (tests, daemons) is honoured
        return self._stream or sys.stdout

    def _write(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, default=str) + "\n")
        self.stream.flush()

    def send(self, alert) -> None:
        self._write(alert_dict(alert))

    def notice(self, text: str, details: dict | None = None) -> None:
        self._write(notice_dict(text, details))
