"""What each process's descriptors and cwd name, learnt from the event stream.

The broker keeps, per process (tgid), the absolute path of each file
descriptor it saw opened (an OPEN's result with its canonical ``path``), and
of its cwd where a chdir or fchdir was seen (eBPF family ``cwd``). A forked child starts with a copy of
its parent's table (fork copies descriptors and cwd); an exec drops the
descriptors opened with O_CLOEXEC; an exit drops the process. Threads share
their process's table (events carry the tgid).

Memory is bounded: at most ``max_per_process`` entries per process (the
oldest learnt go first) and ``max_total`` in all (the processes learnt
earliest lose theirs first); every entry dropped so is counted in
``evicted``. An entry whose path is empty (an open whose name could not be
read) is kept: it says the descriptor was replaced, so an older path of that
number is not reused.

What the table cannot see: descriptors made by calls the sensor does not
collect (dup2, fcntl F_DUPFD, socket, accept, pipe, a filtered-out open) and
closes, so an entry lives until its number is opened again, the process
execs (O_CLOEXEC ones) or exits.
"""

from __future__ import annotations

from collections.abc import Iterable

AT_FDCWD = -100  # the key of a process's cwd
DEFAULT_PER_PROCESS = 512
DEFAULT_TOTAL = 65536


class FdTable:
    """pid -> {fd (AT_FDCWD: the cwd) -> (path, close_on_exec)}, bounded."""

    def __init__(self, max_per_process: int = DEFAULT_PER_PROCESS, max_total: int = DEFAULT_TOTAL):
        if max_per_process < 1 or max_total < 1:
            raise ValueError(f"fd table bounds must be positive: {max_per_process}, {max_total}")
        self.max_per_process = max_per_process
        self.max_total = max_total
        self.procs: dict[int, dict[int, tuple[bytes, bool]]] = {}
        self.total = 0
        self.evicted = 0

    def get(self, pid: int, fd: int) -> bytes | None:
        """The path ``fd`` of ``pid`` names (b"": replaced, path unknown); None: never seen."""
        entry = self.procs.get(pid, {}).get(fd)
        return None if entry is None else entry[0]

    def learn(self, pid: int, items: Iterable[tuple[int, bytes, bool]]) -> None:
        """(fd, path, close_on_exec) of descriptors ``pid`` just got, oldest first."""
        table = self.procs.get(pid)
        if table is None:
            table = self.procs[pid] = {}
        before = len(table)
        for fd, path, cloexec in items:
            table.pop(fd, None)  # re-learnt: now the newest
            table[fd] = (path, cloexec)
        over = len(table) - self.max_per_process
        if over > 0:
            for fd in list(table)[:over]:
                del table[fd]
            self.evicted += over
        self.total += len(table) - before
        self._bound_total()

    def chdir(self, pid: int, path: bytes) -> None:
        """``pid``'s cwd is now ``path`` (b"": changed, to somewhere unknown)."""
        self.learn(pid, [(AT_FDCWD, path, False)])

    def fchdir(self, pid: int, fd: int) -> None:
        """``pid`` changed its cwd to what ``fd`` names."""
        path = self.get(pid, fd)
        self.chdir(pid, b"" if path is None else path)

    def close(self, pid: int, fd: int) -> None:
        table = self.procs.get(pid)
        if table is not None and table.pop(fd, None) is not None:
            self.total -= 1

    def dup(self, pid: int, old: int, new: int, cloexec: bool = False) -> None:
        """``new`` names what ``old`` names (dup2/dup3/F_DUPFD): unknown if ``old`` is."""
        path = self.get(pid, old)
        self.learn(pid, [(new, b"" if path is None else path, cloexec)])

    def fork(self, parent: int, child: int) -> None:
        """A new process (not a thread): its descriptors and cwd are its parent's."""
        self.exit(child)  # a reused pid's old table
        table = self.procs.get(parent)
        if table:
            self.procs[child] = dict(table)
            self.total += len(table)
            self._bound_total()

    def exec(self, pid: int) -> None:
        """``pid`` executed a new program: its close-on-exec descriptors are gone."""
        table = self.procs.get(pid)
        if table:
            kept = {fd: e for fd, e in table.items() if not e[1]}
            self.total -= len(table) - len(kept)
            self.procs[pid] = kept

    def exit(self, pid: int) -> None:
        table = self.procs.pop(pid, None)
        if table:
            self.total -= len(table)

    def stats(self) -> dict:
        return {"processes": len(self.procs), "entries": self.total, "evicted": self.evicted,
                "max_per_process": self.max_per_process, "max_total": self.max_total}

    def _bound_total(self) -> None:
        while self.total > self.max_total and self.procs:
            pid = next(iter(self.procs))  # learnt earliest
            table = self.procs[pid]
            over = self.total - self.max_total
            if over >= len(table):
                del self.procs[pid]
                self.total -= len(table)
                self.evicted += len(table)
            else:
                for fd in list(table)[:over]:
                    del table[fd]
                self.total -= over
                self.evicted += over
