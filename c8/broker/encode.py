"""Release stage 5, encoding: one subscription's batches of a window as one message.

Columnar msgpack (``c8.protocol.batch.columns``: raw little-endian buffers per
column, string columns cut to the batch's longest value), with the container
rows of the indices the batch holds, the lineage rows its processes reach and,
for probes, the argument names.
"""

from __future__ import annotations

import msgpack
import numpy as np

from c8 import schema
from c8.protocol import batch as wire


def encode(sub_id: str, sensor_id: str, batches: list[tuple[str, np.ndarray]], containers,
           lineage: dict | None = None) -> bytes:
    """The ``batches`` message of a subscription (docs/INTERNALS.md, "Broker -> client").

    ``lineage`` maps a category to its window batch's process table
    (c8.protocol.batch.Tables.processes), sent with that category's batch as
    ``processes``: the rows its events' lineage reaches.
    """
    out = []
    for category, arr in batches:
        extra = {}
        if category in ("kernel_call", "user_call"):
            extra["arguments"] = [n[len(schema.ARGUMENT_PREFIX):] for n in arr.dtype.names
                                  if n.startswith(schema.ARGUMENT_PREFIX)]
        idx = np.unique(arr["container"]) if "container" in arr.dtype.names else []
        table = containers.table(idx) if len(idx) else {}
        if lineage and category in lineage and len(arr):
            # the window batch's table whole: a subscriber's part is most often the batch,
            # and sorting 16-byte ids per part cost more than the rows it would save
            extra["processes"] = lineage[category]
        out.append(wire.columns(category, arr, containers={int(k): list(v) for k, v in table.items()}, **extra))
    return msgpack.packb({"type": "batches", "subscription": sub_id, "sensor_id": sensor_id,
                          "batches": out}, use_bin_type=True)
