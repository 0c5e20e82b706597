"""The identity stage on one synthetic window: every event takes the process and
container identity that held at its own time, whatever happened later in the
same window (the tables are the real ones, reading this test's own /proc)."""

from __future__ import annotations

import os
import secrets

import numpy as np

from c8 import schema
from c8.broker.containers import ContainerTable
from c8.broker.identity import Identity
from c8.broker.processes import ProcessTable
from c8.broker.sequence import Sequence


def batch(category: str, times: list[int], pid: int, **cols) -> np.ndarray:
    b = schema.empty(category, len(times))
    b["sensor_monotime_nanos"] = times
    b["process_pid"] = pid
    b["process_tid"] = pid
    for name, values in cols.items():
        b[name] = values
    return b


def knowing(pid: int) -> ProcessTable:
    """A process table that has looked ``pid`` up (a miss is answered at the next collect)."""
    table = ProcessTable(threaded=False)
    table.get(pid)
    table.collect()
    return table


def kinds(category: str, *names: str) -> list[int]:
    return [schema.kind_code(category, n) for n in names]


def test_exec_later_in_the_window_does_not_rename_earlier_events():
    pid = os.getpid()
    ident = Identity(knowing(pid), ContainerTable(discover_roots=False))
    window = {
        "process": batch("process", [100, 300], pid, kind=kinds("process", "EXEC", "EXEC"),
                         exec_filename=[b"/bin/bash", b"/bin/true"],
                         exec_command_line=[b"bash -c x", b"/bin/true"]),
        "file": batch("file", [50, 200, 400], pid, kind=kinds("file", "OPEN", "OPEN", "OPEN"),
                      filename=[b"/a", b"/tmp/x", b"/b"]),
    }
    ident.stamp(window, follow_attaches=True)
    Sequence().number(window)
    files = window["file"]
    before_any = files["process_exec_filename"][0]  # as the table knew this process before
    assert before_any not in (b"/bin/bash", b"/bin/true")
    assert files["process_exec_filename"][1:].tolist() == [b"/bin/bash", b"/bin/true"]
    assert window["process"]["process_exec_filename"].tolist() == [b"/bin/bash", b"/bin/true"]
    assert len(set(files["process_id"].tolist())) == 1  # one process throughout
    seq = {t: s for b in window.values() for t, s in zip(b["sensor_monotime_nanos"].tolist(),
                                                          b["sensor_sequence_number"].tolist(), strict=True)}
    assert [seq[t] for t in (50, 100, 200, 300, 400)] == [1, 2, 3, 4, 5]


def test_a_move_into_a_container_applies_from_its_time_on():
    pid = os.getpid()
    cid = secrets.token_hex(32)
    ct = ContainerTable(discover_roots=False)
    ident = Identity(ProcessTable(), ct)
    ct.queue_attach(250, pid, f"/{cid}")
    window = {
        "process": batch("process", [300], pid, kind=kinds("process", "EXEC"),
                         exec_filename=[b"/bin/cat"], exec_command_line=[b"cat"]),
        "file": batch("file", [100, 200, 400], pid, kind=kinds("file", "OPEN", "OPEN", "OPEN"),
                      filename=[b"/before", b"/cgroup.procs", b"/after"]),
    }
    ident.stamp(window, follow_attaches=True)
    idx = window["file"]["container"].tolist()
    assert idx[0] == idx[1] == 0  # on the host until the move at 250
    assert idx[2] != 0 and ct.row(idx[2])[0] == cid
    assert window["process"]["container"].tolist() == [idx[2]]
