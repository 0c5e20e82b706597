"""What the filter language needs to know about fields beyond the schema table.

Fields fall in four groups: columns of the category's dtype (numeric or
fixed-width byte strings), the container fields (looked up through the
``container`` column in the batch's container table), ``type`` (the batch's
category) and ``kind`` (a column holding a subtype code, compared by name).
"""

from __future__ import annotations

import numpy as np

from c8 import schema

# Position of each container field in a container-table row
# (container_id, container_name, image_id, image_name, runtime, k8s_namespace,
#  k8s_pod_name, k8s_pod_uid, k8s_container_name, k8s_labels).
CONTAINER_FIELDS: dict[str, int] = {
    "container_id": 0, "container_name": 1, "image_id": 2, "image_name": 3,
    "k8s_namespace": 5, "k8s_pod_name": 6, "k8s_pod_uid": 7, "k8s_container_name": 8,
    "k8s_labels": 9,
}
# A map field: filters test each of its entries as the text ``key=value`` (see
# c8.expr.evaluate.labels_match).
LABEL_FIELDS = frozenset({"k8s_labels"})

# Lineage fields: ``parent.<f>`` tests the parent, ``ancestor.<f>`` is true when any
# ancestor (up to 16, parent first) matches; looked up in the batch's lineage table
# (c8.protocol.batch.Tables.processes: process_id -> [pid, exec_filename,
# command_line, parent process_id]).
LINEAGE_FIELDS: dict[str, int] = {"pid": 0, "exec_filename": 1, "command_line": 2, "process_id": -1}
LINEAGE_RELATIONS = ("parent", "ancestor")


def lineage_field(name: str) -> tuple[str, str] | None:
    """(relation, field) of ``parent.pid`` / ``ancestor.exec_filename``; None otherwise."""
    rel, dot, field = name.partition(".")
    if dot and rel in LINEAGE_RELATIONS and field in LINEAGE_FIELDS:
        return rel, field
    return None


# Virtual fields that exist only client-side, so no filter can test them.
CLIENT_ONLY = frozenset({"id", "sensor_id", "process_lineage"})


def all_field_types() -> dict[str, str]:
    """name -> type code over every category (columns win over virtual fields)."""
    types: dict[str, str] = {f.name: f.dtype for f in schema.VIRTUAL}
    for category in schema.CATEGORIES:
        types.update({f.name: f.dtype for f in schema.COMMON + schema.PAYLOAD[category]})
    return types


def is_string(code: str) -> bool:
    return code.startswith("S")


def string_width(code: str) -> int | None:
    """Width of an ``S<n>`` type code, None if unknown."""
    try:
        return int(code[1:])
    except ValueError:
        return None


def int_range(code: str) -> tuple[int, int] | None:
    """Inclusive value range of an integer type code (``u4``, ``i8``), None otherwise."""
    try:
        dt = np.dtype(code)
    except TypeError:
        return None
    if dt.kind not in "iu":
        return None
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def constant_compare(op: str, value: int, lo: int, hi: int) -> bool | None:
    """The result of ``x op value`` for every x in [lo, hi] when it is the same for all.

    None when value lies within the range (the comparison depends on x). Used so
    that an out-of-range literal never wraps around in a narrower column.
    """
    if lo <= value <= hi:
        return None
    below = value < lo  # every x is greater than value
    return {
        "==": False, "!=": True,
        "<": not below, "<=": not below,
        ">": below, ">=": below,
    }[op]
