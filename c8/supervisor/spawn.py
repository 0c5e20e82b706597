"""The real ProcessOS: fork without exec, then become the child in the new process.

Root's interpreter may live where sensor_user cannot execute it (/root), so
children are forked, never exec'd. In the child: default signal handlers,
inherited descriptors closed except 0-2 and its heartbeat pipe, join the
cgroup, drop privileges to its role's capabilities, set the process title,
then import and call the entry point by dotted name ("c8.broker.main:run")
with the config dict and the spec's extra args.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from setproctitle import setproctitle

from c8.protocol import heartbeat
from c8.supervisor import heap
from c8.supervisor.cgroups import SensorCgroup
from c8.supervisor.children import ChildSpec
from c8.supervisor.privileges import die_with_parent, drop_privileges, role_mask


def resolve(entry: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, func = entry.partition(":")
    if not module or not func:
        raise ValueError(f"entry point {entry!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


def _close_inherited_fds(keep: int | None = None) -> None:
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 4096))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


class ForkOS:
    """Forks children as sensor_user inside the sensor cgroup."""

    def __init__(self, config: dict, uid: int, gid: int, cgroup: SensorCgroup | None = None):
        self.config = config
        self.uid, self.gid = uid, gid
        self.cgroup = cgroup
        self._beats: dict[int, int] = {}  # child pid -> read end of its heartbeat pipe

    def spawn(self, spec: ChildSpec) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        want = role_mask(spec.role)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if spec.heartbeat else (-1, -1)
        try:
            pid = os.fork()
        except BaseException:
            if r >= 0:
                os.close(r)
                os.close(w)
            raise
        if pid == 0:
            self._child(spec, want, w if w >= 0 else None)  # never returns
        if r >= 0:
            os.close(w)
            self._beats[pid] = r
        return pid

    def _child(self, spec: ChildSpec, want: int, beat_fd: int | None) -> None:
        code = 1
        parent = os.getppid()
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            _close_inherited_fds(keep=beat_fd)
            heartbeat.install(beat_fd)
            if self.cgroup is not None:
                self.cgroup.add(os.getpid())
            drop_privileges(self.uid, self.gid, want)
            die_with_parent(signal.SIGTERM)
            if os.getppid() != parent:
                raise SystemExit(1)  # the supervisor died before the line above
            setproctitle(spec.name)
            heap.keep_freed_memory()  # batches are megabytes freed in milliseconds
            result = resolve(spec.entry)(self.config, *spec.args)
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            print(f"{spec.name}: uncaught exception", file=sys.stderr)
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.append((pid, status))
            r = self._beats.pop(pid, None)
            if r is not None:
                os.close(r)
        return out

    def heartbeat(self, pid: int) -> bool:
        r = self._beats.get(pid)
        if r is None:
            return False
        got = False
        try:
            while os.read(r, 4096):
                got = True
        except BlockingIOError:
            pass
        return got

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
