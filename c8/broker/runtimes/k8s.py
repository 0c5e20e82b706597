"""Kubernetes identity of a container: pod namespace, name and uid, the
container's name in its pod, and the pod's labels.

Kubernetes runs containers through a CRI runtime, and each leaves the pod's
identity where the broker already looks (the OCI bundle's annotations, which
runc copies into its state.json, containerd keeps beside its task, cri-o in
its storage's userdata/config.json):

- containerd's CRI plugin: ``io.kubernetes.cri.sandbox-namespace``,
  ``sandbox-name``, ``sandbox-uid``, ``container-name``, ``sandbox-id`` and
  ``container-type`` (``sandbox`` for the pod's pause container). It writes
  no labels there: containerd keeps them in its metadata database only.
- cri-o: ``io.kubernetes.pod.namespace``, ``io.kubernetes.pod.name``,
  ``io.kubernetes.pod.uid``, ``io.kubernetes.container.name``,
  ``io.kubernetes.cri-o.SandboxID`` and ``io.kubernetes.cri-o.Labels`` (JSON:
  the kubelet's labels; the sandbox's hold the pod's labels, so a container's
  labels come from its sandbox when it names one).
- the kubelet's cgroup: ``kubepods/<qos>/pod<uid>/<id>`` (cgroupfs driver) or
  ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/
  <runtime>-<id>.scope`` (systemd driver, the uid's dashes as underscores):
  the pod uid alone, when no annotation gives it.

Every value is hostile: annotations must be strings, Labels a JSON map of
strings; names longer than Kubernetes allows or holding anything but
printable ASCII are dropped, and labels are kept only when key and value are
valid Kubernetes label syntax, at most ``MAX_LABELS`` of them. The kubelet's
own ``io.kubernetes.*`` labels are not the pod's labels and are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from c8.host import typed
from c8.host.files import parse_json

NAMESPACE_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")
POD_NAME_KEYS = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
POD_UID_KEYS = ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid")
CONTAINER_NAME_KEYS = ("io.kubernetes.cri.container-name", "io.kubernetes.container.name")
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")
CRIO_LABELS = "io.kubernetes.cri-o.Labels"
KUBELET_PREFIX = "io.kubernetes."  # the kubelet's own labels (pod.name, container.name, ...)

MAX_LABELS = 64  # labels kept per pod (sorted by key: the same ones every time)
# Kubernetes' own bounds: a DNS label (63), a DNS subdomain (253), a uid (36)
MAX_NAMESPACE, MAX_POD_NAME, MAX_UID, MAX_CONTAINER_NAME = 63, 253, 36, 63
MAX_LABEL_KEY, MAX_LABEL_VALUE = 253 + 1 + 63, 63  # [prefix/]name, value

_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"(?:{_LABEL_NAME})?")
_SANDBOX_ID = re.compile(r"[0-9a-f]{64}")  # all patterns: fullmatch (no $: it takes a final newline)
# pod<uid> (cgroupfs) or ...-pod<uid with _ for ->.slice (systemd); static pods: 32 hex
_POD = re.compile(r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
                  r"|[0-9a-f]{32})(?:\.slice)?\Z")


@dataclass(frozen=True)
class K8s:
    """A container's Kubernetes identity; empty strings (and no labels) when unknown.

    ``labels`` is sorted (key, value) pairs; ``sandbox_id`` names the pod's
    sandbox container (where cri-o keeps the pod's labels), not shown."""

    namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    container_name: str = ""
    labels: tuple[tuple[str, str], ...] = field(default=())
    sandbox_id: str = ""

    def __bool__(self) -> bool:
        return bool(self.namespace or self.pod_name or self.pod_uid or self.container_name or self.labels)


def _name(value: str, limit: int) -> str:
    return value if len(value) <= limit and _PRINTABLE.fullmatch(value) else ""


def labels_of(value: object) -> tuple[tuple[str, str], ...]:
    """The pod labels of a Labels annotation (JSON text, or a parsed map): valid
    Kubernetes keys and values only, the kubelet's io.kubernetes.* dropped,
    at most MAX_LABELS, sorted by key."""
    if isinstance(value, str):
        value = parse_json(value.encode())
    found = sorted((k, v) for k, v in typed.string_map(value).items()
                   if not k.startswith(KUBELET_PREFIX)
                   and len(k) <= MAX_LABEL_KEY and len(v) <= MAX_LABEL_VALUE
                   and _LABEL_KEY.fullmatch(k) and _LABEL_VALUE.fullmatch(v))
    return tuple(found[:MAX_LABELS])


def from_annotations(annotations: object) -> K8s | None:
    """The Kubernetes identity OCI annotations give (containerd's CRI or
    cri-o's keys, then the kubelet's labels inside cri-o's Labels); None when
    they name no pod."""
    notes = typed.string_map(annotations)
    inner = typed.string_map(parse_json(notes[CRIO_LABELS].encode())) if CRIO_LABELS in notes else {}

    def first(keys: tuple[str, ...], limit: int) -> str:
        for source in (notes, inner):
            for key in keys:
                value = _name(source.get(key, ""), limit)
                if value:
                    return value
        return ""

    sandbox = next((notes[k] for k in SANDBOX_ID_KEYS if _SANDBOX_ID.fullmatch(notes.get(k, ""))), "")
    found = K8s(first(NAMESPACE_KEYS, MAX_NAMESPACE), first(POD_NAME_KEYS, MAX_POD_NAME),
                pod_uid(first(POD_UID_KEYS, MAX_UID)), first(CONTAINER_NAME_KEYS, MAX_CONTAINER_NAME),
                labels_of(inner), sandbox)
    return found if found or sandbox else None


def pod_uid(value: str) -> str:
    """``value`` when it has the shape of a pod uid (36-character uuid, or 32 hex for
    a static pod), lower-cased; else ""."""
    value = value.lower()
    return value if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}",
                                 value) else ""


def pod_uid_of_cgroup(parts: list[str]) -> str:
    """The pod uid a kubepods cgroup path names (its components, root first), else ""."""
    if not any(p.startswith("kubepods") for p in parts):
        return ""
    for part in reversed(parts):
        m = _POD.search(part)
        if m:
            return pod_uid(m.group(1).replace("_", "-"))
    return ""


def merge(own: K8s | None, pod_uid_from_path: str = "", sandbox: K8s | None = None) -> K8s | None:
    """One identity from a container's annotations, its cgroup's pod uid and its
    sandbox's annotations: the container's own values first; labels from the
    sandbox when it has none of its own."""
    own = own or K8s()
    sandbox = sandbox or K8s()
    merged = K8s(own.namespace or sandbox.namespace, own.pod_name or sandbox.pod_name,
                 own.pod_uid or pod_uid_from_path or sandbox.pod_uid, own.container_name,
                 own.labels or sandbox.labels, own.sandbox_id)
    return merged if merged else None
