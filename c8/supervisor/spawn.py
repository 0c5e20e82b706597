"""The real ProcessOS: fork without exec, then become the child in the new process.

Root's interpreter may live where sensor_user cannot execute it (/root), so
children are forked, never exec'd. In the child: default signal handlers,
inherited descriptors closed except 0-2, join the cgroup, drop privileges,
set the process title, then import and call the entry point by dotted name
("c8.broker.main:run") with the config dict and the spec's extra args.
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

from c8.supervisor.cgroups import SensorCgroup
from c8.supervisor.children import ChildSpec
from c8.supervisor.privileges import die_with_parent, drop_privileges


def resolve(entry: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, func = entry.partition(":")
    if not module or not func:
        raise ValueError(f"entry point {entry!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


def _close_inherited_fds() -> None:
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, 4096)
        return
    for fd in fds:
        if fd > 2:
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

    def spawn(self, spec: ChildSpec) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(spec)  # never returns
        return pid

    def _child(self, spec: ChildSpec) -> None:
        code = 1
        parent = os.getppid()
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            _close_inherited_fds()
            if self.cgroup is not None:
                self.cgroup.add(os.getpid())
            drop_privileges(self.uid, self.gid)
            die_with_parent(signal.SIGTERM)
            if os.getppid() != parent:
                raise SystemExit(1)  # the supervisor died before the line above
            setproctitle(spec.name)
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
        return out

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
