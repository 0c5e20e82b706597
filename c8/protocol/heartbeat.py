"""Children's heartbeat to the supervisor: one byte on a pipe, at most every INTERVAL.

The supervisor gives each child that heartbeats the write end of a pipe
(`install`, after the fork) and restarts a child whose pipe stays silent for
`heartbeat_timeout` seconds: a hung child (stopped, blocked on a FIFO, in an
endless loop) is replaced, not only a dead one. A child calls `beat()` from
its main loop, never from a helper thread, so a stuck loop stops the beats.
Outside the supervisor (tests, a child run by hand) `beat()` does nothing.
"""

from __future__ import annotations

import os
import time

INTERVAL = 0.5  # seconds between writes; the supervisor's timeout is far longer

_fd: int | None = None
_last = float("-inf")


def install(fd: int | None) -> None:
    """Beat on `fd` (a non-blocking pipe's write end) from now on; None stops beating."""
    global _fd, _last
    _fd, _last = fd, float("-inf")


def beat() -> None:
    """Tell the supervisor this process's loop is turning (cheap: one clock read mostly)."""
    global _last
    if _fd is None:
        return
    now = time.monotonic()
    if now - _last < INTERVAL:
        return
    _last = now
    try:
        os.write(_fd, b".")
    except BlockingIOError:
        pass  # the pipe is full: the supervisor has beats enough to read
    except OSError:
        install(None)  # the supervisor is gone; PR_SET_PDEATHSIG ends us soon
