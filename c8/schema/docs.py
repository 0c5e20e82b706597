"""The event reference (docs/events.md), generated from the field table."""

from __future__ import annotations

from c8.schema.fields import COMMON, KINDS, PAYLOAD, VIRTUAL, Field

HEADER = """# Events

Generated from `c8/schema/fields.py` by `c8ctl fields --markdown`; do not edit
by hand (a unit test checks it is up to date).

Every event has the common fields, then the payload of its type. `kind` names
the subtype. Strings are fixed-width and truncated at the width. *Source* says
where each value comes from: `perf sample` (the sample header of the kernel's
record), `eBPF` (the sensor's tracepoint programs, reading the syscall's
arguments and the user memory they point to), a tracepoint name, `sockaddr`
(the address the process passed, decoded in the broker), the broker's process
and container tables, or the client.

Notes:
- `filename` is the name as the process passed it; `path` is that name as
  the kernel resolved it: absolute, canonical (no `.`, `..`, repeated slash
  or symlinked directory) and inside the process's root (chroot, container),
  as the process sees it. A relative name is resolved against the directory
  it is relative to (`dirfd`, -100 for the cwd) and an fd-only call (fchmod,
  fchown: empty `filename`, the fd in `dirfd`) names what that fd names, as
  of the event: the broker keeps each process's descriptors learnt from the
  event stream (every successful OPEN's `ret` with its `path`, every
  chdir/fchdir's cwd, dup2/dup3's copies; copied to the child at fork,
  O_CLOEXEC ones dropped at exec, all at exit; closes are not collected: an
  entry lives until its number is set again; bounded by `fd_table.*`,
  evictions and resolutions counted in `c8ctl status --json`), so a descriptor
  closed or reused, or a cwd changed, right after the call does not matter.
  Only a descriptor or cwd the stream did not show (from before the sensor
  started, or made by a call not collected: dup, fcntl F_DUPFD, socket, a
  filtered-out open) is read from
  `/proc/<pid>/cwd` or `/proc/<pid>/fd/<n>` when the record arrives. `path_status` says which
  (absolute, stream, proc) and why `path` is empty (unreadable, unknown).
  Directories are resolved with `openat2(RESOLVE_IN_ROOT)` from
  `/proc/<pid>/root` (never out of that root, never through a magic link);
  the last component is followed when the call follows it (open without
  `O_NOFOLLOW`, chmod, chown).
  The broker never waits on a file system for it: it reads the dentry cache,
  and what that cannot answer is retried beside the pipeline within 20 ms per
  batch; a name not resolved in time, or past 1024 resolutions in a batch, is
  cleaned as text.
  When the process has exited by then (most short-lived programs), an
  absolute name is cleaned as text (`/etc/../etc//shadow` is `/etc/shadow`;
  a `..` after a symlinked directory may then be wrong) and `path` is empty
  for a relative name whose directory the stream did not show either
  (`unknown`). The last component of a relative fchownat/fchmodat2/linkat
  name is kept as named (their flags are not kept). `oldpath` resolves
  `oldname` the same way (`olddirfd`; a SYMLINK's target from the link's
  directory). Filters and the in-kernel prefix pushdown match `filename`; the
  default rules match `path` and `oldpath`. A subscription whose filter the
  kernel narrows by `filename` collects only the opens it matches, so the
  descriptors of the others come from /proc.
- A name the kernel program could not read at syscall entry (its page not yet
  in memory, as for a program's first opens right after exec: an eBPF program
  may not fault a page in) is read again at syscall exit, once the kernel has
  faulted it in to copy the name (bench/bench_names.py: 138 of 9,300 opens of
  fresh processes were empty before, none now), and the in-kernel name filter
  is applied to it there, so a subscription's `filename` narrowing holds for
  these opens too. Opens and one-name file calls put only the name's bytes in
  the ring. A name still unreadable (a bad pointer) arrives empty with
  `path_status` unreadable, never silently.
- Network `port` is in host order, `port_raw` as stored in the sockaddr
  (network order). An ATTEMPT carries the address the process passed; accept
  and recv* learn theirs at return, so only their RESULT carries the peer.
- In client dicts every event carries its event id as `event_id` (and as `id`,
  except on syscall events, where `id` is the syscall number: Capsule8's name).
- kernel_call and user_call events carry the fetch arguments the subscription
  asked for as `arguments` ({name: value}); filters name them `arg_<name>`.
- Kubernetes: `k8s_namespace`, `k8s_pod_name`, `k8s_pod_uid`,
  `k8s_container_name` and `k8s_labels` come, like `container_name`, from the
  batch's container table, on every event of a container in a pod (empty, `{}`
  for labels, elsewhere). The broker reads what the CRI runtime wrote in the
  container's OCI annotations (containerd's `io.kubernetes.cri.sandbox-*` and
  `container-name`; cri-o's `io.kubernetes.pod.*`, `io.kubernetes.container.name`
  and the JSON `io.kubernetes.cri-o.Labels`, the pod's labels being those of
  its sandbox), and takes the pod uid from the kubepods cgroup path
  (`kubepods/<qos>/pod<uid>/<id>`, `kubepods-<qos>-pod<uid>.slice`) when no
  annotation gives it. Values longer than Kubernetes allows or not printable
  ASCII are dropped, labels kept only with valid key and value syntax (at most
  64, the kubelet's own `io.kubernetes.*` left out). containerd keeps pod
  labels only in its database, so its pods show none. Filters:
  `k8s_namespace == "prod"`, `k8s_labels == "app=web"` (any label),
  `k8s_labels like "team=*"`, `not k8s_labels == "app=web"`.
"""


def _table(fields: tuple[Field, ...]) -> list[str]:
    rows = ["| field | type | meaning | source |", "|---|---|---|---|"]
    for f in fields:
        desc = f.description.replace("|", "\\|")
        rows.append(f"| `{f.name}` | {f.dtype} | {desc} | {f.source} |")
    return rows


def markdown() -> str:
    """docs/events.md: every event type with its kinds and fields."""
    out = [HEADER.rstrip(), "", "## Common fields", "", *_table(COMMON + VIRTUAL)]
    for category, payload in PAYLOAD.items():
        out += ["", f"## {category}", "", "Kinds: " + ", ".join(f"`{k}`" for k in KINDS[category]) + ".", ""]
        out += _table(payload)
    return "\n".join(out) + "\n"
