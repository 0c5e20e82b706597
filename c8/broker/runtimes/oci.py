"""OCI bundles and low-level runtimes: runc, crun, containerd, annotations.

runc keeps /run/runc/<id>/state.json (the bundle's annotations are copied into
``config.labels`` as ``key=value``, plus ``bundle=<dir>``); crun keeps
/run/crun/<id>/status (JSON with ``bundle``); containerd keeps each task's
bundle at <state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json.
None of them knows a name or an image unless an orchestrator wrote
annotations: CRI (containerd), CRI-O, nerdctl, or whoever built the bundle.
"""

from __future__ import annotations

import glob
import json
import os

from . import Metadata

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


def read_json(path: str) -> object | None:
    """Parsed JSON of ``path``, or None when missing, unreadable or malformed."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def from_annotations(runtime: str, annotations: dict, default_name: str = "") -> Metadata:
    """Metadata from OCI annotations (first key present wins)."""

    def first(keys: tuple[str, ...]) -> str:
        for key in keys:
            value = annotations.get(key)
            if isinstance(value, str) and value:
                return value
        return ""

    if runtime == "containerd" and "io.kubernetes.cri-o.Name" in annotations:
        runtime = "cri-o"
    return Metadata(runtime, first(NAME_KEYS) or default_name, first(IMAGE_ID_KEYS),
                    first(IMAGE_NAME_KEYS))


def bundle_annotations(bundle: str) -> dict:
    config = read_json(os.path.join(bundle, "config.json"))
    if isinstance(config, dict) and isinstance(config.get("annotations"), dict):
        return config["annotations"]
    return {}


def read_cmdline(pid: int, proc: str = "/proc") -> list[str]:
    """argv of a process ([] when gone or unreadable)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def from_runtime_argv(argv: list[str], container_id: str, cwd_link: str = "") -> Metadata | None:
    """Metadata from a low-level runtime's command line while it makes the
    container (``runc|crun [--root R] run|create [--bundle B] <id>``): the
    bundle's annotations, the runtime's own name. The bundle defaults to the
    runtime's working directory (``cwd_link``, /proc/<pid>/cwd). None when
    the process is no runc/crun or does not name this container: state files
    come later (runc writes state.json once the init is set up) and go with
    ``runc run``'s container, so this is the one early, sure source."""
    prog = os.path.basename(argv[0]) if argv else ""
    if prog not in ("runc", "crun") or container_id not in argv[1:]:
        return None
    bundle = ""
    for i, arg in enumerate(argv[1:], 1):
        if arg in ("--bundle", "-b") and i + 1 < len(argv):
            bundle = argv[i + 1]
        elif arg.startswith("--bundle="):
            bundle = arg.split("=", 1)[1]
    if not bundle and cwd_link:
        try:
            bundle = os.readlink(cwd_link)
        except OSError:
            return None
    return from_annotations(prog, bundle_annotations(bundle) if bundle else {}, container_id)


def read_runc(roots: list[str], container_id: str) -> Metadata | None:
    """runc's state.json; annotations from its labels (or the bundle)."""
    for root in roots:
        state = read_json(os.path.join(root, container_id, "state.json"))
        if not isinstance(state, dict):
            continue
        labels = (state.get("config") or {}).get("labels") or []
        annotations = dict(label.split("=", 1) for label in labels if "=" in label)
        bundle = annotations.pop("bundle", "")
        if bundle and not annotations:
            annotations = bundle_annotations(bundle)
        return from_annotations("runc", annotations, container_id)
    return None


def read_crun(roots: list[str], container_id: str) -> Metadata | None:
    """crun's status file names the bundle; its config.json has the annotations."""
    for root in roots:
        status = read_json(os.path.join(root, container_id, "status"))
        if isinstance(status, dict):
            return from_annotations("crun", bundle_annotations(status.get("bundle", "")),
                                    container_id)
    return None


def read_containerd(roots: list[str], container_id: str) -> Metadata | None:
    """The task bundle of any namespace (CRI puts names and images in annotations)."""
    for root in roots:
        for bundle in glob.glob(os.path.join(glob.escape(root), "io.containerd.runtime.v*.task",
                                             "*", container_id)):
            config = read_json(os.path.join(bundle, "config.json"))
            if isinstance(config, dict):
                return from_annotations("containerd", config.get("annotations") or {},
                                        container_id)
    return None
