"""The field table: every event field's name, numpy dtype and meaning.

One table feeds the numpy dtypes the broker publishes, the filter language's
type checks, the docs and ``c8ctl fields``. Each event *category* (process,
file, network, ...) has one dtype: the common header followed by its payload.
A batch on the wire holds events of one category; ``kind`` tells the subtype.

String fields are fixed-width byte strings (numpy ``S<n>``), truncated at the
width; the client decodes them as UTF-8 with replacement.

Container identity is dictionary-encoded: events carry ``container`` (a small
integer, 0 on the host) and each published batch carries the table that maps
it to container_id, container_name, image_id and image_name, and the
Kubernetes identity k8s_namespace, k8s_pod_name, k8s_pod_uid,
k8s_container_name and k8s_labels. Clients expand it, so filters and users
still see the named fields.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from c8.schema import rows

WIRE_VERSION = 1


@dataclass(frozen=True)
class Field:
    """One event field: its name, numpy type code and meaning."""

    name: str
    dtype: str
    description: str
    source: str = ""  # where the value comes from, for the docs

    @property
    def is_string(self) -> bool:
        return self.dtype.startswith("S")


# Subtypes of each category, as Capsule8's telemetry API named them.
KINDS: dict[str, tuple[str, ...]] = {
    "process": ("FORK", "EXEC", "EXIT"),
    "syscall": ("ENTER", "EXIT"),
    "file": ("OPEN", "CREATE", "DELETE", "RENAME", "LINK", "SYMLINK", "ATTRIBUTE_CHANGE"),
    "network": (
        "CONNECT_ATTEMPT", "CONNECT_RESULT", "BIND_ATTEMPT", "BIND_RESULT",
        "LISTEN_ATTEMPT", "LISTEN_RESULT", "ACCEPT_ATTEMPT", "ACCEPT_RESULT",
        "SENDTO_ATTEMPT", "SENDTO_RESULT", "RECVFROM_ATTEMPT", "RECVFROM_RESULT",
    ),
    "kernel_call": ("CALL", "RETURN"),
    "user_call": ("CALL", "RETURN"),
    "container": ("CREATED", "RUNNING", "EXITED", "DESTROYED"),
    "lost": ("LOST",),
    "limiter": ("TRIPPED", "RESUMED", "EXITING"),
}
CATEGORIES: tuple[str, ...] = tuple(KINDS)


def kind_code(category: str, kind: str) -> int:
    """The ``kind`` column value of a subtype name (1-based; 0 is never used)."""
    return KINDS[category].index(kind) + 1


def kind_name(category: str, code: int) -> str:
    return KINDS[category][code - 1]


COMMON: tuple[Field, ...] = (
    Field("sensor_sequence_number", "u8", "gap-free sequence number of this event in this sensor's stream", "broker"),
    Field("sensor_monotime_nanos", "u8", "CLOCK_MONOTONIC time of the event, from the kernel", "perf sample time"),
    Field("kind", "u1", "subtype within the category (see KINDS)", "broker"),
    Field("cpu", "u2", "CPU the event happened on", "perf sample"),
    Field("process_pid", "i4", "process (thread group) id", "perf sample"),
    Field("process_tid", "i4", "thread id", "perf sample"),
    Field("process_id", "S16", "process identity, unique across pid reuse: hash of boot id, pid and start time", "process table"),
    Field("container", "u4", "index into the batch's container table; 0 on the host", "container table"),
    Field("uid", "i4", "real user id (-1 when unknown)", "eBPF or process table"),
    Field("gid", "i4", "real group id (-1 when unknown)", "eBPF or process table"),
    Field("euid", "i4", "effective user id (-1 when unknown)", "process table"),
    Field("egid", "i4", "effective group id (-1 when unknown)", "process table"),
    Field("suid", "i4", "saved user id (-1 when unknown)", "process table"),
    Field("sgid", "i4", "saved group id (-1 when unknown)", "process table"),
    Field("fsuid", "i4", "filesystem user id (-1 when unknown)", "process table"),
    Field("fsgid", "i4", "filesystem group id (-1 when unknown)", "process table"),
)

# Fields a client sees that are not columns: derived per event on request.
VIRTUAL: tuple[Field, ...] = (
    Field("id", "S64", "unique event id: sha256 of sensor_id, sequence number and monotime", "client"),
    Field("sensor_id", "S64", "stable id of the sensor's host", "broker"),
    Field("type", "S16", "event category", "batch header"),
    Field("container_id", "S64", "container id; empty on the host", "container table"),
    Field("container_name", "S128", "container name; empty on the host", "container table"),
    Field("image_id", "S80", "image id; empty on the host", "container table"),
    Field("image_name", "S128", "image name; empty on the host", "container table"),
    Field("k8s_namespace", "S64", "Kubernetes namespace of the container's pod; empty outside a pod",
          "container table: CRI annotations (io.kubernetes.cri.sandbox-namespace, io.kubernetes.pod.namespace)"),
    Field("k8s_pod_name", "S256", "name of the container's Kubernetes pod; empty outside a pod",
          "container table: CRI annotations (io.kubernetes.cri.sandbox-name, io.kubernetes.pod.name)"),
    Field("k8s_pod_uid", "S40", "uid of the container's Kubernetes pod; empty outside a pod",
          "container table: CRI annotations (io.kubernetes.cri.sandbox-uid, io.kubernetes.pod.uid), "
          "else the kubepods cgroup path"),
    Field("k8s_container_name", "S64", "the container's name in its pod's spec; empty outside a pod",
          "container table: CRI annotations (io.kubernetes.cri.container-name, io.kubernetes.container.name)"),
    Field("k8s_labels", "S384", "labels of the container's pod: a map {key: value} in events ({} "
          "outside a pod or when unknown, at most 64); filters test each label as the text key=value, "
          "true when any matches (k8s_labels == \"app=web\", like \"app=*\"; !=, not like, not in: when "
          "none does; is null: no labels)",
          "container table: cri-o's io.kubernetes.cri-o.Labels annotation, the pod sandbox's when the "
          "container's has none (containerd keeps pod labels in its database: none)"),
    Field("process_lineage", "O", "ancestors of the acting process, parent first, up to the host's or "
          "the container's init (at most 16): each {pid, process_id, exec_filename, command_line}",
          "process table"),
    *(Field(f"{rel}.{name}", code, f"{what} of {'the parent' if rel == 'parent' else 'any ancestor'}"
            f"{'' if rel == 'parent' else ' (true when one matches)'}; filters only", "process table")
      for rel in ("parent", "ancestor")
      for name, code, what in (("pid", "i4", "pid"), ("process_id", "S16", "process_id"),
                               ("exec_filename", "S256", "executable"),
                               ("command_line", "S1024", "command line"))),
)

ADDRESS = "S108"
# The executable of the acting process, on the categories where rules need it
# (not on syscall events: their volume makes every byte count).
PROCESS_EXEC = Field("process_exec_filename", "S256", "executable of the acting process", "process table")  # text form of an IPv4/IPv6 address, or a unix socket path

PAYLOAD: dict[str, tuple[Field, ...]] = {
    "process": (
        Field("fork_child_pid", "i4", "FORK: pid of the new process or thread", "sched_process_fork"),
        Field("fork_child_id", "S16", "FORK: process_id of the child", "process table"),
        Field("fork_clone_flags", "u8", "FORK: clone flags, when known (0 otherwise)", "eBPF clone"),
        Field("fork_is_thread", "u1", "FORK: 1 when the child is a thread of the parent", "sched_process_fork"),
        Field("exec_filename", "S256", "EXEC: path of the executed file", "sched_process_exec"),
        Field("exec_command_line", "S1024", "EXEC: argv joined with spaces", "eBPF execve"),
        Field("exit_code", "i4", "EXIT: raw wait status", "sched_process_exit / signal"),
        Field("exit_status", "i4", "EXIT: exit status when exited normally", "derived"),
        Field("exit_signal", "i4", "EXIT: terminating signal, 0 if none", "derived"),
        Field("exit_core_dumped", "u1", "EXIT: 1 when a core was dumped", "derived"),
        Field("parent_pid", "i4", "pid of the parent process", "process table"),
        Field("parent_process_id", "S16", "process_id of the parent", "process table"),
        Field("parent_exec_filename", "S256", "executable of the parent", "process table"),
        PROCESS_EXEC,
    ),
    "syscall": (
        Field("id", "i8", "syscall number", "raw_syscalls"),
        Field("arg0", "u8", "ENTER: argument 0", "raw_syscalls:sys_enter"),
        Field("arg1", "u8", "ENTER: argument 1", "raw_syscalls:sys_enter"),
        Field("arg2", "u8", "ENTER: argument 2", "raw_syscalls:sys_enter"),
        Field("arg3", "u8", "ENTER: argument 3", "raw_syscalls:sys_enter"),
        Field("arg4", "u8", "ENTER: argument 4", "raw_syscalls:sys_enter"),
        Field("arg5", "u8", "ENTER: argument 5", "raw_syscalls:sys_enter"),
        Field("ret", "i8", "EXIT: return value", "raw_syscalls:sys_exit"),
    ),
    "file": (
        Field("filename", "S256", "path as the process passed it (RENAME/LINK/SYMLINK: the new name)", "eBPF"),
        Field("path", "S256", "filename as the kernel resolved it: absolute and canonical (no . .. // "
              "or symlinked directory, inside the process's root); empty when it cannot be known "
              "(path_status says why)",
              "broker: event stream, /proc/<pid>/root, cwd, fd/<n>"),
        Field("oldname", "S256", "RENAME/LINK/SYMLINK: source path", "eBPF"),
        Field("oldpath", "S256", "RENAME/LINK: oldname resolved like path; SYMLINK: the target, "
              "resolved from the link's directory", "broker: event stream, /proc/<pid>/root, cwd, fd/<n>"),
        Field("newname", "S256", "RENAME/LINK/SYMLINK: target path", "eBPF"),
        Field("open_flags", "i4", "OPEN: flags", "eBPF"),
        Field("open_mode", "i4", "OPEN/CREATE/ATTRIBUTE_CHANGE: mode", "eBPF"),
        Field("owner_uid", "i4", "ATTRIBUTE_CHANGE: new owner (-1 unchanged)", "eBPF"),
        Field("owner_gid", "i4", "ATTRIBUTE_CHANGE: new group (-1 unchanged)", "eBPF"),
        Field("syscall", "i4", "syscall number that made the event", "eBPF"),
        Field("ret", "i8", "result: fd or 0 on success, -errno on failure", "sys_exit"),
        Field("dirfd", "i4", "the directory fd filename is relative to (-100: the cwd); fchmod/fchown: "
              "the fd acted on", "eBPF"),
        Field("olddirfd", "i4", "RENAME/LINK: the directory fd oldname is relative to (-100: the cwd)", "eBPF"),
        Field("path_status", "S16", "where path came from: absolute (the name was), stream (a directory, "
              "cwd or fd learnt from this process's earlier events), proc (/proc/<pid>/cwd or fd/<n> when "
              "the event arrived); why it is empty: unreadable (the name could not be read), unknown "
              "(relative or fd-only, and neither knew the directory or fd)", "broker"),
        PROCESS_EXEC,
    ),
    "network": (
        Field("fd", "i4", "socket file descriptor", "eBPF"),
        Field("family", "u2", "address family (AF_INET 2, AF_INET6 10, AF_UNIX 1)", "sockaddr"),
        Field("address", ADDRESS, "address text or unix path", "sockaddr"),
        Field("port", "u2", "port in host order", "sockaddr"),
        Field("port_raw", "u2", "port as stored (network order)", "sockaddr"),
        Field("backlog", "i4", "LISTEN: backlog", "eBPF"),
        Field("syscall", "i4", "syscall number that made the event", "eBPF"),
        Field("ret", "i8", "RESULT: return value", "sys_exit"),
        PROCESS_EXEC,
    ),
    "kernel_call": (
        Field("symbol", "S128", "kernel function probed", "kprobe"),
        Field("probe", "S64", "tracefs event name of the probe", "kprobe"),
    ),
    "user_call": (
        Field("executable", "S256", "binary or library probed", "uprobe"),
        Field("symbol", "S128", "function probed", "uprobe"),
        Field("probe", "S64", "tracefs event name of the probe", "uprobe"),
    ),
    "container": (
        Field("host_pid", "i4", "RUNNING: host pid of the container's init", "cgroup + runtime"),
        Field("runtime", "S16", "docker, podman, containerd, runc, crun, cri-o, ...", "cgroup path"),
        Field("exit_code", "i4", "EXITED: raw wait status of init", "sched_process_exit"),
        Field("exit_status", "i4", "EXITED: exit status", "derived"),
        Field("exit_signal", "i4", "EXITED: terminating signal", "derived"),
    ),
    "lost": (
        Field("source", "S16", "where events were lost: kernel (ring full), ebpf:<family> (an eBPF record "
                       "the kernel could not write or save, counted in the kernel), collector (broker not "
                       "reading), unknown_sample / bpf_unknown_tag (records the collector could not "
                       "attribute), broker (a batch it could not build), subscriber (its queue full), rate_cap",
              "collector/broker"),
        Field("count", "u8", "number of events lost", "PERF_RECORD_LOST or counters"),
    ),
    "limiter": (
        Field("dormancy_nanos", "u8", "how long collection sleeps (TRIPPED)", "event limiter"),
        Field("trips", "u4", "trips so far", "event limiter"),
        Field("top_pids", "S128", "TRIPPED/EXITING: the pids with the most events in the windows that "
              "tripped it, most first: pid:events,... (up to 5)", "event limiter"),
        Field("top_uids", "S128", "TRIPPED/EXITING: the same by uid (-1: unknown)", "event limiter"),
        Field("top_containers", "S128", "TRIPPED/EXITING: the same by container (first 12 characters "
              "of its id; host for the host)", "event limiter"),
    ),
}

# kernel_call and user_call batches carry one extra column per fetch-argument the
# subscription asked for, named ``arg_<name>`` with the type the probe reports;
# the batch header lists them, and clients show them as ``arguments``.
ARGUMENT_PREFIX = "arg_"

_DTYPES: dict[str, np.dtype] = {}


def dtype(category: str) -> np.dtype:
    """The numpy dtype of a category's events (common header + payload)."""
    if category not in _DTYPES:
        fields = COMMON + PAYLOAD[category]
        _DTYPES[category] = np.dtype([(f.name, "<" + f.dtype if f.dtype[0] in "iuf" else f.dtype) for f in fields])
    return _DTYPES[category]


def fields(category: str) -> tuple[Field, ...]:
    """Every field a client sees for a category, columns and virtual ones."""
    return COMMON + VIRTUAL + PAYLOAD[category]


def field_types(category: str) -> dict[str, str]:
    """name -> numpy type code, for the filter language's checks."""
    return {f.name: f.dtype for f in fields(category)}


def empty(category: str, n: int, widths: dict[str, int] | None = None) -> np.ndarray:
    """A batch of n events with every field zero, credentials -1; ``widths``: string
    fields held narrower than declared (c8.schema.rows)."""
    dt = rows.with_widths(dtype(category), widths) if widths else dtype(category)
    a = np.empty(n, dt)
    rows.fill(a, _blank(dt))
    return a


@functools.lru_cache(maxsize=rows.LAYOUTS_KEPT)
def _blank(dt: np.dtype) -> np.ndarray:
    a = np.zeros(1, dt)
    for name in ("uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid"):
        a[name] = -1
    a.flags.writeable = False
    return a
