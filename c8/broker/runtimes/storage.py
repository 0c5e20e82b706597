"""containers/storage (podman, cri-o): <root>/<driver>-containers/containers.json.

Each record has ``id``, ``names``, ``image`` (image id, bare hex) and
``metadata``, a JSON string with ``image-name`` ("localhost/busybox:latest")
and ``name``. CRI-O containers live in the same store; their
userdata/config.json annotations (io.kubernetes.cri-o.*) say so.
"""

from __future__ import annotations

import glob
import json
import os

from . import Metadata
from .oci import from_annotations, read_json


def read_storage(roots: list[str], container_id: str) -> Metadata | None:
    """From the first containers.json (any graph driver) listing the id."""
    for root in roots:
        for listing in glob.glob(os.path.join(glob.escape(root), "*-containers",
                                              "containers.json")):
            records = read_json(listing)
            if not isinstance(records, list):
                continue
            for record in records:
                if isinstance(record, dict) and record.get("id") == container_id:
                    return _metadata(os.path.dirname(listing), record)
    return None


def _metadata(store: str, record: dict) -> Metadata:
    try:
        extra = json.loads(record.get("metadata") or "{}")
    except ValueError:
        extra = {}
    if not isinstance(extra, dict):
        extra = {}
    names = record.get("names") or [""]
    name = str(extra.get("name") or names[0])
    image_id = str(record.get("image") or extra.get("image-id") or "")
    image_name = str(extra.get("image-name") or "")
    config = read_json(os.path.join(store, record["id"], "userdata", "config.json"))
    annotations = (config.get("annotations") if isinstance(config, dict) else None) or {}
    if "io.kubernetes.cri-o.Name" in annotations:  # a CRI-O pod container, not podman
        cri = from_annotations("cri-o", annotations, name)
        return Metadata("cri-o", cri.name, cri.image_id or image_id,
                        cri.image_name or image_name)
    return Metadata("podman", name, image_id, image_name)
