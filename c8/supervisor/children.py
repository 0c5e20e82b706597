"""Child process states, supervisord style, with the OS behind one replaceable object.

    STOPPED -> STARTING -> RUNNING -> (exit) BACKOFF -> STARTING -> ...
    STARTING -> (exit before START_SECS) BACKOFF ... -> FATAL after START_RETRIES in a row
    STARTING/RUNNING -> (exit status EXIT_LIMITER) EXITED: never restarted
    STARTING/RUNNING -> STOPPING -> STOPPED on shutdown

Every change goes through `Child.change`. Restarts back off 1s, 2s, 4s ...
capped at 30s; the count resets once a child has stayed up RESET_AFTER
seconds. A child whose spec heartbeats and that sends no heartbeat for
`heartbeat_timeout` seconds is hung: it gets SIGKILL, and its exit (reason
"hung: ...") goes through the same edges as any other. Stdlib only; all process side effects are in a ProcessOS (spawn.py
has the real one, tests a fake).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("c8.supervisor")

# The exit status of a child whose event limiter gave up (limiter.max_retries
# reached). The supervisor does not restart it: it stops every child and
# exits 1 with a logged error, as Capsule8's sensor did.
EXIT_LIMITER = 78

START_SECS = 1.0       # up this long -> RUNNING
BACKOFF_START = 1.0    # first restart delay
BACKOFF_MAX = 30.0     # delay cap
RESET_AFTER = 60.0     # up this long -> the delay starts again from BACKOFF_START
START_RETRIES = 5      # quick failures in a row before FATAL


class State(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


S = State
# Allowed edges; Child.change refuses anything else (a bug, not a runtime condition).
EDGES = {
    (S.STOPPED, S.STARTING),   # start requested
    (S.STARTING, S.RUNNING),   # stayed up START_SECS
    (S.STARTING, S.BACKOFF),   # died before START_SECS: a quick failure, retry later
    (S.STARTING, S.FATAL),     # quick failures exhausted START_RETRIES
    (S.RUNNING, S.BACKOFF),    # died after starting well: restart after the delay
    (S.BACKOFF, S.STARTING),   # delay over: fork again
    (S.BACKOFF, S.STOPPED),    # stop requested while waiting: nothing to kill
    (S.STARTING, S.STOPPING),  # stop requested: SIGTERM sent
    (S.RUNNING, S.STOPPING),   # stop requested: SIGTERM sent
    (S.STOPPING, S.STOPPED),   # reaped after the stop
    (S.STARTING, S.EXITED),    # exited with EXIT_LIMITER: final
    (S.RUNNING, S.EXITED),     # exited with EXIT_LIMITER: final
}
LIVE = (S.STARTING, S.RUNNING, S.STOPPING)


@dataclass(frozen=True)
class ChildSpec:
    """What to run: proctitle name, entry point "module:function", extra args after config,
    its role (the capabilities it keeps: privileges.ROLES) and whether it heartbeats
    (c8.protocol.heartbeat): a child that does is restarted when it stops."""

    name: str
    entry: str
    args: tuple = ()
    role: str = "detector"
    heartbeat: bool = False


class ProcessOS(Protocol):
    """The side effects the state machine needs."""

    def spawn(self, spec: ChildSpec) -> int:
        """Fork a child running spec; returns its pid."""

    def kill(self, pid: int, sig: int) -> None:
        """Signal a process (no error if it is gone)."""

    def reap(self) -> list[tuple[int, int]]:
        """(pid, wait status) of every child that has exited, without blocking."""

    def oom_kills(self) -> int:
        """The memory cgroup's OOM kill count so far (0 without a cgroup)."""

    def now(self) -> float:
        """Monotonic seconds."""

    def sleep(self, seconds: float) -> None:
        """Wait a little (used only while stopping)."""

    def heartbeat(self, pid: int) -> bool:
        """True if the child `pid` sent a heartbeat since the last call (reads them all)."""


def describe_status(status: int, oom: bool = False) -> str:
    """A wait status in words: 'exit status 3', 'signal SIGSEGV', 'OOM-killed (SIGKILL)'."""
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if oom:
            return f"OOM-killed ({name}, memory cgroup limit)"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {name}{core}"
    return f"wait status {status:#x}"


class Child:
    """One supervised process and its state."""

    def __init__(self, spec: ChildSpec, osx: ProcessOS):
        self.spec = spec
        self.os = osx
        self.state = S.STOPPED
        self.pid: int | None = None
        self.restarts = 0            # forks after the first
        self.failures = 0            # exits since it last stayed up RESET_AFTER
        self.quick_failures = 0      # exits in STARTING, in a row
        self.last_exit_reason: str | None = None
        self.last_exit_status: int | None = None
        self.started_at = 0.0
        self.retry_at = 0.0
        self.last_beat = 0.0         # when its last heartbeat was seen (or it started)
        self.hung: str | None = None  # why it was killed as hung, until it is reaped

    @property
    def name(self) -> str:
        return self.spec.name

    def change(self, new: State, why: str) -> None:
        """The one place a state changes; refuses edges not in EDGES."""
        if (self.state, new) not in EDGES:
            raise RuntimeError(f"{self.name}: no transition {self.state.name} -> {new.name}")
        log.debug("%s: %s -> %s (%s)", self.name, self.state.name, new.name, why)
        self.state = new

    def backoff_delay(self) -> float:
        """The delay before the next start: 1s, 2s, 4s ... capped at BACKOFF_MAX."""
        return min(BACKOFF_START * 2 ** max(self.failures - 1, 0), BACKOFF_MAX)

    def start(self) -> None:
        """Fork the process (from STOPPED or at the end of BACKOFF)."""
        if self.state is S.BACKOFF:
            self.restarts += 1
        self.change(S.STARTING, "start")
        self.started_at = self.last_beat = self.os.now()
        self.hung = None
        self.pid = self.os.spawn(self.spec)
        log.info("%s started, pid %d", self.name, self.pid)

    def tick(self) -> None:
        """Time-driven edges: STARTING -> RUNNING, BACKOFF -> STARTING, backoff reset."""
        now = self.os.now()
        if self.state is S.STARTING and now - self.started_at >= START_SECS:
            self.quick_failures = 0
            self.change(S.RUNNING, f"up {START_SECS:g}s")
        if self.state is S.RUNNING and self.failures and now - self.started_at >= RESET_AFTER:
            self.failures = 0  # stayed up: the next restart is quick again
        if self.state is S.BACKOFF and now >= self.retry_at:
            self.start()

    def check_heartbeat(self, timeout: float) -> None:
        """Kill the process (SIGKILL: a stopped one cannot take SIGTERM) when it has
        sent no heartbeat for `timeout` seconds; its exit then restarts it."""
        if not (self.spec.heartbeat and timeout > 0 and self.state in (S.STARTING, S.RUNNING)
                and self.hung is None):
            return
        now = self.os.now()
        if self.os.heartbeat(self.pid):
            self.last_beat = now
            return
        silent = now - self.last_beat
        if silent < timeout:
            return
        self.hung = f"hung: no heartbeat for {timeout:g}s"  # heartbeat_timeout: stable wording
        log.error("%s (pid %s) %s (silent %.1fs); killing it with SIGKILL", self.name, self.pid,
                  self.hung, silent)
        self.os.kill(self.pid, signal.SIGKILL)

    def exited(self, status: int, oom: bool = False) -> None:
        """The process ended with wait `status`; decide what comes next."""
        reason = describe_status(status, oom)
        if self.hung is not None:
            reason, self.hung = f"{self.hung}, {reason}", None
        self.last_exit_reason, self.last_exit_status = reason, status
        pid, self.pid = self.pid, None
        if self.state is S.STOPPING:
            self.change(S.STOPPED, reason)
            log.info("%s (pid %s) stopped: %s", self.name, pid, reason)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_LIMITER:
            self.change(S.EXITED, "event limiter exit")
            log.error("%s (pid %s) exited: the event limiter reached limiter.max_retries "
                      "(exit status %d); not restarting", self.name, pid, EXIT_LIMITER)
            return
        self.failures += 1
        if self.state is S.STARTING:
            self.quick_failures += 1
            if self.quick_failures >= START_RETRIES:
                self.change(S.FATAL, reason)
                log.error("%s (pid %s) exited: %s; %d quick failures in a row, giving up (FATAL)",
                          self.name, pid, reason, self.quick_failures)
                return
        self.change(S.BACKOFF, reason)
        delay = self.backoff_delay()
        self.retry_at = self.os.now() + delay
        log.warning("%s (pid %s) exited: %s; restarting in %gs (restart %d)",
                    self.name, pid, reason, delay, self.restarts + 1)

    def stop(self) -> None:
        """Ask the process to stop (SIGTERM), or cancel a pending restart."""
        if self.state is S.BACKOFF:
            self.change(S.STOPPED, "stop while in backoff")
        elif self.state in (S.STARTING, S.RUNNING):
            self.change(S.STOPPING, "stop")
            self.os.kill(self.pid, signal.SIGTERM)

    def status(self) -> dict:
        """What supervisor.json shows of this child."""
        return {"name": self.name, "pid": self.pid, "state": self.state.name,
                "restarts": self.restarts, "last_exit_reason": self.last_exit_reason}


class Children:
    """All supervised children: start, reap, restart, stop."""

    def __init__(self, specs: list[ChildSpec], osx: ProcessOS, heartbeat_timeout: float = 0.0):
        self.os = osx
        self.children = [Child(s, osx) for s in specs]
        self.heartbeat_timeout = heartbeat_timeout  # 0: no heartbeat watch
        self._oom_seen = osx.oom_kills()

    def by_pid(self, pid: int) -> Child | None:
        return next((c for c in self.children if c.pid == pid), None)

    def start_all(self) -> None:
        for c in self.children:
            if c.state is S.STOPPED:
                c.start()

    def _is_oom(self, status: int) -> bool:
        """A SIGKILL while the cgroup's OOM kill count grew: claim one kill."""
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return False
        if self.os.oom_kills() > self._oom_seen:
            self._oom_seen += 1
            return True
        return False

    def reap(self) -> bool:
        """Handle every exited child; True if any state changed."""
        changed = False
        for pid, status in self.os.reap():
            child = self.by_pid(pid)
            if child is None:
                continue  # a grandchild reparented to us, or an already-forgotten pid
            child.exited(status, self._is_oom(status))
            changed = True
        return changed

    def tick(self) -> bool:
        """Apply time-driven transitions; True if any state changed."""
        before = [c.state for c in self.children]
        for c in self.children:
            c.check_heartbeat(self.heartbeat_timeout)
            c.tick()
        return before != [c.state for c in self.children]

    def failed(self) -> Child | None:
        """The first child that ended for good (EXITED by the limiter, or FATAL)."""
        return next((c for c in self.children if c.state in (S.EXITED, S.FATAL)), None)

    def live(self) -> list[Child]:
        return [c for c in self.children if c.state in LIVE]

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, wait up to `timeout`, then SIGKILL stragglers."""
        for c in self.children:
            c.stop()
        self._reap_for(timeout)
        for c in self.live():
            log.warning("%s (pid %s) did not stop within %gs: SIGKILL", c.name, c.pid, timeout)
            if c.state is not S.STOPPING:
                c.change(S.STOPPING, "stop")
            self.os.kill(c.pid, signal.SIGKILL)
        self._reap_for(timeout)
        for c in self.live():
            log.error("%s (pid %s) survived SIGKILL (uninterruptible sleep?)", c.name, c.pid)

    def _reap_for(self, timeout: float) -> None:
        """Reap exits until no child is live or the timeout passes."""
        deadline = self.os.now() + timeout
        while self.live() and self.os.now() < deadline:
            self.reap()
            if self.live():
                self.os.sleep(0.05)

    def status(self) -> list[dict]:
        return [c.status() for c in self.children]
