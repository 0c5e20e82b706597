"""Event schema: the field table, per-category numpy dtypes, the wire version.

Imported by every process package; imports none of them.
"""

from c8.schema.fields import (
    ARGUMENT_PREFIX,
    CATEGORIES,
    COMMON,
    KINDS,
    PAYLOAD,
    VIRTUAL,
    WIRE_VERSION,
    Field,
    dtype,
    empty,
    field_types,
    fields,
    kind_code,
    kind_name,
)

__all__ = [
    "ARGUMENT_PREFIX", "CATEGORIES", "COMMON", "KINDS", "PAYLOAD", "VIRTUAL", "WIRE_VERSION",
    "Field", "dtype", "empty", "field_types", "fields", "kind_code", "kind_name",
]
