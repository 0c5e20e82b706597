"""containers/storage (podman, cri-o): <root>/<driver>-containers/containers.json.

Each record has ``id``, ``names``, ``image`` (image id, bare hex) and
``metadata``, a JSON string with ``image-name`` ("localhost/busybox:latest")
and ``name``. CRI-O containers live in the same store; their
userdata/config.json annotations (io.kubernetes.cri-o.*) say so.
"""

from __future__ import annotations

import os

from c8.host import typed
from c8.host.files import parse_json, read_json_beneath

from . import Metadata, k8s
from .oci import from_annotations

LISTING_LIMIT = 64 << 20  # containers.json of a store with thousands of containers
MAX_DRIVERS = 16


def read_storage(roots: list[str], container_id: str) -> Metadata | None:
    """From the first containers.json (any graph driver) listing the id."""
    for root in roots:
        try:
            stores = sorted(d for d in os.listdir(root) if d.endswith("-containers"))[:MAX_DRIVERS]
        except OSError:
            continue
        for store in stores:
            records = read_json_beneath(root, f"{store}/containers.json", LISTING_LIMIT)
            for record in typed.records(records):
                if record.get("id") == container_id:
                    return _metadata(root, store, container_id, record)
    return None


def _metadata(root: str, store: str, container_id: str, record: dict) -> Metadata:
    extra = parse_json(typed.text(record, "metadata", default="{}").encode())
    names = typed.texts(record, "names") or [""]
    name = typed.text(extra, "name") or names[0]
    image_id = typed.text(record, "image") or typed.text(extra, "image-id")
    image_name = typed.text(extra, "image-name")
    config = read_json_beneath(root, f"{store}/{container_id}/userdata/config.json", LISTING_LIMIT)
    annotations = typed.string_map(typed.mapping(config).get("annotations"))
    if "io.kubernetes.cri-o.Name" in annotations:  # a CRI-O pod container, not podman
        cri = from_annotations("cri-o", annotations, name)
        return Metadata("cri-o", cri.name, cri.image_id or image_id,
                        cri.image_name or image_name, cri.k8s)
    return Metadata("podman", name, image_id, image_name, k8s.from_annotations(annotations))
