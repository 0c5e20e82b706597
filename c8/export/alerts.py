"""Follow the detector's alert file (export.spool_dir/alerts.jsonl) into the spool.

The detector knows nothing of NATS: when export and detections both run, the
configuration gives it one more ``file`` output (named ``export``), rotated by
size with one backup. This follower reads complete lines from where it
stopped (inode and offset kept in ``alerts.pos``), follows a rotation (it
reads the old file to its end through the descriptor it holds, then starts on
the new one), and appends each read's alerts to the spool as one message,
id ``<sensor_id>-alerts-<inode>-<first offset>-<end offset>``.
"""

from __future__ import annotations

import json
import logging
import os

from c8.export import messages
from c8.export.spool import Spool

log = logging.getLogger("c8.export.alerts")

MAX_READ = 256 << 10  # per message


class AlertFollower:
    """Reads new alert lines of ``path`` into ``spool`` on every ``poll()``."""

    def __init__(self, path: str, spool: Spool, sensor_id: str, pos_path: str):
        self.path = path
        self.spool = spool
        self.sensor_id = sensor_id
        self.pos_path = pos_path
        self.fd = -1
        self.ino = 0
        self.offset = 0
        self.sent = 0
        saved_ino, saved_off = self._load()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        self._open()
        if self.ino == saved_ino and saved_off <= st.st_size:
            self.offset = saved_off

    def _load(self) -> tuple[int, int]:
        try:
            with open(self.pos_path) as f:
                ino, off = f.read().split()
            return int(ino), int(off)
        except (OSError, ValueError):
            return 0, 0

    def _save(self) -> None:
        tmp = self.pos_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.ino} {self.offset}\n")
        os.replace(tmp, self.pos_path)

    def _open(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            self.fd = -1
            return False
        self.ino = os.fstat(self.fd).st_ino
        self.offset = 0
        return True

    def poll(self) -> int:
        """Move every complete new line into the spool; returns alerts moved."""
        moved = 0
        while True:
            if self.fd < 0 and not self._open():
                return moved
            data = os.pread(self.fd, MAX_READ, self.offset)
            end = data.rfind(b"\n") + 1
            if end:
                alerts = []
                for line in data[:end].splitlines():
                    try:
                        alerts.append(json.loads(line))
                    except ValueError:
                        log.warning("not an alert line in %s: %r", self.path, line[:80])
                if alerts:
                    mid = f"{self.sensor_id}-alerts-{self.ino}-{self.offset}-{self.offset + end}"
                    self.spool.append("alerts", mid, len(alerts),
                                      messages.alerts_payload(self.sensor_id, alerts))
                    moved += len(alerts)
                self.offset += end
                self._save()
                continue
            try:  # at the end: was the file rotated away from under us?
                if os.stat(self.path).st_ino == self.ino:
                    return moved
            except FileNotFoundError:
                return moved
            os.close(self.fd)
            self.fd = -1  # the new file, from its start

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
