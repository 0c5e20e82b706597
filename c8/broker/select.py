"""Release stage 4, selection: the events of a window one subscription wants.

Numpy masks only: the spec's kinds, the compiled filter expression and the
container filter, ANDed; a part is copied only when the mask drops something.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from c8 import schema
from c8.schema import rows


def select(sub, category: str, probe: str, batch: np.ndarray, table: dict) -> Iterator[np.ndarray]:
    """The parts of ``batch`` (one category, or one probe's events) that ``sub`` wants.

    ``table`` is the batch's container table (index -> row), shared by every
    subscription's container predicates.
    """
    if category in ("lost", "limiter"):
        yield batch  # every subscriber hears of losses and the limiter
        return
    for cf in sub.categories.get(category, ()):
        if probe and (cf.probe is None or cf.probe["definition"].source != probe):
            continue
        mask = None
        if cf.kinds:
            codes = [schema.kind_code(category, k) for k in cf.kinds]
            mask = np.isin(batch["kind"], codes)
        if cf.mask is not None:
            m = cf.mask(batch, table)
            mask = m if mask is None else mask & m
        cm = sub.container_mask(batch, table)
        if cm is not None:
            mask = cm if mask is None else mask & cm
        part = batch if mask is None or mask.all() else rows.take(batch, mask)
        if len(part):
            yield part
