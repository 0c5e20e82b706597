"""Release stage 2, identity: who did each event of a window, as of its own time.

    cut (merge.py) -> identity (this) -> number (sequence.py) -> select, encode, send (publish.py)

Process events (FORK, EXEC, EXIT) change the process and container tables; they
are applied one by one in time order (their rate is the host's exec rate, not
the event rate). Each change is remembered with its time, so every other event
of the window takes the identity that held at its own time: an OPEN made by
bash just before it execs /bin/true is bash's, and a process moved into a
container cgroup is on the host until the move. Stamping is per unique pid
(np.unique) and, for the few pids that changed in the window, a searchsorted
of the event times in that pid's change times: no per-event Python objects.

Container RUNNING/EXITED events are built here from the process events that
cause them and join the window before it is numbered.
"""

from __future__ import annotations

import numpy as np

from c8 import schema
from c8.broker import catalog
from c8.broker.containers import ContainerTable
from c8.broker.processes import ProcessTable
from c8.schema import rows

MAX_EXEC_HINTS = 8192  # kernel exec names waiting for their eBPF exec record


class Identity:
    """The identity stage: process and container tables applied in time order."""

    def __init__(self, processes: ProcessTable, containers: ContainerTable):
        self.processes = processes
        self.containers = containers
        self.exec_names: dict[int, bytes] = {}  # tgid -> name from sched_process_exec

    def hint_exec_names(self, pids: np.ndarray, names: np.ndarray) -> None:
        """Names the kernel gave execs (sched_process_exec): used only for an exec
        whose name eBPF could not read from user memory."""
        if len(self.exec_names) > MAX_EXEC_HINTS:  # hints whose exec never came
            self.exec_names.clear()
        self.exec_names.update(zip(pids.tolist(), names.tolist(), strict=True))

    def stamp(self, window: dict[str, np.ndarray], follow_attaches: bool) -> None:
        """Apply the window's process events, add the container events they cause,
        and stamp container and process identity on every event, each as of its time.

        ``follow_attaches``: cgroup attaches are collected, so a forked child's
        container follows its parent's moves.
        """
        self.containers.begin_window()
        self.processes.begin_window()
        proc = window.get("process")
        if proc is not None:
            extra = self._apply_process_events(proc, follow_attaches)
            if extra is not None:
                window["container"] = _by_time(rows.concat([window["container"], extra])
                                               if "container" in window else extra)
        self.containers.apply_attaches(_last_time(window))  # moves after the last process event
        if "container" in window:  # metadata may have refined the cgroup's guess (runc -> crun)
            window["container"]["runtime"] = self.containers.runtimes(window["container"]["container"])
        for category, batch in window.items():
            if category in ("lost", "limiter"):
                continue
            if category not in ("process", "container"):
                batch["container"] = self.containers.indices_at(batch["process_pid"],
                                                                batch["sensor_monotime_nanos"])
            self.processes.fill(batch, wait=True)

    def lineage(self, batch: np.ndarray) -> dict[str, list]:
        """The lineage table of a batch's processes (c8.protocol.batch.Tables.processes),
        each chain ending at the host's init or the container's init."""
        if "process_pid" not in (batch.dtype.names or ()) or not len(batch):
            return {}
        ct = self.containers

        def same_tree(pid: int, ancestor: int) -> bool:
            return ct.lookup_pid(ancestor) == ct.lookup_pid(pid)

        pids = batch["process_pid"]
        unique = pids[:1] if (pids == pids[0]).all() else np.unique(pids)  # a storm: no sort
        return self.processes.lineage_rows(unique.tolist(), same_tree)

    def end_window(self) -> None:
        self.processes.end_window()

    # -- process events -----------------------------------------------------------
    def _apply_process_events(self, batch: np.ndarray, follow: bool) -> np.ndarray | None:
        """FORK/EXEC/EXIT to the tables in time order; RUNNING/EXITED events made.

        Each event's container is stamped at its moment: cgroup attaches queued
        before it are applied first, a child inherits its parent's container (when
        attaches are collected, so moves are seen), and an exited pid stays known
        until the next window (its other events of this window still resolve).
        RUNNING is the first exec by path inside a container whose birth was seen
        (runc's helper attaches first and execs before, on the host, and re-executes
        its cloned binary by fd inside); EXITED is the exit of that init.
        """
        pt, ct = self.processes, self.containers
        fork, exe, exit_ = (schema.kind_code("process", k) for k in ("FORK", "EXEC", "EXIT"))
        extra = []
        kinds = batch["kind"]
        stamps = batch["container"]
        times = batch["sensor_monotime_nanos"]
        # /proc facts of these forks and execs, read beside the loop (the release reads no /proc)
        forks = np.flatnonzero((kinds == fork) & ~batch["fork_is_thread"].astype(bool))
        execs = np.flatnonzero(kinds == exe)
        no_argv = execs[batch["exec_command_line"][execs] == b""]
        pt.prefetch(batch["fork_child_pid"][forks].tolist(), batch["process_pid"][execs].tolist(),
                    list(zip(batch["process_pid"][no_argv].tolist(), batch["uid"][no_argv].tolist(),
                             strict=True)))
        for i in np.flatnonzero((kinds == fork) | (kinds == exe) | (kinds == exit_)).tolist():
            ev = batch[i]
            pid = int(ev["process_pid"])
            t = int(times[i])
            k = int(ev["kind"])
            ct.apply_attaches(t)
            idx = ct.lookup_pid(pid) if pid > 0 else 0
            stamps[i] = idx
            if k == fork:
                child = int(ev["fork_child_pid"])
                batch["fork_child_id"][i] = pt.on_fork(pid, child, bool(ev["fork_is_thread"]), t)
                if follow and not ev["fork_is_thread"] and pid > 0:
                    ct.on_fork(pid, child, t)
            elif k == exe:
                kernel_name = self.exec_names.pop(pid, b"")
                if not ev["exec_filename"] and kernel_name:
                    batch["exec_filename"][i] = kernel_name
                    ev = batch[i]
                if not ev["exec_command_line"]:  # /proc's, if read in time; unknown stays empty
                    batch["exec_command_line"][i] = pt.exec_command_line(pid).encode()
                    ev = batch[i]
                cmdline = ev["exec_command_line"].decode(errors="replace")
                pt.on_exec(pid, ev["exec_filename"].decode(errors="replace"), cmdline, t)
                ct.on_exec(pid, cmdline.split())
                me = pt.get(pid)
                parent = pt.get(me.ppid) if me is not None and me.ppid > 0 else None
                if parent is not None:
                    batch["parent_pid"][i] = parent.pid
                    batch["parent_process_id"][i] = parent.process_id
                    batch["parent_exec_filename"][i] = parent.exec_filename.encode()
                # An exec by fd (the kernel names it /dev/fd/N: a runtime re-executing
                # its own cloned binary, as runc init does) is not the container's init.
                if idx and not ev["exec_filename"].startswith(b"/dev/fd/") and ct.mark_running(idx, pid):
                    extra.append(self._container_event(ev, "RUNNING", idx, host_pid=pid))
            else:
                init = ct.init_of(pid)
                if init:
                    extra.append(self._container_event(ev, "EXITED", init, host_pid=pid,
                                                       code=int(ev["exit_code"])))
                pt.on_exit(pid)
                ct.retire_pid(pid)
        return np.concatenate(extra) if extra else None

    def _container_event(self, ev, kind: str, idx: int, host_pid: int = 0, code: int = 0) -> np.ndarray:
        """One container event stamped like the process event that caused it."""
        out = schema.empty("container", 1)
        for name in ("sensor_monotime_nanos", "cpu", "process_pid", "process_tid"):
            out[name] = ev[name]
        out["kind"] = schema.kind_code("container", kind)
        out["container"] = idx
        out["host_pid"] = host_pid
        out["runtime"] = (self.containers.row(idx)[4] or "").encode()
        if kind == "EXITED":
            catalog.split_exit_code(np.array([code]), out)
        return out


def _by_time(batch: np.ndarray) -> np.ndarray:
    return rows.take(batch, np.argsort(batch["sensor_monotime_nanos"], kind="stable"))


def _last_time(window: dict[str, np.ndarray]) -> int:
    return max((int(b["sensor_monotime_nanos"].max()) for b in window.values() if len(b)), default=0)
