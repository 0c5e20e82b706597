"""The container table: which container each pid runs in, and what it is.

cgroup path -> (runtime, id) -> small index -> (id, name, image id, image name,
runtime, k8s namespace, pod name, pod uid, container name in the pod, pod
labels). Events carry the index (0 = host); batch headers carry ``table()``.
Identity comes from the kernel's cgroup events (mkdir/rmdir of a
container's cgroup, a task attached to it) applied in time order with the
process events (a forked child inherits its parent's container), and from
/proc/<pid>/cgroup for processes the events did not place (those that ran
before the sensor). Names and images come from the runtimes' own metadata
(``c8.broker.runtimes``), retried while a runtime has not written it yet;
the Kubernetes identity from a CRI runtime's annotations (and the pod's
sandbox's, for its labels), the pod uid also from a kubepods cgroup path
(``c8.broker.runtimes.k8s``).

The table sits on the broker's release path, which never waits on the
outside world: every metadata lookup (runtime state files, docker's API, a
runtime's command line, root discovery) runs on a worker thread with a
deadline (``runtimes.worker``), the loop waiting for it at most ``wait``
seconds; a lookup that fails, times out or is dropped leaves that
container's name and image unknown, counted in :meth:`ContainerTable.stats`
(``c8ctl status``). No exception of a lookup reaches the caller.

Only components holding a 64-hex id count as containers, so /user.slice or
/process_api/<32 hex> never do.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from c8.host import proc as hostproc

from .runtimes import ROOT_KINDS, Metadata, Roots, k8s
from .runtimes.discovery import discover, roots_from_cmdline
from .runtimes.docker import read_docker, read_docker_api
from .runtimes.oci import from_runtime_argv, read_containerd, read_crun, read_runc
from .runtimes.storage import read_storage
from .runtimes.worker import Job, Worker

log = logging.getLogger("c8.broker.containers")

# [prefix-]<64 hex>[.scope]; the lazy prefix lets "libpod-conmon-<id>" be seen whole
_COMPONENT = re.compile(r"^(?:(?P<prefix>[a-z][a-z0-9_.-]*?)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$")
_PREFIX_RUNTIME = {"docker": "docker", "libpod": "podman", "cri-containerd": "containerd",
                   "crio": "cri-o"}
# monitors that sit beside a container in a cgroup named for it, not inside it
_NOT_CONTAINER = {"libpod-conmon", "crio-conmon"}

Row = tuple[str, str, str, str, str, str, str, str, str, dict]
# (container_id, container_name, image_id, image_name, runtime,
#  k8s_namespace, k8s_pod_name, k8s_pod_uid, k8s_container_name, k8s_labels)
HOST_ROW: Row = ("", "", "", "", "", "", "", "", "", {})


def _safe(argv_of: Callable[[int], list[str]] | None, pid: int) -> list[str]:
    """``argv_of(pid)``, [] when absent or failing (the caller's table, not ours)."""
    try:
        return list(argv_of(pid)) if argv_of else []
    except Exception:
        log.exception("argv of pid %d", pid)
        return []


def _path_of(line: str) -> str:
    """The path of a /proc/<pid>/cgroup line ("4:memory:/docker/<id>"), or ``line``."""
    if not line.startswith("/") and line.count(":") >= 2:
        return line.split(":", 2)[2]
    return line


def _parse(path: str, leaf: bool) -> tuple[str, str, str] | None:
    """(runtime, id, pod uid of a kubepods path or "") of the container the path names."""
    parts = [p for p in _path_of(path.strip()).split("/") if p]
    found = _runtime_and_id(parts, leaf)
    return (*found, k8s.pod_uid_of_cgroup(parts)) if found else None


def _runtime_and_id(parts: list[str], leaf: bool) -> tuple[str, str] | None:
    positions = [len(parts) - 1] if leaf else range(len(parts) - 1, -1, -1)
    for i in positions:
        if i < 0:
            break
        m = _COMPONENT.match(parts[i])
        if not m:
            continue
        prefix, cid = m.group("prefix"), m.group("id")
        if prefix in _NOT_CONTAINER:
            return None
        if prefix:
            return _PREFIX_RUNTIME.get(prefix, "unknown"), cid
        parents = parts[:i]
        if parents and parents[-1] == "docker":
            return "docker", cid
        if any(p.startswith("kubepods") for p in parents):
            return "kubernetes", cid  # cgroupfs driver: the runtime is in the metadata
        if not parents:
            return "runc", cid  # runc/crun without cgroupsPath: /<id>
        if len(parents) == 1:
            return "containerd", cid  # /<namespace>/<id>
        return "unknown", cid
    return None


def parse_cgroup_path(path: str) -> tuple[str, str] | None:
    """(runtime, container_id) from a cgroup path or a /proc/<pid>/cgroup line.

    The innermost component holding a 64-hex id names the container (docker in
    docker gives the inner one). Runtime from the prefix (docker-, libpod-,
    cri-containerd-, crio-) or the parent (/docker/<id>; kubepods ->
    "kubernetes"; /<id> -> "runc"; /<ns>/<id> -> "containerd"). Conmon cgroups
    and paths without such an id give None.
    """
    found = _parse(path, leaf=False)
    return found[:2] if found else None


def pod_uid_of_cgroup(path: str) -> str:
    """The Kubernetes pod uid a kubepods cgroup path (or /proc/<pid>/cgroup line)
    names (kubepods/<qos>/pod<uid>/<id>, kubepods-<qos>-pod<uid_>.slice), else ""."""
    return k8s.pod_uid_of_cgroup([p for p in _path_of(path.strip()).split("/") if p])


def container_of_pid(pid: int, proc: str = "/proc") -> tuple[str, str] | None:
    """(runtime, container_id) of a process from any line of /proc/<pid>/cgroup;
    None on the host or when the process is gone."""
    for line in hostproc.cgroup_lines(pid, proc) or ():
        found = _parse(line, leaf=False)
        if found:
            return found[:2]
    return None


@dataclass
class _Entry:
    container_id: str
    runtime: str
    first_seen: float
    name: str = ""
    image_id: str = ""
    image_name: str = ""
    enriched: bool = False
    created_seen: bool = False
    attached_seen: bool = False
    destroyed_at: float | None = None
    init_pid: int = 0
    born_seen: bool = False  # its cgroup's mkdir (or its first attach) was seen: RUNNING may follow
    last_try: float = float("-inf")  # last metadata attempt
    job: Job | None = None  # the metadata lookup under way
    pod_uid: str = ""  # from a kubepods cgroup path, known at first sight
    k8s: k8s.K8s | None = None  # from the runtime's annotations, once enriched

    def row(self) -> Row:
        pod = self.k8s or _NO_POD
        return (self.container_id, self.name, self.image_id, self.image_name, self.runtime,
                pod.namespace, pod.pod_name, pod.pod_uid or self.pod_uid, pod.container_name,
                dict(pod.labels))


_NO_POD = k8s.K8s()


Reader = Callable[[Roots, str], Metadata | None]

# which metadata sources to try first for a runtime named by the cgroup path
_READERS: dict[str, Reader] = {
    "docker": lambda r, cid: read_docker(r.docker, cid),
    "docker-api": lambda r, cid: read_docker_api(r.docker_sockets, cid),
    "storage": lambda r, cid: read_storage(r.storage, cid),
    "containerd": lambda r, cid: read_containerd(r.containerd, cid),
    "runc": lambda r, cid: read_runc(r.runc, cid),
    "crun": lambda r, cid: read_crun(r.crun, cid),
}
# a runtime the cgroup path names for sure is only looked up in its own metadata
_ORDER = {
    "docker": ("docker", "docker-api"),
    "podman": ("storage",),
    "cri-o": ("storage",),
    "containerd": ("containerd",),
}
# the path only guesses at these (a kubepods or /<id> path): try every source
_ALL = ("runc", "crun", "docker", "docker-api", "containerd", "storage")


DISCOVER_AT_BIRTH_EVERY = 0.5  # s: a new container reads the runtimes' roots at most this often


class ContainerTable:
    """Known containers, each with a small integer index (0 = host).

    Bounded: at most ``max_entries`` containers; a destroyed one is expired
    ``expire_after`` seconds after its cgroup went, or sooner when the table
    is full. Metadata missing at first sight is retried by :meth:`refresh` for
    ``enrich_for`` seconds. Not thread-safe: the broker's loop owns it.
    """

    def __init__(self, proc: str = "/proc", roots: Roots | None = None, *,
                 discover_roots: bool = True, max_entries: int = 4096,
                 expire_after: float = 60.0, enrich_for: float = 120.0,
                 rediscover_every: float = 5.0, max_pids: int = 1 << 16,
                 clock: Callable[[], float] = time.monotonic,
                 worker: Worker | None = None, wait: float = 0.1,
                 lookup_deadline: float = 2.0,
                 advertiser: Callable[[int, str], hostproc.Advertiser] = hostproc.advertiser) -> None:
        self.proc = proc
        self.roots = roots if roots is not None else Roots()
        self.discover_roots = discover_roots
        self.max_entries = max_entries
        self.expire_after = expire_after
        self.enrich_for = enrich_for
        self.rediscover_every = rediscover_every
        self.max_pids = max_pids
        self.clock = clock
        self.worker = worker if worker is not None else Worker()
        self.wait = wait  # longest the caller waits for one lookup
        self.lookup_deadline = lookup_deadline
        self.advertiser = advertiser
        self.overflow = 0  # containers refused because the table was full
        # runtimes_ignored: untrusted runtime processes at the last discovery;
        # untrusted_runtimes: cgroup makers whose command line named no root we trust
        self.counts = {"pid_errors": 0, "untrusted_runtimes": 0, "runtimes_ignored": 0, "gave_up": 0}
        self._entries: dict[int, _Entry] = {}
        self._moves: dict[int, list[tuple[int, int]]] = {}  # pid -> [(time, index)] this window
        self._by_id: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1
        self._pids: dict[int, int] = {}
        self._retired: set[int] = set()  # exited pids, forgotten at the next window
        self._attaches: list[tuple[int, int, int, str]] = []  # heap: (time, seq, pid, path)
        self._attach_seq = 0
        self._pending_pids: dict[int, int] = {}  # pid -> queued attaches not applied yet
        self._awaiting: dict[int, int] = {}  # runtime pid -> index of the container it made, unnamed
        self._last_discovery = float("-inf")
        self._discovery: Job | None = None
        if discover_roots:  # at start-up, not on the release path: lookups queue behind it
            self._discover(lookup_deadline)

    def stats(self) -> dict[str, int]:
        """Counters for ``c8ctl status``: how many containers are known, and
        every way a lookup left a container's name unknown."""
        w = self.worker.counts
        return {"known": len(self._entries), "unnamed": sum(not e.enriched for e in self._entries.values()),
                "overflow": self.overflow, "lookups": w["jobs"], "lookup_failed": w["failed"],
                "lookup_timed_out": w["timed_out"], "lookup_dropped": w["dropped"],
                "lookup_stuck_threads": w["stuck_threads"], "roots_refused": self.roots.refused,
                "roots": sum(len(getattr(self.roots, k)) for k in ROOT_KINDS),
                **self.counts}

    # -- identity --------------------------------------------------------

    def index_of(self, runtime: str, container_id: str, pod_uid: str = "") -> int:
        """Index of a container, created (and enriched) on first sight;
        0 if the table is full of live containers. ``pod_uid``: the Kubernetes
        pod its cgroup path names, if any."""
        index = self._by_id.get(container_id)
        if index is not None:
            entry = self._entries.get(index)
            if entry is not None and pod_uid and not entry.pod_uid:
                entry.pod_uid = pod_uid  # first seen through a path that did not say
            return index
        if len(self._entries) >= self.max_entries:
            self._expire(force=True)
            if len(self._entries) >= self.max_entries:
                self.overflow += 1
                return 0
        index = self._free.pop() if self._free else self._allocate()
        entry = _Entry(container_id, runtime, self.clock(), pod_uid=pod_uid)
        self._entries[index] = entry
        self._by_id[container_id] = index
        if self.discover_roots and entry.first_seen - self._last_discovery >= DISCOVER_AT_BIRTH_EVERY:
            # The runtime that made it (podman with its own --root, conmon) may name a root
            # not known yet, and may be gone within a second: read it now, before the
            # lookup (the worker runs them in turn). Waiting for refresh's period missed
            # short podman runs on a loaded host: never named.
            self._discover(0.0)
        self._enrich(entry)
        return index

    def _allocate(self) -> int:
        index = self._next
        self._next += 1
        return index

    def lookup_pid(self, pid: int) -> int:
        """Container index of a process (0 = host), cached until :meth:`forget_pid`."""
        index = self._pids.get(pid)
        if index is not None:
            return index
        if self._pending_pids.get(pid):
            # it is moved later (runc's helper execs on the host, then is attached):
            # /proc shows where it is now, not where it was at this event
            self._set_pid(pid, 0)
            return 0
        lines = hostproc.cgroup_lines(pid, self.proc)
        if lines is None:
            return 0  # gone: do not cache, the pid may be reused
        try:
            found = next(filter(None, (_parse(line, leaf=False) for line in lines)), None)
            index = self.index_of(*found) if found else 0
        except Exception:  # never expected; identity unknown beats a stopped broker
            self.counts["pid_errors"] += 1
            log.exception("container of pid %d", pid)
            return 0
        self._set_pid(pid, index)
        return index

    def _set_pid(self, pid: int, index: int) -> None:
        if len(self._pids) >= self.max_pids:
            self._pids.clear()  # crude bound; entries are re-read on demand
        self._pids[pid] = index

    def lookup_pids(self, pids: np.ndarray) -> np.ndarray:
        """Vector form of :meth:`lookup_pid`: one lookup per unique pid."""
        pids = np.asarray(pids)
        if len(pids) and (pids == pids[0]).all():  # one process (a storm): no sort
            return np.full(len(pids), self.lookup_pid(int(pids[0])), np.uint32)
        unique, inverse = np.unique(pids, return_inverse=True)
        indices = np.fromiter((self.lookup_pid(int(p)) for p in unique), dtype=np.uint32,
                              count=len(unique))
        return indices[inverse]

    def forget_pid(self, pid: int) -> None:
        """Drop a pid from the cache at once."""
        self._pids.pop(pid, None)
        self._retired.discard(pid)

    def retire_pid(self, pid: int) -> None:
        """Forget ``pid`` at the next :meth:`begin_window` (call on its exit): the
        other events of the window it exited in still resolve to its container."""
        self._retired.add(pid)

    def begin_window(self) -> None:
        """Forget the pids retired during the previous window, and its moves."""
        for pid in self._retired:
            self._pids.pop(pid, None)
        self._retired.clear()
        self._moves.clear()

    def _moved(self, pid: int, time_ns: int, before: int) -> None:
        """Remember that ``pid``'s container changed at ``time_ns`` in this window."""
        history = self._moves.setdefault(pid, [(-1, before)])
        history.append((time_ns, self._pids.get(pid, 0)))

    def indices_at(self, pids: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Container index of each event's pid as of the event's time: the table
        now, except for pids that moved in this window (a searchsorted of the event
        times in their move times)."""
        out = self.lookup_pids(pids) if len(pids) else np.zeros(0, np.uint32)
        for pid in (self._moves.keys() & set(np.unique(pids).tolist())) if self._moves else ():
            at = np.flatnonzero(pids == pid)
            history = self._moves[pid]
            when = np.array([t for t, _ in history], np.int64)
            which = np.searchsorted(when, times[at].astype(np.int64), side="right") - 1
            out[at] = np.array([i for _, i in history], np.uint32)[np.maximum(which, 0)]
        return out

    def on_fork(self, parent: int, child: int, time_ns: int = 0) -> int:
        """The child starts in its parent's cgroup: cache that (it may be gone
        before anyone reads its /proc). Returns the child's index."""
        self._retired.discard(child)  # a reused pid: the new process keeps this entry
        known = parent in self._pids
        index = self.lookup_pid(parent)
        if known or parent in self._pids:  # else the parent is gone: no guess for the child
            before = self._pids.get(child, 0)
            self._set_pid(child, index)
            if before != index:
                self._moved(child, time_ns, before)
        return index

    def row(self, index: int) -> Row:
        """(container_id, container_name, image_id, image_name, runtime, k8s_namespace,
        k8s_pod_name, k8s_pod_uid, k8s_container_name, k8s_labels {key: value});
        empty for 0."""
        entry = self._entries.get(index)
        return entry.row() if entry else HOST_ROW

    def table(self, indices: Iterable[int]) -> dict[int, Row]:
        """Rows of the given indices (for a batch header). Metadata still missing
        is retried here (at most every 0.1 s per container), so the first
        events of a container whose runtime writes it late still get it."""
        rows = {}
        for i in set(np.asarray(list(indices)).tolist()):
            entry = self._entries.get(int(i))
            if entry is not None and not entry.enriched:
                self._retry(entry, 0.1, self.wait)
            rows[int(i)] = entry.row() if entry else HOST_ROW
        return rows

    def runtimes(self, indices: np.ndarray) -> np.ndarray:
        """The runtime of each index as it is known now (bytes, for a ``runtime`` column)."""
        return np.array([self.row(int(i))[4].encode() for i in indices.tolist()], dtype="S16")

    def __len__(self) -> int:
        return len(self._entries)

    # -- lifecycle hints -------------------------------------------------

    def on_cgroup_mkdir(self, path: str, pid: int = 0,
                        argv_of: Callable[[int], list[str]] | None = None) -> tuple[int, str, str] | None:
        """(index, runtime, id) the first time a container's own cgroup is made
        (one mkdir per hierarchy: the rest give None); None for other cgroups.
        ``pid`` is the process making it (the low-level runtime): when no
        metadata names the container yet, its command line may (runc/crun
        ``--bundle``; it also reveals a private ``--root``): from /proc, else
        from ``argv_of(pid)`` (the command line its exec event recorded: a
        short ``runc run`` may be gone by the time its mkdir is read)."""
        found = _parse(path, leaf=True)
        if not found:
            return None
        index = self.index_of(*found)
        entry = self._entries.get(index)
        if entry is None:
            return None
        if entry.destroyed_at is not None:  # the id lives again: a new life
            entry.destroyed_at, entry.created_seen, entry.attached_seen = None, False, False
            entry.init_pid = 0
        if entry.created_seen:
            return None
        entry.created_seen = entry.born_seen = True
        if not entry.enriched and pid > 0 and not self._enrich_from_process(entry, pid, _safe(argv_of, pid)):
            if len(self._awaiting) >= 1024:
                self._awaiting.clear()
            self._awaiting[pid] = index  # its exec event, released later, has the command line
        return index, entry.runtime, entry.container_id

    def on_exec(self, pid: int, argv: list[str]) -> None:
        """A process's exec, in time order: when it made a container's cgroup
        whose metadata is still missing (``crun run`` is often gone by the time
        its mkdir is read), its command line may name the bundle."""
        index = self._awaiting.pop(pid, None) if self._awaiting else None
        entry = self._entries.get(index) if index else None
        if entry is not None and not entry.enriched:
            cid, runtime = entry.container_id, entry.runtime
            self._start(entry, lambda: self._meta_from_argv(cid, runtime, pid, argv, None), self.wait)

    def on_cgroup_rmdir(self, path: str) -> tuple[int, str, str] | None:
        """(index, runtime, id) the first time a container's cgroup is removed
        (DESTROYED); None for other cgroups and for later hierarchies."""
        found = _parse(path, leaf=True)
        if not found:
            return None
        index = self.index_of(*found)
        entry = self._entries.get(index)
        if entry is None or entry.destroyed_at is not None:
            return None
        entry.destroyed_at = self.clock()
        return index, entry.runtime, entry.container_id

    def on_cgroup_attach(self, path: str, pid: int) -> tuple[int, str, str] | None:
        """Record that ``pid`` moved into ``path`` (keeps the pid cache right:
        runc attaches its own process, whose children become the container).
        (index, runtime, id) the first time a process enters a container."""
        found = _parse(path, leaf=False)
        if not found:
            self._set_pid(pid, 0)
            return None
        known = found[1] in self._by_id
        index = self.index_of(*found)
        self._set_pid(pid, index)
        entry = self._entries.get(index)
        if entry is None or entry.attached_seen:
            return None
        entry.attached_seen = True
        if not known:  # its mkdir was missed (or never happens: a pre-made cgroup)
            entry.born_seen = True
        return index, entry.runtime, entry.container_id

    def queue_attach(self, time_ns: int, pid: int, path: str) -> None:
        """Hold a cgroup_attach_task until the process events before it are
        applied (:meth:`apply_attaches`): events arrive per CPU, out of order."""
        self._attach_seq += 1
        heapq.heappush(self._attaches, (time_ns, self._attach_seq, pid, path))
        self._pending_pids[pid] = self._pending_pids.get(pid, 0) + 1

    def apply_attaches(self, until_ns: int) -> None:
        """Apply the queued attaches stamped at or before ``until_ns``, in time order."""
        while self._attaches and self._attaches[0][0] <= until_ns:
            time_ns, _, pid, path = heapq.heappop(self._attaches)
            left = self._pending_pids.get(pid, 1) - 1
            if left:
                self._pending_pids[pid] = left
            else:
                self._pending_pids.pop(pid, None)
            before = self._pids.get(pid, 0)
            self.on_cgroup_attach(path, pid)
            self._moved(pid, time_ns, before)

    def mark_running(self, index: int, pid: int) -> bool:
        """Note ``pid`` as the container's init (the first exec inside it);
        True the first time, when the broker should emit RUNNING. Only for a
        container whose birth was seen: in one found running (scan, or a
        /proc lookup) the first exec seen is not its init's."""
        entry = self._entries.get(index)
        if entry is None or entry.init_pid or not entry.born_seen:
            return False
        entry.init_pid = pid
        return True

    def init_pid(self, index: int) -> int:
        """Host pid of the container's init, 0 if unknown."""
        entry = self._entries.get(index)
        return entry.init_pid if entry else 0

    def init_of(self, pid: int) -> int:
        """Index of the container whose init is ``pid`` (EXITED on its exit), else 0."""
        index = self._pids.get(pid, 0)
        entry = self._entries.get(index)
        return index if entry is not None and entry.init_pid == pid else 0

    # -- start-up and housekeeping ----------------------------------------

    def scan(self) -> list[int]:
        """Find the containers running now from every pid's cgroup (so those
        started before the sensor are known); their init is the member whose
        parent is outside. Returns their indices."""
        if self.discover_roots:
            self._discover(self.lookup_deadline)  # start-up: see __init__
        members: dict[int, list[int]] = {}
        for pid in hostproc.pids(self.proc):
            self._pids.pop(pid, None)
            index = self.lookup_pid(pid)
            if index:
                members.setdefault(index, []).append(pid)
        for index, group in members.items():
            entry = self._entries[index]
            entry.created_seen = entry.attached_seen = True
            if not entry.init_pid:
                inside = set(group)
                for pid in sorted(group):
                    ppid = hostproc.ppid(pid, self.proc)
                    if ppid is not None and ppid not in inside:
                        entry.init_pid = pid
                        break
        return sorted(members)

    def refresh(self) -> list[int]:
        """Collect lookups done, retry metadata for containers not enriched
        yet (without waiting: answers are collected at the next call), expire
        destroyed ones; returns the indices enriched since the last call."""
        now = self.clock()
        self.worker.check()
        done = [i for i, e in self._entries.items() if e.job is not None and self._collect(e)]
        pending = [(i, e) for i, e in self._entries.items() if not e.enriched]
        for _, e in pending:
            if now - e.first_seen >= self.enrich_for and e.job is None and e.last_try > float("-inf"):
                e.last_try = float("-inf")  # counted once
                self.counts["gave_up"] += 1
        pending = [(i, e) for i, e in pending if now - e.first_seen < self.enrich_for]
        if pending and self.discover_roots and now - self._last_discovery >= self.rediscover_every:
            self._discover(0.0)
        done += [i for i, e in pending if e.job is None and self._enrich(e, 0.0)]
        self._expire(force=False)
        return done

    def _discover(self, wait: float) -> None:
        """Add the roots running daemons advertise (on the worker)."""
        self._last_discovery = self.clock()
        if self._discovery is not None and not self._discovery.done.is_set():
            return
        self._discovery = self.worker.submit(self._discover_job, deadline=10 * self.lookup_deadline)
        self.worker.wait(self._discovery, wait)

    def _discover_job(self) -> None:
        self.counts["runtimes_ignored"] = discover(self.roots, self.proc, self.advertiser)

    # -- metadata lookups: on the worker, each applied here once done ---------------------

    def _retry(self, entry: _Entry, every: float, wait: float) -> bool:
        if entry.job is not None:
            return self._collect(entry)
        now = self.clock()
        if now - entry.last_try < every or now - entry.first_seen >= self.enrich_for:
            return False
        return self._enrich(entry, wait)

    def _enrich(self, entry: _Entry, wait: float | None = None) -> bool:
        cid, runtime = entry.container_id, entry.runtime
        return self._start(entry, lambda: self._meta(cid, runtime),
                           self.wait if wait is None else wait)

    def _start(self, entry: _Entry, lookup: Callable[[], Metadata | None], wait: float) -> bool:
        """Run ``lookup`` for ``entry`` on the worker (one at a time per
        container), wait at most ``wait`` s; True when the entry is enriched now."""
        if entry.job is not None and not self._collect(entry) and entry.job is not None:
            return False  # one lookup under way already
        if entry.enriched:
            return True
        entry.last_try = self.clock()
        entry.job = self.worker.submit(lookup, self.lookup_deadline)
        if entry.job is None:
            return False
        self.worker.wait(entry.job, wait)
        return self._collect(entry)

    def _collect(self, entry: _Entry) -> bool:
        """Apply the entry's finished lookup, if any; True when enriched."""
        job = entry.job
        if job is not None and job.done.is_set():
            entry.job = None
            meta = job.result if not job.failed else None
            if isinstance(meta, Metadata) and not entry.enriched:
                entry.name, entry.image_id, entry.image_name = meta.name, meta.image_id, meta.image_name
                entry.k8s = meta.k8s
                if entry.runtime not in _ORDER:  # the path only guessed the runtime
                    entry.runtime = meta.runtime
                entry.enriched = True
        return entry.enriched

    def _enrich_from_process(self, entry: _Entry, pid: int, fallback: list[str]) -> bool:
        """Metadata from the runtime process making the container's cgroup
        (its command line from /proc, else ``fallback``: its exec's)."""
        cid, runtime = entry.container_id, entry.runtime
        return self._start(entry, lambda: self._meta_from_argv(cid, runtime, pid, None, fallback),
                           self.wait)

    # the lookups themselves: run on the worker thread, touch no entry

    def _meta(self, cid: str, runtime: str) -> Metadata | None:
        return self._with_pod(cid, runtime, self._read(cid, runtime))

    def _read(self, cid: str, runtime: str) -> Metadata | None:
        for source in _ORDER.get(runtime, _ALL):
            meta = _READERS[source](self.roots, cid)
            if meta is not None:
                return meta
        return None

    def _with_pod(self, cid: str, runtime: str, meta: Metadata | None) -> Metadata | None:
        """``meta`` with its pod's labels from the pod's sandbox when its own
        annotations have none (cri-o keeps them on the sandbox only)."""
        pod = meta.k8s if meta is not None else None
        if pod is None or pod.labels or not pod.sandbox_id or pod.sandbox_id == cid:
            return meta
        sandbox = self._read(pod.sandbox_id, runtime)
        return dataclasses.replace(meta, k8s=k8s.merge(pod, "", sandbox.k8s if sandbox else None))

    def _meta_from_argv(self, cid: str, runtime: str, pid: int, argv: list[str] | None,
                        fallback: list[str]) -> Metadata | None:
        """A runtime's command line (``argv``, else /proc's, else ``fallback``)
        may name a root (trusted only from root's own runtimes, see
        runtimes.discovery) and a bundle (read only when owned by the
        process's uid, or root's when that is unknown)."""
        who = self.advertiser(pid, self.proc)
        live = bool(who.argv)
        from_proc = not argv and live  # its working directory is the default bundle
        argv = argv or who.argv or fallback
        if not argv:
            return None
        if who.trusted:
            roots_from_cmdline(argv, self.roots)
        elif live:
            self.counts["untrusted_runtimes"] += 1
        meta = self._meta(cid, runtime)
        if meta is not None or runtime in _ORDER:
            # docker's or podman's runc: the bundle knows no name, their metadata does
            return meta
        owner = None if who.trusted else (who.uid or 0)
        cwd = hostproc.cwd(pid, self.proc) if from_proc else ""
        return self._with_pod(cid, runtime, from_runtime_argv(argv, cid, cwd, owner))

    def _expire(self, force: bool) -> None:
        now = self.clock()
        gone = sorted((e.destroyed_at, i) for i, e in self._entries.items()
                      if e.destroyed_at is not None)
        if not force:
            gone = [(t, i) for t, i in gone if now - t >= self.expire_after]
        elif gone:
            gone = gone[: max(1, len(gone) // 4)]  # make room, keep the newest
        if not gone:
            return
        freed = {i for _, i in gone}
        for index in freed:
            entry = self._entries.pop(index)
            del self._by_id[entry.container_id]
            self._free.append(index)
        # a freed index will be reused: no pid may still point at it
        for pid in [p for p, i in self._pids.items() if i in freed]:
            del self._pids[pid]
