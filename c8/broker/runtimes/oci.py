"""OCI bundles and low-level runtimes: runc, crun, containerd, annotations.

runc keeps /run/runc/<id>/state.json (the bundle's annotations are copied into
``config.labels`` as ``key=value``, plus ``bundle=<dir>``); crun keeps
/run/crun/<id>/status (JSON with ``bundle``); containerd keeps each task's
bundle at <state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json.
None of them knows a name or an image unless an orchestrator wrote
annotations: CRI (containerd), CRI-O, nerdctl, or whoever built the bundle.

Files below a root are read with c8.host.files.read_json_beneath (no symlink
followed, regular files only, capped). A bundle is a path a process chose:
its config.json is read only when owned by the uid the caller names (see
:func:`bundle_annotations`).
"""

from __future__ import annotations

import os

from c8.host import typed
from c8.host.files import read_json_beneath

from . import Metadata, k8s

NAME_KEYS = (
    "io.kubernetes.cri.container-name",
    "io.kubernetes.container.name",
    "nerdctl/name",
)
IMAGE_NAME_KEYS = (
    "io.kubernetes.cri.image-name",
    "io.kubernetes.cri-o.ImageName",
    "org.opencontainers.image.ref.name",
    "org.opencontainers.image.base.name",
)
IMAGE_ID_KEYS = (
    "io.kubernetes.cri-o.ImageRef",
    "io.kubernetes.cri.image-id",
    "org.opencontainers.image.base.digest",
)
STATE_LIMIT = 4 << 20  # bytes of a state or config file (runc's state.json is a few KiB)
MAX_NAMESPACES = 256   # containerd namespaces looked into per lookup


def from_annotations(runtime: str, annotations: object, default_name: str = "") -> Metadata:
    """Metadata from OCI annotations (first key present wins; non-strings ignored),
    with the Kubernetes identity CRI runtimes write there (``runtimes.k8s``)."""
    notes = typed.string_map(annotations)

    def first(keys: tuple[str, ...]) -> str:
        return next((notes[k] for k in keys if notes.get(k)), "")

    if runtime == "containerd" and "io.kubernetes.cri-o.Name" in notes:
        runtime = "cri-o"
    return Metadata(runtime, first(NAME_KEYS) or default_name, first(IMAGE_ID_KEYS),
                    first(IMAGE_NAME_KEYS), k8s.from_annotations(notes))


def bundle_annotations(bundle: str, owner: int | None = None) -> dict[str, str]:
    """The annotations of ``bundle``/config.json; {} when absent or unsafe.

    ``owner``: the file must belong to this uid (a bundle named on an
    untrusted command line: its config.json must be that user's own, so no
    one gets the broker to read a file they could not read). None: any owner
    (a bundle a trusted root's state names).
    """
    if not bundle.startswith("/"):
        return {}
    config = read_json_beneath(bundle, "config.json", STATE_LIMIT, owner)
    return typed.string_map(typed.mapping(config).get("annotations"))


def from_runtime_argv(argv: list[str], container_id: str, cwd: str = "",
                      owner: int | None = None) -> Metadata | None:
    """Metadata from a low-level runtime's command line while it makes the
    container (``runc|crun [--root R] run|create [--bundle B] <id>``): the
    bundle's annotations, the runtime's own name. The bundle defaults to the
    runtime's working directory ``cwd``. None when the process is no
    runc/crun or does not name this container: state files come later (runc
    writes state.json once the init is set up) and go with ``runc run``'s
    container, so this is the one early, sure source. ``owner`` as in
    :func:`bundle_annotations`."""
    prog = os.path.basename(argv[0]) if argv else ""
    if prog not in ("runc", "crun") or container_id not in argv[1:]:
        return None
    bundle = ""
    for i, arg in enumerate(argv[1:], 1):
        if arg in ("--bundle", "-b") and i + 1 < len(argv):
            bundle = argv[i + 1]
        elif arg.startswith("--bundle="):
            bundle = arg.split("=", 1)[1]
    bundle = bundle or cwd
    return from_annotations(prog, bundle_annotations(bundle, owner) if bundle else {}, container_id)


def read_runc(roots: list[str], container_id: str) -> Metadata | None:
    """runc's state.json; annotations from its labels (or the bundle)."""
    for root in roots:
        state = read_json_beneath(root, f"{container_id}/state.json", STATE_LIMIT)
        if not isinstance(state, dict):
            continue
        labels = typed.texts(state, "config", "labels")
        annotations = dict(label.split("=", 1) for label in labels if "=" in label)
        bundle = annotations.pop("bundle", "")
        if bundle and not annotations:
            # the state's owner (root, as its root is trusted) wrote this path
            annotations = bundle_annotations(bundle)
        return from_annotations("runc", annotations, container_id)
    return None


def read_crun(roots: list[str], container_id: str) -> Metadata | None:
    """crun's status file names the bundle; its config.json has the annotations."""
    for root in roots:
        status = read_json_beneath(root, f"{container_id}/status", STATE_LIMIT)
        if isinstance(status, dict):
            return from_annotations("crun", bundle_annotations(typed.text(status, "bundle")),
                                    container_id)
    return None


def read_containerd(roots: list[str], container_id: str) -> Metadata | None:
    """The task bundle of any namespace (CRI puts names and images in annotations)."""
    for root in roots:
        try:
            versions = sorted(d for d in os.listdir(root)
                              if d.startswith("io.containerd.runtime.v") and d.endswith(".task"))
        except OSError:
            continue
        for version in versions:
            try:
                namespaces = sorted(os.listdir(os.path.join(root, version)))[:MAX_NAMESPACES]
            except OSError:
                continue
            for ns in namespaces:
                config = read_json_beneath(root, f"{version}/{ns}/{container_id}/config.json",
                                           STATE_LIMIT)
                if isinstance(config, dict):
                    return from_annotations("containerd", config.get("annotations"), container_id)
    return None
