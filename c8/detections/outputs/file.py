"""Alerts as JSON lines in a file, flushed per alert, rotated by size.

Rotation works like logrotate's numbered scheme: when the next line would take
the file past max_bytes, path.{backups-1} -> path.{backups}, ..., path -> path.1,
and a new path is started. With backups=0 the file is simply truncated.
"""

from __future__ import annotations

import json
import os

from c8.detections.outputs.base import Output, alert_dict, notice_dict
from c8.protocol import files


class FileOutput(Output):
    """JSON lines appended to ``path``; ``max_bytes`` 0 means never rotate."""

    type = "file"

    def __init__(self, path: str, max_bytes: int = 0, backups: int = 5, name: str | None = None):
        super().__init__(name)
        if max_bytes < 0 or backups < 0:
            raise ValueError(f"file output {path}: max_bytes and backups must be >= 0")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.rotations = 0
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        # 0640 whatever the umask, no symlink followed, FIFOs and others' files refused
        self._f = files.open_append(path)  # held open for the output's life
        self._size = self._f.tell()

    def _write(self, obj: dict) -> None:
        line = (json.dumps(obj, default=str) + "\n").encode()
        if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._f.write(line)
        self._f.flush()
        self._size += len(line)

    def _rotate(self) -> None:
        self._f.close()
        if self.backups == 0:
            mode = "wb"
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            mode = "ab"
        self._f = files.open_append(self.path, truncate=mode == "wb")
        self._size = 0
        self.rotations += 1

    def send(self, alert) -> None:
        self._write(alert_dict(alert))

    def notice(self, text: str, details: dict | None = None) -> None:
        self._write(notice_dict(text, details))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def stats(self) -> dict:
        return {"rotations": self.rotations, "size": self._size}
