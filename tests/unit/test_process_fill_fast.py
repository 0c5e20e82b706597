"""ProcessTable.fill's one-process fast path gives what the general path gives."""

import os

import numpy as np

from c8 import schema
from c8.broker.processes import CREDENTIALS, ProcessTable


def _batch(pids, uid_known):
    b = schema.empty("syscall", len(pids))
    b["process_pid"] = pids
    b["uid"][uid_known] = 12345
    return b


def _reference(table, batch):
    """fill applied event by event (each a one-row batch: no fast path question)."""
    out = batch.copy()
    for i in range(len(out)):
        row = out[i:i + 1]
        table.fill(row)
    return out


def test_one_process_batch_matches_per_event_fill():
    t = ProcessTable(threaded=False)
    me = os.getpid()
    t.get(me)
    t.collect()  # the miss's lookup answered
    for known in ([], [0, 2], [0, 1, 2, 3]):  # none, some, all credentials already set
        b = _batch([me] * 4, known)
        ref = _reference(t, b)
        t.fill(b)
        for name in ("process_id", *CREDENTIALS):
            assert b[name].tolist() == ref[name].tolist(), name
        assert b["uid"][known].tolist() == [12345] * len(known)
        assert b["process_id"][0] != b""


def test_mixed_pids_match_per_event_fill():
    t = ProcessTable(threaded=False)
    t.get(os.getpid())
    t.collect()
    b = _batch([os.getpid(), 1, os.getpid(), 999_999_999], [1])
    ref = _reference(t, b)
    t.fill(b)
    for name in ("process_id", *CREDENTIALS):
        assert b[name].tolist() == ref[name].tolist(), name
    assert np.all(b["process_id"][3:] == b"")
